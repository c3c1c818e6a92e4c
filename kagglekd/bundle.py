"""The Kaggle kernel bundle: ``kernel-metadata.json`` + one self-contained notebook, ready for
``kaggle kernels push -p DIR``.

The notebook opens with its introduction; the next cell, hidden (its input is collapsed in Kaggle's viewer and
in Jupyter), carries the kit as a base64 wheel built here deterministically (sorted entries, fixed timestamps
and permissions: regenerating gives identical bytes) and installs it with ``pip install --no-deps --no-index
--target`` (internet off works; the runtime deps are in the Kaggle image), falling back to unzipping the wheel
onto ``sys.path`` when pip is not usable. Then one ``parameters`` cell (the stages' merged) and the staged
notebooks ``notebooks/00..03`` in order (their install cells and stage-to-stage "next" cells dropped), so the
bundle never drifts from them; 03 ends with the "what next" cell.

``validate_metadata`` checks the rules ``kaggle kernels push`` applies before it contacts the server (see
../shared/KAGGLE.md) and the kit's stricter ones; ``kaggle_cli_problems`` runs the ``kaggle`` package's own
``kernels_push`` up to the point where it would connect, without importing ``kaggle/__init__.py`` (which tries
to authenticate). ``write_bundle`` builds and checks everything in a scratch folder first: a refused bundle
writes nothing, and an existing folder keeps its contents.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import pprint
import re
import shutil
import sys
import tempfile
import types
import zipfile
from pathlib import Path

from slugify import slugify  # python-slugify: what `kaggle kernels push` derives a title's slug with

import kagglekd
from kagglekd import gpus
from kagglekd.config import PRESETS_DIR, DistillConfig
from kagglekd.errors import ConfigError

PACKAGE_DIR = Path(kagglekd.__file__).parent
NOTEBOOKS_DIR = PACKAGE_DIR.parent / "notebooks"
STAGES = ("00_setup", "01_diagnostics", "02_train", "03_evaluate")
DEFAULT_CONFIG = "smollm2-360m-to-135m-t4x2"  # same tokenizer on both sides: the pair that trains today on T4 x2
DEFAULT_ACCELERATOR = "NvidiaTeslaT4"  # T4 x2; enable_gpu alone has landed on P100s, which this torch cannot use
METADATA_FILE = "kernel-metadata.json"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold; fixed so builds are byte-identical
B64_LINE = 100

KNOWN_KEYS = {
    "id",
    "id_no",
    "title",
    "code_file",
    "language",
    "kernel_type",
    "is_private",
    "enable_gpu",
    "enable_tpu",
    "enable_internet",
    "dataset_sources",
    "competition_sources",
    "kernel_sources",
    "model_sources",
    "keywords",
    "docker_image_pinning_type",
    "docker_image",
    "machine_shape",
}
BOOLEAN_KEYS = ("is_private", "enable_gpu", "enable_tpu", "enable_internet")
LANGUAGES = ("python", "r", "rmarkdown")
KERNEL_TYPES = ("script", "notebook")
PINNING_TYPES = ("original", "latest")
SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
STAGED_ONLY = "staged-only"  # tag of cells that make sense only in the four separate notebooks ("Next: 01_...")
HIDDEN_INPUT = {"_kg_hide-input": True, "jupyter": {"source_hidden": True}}  # Kaggle's viewer; JupyterLab


# ---- metadata rules --------------------------------------------------------------------------------------
def _is_bool(value) -> bool:
    return isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false"))


def _parts_ok(text, min_slashes: int, max_slashes: int) -> bool:
    if not isinstance(text, str) or not min_slashes <= text.count("/") <= max_slashes:
        return False
    return all(text.split("/"))


def validate_metadata(meta: dict, folder: str | Path) -> list[str]:
    """Every problem ``kaggle kernels push -p folder`` would raise before contacting the server, plus the
    kit's stricter rules (explicit booleans, title matching the slug, a documented current GPU machine shape).
    [] = valid."""
    if not isinstance(meta, dict):
        return [f"{METADATA_FILE} must hold a JSON object, not {type(meta).__name__}"]
    problems = [
        f"unknown key '{key}' (known: {', '.join(sorted(KNOWN_KEYS))})" for key in sorted(set(meta) - KNOWN_KEYS)
    ]
    problems += _identity_problems(meta)
    problems += _code_problems(meta, folder)
    problems += _machine_problems(meta)
    problems += _source_problems(meta)
    return problems


def _identity_problems(meta: dict) -> list[str]:
    """The ``id`` (owner/slug) or ``id_no``, and a ``title`` that slugifies to the id's slug."""
    problems = []
    kernel_id, slug = meta.get("id"), None
    if not kernel_id and not meta.get("id_no"):
        problems.append("id (owner/slug) or id_no must be given")
    if kernel_id:
        if not isinstance(kernel_id, str) or kernel_id.count("/") != 1 or not all(kernel_id.split("/")):
            problems.append(f"id {kernel_id!r} must be 'owner/slug' (no version part)")
        else:
            owner, slug = kernel_id.split("/")
            if len(slug) < 5:
                problems.append(f"id slug {slug!r} must be at least five characters")
            if not SLUG.match(slug):
                problems.append(f"id slug {slug!r} must be lowercase letters, digits and single inner hyphens")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", owner):
                problems.append(f"id owner {owner!r} is not a Kaggle username")

    title = meta.get("title")
    if title is not None:
        if not isinstance(title, str) or len(title) < 5:
            problems.append(f"title {title!r} must be at least five characters")
        elif slug is not None and slugify(title) != slug.lower():
            problems.append(
                f"title {title!r} slugifies to {slugify(title)!r}, not the id's slug {slug!r}: Kaggle "
                "would derive another URL. Make them match (--title / --slug)."
            )
    return problems


