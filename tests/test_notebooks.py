"""The four staged notebooks and the bundled kernel notebook, executed in SMOKE mode by papermill on the
venv's own `python3` kernel; the charts they save and the tables they show are checked in their outputs.

SMOKE = tiny random teacher/student on the offline corpus for a few steps (kagglekd.env.SMOKE_OVERRIDES).
The child kernels inherit KAGGLEKD_CACHE (the session's shared kit cache) through os.environ.
"""

import json
import os
import time
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import papermill
import pytest

from kagglekd import env

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["00_setup", "01_diagnostics", "02_train", "03_evaluate"]
PNG = b"\x89PNG\r\n\x1a\n"
TIMINGS: dict[str, float] = {}
BUNDLE_MAX_STEPS = 3  # the executed bundle's plan: not SMOKE's 4 steps


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


class _Cells(HTMLParser):
    """The text of every <th>/<td> of an HTML table, in order."""

    def __init__(self):
        super().__init__()
        self.cells: list[str] = []
        self._open = False

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self._open = True
            self.cells.append("")

    def handle_endtag(self, tag):
        self._open = self._open and tag not in ("td", "th")

    def handle_data(self, data):
        if self._open:
            self.cells[-1] += data


def table_outputs(notebook, marker: str) -> list[tuple[list[str], str]]:
    """(HTML table cell texts, text/plain) of each output of the code cells whose source contains ``marker``."""
    found = []
    for cell in notebook.cells:
        if cell.cell_type != "code" or marker not in cell.source:
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "text/html" in data:
                parser = _Cells()
                parser.feed(data["text/html"])
                found.append((parser.cells, data.get("text/plain", "")))
    return found


def assert_tables_whole(notebook, marker: str) -> list[str]:
    """The tables shown by the cells containing ``marker``: every cell whole (no "..."/"…" of pandas'
    max_colwidth), no NaN/None where a value is missing. Returns all their cell texts."""
    tables = table_outputs(notebook, marker)
    assert tables, f"no HTML table in the output of the cell with {marker!r}"
    texts = []
    for cells, plain in tables:
        assert cells
        for text in cells:
            assert not text.endswith(("...", "…")), f"truncated: {text!r}"
            assert text.strip() not in ("NaN", "nan", "None", "<NA>"), f"{text!r} shown for a missing value"
        assert "NaN" not in plain and "…" not in plain and not any(line.endswith("...") for line in plain.splitlines())
        texts += cells
    return texts


def assert_findings_whole(notebook) -> None:
    """The findings table: longer messages than pandas' 50-character cut, and a blank fix where there is none."""
    texts = assert_tables_whole(notebook, 'report.to_dict()["findings"]')
    columns = texts[:5]
    assert columns == ["severity", "id", "field", "message", "fix"]
    rows = [texts[i : i + 5] for i in range(5, len(texts), 5)]
    assert any(len(row[3]) > 80 for row in rows), "no message longer than pandas' default column width"
    assert any(row[4] == "" for row in rows), "a finding without a fix must show a blank"
    assert any(len(row[4]) > 50 for row in rows), "no fix longer than pandas' default column width"


def assert_card_front_matter_fenced(notebook) -> None:
    card = next(c for c in notebook.cells if c.cell_type == "code" and "card_markdown(" in c.source)
    markdown = "".join(o["data"]["text/markdown"] for o in card.outputs if "text/markdown" in o.get("data", {}))
    assert "```yaml\nlibrary_name: transformers\n" in markdown and not markdown.lstrip().startswith("---")
    assert "\n## Results" in markdown  # the card's own Markdown follows the fenced block


def what_next_text(notebook) -> str:
    last = notebook.cells[-1]
    assert last.cell_type == "code" and last.source.startswith("what_next(")
    return "".join(o["data"]["text/markdown"] for o in last.outputs if "text/markdown" in o.get("data", {}))


def smoke_run_dir(run_dir: Path) -> Path:
    """Where a SMOKE run given ``RUN_DIR = run_dir`` writes (the kit keeps it apart from a real run's dir)."""
    return Path(env.notebook_config("smollm2-360m-to-135m-t4x2", run_dir, smoke=True).output_dir)


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
    return smoke_run_dir(run_dir), executed


@pytest.fixture(scope="module")
def bundled(child_env, staged, tmp_path_factory):
    work = tmp_path_factory.mktemp("bundled")
    meta = json.loads((REPO / "kaggle_kernel" / "kernel-metadata.json").read_text())
    child_env.delenv("PYTHONPATH", raising=False)  # only the embedded kit
    notebook = execute(  # MAX_STEPS 3 (SMOKE plans 4): the bundle passes its parameter through to the plan
        REPO / "kaggle_kernel" / meta["code_file"],
        work / "bundle.out.ipynb",
        work,
        RUN_DIR=str(work / "run"),
        MAX_STEPS=BUNDLE_MAX_STEPS,
    )
    return smoke_run_dir(work / "run"), notebook


