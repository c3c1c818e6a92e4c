"""Figures: the LR plan, the memory plan, training history, component shares, eval comparison; LiveChart.

Every ``plot_*`` returns the matplotlib Figure and, when ``path`` is given, writes it as a PNG. Figures are
built with the object API (``matplotlib.figure.Figure``), so nothing depends on pyplot's global state or on a
display: ``Figure.savefig`` renders with Agg whatever backend is active (headless is fine); notebooks show
the returned Figure. ``LiveChart`` renders ``plot_history`` to ``live_chart.png`` and
updates one IPython display handle (not ipywidgets: papermill / Kaggle "Save & Run All" do not save widget
output, but they do save a display handle's final state).

Every axes gets a title and a y label; legends sit outside the plotting area (the figures use matplotlib's
constrained layout, which makes room for them), so no legend covers a line; columns that are all NaN (a
component the run does not use) are neither drawn nor listed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kagglekd.config import COMPONENTS
from kagglekd.schedule import count_noun

GiB = 1024**3
MiB = 1024**2
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
    "cpu_heap_kept": "freed memory kept for reuse (CPU)",
}
# On a CPU the planner's runtime overhead is allocator arenas and thread-pool buffers, not a CUDA context.
_CPU_PART_LABELS = {**_PART_LABELS, "runtime_overhead": "CPU runtime (allocator, thread pools)"}
_COMPONENT_TITLES = {
    "kd": "KD loss (teacher -> student)",
    "ce": "CE loss (next token of the data)",
    "feature": "feature loss (hidden states)",
    "attention": "attention-map loss",
    "router": "router loss (SAR, trains the teacher)",
}
_LEGEND = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)  # right of the axes


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _size(num_bytes: float) -> str:
    """Bytes as GiB, or as MiB below 0.1 GiB (so small parts do not all read 0.00 GiB)."""
    return f"{num_bytes / GiB:.2f} GiB" if num_bytes >= 0.1 * GiB else f"{num_bytes / MiB:.1f} MiB"


def _value_label(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def plot_lr_plan(plan, path: str | Path | None = None) -> Figure:
    """LR against optimizer step (integer ticks); warmup shaded with its share; micro-batches on a secondary x
    axis; a marker where the LR first reaches 0 before the end. Short plans mark every step. The step axis is
    padded (the first and last dots are whole) and the dots are not clipped at LR 0 (warmup starts there)."""
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(plan.optimizer_steps))
    dots = dict(marker="o", ms=4, clip_on=False) if plan.optimizer_steps <= 30 else {}  # a step is a dot
    ax.plot(
        steps, plan.lrs, color="tab:blue", lw=1.8, label=f"{plan.scheduler_type} (peak {plan.learning_rate:g})", **dots
    )
    if plan.warmup_steps:
        ax.axvspan(
            0,
            plan.warmup_steps,
            color="tab:orange",
            alpha=0.18,
            label=f"warmup: {count_noun(plan.warmup_steps, 'step')} ({plan.warmup_fraction:.1%})",
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
            clip_on=False,  # on the axis line: a whole cross, not its upper half
            label=f"LR hits 0 at step {zero} of {plan.optimizer_steps}",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_xlim(*_step_limits(pd.Series(steps)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ga = plan.gradient_accumulation_steps
    top = ax.secondary_xaxis("top", functions=(lambda s: s * ga, lambda b: b / ga))
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_xlabel(f"micro-batches (step x accumulation {ga})")
    ax.set_title(
        f"LR plan: {count_noun(plan.optimizer_steps, 'optimizer step')}, "
        f"{count_noun(plan.batches_per_epoch, 'batch', 'batches')} per epoch",
        fontsize=11,
    )
    ax.legend(**_LEGEND)
    return _save(fig, path)


def plot_memory(memory_plan, path: str | Path | None = None) -> Figure:
    """One stacked bar of the predicted parts against the device's capacity line, the fraction annotated.

    The device of the plan decides the words: on ``cpu`` the capacity is system RAM and the runtime overhead
    is the CPU allocator's, not a CUDA context. A plan under ``ZOOM_BELOW`` of the capacity (a SMOKE run's tiny
    models) also gets an inset of its parts on their own scale (``_zoom_parts``)."""
    on_cpu = memory_plan.gpu == "cpu"
    part_labels = _CPU_PART_LABELS if on_cpu else _PART_LABELS
    device = "CPU (system RAM)" if on_cpu else memory_plan.gpu
    where = {"both": "per device", "student": "on the student GPU", "teacher": "on the teacher GPU"}
    fig = Figure(figsize=(8, 5.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    bottom = 0.0
    colors = matplotlib.colormaps["tab20"]
    parts = [(k, v) for k, v in memory_plan.parts.items() if v > 0]
    for index, (name, value) in enumerate(parts):
        gib = value / GiB
        label = f"{part_labels.get(name, name)}: {_size(value)}"
        ax.bar([0], [gib], bottom=bottom, width=0.5, color=colors(index % 20), label=label)
        bottom += gib
    capacity = memory_plan.capacity / GiB
    capacity_label = f"system RAM {capacity:.1f} GiB" if on_cpu else f"{memory_plan.gpu} capacity {capacity:.1f} GiB"
    ax.axhline(capacity, color="tab:red", ls="--", lw=1.5, label=capacity_label)
    ax.axhline(0.85 * capacity, color="tab:orange", ls=":", lw=1.2, label="85 % (tight above)")
    ax.annotate(
        f"{_size(memory_plan.total)} = {memory_plan.fraction:.0%} ({memory_plan.verdict})",
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
    ax.set_ylabel("GiB of system RAM" if on_cpu else f"GiB {where.get(memory_plan.placement, 'per device')}")
    ax.set_title(f"Predicted peak memory on {device} ({memory_plan.kd_mode} KD)", fontsize=11)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], **{**_LEGEND, "loc": "center left", "bbox_to_anchor": (1.02, 0.5)})
    if 0 < memory_plan.total < ZOOM_BELOW * memory_plan.capacity:  # a sliver against the capacity: zoom in
        _zoom_parts(ax, [value for _, value in parts], [colors(i % 20) for i in range(len(parts))])
    return _save(fig, path)


ZOOM_BELOW = 0.15  # a memory plan under this fraction of the capacity gets the zoomed inset of its parts


def _zoom_parts(ax, values: list[float], colours: list) -> None:
    """An inset in the empty middle of the memory chart (under the 85 % line): the same stacked parts on their
    own scale, in MiB below 1 GiB, so a plan of 1 % of the capacity still shows what it is made of."""
    total = sum(values)
    unit, scale = ("MiB", MiB) if total < GiB else ("GiB", GiB)
    inset = ax.inset_axes((0.3, 0.2, 0.4, 0.45))
    bottom = 0.0
    for value, colour in zip(values, colours):
        inset.bar([0], [value / scale], bottom=bottom, width=0.5, color=colour)
        bottom += value / scale
    inset.set_xlim(-0.6, 0.6)
    inset.set_xticks([])
    inset.set_ylim(0, bottom * 1.1)
    inset.set_ylabel(unit, fontsize=8)
    inset.tick_params(labelsize=8)
    inset.set_title(f"zoom: the {_size(total)} to scale", fontsize=9)


# ---- history -------------------------------------------------------------------------------------------
@dataclass
class _Panel:
    """One axes of ``plot_history``: its title, y label and the (column, legend label, line style) it draws."""

    title: str
    ylabel: str
    series: list[tuple[str, str, dict]] = field(default_factory=list)
    markers: bool = False  # sparse columns (evals): points with their values written beside them


def _steps(history: pd.DataFrame) -> pd.Series:
    return history["step"] if "step" in history else pd.Series(range(len(history)), index=history.index)


def _numeric(history: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(history[column], errors="coerce")


def _has(history: pd.DataFrame, column: str) -> bool:
    """The column exists and holds at least one number (an unused component's column is all NaN)."""
    return column in history and _numeric(history, column).notna().any()


def _same_series(a: pd.Series, b: pd.Series) -> bool:
    """Equal where either is a number (NaN in the same rows): one line would hide the other exactly."""
    a, b = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
    return bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a, b, rtol=1e-6, atol=0.0, equal_nan=True))


