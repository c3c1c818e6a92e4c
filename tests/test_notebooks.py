"""The four staged notebooks and the bundled kernel notebook, executed in SMOKE mode by papermill on the
venv's own `python3` kernel; the charts they save and the tables they show are checked in their outputs.

SMOKE = tiny random teacher/student on the offline corpus for a few steps (kagglekd.env.SMOKE_OVERRIDES).
The child kernels inherit KAGGLEKD_CACHE (the session's shared kit cache) through os.environ.
"""

import json
import os
import time
from pathlib import Path

import nbformat
import papermill
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["00_setup", "01_diagnostics", "02_train", "03_evaluate"]
PNG = b"\x89PNG\r\n\x1a\n"
TIMINGS: dict[str, float] = {}


def execute(source: Path, out: Path, cwd: Path, **parameters) -> nbformat.NotebookNode:
    start = time.perf_counter()
    papermill.execute_notebook(
        str(source),
        str(out),
        parameters={"SMOKE": True, **parameters},
        kernel_name="python3",
        cwd=str(cwd),
        progress_bar=False,
        log_output=False,
    )
    TIMINGS[source.stem] = time.perf_counter() - start
    return nbformat.read(out, as_version=4)


def output_text(notebook) -> str:
    """Everything the executed notebook shows as text: streams, text/plain, text/markdown, errors."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type == "error":
                parts.append(f"{output.ename}: {output.evalue}")
            else:
                data = output.get("data", {})
                parts += [data.get("text/plain", ""), data.get("text/markdown", "")]
    return "\n".join(parts)


def png_outputs(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000, f"{path} is not a real chart"


@pytest.fixture(scope="module")
def child_env(kagglekd_cache, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("kernel-tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
        patch.setenv("TMPDIR", str(scratch))  # the bundle unpacks its kit under tempfile's dir
        patch.setenv("MPLBACKEND", "Agg")
        patch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
        yield patch


@pytest.fixture(scope="module")
def staged(child_env, tmp_path_factory):
    """00 -> 03 in one run dir, as a user runs them (02 also trains the CE-only baseline for 03)."""
    work = tmp_path_factory.mktemp("staged")
    run_dir = work / "run"
    child_env.setenv("PYTHONPATH", str(REPO))  # the checkout's kit, as `pip install -e .` would give
    executed = {}
    for name in NOTEBOOKS:
        # 02 trains through the notebook_launcher path (one process on CPU); the bundle below keeps the planner's
        # default (in-process), so both launch paths run.
        extra = {"TRAIN_CE_BASELINE": True, "LAUNCH": "notebook_launcher"} if name == "02_train" else {}
        executed[name] = execute(
            REPO / "notebooks" / f"{name}.ipynb", work / f"{name}.out.ipynb", work, RUN_DIR=str(run_dir), **extra
        )
    child_env.delenv("PYTHONPATH", raising=False)
    return run_dir, executed


@pytest.fixture(scope="module")
def bundled(child_env, staged, tmp_path_factory):
    work = tmp_path_factory.mktemp("bundled")
    meta = json.loads((REPO / "kaggle_kernel" / "kernel-metadata.json").read_text())
    child_env.delenv("PYTHONPATH", raising=False)  # only the embedded kit
    notebook = execute(
        REPO / "kaggle_kernel" / meta["code_file"], work / "bundle.out.ipynb", work, RUN_DIR=str(work / "run")
    )
    return work / "run", notebook


# ---- committed notebooks: thin, parameterised, without outputs ---------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_shape(name):
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name} is committed with outputs"
    parameters = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1
    for line in ("SMOKE = False", "PRESET = ", "RUN_DIR = "):
        assert line in parameters[0].source
    lines = [line.lstrip() for c in code for line in c.source.splitlines()]
    assert not any(line.startswith(("def ", "class ", "lambda")) for line in lines), f"{name} defines a function"
    assert any("kagglekd" in c.source and "import" in c.source for c in code)


# ---- executed --------------------------------------------------------------------------------------------
def test_00_setup(staged):
    run_dir, executed = staged
    text = output_text(executed["00_setup"])
    for expected in (
        "torch build",
        "GPU profile",
        "Kaggle run type",
        "transformers",
        "smollm2-360m-to-135m-t4x2",
        "tiny-random-moe",
    ):
        assert expected in text, expected
    assert json.loads((run_dir / "doctor.json").read_text())["exit_code"] == 0


def test_01_diagnostics(staged):
    run_dir, executed = staged
    text = output_text(executed["01_diagnostics"])
    assert "severity" in text and "message" in text and "dry-run" in text
    for chart in ("lr_plan.png", "memory.png", "component_shares.png", "dry_run_history.png"):
        assert_png(run_dir / "diagnostics" / chart)
    assert png_outputs(executed["01_diagnostics"]) >= 4
    fixed = json.loads((run_dir / "train_config.json").read_text())
    assert "_fixes" in fixed and fixed["teacher_model"] == "tiny-random-moe"


def test_02_train(staged):
    run_dir, executed = staged
    notebook = executed["02_train"]
    assert_png(run_dir / "live_chart.png")
    assert png_outputs(notebook) >= 1, "the live chart's display handle left no PNG in the notebook"
    text = output_text(notebook)
    for column in ("step", "loss", "kd", "ce", "grad_norm", "tokens_per_s", "eval_ppl", "optimizer_steps"):
        assert column in text, column
    assert "launch: notebook_launcher, 1 process(es), strategy single on cpu" in text
    assert "Launching training on CPU" in text  # accelerate.notebook_launcher's own line: it ran the function
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer_steps"] == 4 and (run_dir / "student" / "config.json").is_file()
    assert (Path(f"{run_dir}-ce") / "student" / "config.json").is_file()


def test_03_evaluate(staged):
    run_dir, executed = staged
    text = output_text(executed["03_evaluate"])
    for expected in (
        "eval_ppl",
        "top1_agreement",
        "teacher",
        "student (KD)",
        "student (CE only)",
        "prompt",
        "parameters_m",
        "mb_on_disk",
        "forward_tokens_per_s",
        "generate_tokens_per_s",
        "## Results",
    ):
        assert expected in text, expected
    for chart in ("eval_ppl.png", "size_speed.png", "history.png"):
        assert_png(run_dir / chart)
    card = (run_dir / "student" / "README.md").read_text()
    assert "## Data" in card and "## Results" in card and "student (CE only)" in card


def test_bundled_kernel_notebook(bundled):
    run_dir, notebook = bundled
    text = output_text(notebook)
    assert "kagglekd 0.1.0 from" in text and "kagglekd-kit-" in text, "the embedded kit was not the one imported"
    for chart in (
        "diagnostics/lr_plan.png",
        "diagnostics/memory.png",
        "live_chart.png",
        "eval_ppl.png",
        "size_speed.png",
    ):
        assert_png(run_dir / chart)
    for expected in ("severity", "tokens_per_s", "eval_ppl", "top1_agreement", "mb_on_disk", "launch: in-process"):
        assert expected in text, expected
    assert (run_dir / "student" / "README.md").is_file()


def test_report_timings(staged, bundled):
    print("notebook wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in TIMINGS.items()))
    assert set(TIMINGS) >= set(NOTEBOOKS)
    assert os.environ.get("KAGGLEKD_CACHE")
