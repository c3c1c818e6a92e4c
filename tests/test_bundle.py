"""The Kaggle kernel bundle: metadata rules (each one), the kaggle CLI's own push checks, the deterministic
wheel, and that the committed kaggle_kernel/ is what `python -m kagglekd bundle` generates today."""

import copy
import importlib.util
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from kagglekd import bundle, gpus
from kagglekd.__main__ import main
from kagglekd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "kaggle_kernel"
PLACEHOLDER_OWNER = "your-kaggle-username"
REGENERATE = f"python -m kagglekd bundle --owner {PLACEHOLDER_OWNER} --out kaggle_kernel"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "kernel"
    bundle.write_bundle(out, owner=PLACEHOLDER_OWNER)
    return out


@pytest.fixture
def good(built):
    meta = json.loads((built / bundle.METADATA_FILE).read_text())
    return meta, built


def problems_with(good, **changes):
    meta, folder = good
    meta = copy.deepcopy(meta)
    for key, value in changes.items():
        if value is KeyError:
            meta.pop(key, None)
        else:
            meta[key] = value
    return bundle.validate_metadata(meta, folder)


def test_generated_metadata_is_valid_and_explicit(good):
    meta, folder = good
    assert bundle.validate_metadata(meta, folder) == []
    assert meta["id"] == f"{PLACEHOLDER_OWNER}/kagglekd-smollm2-360m-to-135m-t4x2"
    assert bundle.slugify(meta["title"]) == meta["id"].split("/")[1]
    assert meta["language"] == "python" and meta["kernel_type"] == "notebook"
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    for key in bundle.BOOLEAN_KEYS:
        assert isinstance(meta[key], bool)
    assert meta["is_private"] is True and meta["enable_internet"] is True  # hub models in this preset
    assert (folder / meta["code_file"]).is_file()


def test_generated_folder_passes_the_kaggle_clis_own_push_checks(built):
    assert bundle.kaggle_cli_problems(built) == []


def test_kaggle_cli_catches_what_validate_metadata_catches(tmp_path, good):
    meta, folder = good
    for key, value in [("id", "me/abc"), ("language", "julia"), ("id", "me/kagglekd-x/3")]:
        broken = tmp_path / f"{key}-{len(str(value))}"
        broken.mkdir()
        (broken / meta["code_file"]).write_text((folder / meta["code_file"]).read_text())
        (broken / bundle.METADATA_FILE).write_text(json.dumps({**meta, key: value}))
        assert bundle.kaggle_cli_problems(broken), (key, value)
        assert bundle.validate_metadata({**meta, key: value}, broken), (key, value)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"id": KeyError}, "id (owner/slug) or id_no"),
        ({"id": "me/kagglekd-run/2"}, "no version part"),
        ({"id": "me/abcd", "title": "abcd five"}, "at least five characters"),
        ({"id": "me/Bad_Slug", "title": "bad slug"}, "lowercase"),
        ({"id": "/kagglekd-run"}, "owner/slug"),
        ({"title": "abc"}, "title 'abc' must be at least five"),
        ({"title": "Something Else Entirely"}, "slugifies to"),
        ({"code_file": KeyError}, "code_file must name"),
        ({"code_file": "missing.ipynb"}, "does not exist"),
        ({"language": "julia"}, "language 'julia'"),
        ({"kernel_type": "app"}, "kernel_type 'app'"),
        ({"is_private": KeyError}, "is_private must be written explicitly"),
        ({"enable_internet": KeyError}, "enable_internet must be written explicitly"),
        ({"enable_gpu": "yes"}, "enable_gpu = 'yes' must be true or false"),
        ({"enable_tpu": True}, "cannot both be true"),
        ({"machine_shape": KeyError}, "landed on P100"),
        ({"machine_shape": "NvidiaTeslaP100"}, "retired"),
        ({"machine_shape": "TpuV38"}, "retired"),
        ({"machine_shape": "NvidiaTeslaT4x2"}, "not an accelerator the Kaggle CLI documents"),
        ({"machine_shape": "nvidiateslat4"}, "did you mean 'NvidiaTeslaT4'"),
        ({"machine_shape": "GPU T4 x2"}, "NvidiaTeslaT4, NvidiaL4X1"),
        ({"machine_shape": "TpuV5E8"}, "a TPU: the kit trains on GPUs"),
        ({"machine_shape": "NvidiaTeslaT4Highmem"}, "admin-only"),
        ({"machine_shape": ""}, "must be one of NvidiaTeslaT4"),
        ({"dataset_sources": ["noslash"]}, "dataset_sources"),
        ({"dataset_sources": ["a/b/c/d"]}, "dataset_sources"),
        ({"kernel_sources": ["me/abc"]}, "kernel_sources"),
        ({"model_sources": ["o/m/pytorch/v/x"]}, "integer version"),
        ({"model_sources": ["o/m/pytorch/1"]}, "model_sources"),
        ({"competition_sources": ["a/b"]}, "competition slug"),
        ({"docker_image_pinning_type": "newest"}, "docker_image_pinning_type"),
        ({"dataset_sources": "me/data"}, "must be a list"),
        ({"enable_gpus": True}, "unknown key 'enable_gpus'"),
    ],
)
def test_each_rule(good, changes, fragment):
    problems = problems_with(good, **changes)
    assert any(fragment in p for p in problems), problems


