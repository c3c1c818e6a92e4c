"""The Kaggle kernel bundle: metadata rules (each one), the kaggle CLI's own push checks, the deterministic
wheel, and that the committed kaggle_kernel/ is what `python -m kagglekd bundle` generates today."""

import copy
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kagglekd import bundle
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


def test_slugify_matches_python_slugify():
    slugify = pytest.importorskip("slugify").slugify  # installed with kaggle (requirements-test.txt)
    for title in [
        "kagglekd smollm2 360m to 135m t4x2",
        "KD: SmolLM 135M from Huihui-MoE (v2)",
        "  a -- b  ",
        "Émile's 1,000 steps",
        "under_score and.dots",
    ]:
        assert bundle.slugify(title) == slugify(title), title


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


def test_notebook_shape(built):
    meta = json.loads((built / bundle.METADATA_FILE).read_text())
    notebook = json.loads((built / meta["code_file"]).read_text())
    cells = notebook["cells"]
    assert "KIT_B64" in cells[0]["source"] and "--no-index" in cells[0]["source"]
    parameters = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(parameters) == 1
    source = parameters[0]["source"]
    assert "SMOKE = False" in source and 'PRESET = "smollm2-360m-to-135m-t4x2"' in source
    assert re.findall(r"^RUN_DIR = .*$", source, re.M) == [re.findall(r"^RUN_DIR = .*$", source, re.M)[0]]
    assert source.startswith("SMOKE = False") and "\nRUN_DIR = None" in source
    assert not any("install-kit" in c["metadata"].get("tags", []) for c in cells[1:])
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
    for index, (a, b) in enumerate(zip(old["cells"][1:], new["cells"][1:]), start=1):
        assert a == b, f"kaggle_kernel/{name} cell {index} is stale (notebooks/ changed); run: {REGENERATE}"
    assert len(old["cells"]) == len(new["cells"]), f"kaggle_kernel/{name} is stale; run: {REGENERATE}"
    # The embedded kit: compared by content, so a different zlib build cannot fail the check.
    payload = lambda nb: bundle.wheel_contents(
        __import__("base64").b64decode(nb["cells"][0]["source"].split('KIT_B64 = """')[1].split('"""')[0])
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