def _code_problems(meta: dict, folder: str | Path) -> list[str]:
    """``code_file`` present in ``folder``, a known language and kernel type, and a well-formed notebook."""
    problems = []
    code_file = meta.get("code_file")
    if not code_file:
        problems.append("code_file must name the notebook or script")
    elif not (Path(folder) / str(code_file)).is_file():
        problems.append(f"code_file {code_file!r} does not exist in {folder}")

    language, kernel_type = meta.get("language"), meta.get("kernel_type")
    if language not in LANGUAGES:
        problems.append(f"language {language!r} must be one of {', '.join(LANGUAGES)}")
    if kernel_type not in KERNEL_TYPES:
        problems.append(f"kernel_type {kernel_type!r} must be one of {', '.join(KERNEL_TYPES)}")
    if kernel_type == "notebook" and code_file and (Path(folder) / str(code_file)).is_file():
        problems += _notebook_problems(Path(folder) / str(code_file))
    return problems


def _machine_problems(meta: dict) -> list[str]:
    """Explicit booleans, not GPU and TPU at once, and a current machine shape whenever the GPU is on."""
    problems = []
    for key in BOOLEAN_KEYS:
        if key not in meta:
            problems.append(f"{key} must be written explicitly (the CLI's defaults differ: internet on, private)")
        elif not _is_bool(meta[key]):
            problems.append(f"{key} = {meta[key]!r} must be true or false")
    if str(meta.get("enable_gpu")).lower() == "true" and str(meta.get("enable_tpu")).lower() == "true":
        problems.append("enable_gpu and enable_tpu cannot both be true")

    shape = meta.get("machine_shape")
    if shape is not None:
        problems += shape_problems(shape)
    if str(meta.get("enable_gpu")).lower() == "true" and not shape:
        problems.append("enable_gpu without machine_shape has landed on P100s; set machine_shape NvidiaTeslaT4 (T4 x2)")
    return problems