def test_accepted_forms(good):
    assert problems_with(good, enable_internet="false", is_private="True") == []
    assert (
        problems_with(
            good,
            dataset_sources=["me/wheels", "me/wheels/3"],
            kernel_sources=["me/kagglekd-run/7"],
            model_sources=["qwen/qwen3/transformers/0.6b/1"],
            competition_sources=["titanic"],
            docker_image_pinning_type="original",
        )
        == []
    )


def test_notebook_must_be_valid_json(good, tmp_path):
    meta, folder = good
    (tmp_path / meta["code_file"]).write_text("{not json")
    assert any("not valid notebook JSON" in p for p in bundle.validate_metadata(meta, tmp_path))


NON_ASCII_TITLES = {  # title -> the slug python-slugify (what the kaggle CLI checks titles with) gives it
    "KD: SmolLM2 → 135M (T4×2)": "kd-smollm2-135m-t4x2",
    "Émile's 1,000 steps": "emile-s-1000-steps",
    "Дистилляция SmolLM": "distilliatsiia-smollm",
    "知识蒸馏 SmolLM": "zhi-shi-zheng-liu-smollm",
    "a ½ b distilled": "a-1-2-b-distilled",
}


def test_slugs_are_python_slugifys_and_pass_the_kaggle_clis_title_check(tmp_path):
    from slugify import slugify  # python-slugify, the package the kaggle CLI imports

    for index, (title, expected) in enumerate(NON_ASCII_TITLES.items()):
        assert slugify(title) == expected, title  # the library itself, pinned: a changed transliteration shows here
        out = bundle.write_bundle(tmp_path / f"k{index}", owner="me", title=title, config="tiny-cpu")
        meta = json.loads((out / bundle.METADATA_FILE).read_text(encoding="utf-8"))
        assert meta["id"] == f"me/{expected}" and meta["title"] == title
        assert bundle.kaggle_cli_problems(out) == [], title  # the CLI warns when slugify(title) != the id's slug


def test_wheel_is_deterministic_and_complete():
    first, second = bundle.build_wheel(), bundle.build_wheel()
    assert first == second
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        names = archive.namelist()
        assert names == sorted(n for n in names if not n.startswith("kagglekd-")) + [
            n for n in names if n.startswith("kagglekd-")
        ]
        assert {i.date_time for i in archive.infolist()} == {bundle.ZIP_TIME}
        record = archive.read(f"kagglekd-{bundle.kagglekd.__version__}.dist-info/RECORD").decode()
    assert "kagglekd/__init__.py" in names and "kagglekd/presets/tiny-cpu.json" in names
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
    assert "kagglekd/bundle.py,sha256=" in record


def test_wheel_carries_every_module_of_every_package_setuptools_finds():
    from setuptools import find_packages

    packages = find_packages(str(REPO), include=["kagglekd*"])
    assert "kagglekd.diagnose" in packages  # a subpackage: the wheel must not stop at the top level
    modules = {
        path.relative_to(REPO).as_posix()
        for package in packages
        for path in (REPO / package.replace(".", "/")).glob("*.py")
    }
    names = set(bundle.wheel_contents(bundle.build_wheel()))
    assert sorted(modules - names) == []


def test_wheel_installs_offline_with_pip(tmp_path):
    wheel = tmp_path / bundle.wheel_name()
    wheel.write_bytes(bundle.build_wheel())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
            str(tmp_path / "site"),
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "kagglekd" / "trainer.py").is_file()
    assert (tmp_path / "site" / "kagglekd" / "presets" / "smollm2-360m-to-135m-t4x2.json").is_file()


def visible_cells(notebook: dict) -> list[dict]:
    """The cells whose input a reader sees: Kaggle's viewer hides `_kg_hide-input`, JupyterLab collapses
    `jupyter.source_hidden`; a cell hidden in only one of them is visible in the other."""
    return [
        cell
        for cell in notebook["cells"]
        if not (cell["metadata"].get("_kg_hide-input") and cell["metadata"].get("jupyter", {}).get("source_hidden"))
    ]