def _components(history: pd.DataFrame) -> list[str]:
    """The kit's components in their fixed order, then any other ``w_*`` component a run added."""
    extra = [c[2:] for c in history if c.startswith("w_") and c[2:] not in COMPONENTS]
    return [*COMPONENTS, *extra]


def _component_panel(history: pd.DataFrame, name: str) -> _Panel | None:
    """Raw value (solid) and weighted value (dashed) of one component; one line when they are equal."""
    raw, weighted = _has(history, name), _has(history, f"w_{name}")
    if not (raw or weighted):
        return None
    panel = _Panel(_COMPONENT_TITLES.get(name, f"{name} loss"), "loss per valid token")
    if raw:
        panel.series.append((name, f"{name} (raw)", dict(lw=1.6)))
    if weighted and raw and _same_series(_numeric(history, name), _numeric(history, f"w_{name}")):
        panel.series[0] = (name, f"{name} (raw = weighted, weight 1)", dict(lw=1.6))
    elif weighted:
        panel.series.append((f"w_{name}", f"w_{name} (weight x raw)", dict(lw=1.6, ls="--")))
    return panel


def _history_panels(history: pd.DataFrame) -> list[_Panel]:
    """The panels ``plot_history`` draws: the total loss, one per component in use, LR, grad norm, throughput,
    eval perplexity. The total and the components are separate panels: a component that is most of the total
    (CE in a short KD run, the only component of a CE-only run) would otherwise hide it."""
    panels = []
    if _has(history, "loss"):
        panels.append(_Panel("total loss (backpropagated)", "loss per valid token", [("loss", "loss", dict(lw=1.6))]))
    panels += [p for p in (_component_panel(history, name) for name in _components(history)) if p is not None]
    for column, title, unit in (
        ("lr", "learning rate", "LR"),
        ("grad_norm", "gradient norm (before clipping)", "L2 norm"),
        ("tokens_per_s", "throughput", "tokens / s"),
    ):
        if _has(history, column):
            panels.append(_Panel(title, unit, [(column, column, dict(lw=1.4))]))
    evals = [(c, c, dict(marker="o", ms=5, lw=1.2)) for c in ("eval_ppl", "eval_ppl_ema") if _has(history, c)]
    if evals:
        panels.append(_Panel("eval perplexity (held-out)", "perplexity", evals, markers=True))
    return panels