def shape_problems(shape) -> list[str]:
    """Is ``shape`` an accelerator the Kaggle CLI documents (``gpus.KAGGLE_ACCELERATORS``, spelled exactly), not
    retired, and a GPU the kit can plan? The CLI itself passes any string to the server (a typo such as
    ``NvidiaTeslaT4x2`` is pushed and fails there, or runs elsewhere), so the kit checks it here. [] = usable."""
    offered = ", ".join(gpus.BUNDLE_ACCELERATORS)
    if not isinstance(shape, str) or not shape:
        return [f"machine_shape {shape!r} must be one of {offered}"]
    retired = {name.lower(): (name, why) for name, why in gpus.RETIRED_ACCELERATORS.items()}
    if shape.lower() in retired:
        return [f"machine_shape {shape!r} is retired ({retired[shape.lower()][1]}); use one of {offered}"]
    documented = {name.lower(): name for name in gpus.KAGGLE_ACCELERATORS}
    if shape not in gpus.KAGGLE_ACCELERATORS:
        spelled = documented.get(shape.lower())
        hint = f"did you mean {spelled!r}? " if spelled else ""
        return [
            f"machine_shape {shape!r} is not an accelerator the Kaggle CLI documents ({hint}documented: "
            f"{', '.join(gpus.KAGGLE_ACCELERATORS)}); for this kit use one of {offered}"
        ]
    if shape not in gpus.BUNDLE_ACCELERATORS:
        why = "a TPU: the kit trains on GPUs" if shape.startswith("Tpu") else "admin-only on Kaggle"
        return [f"machine_shape {shape!r} is {why}; use one of {offered}"]
    return []


def _source_problems(meta: dict) -> list[str]:
    """The forms of the attached sources and keywords, and the docker image pinning type."""
    problems = []
    for key, check, form in (
        ("dataset_sources", lambda s: _parts_ok(s, 1, 2), "owner/slug[/version]"),
        (
            "kernel_sources",
            lambda s: _parts_ok(s, 1, 2) and len(s.split("/")[1]) >= 5,
            "owner/slug[/version], slug >= 5 chars",
        ),
        (
            "model_sources",
            lambda s: _parts_ok(s, 4, 4) and s.split("/")[4].isdigit(),
            "owner/model/framework/variation/VERSION (integer version)",
        ),
        ("competition_sources", lambda s: isinstance(s, str) and bool(s) and "/" not in s, "a competition slug"),
        ("keywords", lambda s: isinstance(s, str) and bool(s), "a string"),
    ):
        values = meta.get(key, [])
        if not isinstance(values, list):
            problems.append(f"{key} must be a list")
            continue
        problems += [f"{key}: {value!r} must be {form}" for value in values if not check(value)]

    pinning = meta.get("docker_image_pinning_type")
    if pinning is not None and pinning not in PINNING_TYPES:
        problems.append(f"docker_image_pinning_type {pinning!r} must be one of {', '.join(PINNING_TYPES)}")
    return problems


def _notebook_problems(path: Path) -> list[str]:
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"code_file {path.name} is not valid notebook JSON: {err}"]
    try:
        import nbformat
    except ImportError:
        return [] if isinstance(notebook.get("cells"), list) else [f"{path.name} has no cells list"]
    try:
        nbformat.validate(nbformat.from_dict(notebook))
    except nbformat.ValidationError as err:
        return [f"{path.name} is not a valid nbformat v4 notebook: {err.message}"]
    return []


KAGGLE_CLI_FIX = (
    "pip install kaggle six"  # kaggle 2.2.x imports six without declaring it (python-dateutil 4 dropped it)
)


def _kaggle_api_class():
    """``kaggle.api.kaggle_api_extended.KaggleApi``, imported without running ``kaggle/__init__.py``.

    Raises ImportError whose message says which of two things is wrong: the package is not installed, or it is
    installed but its own import fails (naming the missing module, e.g. ``six``), each with the fix.
    """
    spec = importlib.util.find_spec("kaggle")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"the kaggle package is not installed ({KAGGLE_CLI_FIX})")
    stand_in = None
    if "kaggle.api.kaggle_api_extended" not in sys.modules and "kaggle" not in sys.modules:
        stand_in = types.ModuleType("kaggle")
        stand_in.__path__ = list(spec.submodule_search_locations)
        stand_in.__spec__ = spec
        sys.modules["kaggle"] = stand_in
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as err:
        if stand_in is not None and sys.modules.get("kaggle") is stand_in:
            del sys.modules["kaggle"]
        try:
            version = importlib.metadata.version("kaggle")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        missing = f"module {err.name!r} is missing" if err.name else str(err)
        extra = "" if err.name in (None, "six") else f" and the package that provides {err.name!r}"
        raise ImportError(
            f"the kaggle package ({version}) is installed but its import fails: {missing} ({err}). "
            f"The kaggle CLI fails the same way. Fix: {KAGGLE_CLI_FIX}{extra}"
        ) from err
    return KaggleApi