def test_notebook_reads_from_the_introduction(built):
    """What a reader sees first is the introduction; the kit's base64 is in a hidden cell after it."""
    meta = json.loads((built / bundle.METADATA_FILE).read_text())
    notebook = json.loads((built / meta["code_file"]).read_text())
    visible = visible_cells(notebook)
    assert visible[0]["cell_type"] == "markdown" and visible[0]["source"].startswith(f"# {meta['title']}\n")
    assert not any("KIT_B64" in cell["source"] for cell in visible)
    install = [cell for cell in notebook["cells"] if "KIT_B64" in cell["source"]]
    assert len(install) == 1 and notebook["cells"].index(install[0]) == 1  # right after the introduction
    assert "next cell" in visible[0]["source"] and "previous cell" not in visible[0]["source"]
    joined = "\n".join(cell["source"] for cell in notebook["cells"])
    assert "Next: `0" not in joined, "a stage-to-stage 'Next: 0x_....ipynb' link in the one-file bundle"
    markdown = "\n".join(cell["source"] for cell in notebook["cells"] if cell["cell_type"] == "markdown")
    headings = re.findall(r"^(#+) (.*)$", markdown, re.M)
    assert headings[0] == ("#", meta["title"]) and [h for h in headings if h[0] == "#"] == headings[:1]
    stages = [text for level, text in headings if level == "##"]
    assert stages[:4] == ["00 · Setup", "01 · Diagnostics", "02 · Train", "03 · Evaluate"]
    assert notebook["cells"][-1]["source"].startswith("what_next(")  # the last cell says what to do next


def test_notebook_shape(built):
    meta = json.loads((built / bundle.METADATA_FILE).read_text())
    notebook = json.loads((built / meta["code_file"]).read_text())
    cells = notebook["cells"]
    install = cells[1]
    assert "KIT_B64" in install["source"] and "--no-index" in install["source"]
    assert install["metadata"]["_kg_hide-input"] is True and install["metadata"]["jupyter"]["source_hidden"] is True
    parameters = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(parameters) == 1
    source = parameters[0]["source"]
    assert "SMOKE = False" in source and 'PRESET = "smollm2-360m-to-135m-t4x2"' in source
    assert re.findall(r"^RUN_DIR = .*$", source, re.M) == [re.findall(r"^RUN_DIR = .*$", source, re.M)[0]]
    assert source.startswith("SMOKE = False") and "\nRUN_DIR = None" in source
    assert [c["metadata"].get("tags") for c in cells].count(["install-kit"]) == 1
    assert 'GPU = "T4x2"' in source  # the profile of the default accelerator, NvidiaTeslaT4
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")
    joined = "\n".join(c["source"] for c in cells)
    for stage in ("00 · Setup", "01 · Diagnostics", "02 · Train", "03 · Evaluate"):
        assert stage in joined
    assert "def " not in joined.replace("undef", "")


def test_committed_kaggle_kernel_is_current(built):
    assert COMMITTED.is_dir(), f"kaggle_kernel/ is missing; run: {REGENERATE}"
    committed = sorted(p.name for p in COMMITTED.iterdir())
    fresh = sorted(p.name for p in built.iterdir())
    assert committed == fresh, f"kaggle_kernel/ has {committed}, the generator writes {fresh}; run: {REGENERATE}"
    assert (COMMITTED / bundle.METADATA_FILE).read_text() == (built / bundle.METADATA_FILE).read_text(), (
        f"kaggle_kernel/kernel-metadata.json is stale; run: {REGENERATE}"
    )
    name = json.loads((built / bundle.METADATA_FILE).read_text())["code_file"]
    old, new = json.loads((COMMITTED / name).read_text()), json.loads((built / name).read_text())
    assert len(old["cells"]) == len(new["cells"]), f"kaggle_kernel/{name} is stale; run: {REGENERATE}"
    kit = lambda nb: next(c for c in nb["cells"] if "install-kit" in c["metadata"].get("tags", []))
    for index, (a, b) in enumerate(zip(old["cells"], new["cells"])):
        if a is not kit(old):
            assert a == b, f"kaggle_kernel/{name} cell {index} is stale (notebooks/ changed); run: {REGENERATE}"
    # The embedded kit: compared by content, so a different zlib build cannot fail the check.
    payload = lambda nb: bundle.wheel_contents(
        __import__("base64").b64decode(kit(nb)["source"].split('KIT_B64 = """')[1].split('"""')[0])
    )
    stale = sorted(k for k in set(payload(old)) | set(payload(new)) if payload(old).get(k) != payload(new).get(k))
    assert not stale, f"the kit embedded in kaggle_kernel/ is stale ({', '.join(stale[:5])}); run: {REGENERATE}"