def test_02_train_pauses_at_stop_after_and_a_second_run_finishes_the_plan(child_env, tmp_path):
    """02's STOP_AFTER pauses the session with a checkpoint and no export; running 02 again (STOP_AFTER unset)
    resumes and finishes the plan that MAX_STEPS set (5 steps here, SMOKE plans 4)."""
    child_env.setenv("PYTHONPATH", str(REPO))
    source, run_dir = REPO / "notebooks" / "02_train.ipynb", tmp_path / "run"
    first = execute(source, tmp_path / "first.ipynb", tmp_path, RUN_DIR=str(run_dir), MAX_STEPS=5, STOP_AFTER=2)
    run_dir = smoke_run_dir(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["optimizer_steps"], summary["planned_steps"], summary["paused"]) == (2, 5, True)
    assert not (run_dir / "student").exists() and "paused after optimizer step 2 of 5" in output_text(first)
    shown = assert_tables_whole(first, "summary.items()")  # the resume command whole in the summary table
    assert summary["resume"] in shown and summary["resume"].endswith("with resume 'auto').")
    second = execute(source, tmp_path / "second.ipynb", tmp_path, RUN_DIR=str(tmp_path / "run"), MAX_STEPS=5)
    child_env.delenv("PYTHONPATH", raising=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["optimizer_steps"], summary["planned_steps"], summary["paused"]) == (5, 5, False)
    assert "resuming from" in output_text(second) and (run_dir / "student" / "config.json").is_file()


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
    assert "torch build" in assert_tables_whole(executed["00_setup"], "table(doctor.rows())")
    assert assert_tables_whole(executed["00_setup"], "doctor.checks")[:3] == ["severity", "message", "fix"]
    presets = assert_tables_whole(executed["00_setup"], "preset_names()")  # a table, not a DataFrame with its index
    assert presets[:3] == ["preset", "teacher_model", "student_model"] and "tiny-cpu" in presets
    config = assert_tables_whole(executed["00_setup"], "config.to_dict()")
    assert config[:2] == ["key", "value"] and len(config) == 2 + 2 * len(env.notebook_config("tiny-cpu").to_dict())


def test_01_diagnostics(staged):
    run_dir, executed = staged
    text = output_text(executed["01_diagnostics"])
    assert "severity" in text and "message" in text and "dry-run" in text
    for chart in ("lr_plan.png", "memory.png", "component_shares.png", "dry_run_history.png"):
        assert_png(run_dir / "diagnostics" / chart)
    assert png_outputs(executed["01_diagnostics"]) >= 4
    fixed = json.loads((run_dir / "train_config.json").read_text())
    assert "_fixes" in fixed and fixed["teacher_model"] == "tiny-random-moe"
    assert_findings_whole(executed["01_diagnostics"])
    assert "charts in " in output_text(executed["01_diagnostics"])
    assert assert_tables_whole(executed["01_diagnostics"], 'fixed["_fixes"]')[0] == "change"


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
    cells = assert_tables_whole(notebook, "read_history(run_dir)")
    width = cells.index("eval_top1_agreement") + 1
    header, rows = cells[:width], [cells[i : i + width] for i in range(width, len(cells), width)]
    ppl = [row[header.index("eval_ppl")] for row in rows]
    assert len(rows) == 4 and "" in ppl and any(ppl), ppl  # blank on steps without an eval, a number on the others
    summaries = assert_tables_whole(notebook, "summary.items()")  # the CE-only twin has no agreement: a blank
    assert summaries.count("optimizer_steps") == 2 and summaries.count("eval_top1_agreement") == 2


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
    assert_card_front_matter_fenced(executed["03_evaluate"])
    for marker in ("report.perplexity_rows", "report.side_by_side", "report.size_speed_rows"):
        assert_tables_whole(executed["03_evaluate"], marker)
    assert "SMOKE = False" in what_next_text(executed["03_evaluate"])


