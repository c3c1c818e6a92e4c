"""Evaluation arithmetic and the run's history table.

Perplexity is exp(token-weighted mean student cross-entropy) and nothing else: not exp(KD loss), not a
mean of per-batch perplexities.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kagglekd.config import COMPONENTS
from kagglekd.rundir import HISTORY_FILE

# Columns every history.csv has, in this order; components a run adds come after them.
HISTORY_COLUMNS = (
    ["step", "epoch", "lr", "loss", *COMPONENTS]
    + [f"w_{c}" for c in COMPONENTS]
    + [f"share_{c}" for c in COMPONENTS]
    + ["grad_norm", "tokens", "tokens_per_s", "skipped", "eval_ppl", "eval_kd", "eval_top1_agreement", "eval_ppl_ema"]
)


def perplexity(ce_sum: float, tokens: int) -> float:
    """exp of the token-weighted mean cross-entropy; ``inf`` when it overflows, NaN with no tokens."""
    if tokens <= 0:
        return float("nan")
    mean = ce_sum / tokens
    return math.exp(mean) if mean < 700 else float("inf")


@dataclass
class EvalTotals:
    """Running sums over eval batches; every mean is weighted by valid target tokens."""

    tokens: int = 0
    ce_sum: float = 0.0
    kd_sum: float = 0.0
    agree: int = 0
    # positions where the teacher's top-1 could be compared (cross-tokenizer: aligned ones); 0 = all tokens
    compared: int = 0

    def add(self, tokens: int, ce_sum: float, kd_sum: float = 0.0, agree: int = 0, compared: int = 0) -> None:
        self.tokens += tokens
        self.ce_sum += ce_sum
        self.kd_sum += kd_sum
        self.agree += agree
        self.compared += compared

    @property
    def ppl(self) -> float:
        return perplexity(self.ce_sum, self.tokens)

    @property
    def kd(self) -> float:
        return self.kd_sum / self.tokens if self.tokens else float("nan")

    @property
    def top1_agreement(self) -> float:
        over = self.compared or self.tokens
        return self.agree / over if over else float("nan")


class HistoryWriter:
    """history.csv: one row per optimizer step, flushed as it is written so a killed run keeps its rows."""

    def __init__(self, path: Path, extra_columns: Iterable[str] = ()):
        self.path = Path(path)
        self.columns = HISTORY_COLUMNS + [c for c in extra_columns if c not in HISTORY_COLUMNS]
        self.rows: list[dict] = []

    def reset(self, rows: list[dict]) -> None:
        """Rewrite the file with ``rows`` (used on resume: the checkpoint's rows are the truth)."""
        self.rows = [dict(r) for r in rows]
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def update_last(self, values: dict) -> None:
        """Add eval columns to the newest row (the step the eval followed) and rewrite the file."""
        self.rows[-1].update(values)
        self.reset(self.rows)


def progress_postfix(row: dict) -> dict:
    """The progress bar's postfix of one history row: loss, LR, tokens/s, and on runs that generate the share of
    the step spent in ``generate`` and the mean generated length."""
    postfix = {"loss": f"{row['loss']:.3f}", "lr": f"{row['lr']:.2e}", "tok_s": f"{row['tokens_per_s']:.0f}"}
    if "generation_share" in row:
        postfix["gen"] = f"{row['generation_share']:.0%}"
        if not math.isnan(row["generated_length"]):
            postfix["gen_len"] = f"{row['generated_length']:.0f}"
    return postfix


def read_history(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / HISTORY_FILE)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table for the CLI and report.md (markdown pipe syntax, readable in a terminal too)."""

    def cell(value) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            # 4 significant digits below 1,000; whole numbers with separators above (".4g" turns 12,345 into
            # 1.234e+04 and 9,999.7 into 1e+04)
            return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(s.ljust(w) for s, w in zip(cells, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)