def kaggle_cli_unavailable() -> str | None:
    """None when the kaggle CLI's push checks can run here; else why not, with the fix (one sentence)."""
    try:
        _kaggle_api_class()
    except ImportError as err:
        return str(err)
    return None


def kaggle_cli_problems(folder: str | Path) -> list[str]:
    """Run the ``kaggle`` package's own ``KaggleApi.kernels_push`` on ``folder`` up to the point where it would
    open a connection. Returns its errors and warnings ([] = it would push). Raises ImportError (with the reason
    and the fix) when the ``kaggle`` package is missing or does not import.

    ``kaggle/__init__.py`` authenticates on import; a stand-in parent package keeps it from running, so no
    credentials are read and nothing touches the network.
    """
    KaggleApi = _kaggle_api_class()

    class _WouldConnect(Exception):
        pass

    def refuse_connection(*_args, **_kwargs):
        raise _WouldConnect

    api = KaggleApi()
    api.build_kaggle_client = refuse_connection
    printed = io.StringIO()
    problems = []
    try:
        with contextlib.redirect_stdout(printed):
            api.kernels_push(str(folder))
        problems.append("kernels_push returned without trying to connect (unexpected)")
    except _WouldConnect:
        pass
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        problems.append(str(err))
    problems += [line for line in printed.getvalue().splitlines() if line.strip()]
    return problems


# ---- the kit as a wheel ----------------------------------------------------------------------------------
def package_files() -> list[Path]:
    """The files a wheel of kagglekd carries: the modules of it and its subpackages, and its presets.

    What ``pyproject.toml`` ships: ``packages.find`` takes every directory with an ``__init__.py``
    (``kagglekd.diagnose`` too), ``package-data`` adds ``presets/*.json``.
    """
    modules = [path for path in PACKAGE_DIR.rglob("*.py") if (path.parent / "__init__.py").is_file()]
    files = modules + list((PACKAGE_DIR / "presets").glob("*.json"))
    return sorted(files, key=lambda p: p.relative_to(PACKAGE_DIR.parent).as_posix())


