"""Figures: the LR plan, the memory plan, training history, component shares, eval comparison; LiveChart.

Every ``plot_*`` returns the matplotlib Figure and, when ``path`` is given, writes it as a PNG. Figures are
built with the object API (``matplotlib.figure.Figure``), so nothing depends on pyplot's global state or on a
display: ``Figure.savefig`` renders with Agg whatever backend is active (headless is fine); notebooks show
the returned Figure. ``LiveChart`` renders ``plot_history`` to ``live_chart.png`` and
updates one IPython display handle (not ipywidgets: papermill / Kaggle "Save & Run All" do not save widget
output, but they do save a display handle's final state).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

GiB = 1024**3
_PART_LABELS = {
    "runtime_overhead": "CUDA context / runtime",
    "teacher_weights": "teacher weights",
    "student_weights": "student weights (fp32)",
    "student_grads": "student grads",
    "optimizer_states": "AdamW states",
    "autocast_copies": "autocast fp16 copies",
    "student_activations": "student activations",
    "attention_maps": "attention maps [B,H,T,T]",
    "teacher_activations": "teacher activations",
    "student_logits": "student logits",
    "teacher_logits": "teacher logits",
    "kd_intermediates": "KD intermediates (chunk)",
    "sar_router_states": "SAR router states",
}


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_lr_plan(plan, path: str | Path | None = None) -> Figure:
    """LR against optimizer step; warmup shaded with its share; micro-batches on a secondary x axis;
    a marker where the LR first reaches 0 before the end."""
    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(plan.optimizer_steps))
    ax.plot(steps, plan.lrs, color="tab:blue", lw=1.8, label=f"{plan.scheduler_type} (peak {plan.learning_rate:g})")
    if plan.warmup_steps:
        ax.axvspan(
            0,
            plan.warmup_steps,
            color="tab:orange",
            alpha=0.18,
            label=f"warmup: {plan.warmup_steps} steps ({plan.warmup_fraction:.1%})",
        )
        ax.annotate(
            f"warmup {plan.warmup_fraction:.1%}",
            xy=(plan.warmup_steps, plan.learning_rate),
            xytext=(6, -14),
            textcoords="offset points",
            color="tab:orange",
            fontsize=9,
        )
    zero = plan.first_zero_lr_step()
    if zero is not None and zero < plan.optimizer_steps - 1:
        ax.plot(
            [zero],
            [0.0],
            marker="X",
            color="tab:red",
            ms=10,
            ls="none",
            label=f"LR hits 0 at step {zero} of {plan.optimizer_steps}",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_xlim(0, max(1, plan.optimizer_steps - 1))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ga = plan.gradient_accumulation_steps
    top = ax.secondary_xaxis("top", functions=(lambda s: s * ga, lambda b: b / ga))
    top.set_xlabel(f"micro-batches (step x accumulation {ga})")
    ax.set_title(
        f"LR plan: {plan.optimizer_steps} optimizer steps, {plan.batches_per_epoch} batches/epoch", fontsize=11, pad=28
    )
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_memory(memory_plan, path: str | Path | None = None) -> Figure:
    """One stacked bar of the predicted parts against the GPU's capacity line, the fraction annotated."""
    fig = Figure(figsize=(7, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    bottom = 0.0
    colors = matplotlib.colormaps["tab20"]
    parts = [(k, v) for k, v in memory_plan.parts.items() if v > 0]
    for index, (name, value) in enumerate(parts):
        gib = value / GiB
        ax.bar(
            [0],
            [gib],
            bottom=bottom,
            width=0.5,
            color=colors(index % 20),
            label=f"{_PART_LABELS.get(name, name)}: {gib:.2f} GiB",
        )
        bottom += gib
    capacity = memory_plan.capacity / GiB
    ax.axhline(capacity, color="tab:red", ls="--", lw=1.5, label=f"{memory_plan.gpu} capacity {capacity:.1f} GiB")
    ax.axhline(0.85 * capacity, color="tab:orange", ls=":", lw=1.2, label="85 % (tight above)")
    ax.annotate(
        f"{memory_plan.total / GiB:.2f} GiB = {memory_plan.fraction:.0%} ({memory_plan.verdict})",
        xy=(0, bottom),
        xytext=(0, 6),
        textcoords="offset points",
        ha="center",
        fontsize=10,
        fontweight="bold",
    )
    ax.set_xlim(-0.6, 0.6)
    ax.set_xticks([0])
    ax.set_xticklabels([f"batch {memory_plan.batch_size} x {memory_plan.max_length} tokens"])
    ax.set_ylim(0, max(capacity, bottom) * 1.12)
    ax.set_ylabel("GiB per device")
    ax.set_title(f"Predicted peak memory on {memory_plan.gpu} ({memory_plan.kd_mode} KD)", fontsize=11)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)  # top = top
    return _save(fig, path)


def _steps(history: pd.DataFrame) -> pd.Series:
    return history["step"] if "step" in history else pd.Series(range(len(history)), index=history.index)


def plot_history(history: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Panels of a run's history: loss components (+ weighted ``w_*``), LR, grad norm, tokens/s, eval perplexity.
    Panels whose columns are missing or all-NaN are left out."""
    history = history if isinstance(history, pd.DataFrame) else pd.DataFrame(history)
    steps = _steps(history)

    def has(column: str) -> bool:
        return column in history and pd.to_numeric(history[column], errors="coerce").notna().any()

    panels = []
    loss_cols = [c for c in ("loss", "kd", "ce") if has(c)] + sorted(
        c for c in history if c.startswith("w_") and has(c)
    )
    if loss_cols:
        panels.append(("loss components", loss_cols, "loss (per valid token)"))
    for column, title, unit in (
        ("lr", "learning rate", "LR"),
        ("grad_norm", "gradient norm", "L2 norm"),
        ("tokens_per_s", "throughput", "tokens / s"),
    ):
        if has(column):
            panels.append((title, [column], unit))
    eval_cols = [c for c in ("eval_ppl", "eval_ppl_ema") if has(c)]
    if eval_cols:
        panels.append(("eval perplexity", eval_cols, "perplexity"))
    columns = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(6 * columns, 3.2 * rows))
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no history yet", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    for index, (title, cols, unit) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, index + 1)
        for column in cols:
            values = pd.to_numeric(history[column], errors="coerce")
            keep = values.notna()
            style = dict(marker="o", ms=4) if title == "eval perplexity" else dict(lw=1.4)
            ax.plot(steps[keep], values[keep], label=column, **style)
        if "skipped" in history and title == "loss components":
            skipped = history["skipped"].fillna(0).astype(bool)
            for step in steps[skipped]:
                ax.axvline(step, color="tab:red", alpha=0.3, lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if len(cols) > 1 or title == "loss components":
            ax.legend(fontsize=8)
    fig.suptitle("Training history", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_component_shares(history: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Stacked area of the realised share of each loss component (``share_*`` columns) over steps."""
    history = history if isinstance(history, pd.DataFrame) else pd.DataFrame(history)
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot(1, 1, 1)
    columns = sorted(c for c in history if c.startswith("share_"))
    if not columns:
        ax.text(0.5, 0.5, "no share_* columns in the history", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    steps = _steps(history)
    shares = history[columns].apply(pd.to_numeric, errors="coerce").fillna(0.0)
    ax.stackplot(steps, *[shares[c] for c in columns], labels=[c.removeprefix("share_") for c in columns], alpha=0.85)
    ax.set_ylim(0, max(1.0, float(shares.sum(axis=1).max()) if len(shares) else 1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of the total loss")
    ax.set_title("Realised share of each loss component (weight x value / total)", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_eval_comparison(
    table: dict[str, float], path: str | Path | None = None, title: str = "Eval perplexity (lower is better)"
) -> Figure:
    """Bar chart of named values, e.g. {"teacher": 13.4, "CE-only student": 15.9, "KD student": 15.5}."""
    fig = Figure(figsize=(max(5, 1.6 * len(table)), 4))
    ax = fig.add_subplot(1, 1, 1)
    names, values = list(table), [float(v) for v in table.values()]
    bars = ax.bar(names, values, color=matplotlib.colormaps["tab10"](range(len(names))))
    for bar, value in zip(bars, values):
        label = "n/a" if math.isnan(value) else f"{value:.2f}"
        ax.annotate(
            label,
            xy=(bar.get_x() + bar.get_width() / 2, 0 if math.isnan(value) else value),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=10,
        )
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


class LiveChart:
    """Trainer callback: accumulates logged rows and, every ``every_s`` seconds and at the end, renders
    ``plot_history`` to ``run_dir/live_chart.png`` and (under IPython) updates one display handle."""

    filename = "live_chart.png"

    def __init__(self, run_dir: str | Path, every_s: float = 30.0):
        self.run_dir = Path(run_dir)
        self.every_s = every_s
        self.rows: list[dict] = []
        self._last = -math.inf
        self._handle = None

    @property
    def path(self) -> Path:
        return self.run_dir / self.filename

    def on_log(self, metrics: dict) -> None:
        self.rows.append(dict(metrics))
        self._maybe_render()

    def on_eval(self, metrics: dict) -> None:
        self.rows.append(dict(metrics))
        self._maybe_render()

    def on_end(self, summary: dict) -> None:
        self.render()

    def _maybe_render(self) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.render()

    def render(self) -> Path:
        self._last = time.monotonic()
        plot_history(pd.DataFrame(self.rows), self.path)
        self._show()
        return self.path

    def _show(self) -> None:
        try:
            import IPython
            from IPython import display as ipd
        except ImportError:
            return
        get_ipython = getattr(IPython, "get_ipython", None)
        if get_ipython is None or get_ipython() is None:  # plain Python: the PNG on disk is the output
            return
        image = ipd.Image(filename=str(self.path))
        if self._handle is None:
            self._handle = ipd.display(image, display_id=True)
        else:
            self._handle.update(image)