def _step_limits(steps: pd.Series) -> tuple[float, float]:
    """The run's step range, a little padded; a single step gets one step either side (not +-0.1)."""
    numbers = pd.to_numeric(steps, errors="coerce").dropna()
    low, high = (float(numbers.min()), float(numbers.max())) if len(numbers) else (0.0, 1.0)
    if high == low:
        low, high = low - 1, high + 1
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def _in_a_dip(points: list[tuple[float, float]], index: int) -> bool:
    """Whether point ``index`` lies below the mean of its neighbours: the line comes down to it, so a label above
    it would sit on the line (an eval perplexity falling from one eval to the next)."""
    neighbours = [points[i][1] for i in (index - 1, index + 1) if 0 <= i < len(points)]
    return bool(neighbours) and points[index][1] < sum(neighbours) / len(neighbours)


def _draw_panel(ax, panel: _Panel, history: pd.DataFrame, steps: pd.Series) -> None:
    for column, label, style in panel.series:
        values = _numeric(history, column)
        keep = values.notna()
        if keep.sum() == 1:  # a line through one point draws nothing: mark the point
            style = {"marker": "o", "ms": 5, **style}
        line = ax.plot(steps[keep], values[keep], label=label, **style)[0]
        if panel.markers:
            points = list(zip(steps[keep], values[keep]))
            shown = range(len(points)) if len(points) <= 6 else [len(points) - 1]  # many evals: the last only
            for index in shown:
                x, y = points[index]
                below = _in_a_dip(points, index)  # a value the line reaches from above: its label under it
                ax.annotate(_value_label(float(y)), xy=(x, y), xytext=(0, -8 if below else 7),
                            textcoords="offset points", ha="center", va="top" if below else "baseline",
                            fontsize=8, color=line.get_color())  # fmt: skip
    if panel.markers:  # room for the values above the points; one value: a +-10 % band around it
        ax.margins(y=0.15)
        values = pd.concat([_numeric(history, c) for c, _, _ in panel.series]).dropna()
        if values.nunique() == 1:
            value = float(values.iloc[0])
            ax.set_ylim(*(sorted((0.9 * value, 1.1 * value)) if value else (-1.0, 1.0)))
    if "skipped" in history and panel.series[0][0] == "loss":
        skipped = pd.to_numeric(history["skipped"], errors="coerce").fillna(0).astype(bool)
        for index, step in enumerate(steps[skipped]):
            ax.axvline(step, color="tab:red", alpha=0.3, lw=0.8, label="skipped step" if index == 0 else None)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlim(*_step_limits(steps))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(**_LEGEND)