def wheel_name() -> str:
    return f"kagglekd-{kagglekd.__version__}-py3-none-any.whl"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel() -> bytes:
    """A pure-Python wheel of the package, byte-identical for identical sources."""
    version = kagglekd.__version__
    dist_info = f"kagglekd-{version}.dist-info"
    entries = [(p.relative_to(PACKAGE_DIR.parent).as_posix(), p.read_bytes()) for p in package_files()]
    entries.append(
        (
            f"{dist_info}/METADATA",
            (
                f"Metadata-Version: 2.1\nName: kagglekd\nVersion: {version}\n"
                "Summary: Knowledge distillation of causal LMs (MoE teachers into dense students) on Kaggle GPUs\n"
                "Requires-Python: >=3.10\n"
            ).encode(),
        )
    )
    entries.append(
        (
            f"{dist_info}/WHEEL",
            (b"Wheel-Version: 1.0\nGenerator: kagglekd.bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        )
    )
    entries.append((f"{dist_info}/top_level.txt", b"kagglekd\n"))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in entries:
        writer.writerow([name, _record_hash(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    entries.append((f"{dist_info}/RECORD", record.getvalue().encode()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever the building OS
            archive.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return out.getvalue()


def wheel_contents(wheel: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# ---- the notebook ----------------------------------------------------------------------------------------
INSTALL_CELL = '''# The kagglekd kit, embedded as a wheel (base64). Installed with pip --no-deps --no-index into a
# private folder on sys.path, so it works with internet off (its dependencies are in the Kaggle image).
# Generated by `python -m kagglekd bundle`: edit the package and regenerate, never this cell.
import base64
import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

KIT_WHEEL = "{wheel_name}"
KIT_SHA256 = "{sha256}"
KIT_B64 = """
{payload}
"""
kit_dir = Path(tempfile.mkdtemp(prefix="kagglekd-kit-"))
wheel = kit_dir / KIT_WHEEL
wheel.write_bytes(base64.b64decode(KIT_B64))
assert hashlib.sha256(wheel.read_bytes()).hexdigest() == KIT_SHA256, "the embedded kit is damaged: regenerate"
pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                      str(kit_dir / "site"), str(wheel)], capture_output=True, text=True)
if pip.returncode != 0:  # no usable pip: a pure-Python wheel is a zip of the package
    print(f"pip install failed ({{pip.stderr.strip()[-200:]}}); unpacking the wheel instead")
    zipfile.ZipFile(wheel).extractall(kit_dir / "site")
sys.path.insert(0, str(kit_dir / "site"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(kit_dir / "site"), os.environ.get("PYTHONPATH")) if p)
importlib.invalidate_caches()
import kagglekd  # noqa: E402

print(f"kagglekd {{kagglekd.__version__}} from {{Path(kagglekd.__file__).parent}}")'''

INTRO = """# {heading}

Knowledge distillation of **{teacher}** into **{student}** on a Kaggle **{accelerator}** session ({gpu}),
in four stages, then what to do next:
setup (environment doctor) → diagnostics (findings, LR plan, memory plan, dry run) → training (live chart,
auto-resume) → evaluation (perplexity, agreement, generations, size/speed, model card in `student/`).

* The kit is embedded in the next cell (hidden: its input is a base64 wheel) and installs with internet off.
* Change `PRESET` in the parameters cell to switch configs (presets: {presets}; or paste a config dict).
  `SMOKE = True` runs tiny random models for a few steps (a check that everything works, in minutes).
* `GPU` there is the profile the diagnostics plan memory and time for: {profile}, the accelerator this notebook
  was bundled for (`machine_shape` {accelerator}). Changed the accelerator in the notebook's settings? Set it to
  `None` (this session's GPU).
{hub}* To continue a run that hit the 12 h limit: attach this notebook's previous version as an input
  (kernel source); the training section resumes from its newest checkpoint.

Generated by `python -m kagglekd bundle`; regenerate rather than edit."""
HUB_NOTE = """* The models and dataset of this preset come from the Hugging Face hub: keep internet on, or attach them
  as inputs and point the config's `teacher_model` / `student_model` / `dataset` at their `/kaggle/input` folders.
"""


def _read_stage(name: str) -> dict:
    path = NOTEBOOKS_DIR / f"{name}.ipynb"
    if not path.is_file():
        raise ConfigError(f"{path} not found: `bundle` builds from the staged notebooks of a kagglekd checkout.")
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _merge_parameters(cells: list[str], preset_literal: str, accelerator: str) -> str:
    """One parameters cell: every ``NAME = value  # comment`` line of the stages, first occurrence wins; ``PRESET``
    is the bundled config and ``GPU`` the profile of ``accelerator``."""
    seen, lines = set(), []
    for source in cells:
        for line in source.splitlines():
            name = line.split("=", 1)[0].strip()
            if not name or name in seen:
                continue
            seen.add(name)
            if name == "PRESET":
                comment = '  # preset name or JSON config path (a dict literal works too); "tiny-cpu": offline demo'
                line = f"PRESET = {preset_literal}{comment if chr(10) not in preset_literal else ''}"
            elif name == "GPU":
                profile = accelerator_profile(accelerator).name
                comment = f"machine_shape {accelerator}; None: this session's GPU (not under SMOKE)"
                line = f"GPU = {json.dumps(profile)}  # {comment}"
            lines.append(line)
    return "\n".join(lines)


def _cell(cell_type: str, source: str, index: int, tags: list[str] | None = None, hidden: bool = False) -> dict:
    metadata = {"tags": tags} if tags else {}
    if hidden:
        metadata.update(json.loads(json.dumps(HIDDEN_INPUT)))
    cell = {"cell_type": cell_type, "id": f"cell-{index:03d}", "metadata": metadata, "source": source}
    if cell_type == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def _demote_headings(markdown: str) -> str:
    """One level deeper for every heading: the stages' ``# 00 · Setup`` become ``##`` sections under the bundle's
    title, and their sections ``###``."""
    return re.sub(r"^(#{1,5}) ", r"#\1 ", markdown, flags=re.M)


# Why the kit rides in a hidden cell after the introduction, not in a Kaggle dataset the bundle attaches: one
# folder, one `kaggle kernels push`, and the kernel runs with internet off; the notebook and the kit it runs can
# never be out of step (a dataset is a second artefact with its own versions, to create with credentials before
# the first push and to re-upload after every change, and an old attached version would silently run old code).
# The cost was 2,288 lines of base64 before the introduction; Kaggle's viewer hides the input of a cell marked
# `_kg_hide-input` and JupyterLab collapses one marked `jupyter.source_hidden`, and the introduction comes first.
def build_notebook(config: str | Path, title: str, wheel: bytes, accelerator: str = DEFAULT_ACCELERATOR) -> dict:
    """The self-contained notebook: introduction, the hidden install cell, parameters, then the stages' cells in
    order (their install, parameters and staged-only cells dropped); 03 ends with "what next"."""
    loaded = DistillConfig.load(config)
    preset = _preset_name(config)
    literal = json.dumps(preset) if preset else pprint.pformat(json.loads(Path(config).read_text()), width=100)
    encoded = base64.b64encode(wheel).decode()
    payload = "\n".join(encoded[i : i + B64_LINE] for i in range(0, len(encoded), B64_LINE))
    install = INSTALL_CELL.format(wheel_name=wheel_name(), sha256=hashlib.sha256(wheel).hexdigest(), payload=payload)
    presets = ", ".join(f"`{p.stem}`" for p in sorted(PRESETS_DIR.glob("*.json")) if not p.stem.startswith("card-"))
    profile = accelerator_profile(accelerator)
    intro = INTRO.format(
        heading=title if title.lower().startswith("kagglekd") else f"kagglekd: {title}",
        teacher=loaded.teacher_model,
        student=loaded.student_model,
        accelerator=accelerator,
        gpu=f"planned as `{profile.name}`: {profile.devices} GPU(s) of {profile.capacity_bytes / gpus.GiB:.1f} GiB",
        profile=f"`{profile.name}`",
        presets=presets,
        hub=HUB_NOTE if _needs_hub(loaded) else "",
    )
    stages = [_read_stage(name) for name in STAGES]
    parameter_cells = [_source(c) for nb in stages for c in nb["cells"] if "parameters" in _tags(c)]
    body: list[tuple[str, str, list[str] | None, bool]] = [
        ("markdown", intro, None, False),
        ("code", install, ["install-kit"], True),
        ("code", _merge_parameters(parameter_cells, literal, accelerator), ["parameters"], False),
    ]
    for notebook in stages:
        for cell in notebook["cells"]:
            if {"parameters", "install-kit", STAGED_ONLY} & set(_tags(cell)):
                continue
            source = _source(cell)
            if cell["cell_type"] == "markdown":
                source = _demote_headings(source)
            body.append((cell["cell_type"], source, None, False))
    return {
        "cells": [_cell(kind, source, i, tags, hidden) for i, (kind, source, tags, hidden) in enumerate(body)],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


# ---- the folder ------------------------------------------------------------------------------------------
def _preset_name(config: str | Path) -> str | None:
    path = Path(config)
    if path.suffix == ".json" or path.exists():
        return None
    return str(config)


def _needs_hub(config: DistillConfig) -> bool:
    """Does the config name hub models or a hub dataset (which need internet unless attached as inputs)?"""
    from kagglekd.memory import TINY_PRESETS

    local = lambda ref: ref is None or ref in TINY_PRESETS or ref.startswith(("/", ".", "~")) or "/" not in ref
    return not all(
        local(ref) for ref in (config.teacher_model, config.student_model, config.tokenizer, config.teacher_tokenizer)
    ) or not (config.dataset == "stdlib-docs" or config.dataset.startswith(("/", ".", "~")))


def accelerator_profile(accelerator: str) -> gpus.GpuProfile:
    """The planner profile of a ``bundle --accelerator`` choice (``gpus.BUNDLE_ACCELERATORS``); ConfigError
    naming the field, what is wrong and the choices otherwise (a typo such as ``NvidiaTeslaT4x2`` included)."""
    problems = shape_problems(accelerator)
    if problems:
        raise ConfigError(problems[0].replace("machine_shape", "accelerator", 1), field="accelerator")
    return gpus.resolve(accelerator, strict=True)


def build_metadata(
    owner: str,
    slug: str,
    title: str,
    code_file: str,
    *,
    public: bool,
    internet: bool,
    datasets=(),
    kernel_sources=(),
    accelerator: str = DEFAULT_ACCELERATOR,
) -> dict:
    return {
        "id": f"{owner}/{slug}",
        "title": title,
        "code_file": code_file,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": not public,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": internet,
        "machine_shape": accelerator,  # always explicit: enable_gpu alone has landed on P100s
        "dataset_sources": list(datasets),
        "competition_sources": [],
        "kernel_sources": list(kernel_sources),
        "model_sources": [],
    }


def write_bundle(
    out: str | Path,
    *,
    owner: str,
    slug: str | None = None,
    title: str | None = None,
    config: str | Path = DEFAULT_CONFIG,
    accelerator: str = DEFAULT_ACCELERATOR,
    public: bool = False,
    internet: bool | None = None,
    datasets=(),
    kernel_sources=(),
    cli_checks: bool = False,
) -> Path:
    """Write ``out/kernel-metadata.json`` and ``out/<slug>.ipynb`` for ``machine_shape`` ``accelerator``.

    Everything is built and checked in a scratch folder first (``validate_metadata``, and with ``cli_checks`` the
    kaggle CLI's own push checks too): a refusal raises ConfigError listing every rule broken and writes nothing,
    so an existing ``out`` keeps its contents. Then the two files are moved in, each by an atomic rename; the
    notebook an older metadata file named (a renamed kernel) is removed, anything else in ``out`` is kept.
    """
    loaded = DistillConfig.load(config)  # a bad config fails here, naming the field
    accelerator_profile(accelerator)  # a typo or a shape without a profile fails here, naming the choices
    name = _preset_name(config) or Path(config).stem
    if slug is None:
        slug = slugify(title) if title else slugify(f"kagglekd {name}")
    if title is None:
        title = slug.replace("-", " ")
    internet = _needs_hub(loaded) if internet is None else internet
    code_file = f"{slug}.ipynb"
    notebook = build_notebook(config, title, build_wheel(), accelerator=accelerator)
    meta = build_metadata(
        owner,
        slug,
        title,
        code_file,
        public=public,
        internet=internet,
        datasets=datasets,
        kernel_sources=kernel_sources,
        accelerator=accelerator,
    )
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="kagglekd-bundle-") as scratch:
        staged = Path(scratch)
        if Path(code_file).name == code_file:  # a slug with a path separator is refused below, never written
            (staged / code_file).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (staged / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        problems = validate_metadata(meta, staged)
        if cli_checks and not problems:
            problems = [f"kaggle CLI: {problem}" for problem in kaggle_cli_problems(staged)]
        if problems:
            raise ConfigError("kernel-metadata.json would not push:\n  - " + "\n  - ".join(problems))
        out.mkdir(parents=True, exist_ok=True)
        old_code = _previous_code_file(out / METADATA_FILE)
        for file_name in (code_file, METADATA_FILE):
            partial = out / f".{file_name}.partial"
            shutil.copyfile(staged / file_name, partial)
            os.replace(partial, out / file_name)
    if old_code and old_code != code_file:  # a renamed kernel: drop the notebook the old metadata pointed at
        (out / old_code).unlink(missing_ok=True)
    return out


def _previous_code_file(metadata: Path) -> str | None:
    """The plain file name an existing ``kernel-metadata.json`` gives as ``code_file``, else None."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        old_code = json.loads(metadata.read_text()).get("code_file")
        if isinstance(old_code, str) and old_code and Path(old_code).name == old_code:
            return old_code
    return None