def test_cli(tmp_path, capsys):
    out = tmp_path / "k"
    assert (
        main(
            [
                "bundle",
                "--owner",
                "someone",
                "--config",
                "tiny-cpu",
                "--title",
                "My KD smoke run",
                "--internet",
                "off",
                "--public",
                "--dataset",
                "someone/kagglekd-wheels",
                "--kernel-source",
                "someone/my-kd-smoke-run",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "kaggle kernels push -p" in capsys.readouterr().out
    meta = json.loads((out / bundle.METADATA_FILE).read_text())
    assert meta["id"] == "someone/my-kd-smoke-run" and meta["title"] == "My KD smoke run"
    assert meta["is_private"] is False and meta["enable_internet"] is False
    assert meta["dataset_sources"] == ["someone/kagglekd-wheels"]
    assert meta["kernel_sources"] == ["someone/my-kd-smoke-run"]
    assert bundle.kaggle_cli_problems(out) == []


def test_cli_refuses_title_slug_mismatch_and_bad_sources(tmp_path, capsys):
    assert (
        main(
            [
                "bundle",
                "--owner",
                "me",
                "--slug",
                "kagglekd-run",
                "--title",
                "another title",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "slugifies to" in capsys.readouterr().err
    assert main(["bundle", "--owner", "me", "--dataset", "nope", "--out", str(tmp_path / "b")]) == 2
    assert main(["bundle", "--owner", "me", "--config", "no-such-preset", "--out", str(tmp_path / "c")]) == 2


def test_config_file_is_embedded_as_a_dict(tmp_path):
    config = tmp_path / "my-config.json"
    config.write_text(json.dumps({"teacher_model": "tiny-moe", "max_steps": 50}))
    out = bundle.write_bundle(tmp_path / "k", owner="me", config=config)
    meta = json.loads((out / bundle.METADATA_FILE).read_text())
    assert meta["id"] == "me/kagglekd-my-config" and meta["enable_internet"] is False
    notebook = json.loads((out / meta["code_file"]).read_text())
    params = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    assert "'max_steps': 50" in params["source"]


def test_write_bundle_raises_with_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        bundle.write_bundle(tmp_path, owner="me", slug="abc", title="x", datasets=["bad"])
    text = str(err.value)
    assert "five characters" in text and "dataset_sources" in text


# ---- accelerators ----------------------------------------------------------------------------------------
def test_documented_accelerators_agree_with_the_installed_kaggle_cli():
    """The CLI's own table of retired shapes (it warns on them) is a subset of ours, and each is documented or
    retired long enough ago to be gone from the docs (TpuV232, TpuV2256)."""
    spec = importlib.util.find_spec("kaggle")  # located, not imported: kaggle/__init__.py authenticates
    if spec is None:
        pytest.skip("kaggle is not installed (requirements-test.txt)")
    source = (Path(spec.submodule_search_locations[0]) / "api" / "kaggle_api_extended.py").read_text(encoding="utf-8")
    table = re.search(r"_RETIRED_ACCELERATORS = \{(.*?)\}", source, re.S).group(1)
    retired_by_cli = set(re.findall(r'"(\w+)":', table))
    assert retired_by_cli and retired_by_cli <= {name.lower() for name in gpus.RETIRED_ACCELERATORS}
    assert "NvidiaTeslaT4" in gpus.KAGGLE_ACCELERATORS and "NvidiaTeslaT4x2" not in gpus.KAGGLE_ACCELERATORS


def test_accelerator_picks_the_profile_the_notebook_plans_for(tmp_path):
    out = bundle.write_bundle(tmp_path / "l4", owner="me", accelerator="NvidiaL4X1")
    meta = json.loads((out / bundle.METADATA_FILE).read_text())
    assert meta["machine_shape"] == "NvidiaL4X1" and meta["enable_gpu"] is True
    notebook = json.loads((out / meta["code_file"]).read_text())
    cells = notebook["cells"]
    parameters = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    assert re.search(r'^GPU = "L4"  #', parameters["source"], re.M)
    assert "**NvidiaL4X1**" in cells[0]["source"] and "`L4`" in cells[0]["source"]
    # Run the bundled notebook's own parameter and diagnostics cells (no dry run): the plan is for an L4.
    namespace: dict = {}
    exec(parameters["source"] + f"\nDRY_RUN_STEPS = 0\nRUN_DIR = {str(tmp_path / 'run')!r}", namespace)
    diagnostics = cells.index(next(c for c in cells if c["source"].startswith("## 01 · Diagnostics")))
    for cell in cells[diagnostics + 1 : diagnostics + 4]:  # its setup cell, "### Findings", the findings cell
        if cell["cell_type"] == "code":
            exec(cell["source"], namespace)
    assert namespace["gpu"] == "L4" and namespace["report"].gpu == "L4"
    memory = next(f for f in namespace["report"].findings if f.id == "memory")
    assert "of 22.5 GiB per device on L4" in memory.message  # the L4 profile's 22.5 GiB, not a T4's 15


@pytest.mark.parametrize("accelerator, profile", [("NvidiaH100", "H100"), ("NvidiaL4", "L4x4")])
def test_cli_accelerator(tmp_path, accelerator, profile, capsys):
    out = tmp_path / "k"
    assert main(["bundle", "--owner", "me", "--accelerator", accelerator, "--out", str(out)]) == 0
    assert f"for {accelerator}" in capsys.readouterr().out
    meta = json.loads((out / bundle.METADATA_FILE).read_text())
    assert meta["machine_shape"] == accelerator
    cells = json.loads((out / meta["code_file"]).read_text())["cells"]
    assert any(f'\nGPU = "{profile}"  #' in c["source"] for c in cells if "parameters" in c["metadata"].get("tags", []))


def test_a_shape_typo_is_refused_with_the_choices(tmp_path, capsys):
    with pytest.raises(ConfigError, match="NvidiaTeslaT4x2") as err:
        bundle.write_bundle(tmp_path / "a", owner="me", accelerator="NvidiaTeslaT4x2")
    assert err.value.field == "accelerator" and ", ".join(gpus.BUNDLE_ACCELERATORS) in str(err.value)
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["bundle", "--owner", "me", "--accelerator", "NvidiaTeslaT4x2", "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 2 and "invalid choice: 'NvidiaTeslaT4x2'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ---- a refusal writes nothing ----------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_bundle_writes_nothing(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the bundle stages its files
    fresh = tmp_path / "new" / "kernel"
    with pytest.raises(ConfigError, match="dataset_sources"):
        bundle.write_bundle(fresh, owner="me", config="tiny-cpu", datasets=["not-a-dataset"])
    assert not (tmp_path / "new").exists() and list(scratch.iterdir()) == []
    assert main(["bundle", "--owner", "me", "--slug", "abc", "--title", "abcde", "--out", str(fresh)]) == 2
    assert "five characters" in capsys.readouterr().err and not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    bundle.write_bundle(existing, owner="me", title="My KD run", config="tiny-cpu")
    (existing / "notes.txt").write_text("mine")
    before = _snapshot(existing)
    with pytest.raises(ConfigError):
        bundle.write_bundle(existing, owner="me", title="Another run", config="tiny-cpu", kernel_sources=["x/y"])
    assert _snapshot(existing) == before and list(scratch.iterdir()) == []
    # accepted: the renamed kernel's notebook replaces the old one, the user's own file stays
    bundle.write_bundle(existing, owner="me", title="Another run", config="tiny-cpu")
    assert sorted(_snapshot(existing)) == ["another-run.ipynb", bundle.METADATA_FILE, "notes.txt"]


def test_a_slug_with_a_path_is_refused_without_writing_outside(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the staging folder is made in here
    with pytest.raises(ConfigError, match="slug"):
        bundle.write_bundle(tmp_path / "k", owner="me", slug="../escaped", title="escaped run")
    assert not (tmp_path / "k").exists() and list(scratch.iterdir()) == []  # no scratch/escaped.ipynb either


# ---- the kaggle CLI, installed but broken ----------------------------------------------------------------
def test_a_kaggle_package_that_does_not_import_is_named_with_its_fix(tmp_path):
    """kaggle 2.2.x imports six without declaring it: the kit says so (not 'not installed') and names the fix."""
    blocked = (
        "import sys; sys.modules['six'] = None\n"  # as if pip had not installed six: `import six` fails
        "from kagglekd.__main__ import main\n"
        f"sys.exit(main(['bundle', '--owner', 'me', '--config', 'tiny-cpu', '--out', {str(tmp_path / 'k')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "is installed but its import fails" in done.stderr and "'six'" in done.stderr
    assert "pip install kaggle six" in done.stderr and "not installed" not in done.stderr
    assert "kaggle CLI checks not run" in done.stdout and (tmp_path / "k" / bundle.METADATA_FILE).is_file()