def test_the_executed_bundle_opens_with_its_introduction(bundled):
    """What a reader of the executed SMOKE bundle sees first is the introduction: the cell with the kit's base64
    comes after it, with its input hidden for Kaggle's viewer and JupyterLab (papermill kept the metadata)."""
    _, notebook = bundled
    hidden = lambda c: c.metadata.get("_kg_hide-input") is True and c.metadata.get("jupyter", {}).get("source_hidden")
    visible = [c for c in notebook.cells if not hidden(c)]
    first = visible[0]
    assert first.cell_type == "markdown" and first.source.startswith("# kagglekd")
    assert not any("KIT_B64" in c.source for c in visible)
    kit = next(c for c in notebook.cells if "KIT_B64" in c.source)
    assert notebook.cells.index(kit) > notebook.cells.index(first)
    assert "kagglekd 0.1.0 from" in "".join(o.get("text", "") for o in kit.outputs)  # its output stays visible


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
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer_steps"] == summary["planned_steps"] == BUNDLE_MAX_STEPS  # MAX_STEPS set the plan
    assert json.loads((run_dir / "train_config.json").read_text())["max_steps"] == BUNDLE_MAX_STEPS  # and 01's
    # the charts are in the notebook itself: LR plan, memory, component shares, dry-run history (01), the live
    # chart (02), perplexity, size/speed, history (03)
    assert png_outputs(notebook) >= 8
    assert_findings_whole(notebook)
    assert_tables_whole(notebook, "table(doctor.rows())")
    assert_card_front_matter_fenced(notebook)
    closing = what_next_text(notebook)
    assert "SMOKE" in closing and "`SMOKE = False`" in closing and str(run_dir) in closing
    real_run_dir = env.notebook_config("smollm2-360m-to-135m-t4x2", run_dir.parent / "run").output_dir
    assert f"The real run writes to `{real_run_dir}`" in closing
    assert "kaggle kernels push -p DIR" in closing


def test_report_timings(staged, bundled):
    print("notebook wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in TIMINGS.items()))
    assert set(TIMINGS) >= set(NOTEBOOKS)
    assert os.environ.get("KAGGLEKD_CACHE")


# ---- what the notebooks show (kagglekd.display), without running a notebook --------------------------------
def test_table_shows_every_cell_whole_with_blanks_for_missing_values():
    import pandas as pd

    from kagglekd.display import table

    long = "warmup is 1 of 4 optimizer steps (25.0%): a fifth of the run or more is spent below the peak LR."
    rows = [{"severity": "warning", "message": long, "fix": None}, {"severity": "info", "message": "<b>x</b>"}]
    shown = table(rows, columns=["severity", "message", "fix"])
    parser = _Cells()
    parser.feed(shown._repr_html_())
    assert parser.cells == ["severity", "message", "fix", "warning", long, "", "info", "<b>x</b>", ""]
    assert "&lt;b&gt;x&lt;/b&gt;" in shown._repr_html_()  # text, never markup
    plain = repr(shown)
    assert long in plain and "None" not in plain and "NaN" not in plain
    # what pandas shows for the same rows, for contrast: the message cut at 50 characters, NaN/None for the gaps
    pandas_html = pd.DataFrame(rows, columns=["severity", "message", "fix"])._repr_html_()
    assert long not in pandas_html and ("NaN" in pandas_html or "None" in pandas_html)
    assert table([{"a": float("nan"), "b": 1 / 3, "c": 4}]).rows == [["", "0.333333", "4"]]  # 6 significant digits
    empty = table([], columns=["severity", "message", "fix"])
    parser = _Cells()
    parser.feed(empty._repr_html_())
    assert parser.cells == ["severity", "message", "fix", "(none)", "", ""] and "(none)" in repr(empty)


def test_card_markdown_fences_the_front_matter(tmp_path):
    from kagglekd.display import card_markdown, split_front_matter

    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: transformers\ntags:\n- kagglekd\n---\n\n# Student\n\n## Results\n")
    markdown = card_markdown(card).data
    assert markdown.index("```yaml\nlibrary_name: transformers\ntags:\n- kagglekd\n```") < markdown.index("# Student")
    assert "\n---\n" not in markdown and not markdown.startswith("---")
    assert split_front_matter("# No front matter\n---\n") == (None, "# No front matter\n---\n")
    assert split_front_matter("---\nunterminated: yes\n") == (None, "---\nunterminated: yes\n")


def test_what_next_tells_a_smoke_user_how_to_train_and_a_real_user_where_the_student_is(tmp_path):
    from kagglekd.display import what_next_text

    smoke = what_next_text(tmp_path / "run-smoke", smoke=True, real_run_dir=tmp_path / "run")
    assert "`SMOKE = False`" in smoke and "Save & Run All" in smoke and f"wrote to `{tmp_path / 'run-smoke'}`" in smoke
    assert f"The real run writes to `{tmp_path / 'run'}`" in smoke
    assert "kaggle kernels push -p DIR" in smoke
    real = what_next_text(tmp_path / "run", smoke=False)
    assert str(tmp_path / "run" / "student" / "README.md") in real and "SMOKE = False" not in real
    assert "Output" in what_next_text("/kaggle/working/runs/x", smoke=False)  # on Kaggle: the version's Output tab
