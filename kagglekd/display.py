"""What the notebooks show: text tables in full, the model card, and the closing "what next".

pandas shortens every cell of a DataFrame past ``display.max_colwidth`` (50 characters) to ``...`` and prints a
missing value as ``NaN`` or ``None``; a finding's message and its fix are the point of the table, so ``table`` shows
each cell whole, wrapped, with a blank where there is no value, in the HTML Kaggle and Jupyter render and in the
plain-text form papermill also saves. The notebooks call these; they define no functions themselves.
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path

from kagglekd.rundir import STUDENT_DIR

# A column of short values stays on one line; a column with long text wraps at spaces (a word longer than the
# column breaks only when nothing else fits) and is given room, so the table does not grow a column per word.
SHORT_TEXT = 40  # characters: the longest cell of a column kept on one line
STYLE = "vertical-align:top; padding:2px 8px"
ONE_LINE = "white-space:nowrap"
WRAPPED = "white-space:pre-wrap; overflow-wrap:break-word; min-width:16em"
KAGGLE_WORKING = "/kaggle/working"


def _is_number(value) -> bool:
    """int or float, numpy's too; not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell_text(value) -> str:
    """A cell's text: '' for None or NaN (pandas' fill for a key a row lacks, or a step without an eval), a
    fractional float to 6 significant digits, anything else as ``str``."""
    if value is None:
        return ""
    if _is_number(value):
        number = float(value)
        if math.isnan(number):
            return ""
        if math.isfinite(number) and not number.is_integer():
            return f"{number:.6g}"
    return str(value)