def plot_history(history: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Panels of a run's history (``history.csv`` rows): total loss, each component in use (raw and weighted),
    LR, grad norm, tokens/s, eval perplexity. Columns that are missing or all NaN are left out."""
    history = history if isinstance(history, pd.DataFrame) else pd.DataFrame(history)
    steps = _steps(history)
    panels = _history_panels(history)
    columns = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(6.5 * columns, 3.0 * rows + 0.5), layout="constrained")
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no history yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("Training history: no logged steps yet", fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss per valid token")
        return _save(fig, path)
    for index, panel in enumerate(panels):
        _draw_panel(fig.add_subplot(rows, columns, index + 1), panel, history, steps)
    fig.suptitle("Training history", fontsize=12)
    return _save(fig, path)


def plot_component_shares(history: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """Stacked area of the realised share of each loss component in use (``share_*`` columns) over steps.

    Share columns that are all NaN (components the run does not use, and ``share_router``, which is no share
    of the student's objective) are not drawn and not listed. A single logged step is one stacked bar."""
    history = history if isinstance(history, pd.DataFrame) else pd.DataFrame(history)
    fig = Figure(figsize=(8.5, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title("Realised share of each loss component (weight x value / total)", fontsize=11)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of the student's objective")
    order = [f"share_{c}" for c in _components(history)]
    columns = [c for c in order if _has(history, c)]
    columns += sorted(c for c in history if c.startswith("share_") and c not in order and _has(history, c))
    if not columns:
        ax.text(0.5, 0.5, "no share_* values in the history", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    steps = _steps(history)
    shares = history[columns].apply(pd.to_numeric, errors="coerce").fillna(0.0)
    labels = [c.removeprefix("share_") for c in columns]
    if len(shares) == 1:  # an area over one step has no width
        bottom = 0.0
        for column, label in zip(columns, labels):
            ax.bar(steps, shares[column], bottom=bottom, width=0.6, label=label, alpha=0.85)
            bottom += float(shares[column].iloc[0])
    else:
        ax.stackplot(steps, *[shares[c] for c in columns], labels=labels, alpha=0.85)
    ax.set_ylim(0, max(1.0, float(shares.sum(axis=1).max())))
    ax.set_xlim(*_step_limits(steps))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(**{**_LEGEND, "fontsize": 9})
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_eval_comparison(
    table: dict[str, float],
    path: str | Path | None = None,
    title: str = "Eval perplexity (lower is better)",
    ylabel: str = "perplexity",
) -> Figure:
    """Bar chart of named values, e.g. {"teacher": 13.4, "CE-only student": 15.9, "KD student": 15.5}; each bar
    carries its value (NaN: "n/a")."""
    fig = Figure(figsize=(max(5, 1.6 * len(table)), 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    names, values = list(table), [float(v) for v in table.values()]
    bars = ax.bar(names, values, color=matplotlib.colormaps["tab10"](range(len(names))))
    for bar, value in zip(bars, values):
        ax.annotate(
            "n/a" if math.isnan(value) else f"{value:.2f}",
            xy=(bar.get_x() + bar.get_width() / 2, 0 if math.isnan(value) else value),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=10,
        )
    ax.margins(y=0.12)  # room for the values above the bars
    ax.set_ylabel(ylabel)
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