class Table:
    """Rows of text shown whole: no truncation, blanks for missing values, long text wrapped in its column.

    ``rows``: an iterable of mappings (one per row); ``columns``: their order (default: keys in first-seen order).
    ``_repr_html_`` is what Jupyter and Kaggle render; ``repr`` is the ``text/plain`` twin (columns separated by
    two spaces, a cell's text never shortened).
    """

    def __init__(self, rows: Iterable[Mapping], columns: Iterable[str] | None = None):
        rows = [dict(row) for row in rows]
        if columns is None:
            columns = list(dict.fromkeys(key for row in rows for key in row))
        self.columns = [str(column) for column in columns]
        self.rows = [[_cell_text(row.get(column)) for column in self.columns] for row in rows]
        self.numeric = [  # right-aligned: every value given in the column is a number
            any(column in row for row in rows)
            and all(_is_number(row[column]) for row in rows if row.get(column) is not None)
            for column in self.columns
        ]

    def _repr_html_(self) -> str:
        styles = []
        for index, column in enumerate(self.columns):
            longest = max([len(column)] + [len(row[index]) for row in self.rows])
            align = "right" if self.numeric[index] else "left"
            styles.append(f"{STYLE}; text-align:{align}; {ONE_LINE if longest <= SHORT_TEXT else WRAPPED}")
        head = "".join(f'<th style="{style}">{html.escape(column)}</th>' for column, style in zip(self.columns, styles))
        rows = self.rows or [["(none)"] + [""] * (len(self.columns) - 1)]  # an empty table says so
        body = "".join(
            "<tr>"
            + "".join(f'<td style="{style}">{html.escape(cell)}</td>' for cell, style in zip(row, styles))
            + "</tr>"
            for row in rows
        )
        return f'<table class="kagglekd-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        empty = [["(none)"] + [""] * (len(self.columns) - 1)]
        lines = [[cell.replace("\n", " ") for cell in line] for line in (self.columns, *(self.rows or empty))]
        widths = [max(len(line[i]) for line in lines) for i in range(len(self.columns))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def table(rows: Iterable[Mapping], columns: Iterable[str] | None = None) -> Table:
    """``Table(rows, columns)``: e.g. ``table(report.to_dict()["findings"], ["severity", "message", "fix"])``."""
    return Table(rows, columns)


def split_front_matter(text: str) -> tuple[str | None, str]:
    """(YAML front matter without its ``---`` fences, the rest) of a Markdown text; (None, text) when it has none."""
    lines = text.split("\n")
    if not lines or lines[0].strip() != "---":
        return None, text
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            return "\n".join(lines[1:end]), "\n".join(lines[end + 1 :]).lstrip("\n")
    return None, text


def card_markdown(path: str | Path):
    """A model card (``student/README.md``) for display: its YAML front matter as a fenced ``yaml`` block (a
    Markdown renderer would run it together into one paragraph), then the card's Markdown."""
    from IPython.display import Markdown

    front, body = split_front_matter(Path(path).read_text(encoding="utf-8"))
    if front is None:
        return Markdown(body)
    return Markdown(f"Hub metadata (YAML front matter of `{Path(path).name}`):\n\n```yaml\n{front}\n```\n\n{body}")


def _saved(run_dir: Path) -> str:
    if str(run_dir.resolve()).startswith(KAGGLE_WORKING):
        return "saved with the notebook version: its **Output** tab, or `kaggle kernels output OWNER/SLUG -p DIR`"
    return "on this machine's disk"


def what_next_text(run_dir: str | Path, smoke: bool, real_run_dir: str | Path | None = None) -> str:
    """The closing Markdown. After a SMOKE run (which wrote to ``run_dir``): how to train for real, and where that
    run writes (``real_run_dir``, default ``run_dir``). After a real run: where the student and its card are."""
    run_dir = Path(run_dir)
    push = (
        "To change the preset or the kit and push again from your machine: "
        "`python -m kagglekd bundle --owner YOU --out DIR` (add the same `--title`/`--slug` and `--accelerator`), "
        "then `kaggle kernels push -p DIR`: a new version of the same kernel."
    )
    if smoke:
        real = Path(real_run_dir) if real_run_dir is not None else run_dir
        return "\n".join(
            [
                "## What next",
                "",
                "This was a **SMOKE** run: tiny random models for a few steps on the offline corpus. It shows that "
                f"every stage runs here; its numbers say nothing about distillation. It wrote to `{run_dir}`.",
                "",
                "1. In the parameters cell at the top set `SMOKE = False` (and `PRESET` to the pair you want).",
                "2. **Save Version → Save & Run All (Commit)**: the whole notebook runs in the background, up to 12 h, "
                "on the accelerator in the notebook's settings; you can close the browser.",
                f"3. The real run writes to `{real}` ({_saved(real)}): checkpoints, `history.csv`, the charts, and "
                f"the student with its model card in `{real / STUDENT_DIR}`.",
                "",
                push,
            ]
        )
    student = run_dir / STUDENT_DIR
    return "\n".join(
        [
            "## What next",
            "",
            f"* The distilled student (weights, tokenizer, config): `{student}`; its model card: "
            f"`{student / 'README.md'}` (data, config and the numbers above), {_saved(run_dir)}.",
            f"* The training history (`history.csv`), charts and checkpoints are in `{run_dir}`.",
            "* Publish it: `huggingface_hub.upload_folder(folder_path=..., repo_id=...)` on the `student/` folder, "
            "or **New Model** from the version's Output.",
            "* Stopped by the 12 h limit? Attach this version's output as an input (Add Input → your notebook) "
            "and Save & Run All again: training resumes from the newest checkpoint.",
            "",
            push,
        ]
    )


def what_next(preset, run_dir: str | Path | None, smoke: bool):
    """``what_next_text`` as Markdown for the notebook's last cell, for the notebook's ``PRESET``, ``RUN_DIR`` and
    ``SMOKE`` (the run dirs come from ``env.notebook_config``, as every stage's do)."""
    from IPython.display import Markdown

    from kagglekd.env import notebook_config

    here = notebook_config(preset, run_dir, smoke=smoke).output_dir
    real = notebook_config(preset, run_dir, smoke=False).output_dir
    return Markdown(what_next_text(here, smoke, real_run_dir=real))
