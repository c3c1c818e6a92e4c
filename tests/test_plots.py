"""Plots: each writes a non-empty PNG with the expected panels; every axes of every figure the kit makes is
titled and y-labelled, no legend covers a line or lists an unused series, no line hides another; LiveChart
writes its PNG and updates one handle."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from transformers import LlamaConfig

from kagglekd import demo, plots, report
from kagglekd.config import COMPONENTS, DistillConfig
from kagglekd.memory import plan_memory
from kagglekd.metrics import HISTORY_COLUMNS
from kagglekd.schedule import SchedulePlan, plan_schedule

PNG_MAGIC = b"\x89PNG"


def _png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:4] == PNG_MAGIC


def _history(n: int = 20, with_eval: bool = True) -> pd.DataFrame:
    rows = []
    for step in range(n):
        row = {
            "step": step,
            "lr": 1e-3 * (1 - step / n),
            "loss": 3 - step * 0.05,
            "kd": 2 - step * 0.03,
            "ce": 4 - step * 0.05,
            "w_kd": 1.0,
            "w_ce": 2.0,
            "grad_norm": 1.0 + 0.1 * step,
            "tokens_per_s": 1000.0 + step,
            "skipped": step == 5,
            "share_kd": 0.4,
            "share_ce": 0.6,
        }
        if with_eval:
            row["eval_ppl"] = 30.0 - step if step % 5 == 4 else math.nan
            row["eval_ppl_ema"] = 31.0 - step if step % 5 == 4 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_lr_plan_png_has_warmup_and_micro_batch_axis(tmp_path):
    plan = plan_schedule(DistillConfig(warmup_ratio=0.1, gradient_accumulation_steps=4), 400)
    fig = plots.plot_lr_plan(plan, tmp_path / "lr.png")
    assert _png(tmp_path / "lr.png") and len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "learning rate"
    assert "micro-batches" in ax.child_axes[0].get_xlabel()  # the secondary x axis
    assert any("warmup: 10 steps (10.0%)" in label for label in _labels(ax))
    assert not any("LR hits 0" in label for label in _labels(ax))


def test_lr_plan_marks_lr_reaching_zero_early(tmp_path):
    lrs = (0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0, 0.0, 0.0)
    plan = SchedulePlan(32, 4, 8, 8, 2, "linear", {}, 1e-3, lrs)
    fig = plots.plot_lr_plan(plan, tmp_path / "zero.png")
    assert any("LR hits 0 at step 4 of 8" in label for label in _labels(fig.axes[0]))


def test_memory_png_stacks_parts_against_capacity(tmp_path):
    student = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    plan = plan_memory(DistillConfig(), gpu="T4", teacher_cfg=student, student_cfg=student)
    fig = plots.plot_memory(plan, tmp_path / "memory.png")
    assert _png(tmp_path / "memory.png") and len(fig.axes) == 1
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("capacity 15.0 GiB" in label for label in labels)
    assert sum(1 for p in plan.parts.values() if p > 0) + 2 == len(labels)


def test_history_panels_and_missing_columns(tmp_path):
    fig = plots.plot_history(_history(), tmp_path / "h.png")
    assert _png(tmp_path / "h.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "total loss (backpropagated)",
        "KD loss (teacher -> student)",
        "CE loss (next token of the data)",
        "learning rate",
        "gradient norm (before clipping)",
        "throughput",
        "eval perplexity (held-out)",
    ]
    eval_ax = fig.axes[-1]
    assert {line.get_label() for line in eval_ax.get_lines()} == {"eval_ppl", "eval_ppl_ema"}
    assert len(eval_ax.get_lines()[0].get_xdata()) == 4  # only rows with an eval
    sparse = plots.plot_history(pd.DataFrame({"step": [0, 1], "loss": [1.0, 0.9]}), tmp_path / "s.png")
    assert [ax.get_title() for ax in sparse.axes] == ["total loss (backpropagated)"] and _png(tmp_path / "s.png")
    empty = plots.plot_history(pd.DataFrame(), tmp_path / "e.png")
    assert _png(tmp_path / "e.png") and len(empty.axes) == 1


def test_history_with_nan_losses_still_plots(tmp_path):
    history = _history(with_eval=False)
    history.loc[3:6, ["loss", "kd"]] = math.nan
    history.loc[:, "ce"] = math.nan
    fig = plots.plot_history(history, tmp_path / "nan.png")
    assert _png(tmp_path / "nan.png")
    labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert "ce (raw)" not in labels
    assert {"loss", "kd (raw)", "w_kd (weight x raw)", "w_ce (weight x raw)"} <= labels


def test_component_shares_and_eval_comparison(tmp_path):
    fig = plots.plot_component_shares(_history(), tmp_path / "shares.png")
    assert _png(tmp_path / "shares.png") and len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["kd", "ce"]  # COMPONENTS order
    bars = plots.plot_eval_comparison({"teacher": 13.4, "CE-only": 15.9, "KD": 15.5}, tmp_path / "cmp.png")
    assert _png(tmp_path / "cmp.png") and len(bars.axes[0].patches) == 3


# ---- every figure the kit makes ---------------------------------------------------------------------------
def run_history(steps: int = 6, alphas: dict | None = None, eval_at=(2, 5), skipped=(3,)) -> pd.DataFrame:
    """Rows shaped like a real ``history.csv``: every ``HISTORY_COLUMNS`` column, NaN for the components the run
    does not use; ``w_c = alpha_c x c``, ``loss = sum of w_c``, ``share_c = w_c / loss`` (as ``Objective``)."""
    alphas = {"kd": 0.5, "ce": 0.5} if alphas is None else alphas
    raw = {"kd": lambda s: 0.07 + 0.001 * s, "ce": lambda s: 8.3 - 0.15 * s}  # KD small next to CE, as measured
    rows = []
    for step in range(steps):
        row = dict.fromkeys(HISTORY_COLUMNS, math.nan)
        weighted = {c: a * raw[c](step) for c, a in alphas.items() if a > 0}
        for component, value in weighted.items():
            row.update({component: raw[component](step), f"w_{component}": value})
            row[f"share_{component}"] = value / sum(weighted.values())
        row.update(step=step, epoch=step / steps, lr=1e-3 * (1 - step / steps), loss=sum(weighted.values()))
        row.update(grad_norm=1.0 + 0.1 * step, tokens=128, tokens_per_s=600.0 + step, skipped=int(step in skipped))
        if step in eval_at:
            row["eval_ppl"] = 2600.0 - 100 * step
        rows.append(row)
    return pd.DataFrame(rows)


def _tiny_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )


DIAGNOSED = {
    "teacher_model": "HuggingFaceTB/SmolLM2-360M",
    "student_model": "HuggingFaceTB/SmolLM2-135M",
    "batch_size": 4,
    "max_length": 256,
    "dataset_subset_size": 8000,
}


def kit_figures(directory, monkeypatch) -> dict[str, object]:
    """Every figure the kit makes, by name, each also written as ``directory/<name>.png``: every ``plots.plot_*``
    and ``report.plot_size_speed`` on typical and edge-case inputs, and ``diagnose.write_plots`` of a report
    with dry-run rows (figures recorded as it makes them)."""
    from kagglekd import diagnose

    kd, ce_only = run_history(), run_history(alphas={"ce": 1.0}, eval_at=(5,), skipped=())
    dry_run = run_history(steps=2, eval_at=(1,), skipped=())  # diagnose's dry run: a few steps, one eval
    one_step = run_history(steps=1, eval_at=(0,), skipped=())
    lr_plans = {"lr_400": plan_schedule(DistillConfig(warmup_ratio=0.1, gradient_accumulation_steps=4), 400)}
    for steps in (1, 3, 7):
        warmup = 1 if steps > 1 else 0  # a one-step plan cannot warm up
        lr_plans[f"lr_{steps}"] = plan_schedule(DistillConfig(warmup_steps=warmup, max_steps=steps), steps)
    makers = {name: (plots.plot_lr_plan, plan) for name, plan in lr_plans.items()}
    for gpu in ("T4", "cpu"):
        plan = plan_memory(DistillConfig(), gpu=gpu, teacher_cfg=_tiny_config(), student_cfg=_tiny_config())
        makers[f"memory_{gpu}"] = (plots.plot_memory, plan)
    for name, history in {"kd": kd, "ce_only": ce_only, "dry_run": dry_run, "one_step": one_step}.items():
        makers[f"history_{name}"] = (plots.plot_history, history)
        makers[f"shares_{name}"] = (plots.plot_component_shares, history)
    makers["history_empty"] = (plots.plot_history, pd.DataFrame())
    makers["shares_empty"] = (plots.plot_component_shares, pd.DataFrame())
    makers["eval_comparison"] = (plots.plot_eval_comparison, {"teacher": 13.4, "student (CE only)": 15.9, "KD": 15.5})
    makers["eval_one"] = (plots.plot_eval_comparison, {"student (KD)": 2.0, "teacher": math.nan})
    sizes = [
        {"model": "teacher", "parameters_m": 6.04, "forward_tokens_per_s": 2000.0, "generate_tokens_per_s": 90.0},
        {"model": "student (KD)", "parameters_m": 0.643, "forward_tokens_per_s": 376.0, "generate_tokens_per_s": 40},
    ]
    makers["size_speed"] = (report.plot_size_speed, sizes)
    for name, runs in ablation_runs().items():  # demo's ablation chart, outside plots.py
        chart = functools.partial(demo._plot_ablation, seeds=len({run["seed"] for run in runs}), steps=60)
        makers[f"ablation_{name}"] = (chart, demo.summarise_ablation(runs))
    figures = {name: make(data, directory / f"{name}.png") for name, (make, data) in makers.items()}
    recorded = []

    def recording(make):
        return lambda *args, **kwargs: recorded.append(make(*args, **kwargs)) or recorded[-1]

    for name in ("plot_lr_plan", "plot_memory", "plot_component_shares", "plot_history"):
        monkeypatch.setattr(plots, name, recording(getattr(plots, name)))
    for gpu in ("cpu", "T4x2"):
        diagnosed = dataclasses.replace(diagnose.diagnose(DIAGNOSED, gpu=gpu), history=dry_run.to_dict("records"))
        written = diagnose.write_plots(diagnosed, directory / f"diagnose_{gpu}")
        figures.update({f"diagnose_{gpu}_{path.stem}": fig for path, fig in zip(written, recorded[-len(written) :])})
    return figures


def ablation_runs() -> dict[str, list[dict]]:
    """Rows of ``demo.run_ablation``'s runs: three variants over three seeds, and one variant with one seed (sd
    NaN, all bars one height)."""
    three = [
        {"variant": variant, "seed": seed, "eval_ppl": 200.0 + 4 * index + seed, "top1_agreement": 0.3 + 0.01 * seed,
         "train_time_s": 60.0, "tokens_per_s": 900.0}
        for index, variant in enumerate(("CE-only", "KD", "SAR+KA"))
        for seed in range(3)
    ]  # fmt: skip
    one = [{"variant": "KD", "seed": 0, "eval_ppl": 31.7, "top1_agreement": 0.72, "train_time_s": 9.0,
            "tokens_per_s": 800.0}]  # fmt: skip
    return {"seeds": three, "one": one}


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        return kit_figures(tmp_path_factory.mktemp("figures"), patch)


def test_the_figure_walk_covers_every_plot_function(figures):
    made = {name.split("_")[0] for name in figures}
    assert {"lr", "memory", "history", "shares", "eval", "size", "diagnose", "ablation"} <= made
    functions = {name for name in dir(plots) if name.startswith("plot_")}
    assert functions == {"plot_lr_plan", "plot_memory", "plot_history", "plot_component_shares", "plot_eval_comparison"}
    assert len([n for n in figures if n.startswith("diagnose_")]) == 8  # 4 figures x (cpu, T4x2)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").replace("%", ""))
    except ValueError:
        return False
    return True


def test_every_axes_has_a_title_and_a_y_label(figures):
    for name, fig in figures.items():
        assert fig.axes, name
        for ax in fig.axes:
            title = ax.get_title()
            assert title.strip() and not _is_number(title.strip()), (name, title)
            assert ax.get_ylabel().strip(), (name, title)


def _shows_data(handle) -> bool:
    """Whether a legend entry's artist draws something: a line with a finite point, a stacked band or bar with
    a height (an all-NaN share filled with 0 is a band of zero area)."""
    if isinstance(handle, Line2D):
        return bool(np.isfinite(np.asarray(handle.get_ydata(), dtype=float)).any())
    if isinstance(handle, PolyCollection):
        return any(_area(path.vertices) > 0 for path in handle.get_paths())
    if isinstance(handle, BarContainer):
        return any(_shows_data(patch) for patch in handle.patches)
    if isinstance(handle, Patch):  # a bar, or an axvspan
        return any(
            _area(path.vertices) > 0 for path in [handle.get_patch_transform().transform_path(handle.get_path())]
        )
    raise AssertionError(f"unexpected legend handle {handle!r}")


def _area(vertices) -> float:
    x, y = np.asarray(vertices, dtype=float).T
    return abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2


def test_no_legend_lists_a_series_without_data(figures):
    for name, fig in figures.items():
        for ax in fig.axes:
            handles, labels = ax.get_legend_handles_labels()
            for handle, label in zip(handles, labels):
                assert _shows_data(handle), (name, ax.get_title(), label)
    kd_only = run_history(alphas={"kd": 1.0})
    shares = plots.plot_component_shares(kd_only)
    assert _labels(shares.axes[0]) == ["kd"]  # feature, attention, router, ce: all NaN, not listed
    unused = {c for c in COMPONENTS if c != "kd"}
    for ax in plots.plot_history(kd_only).axes:
        drawn = {line.get_label().split(" ")[0].removeprefix("w_") for line in ax.get_lines()}
        assert not drawn & unused, ax.get_title()


def _drawn(fig):
    """Lay out and draw ``fig`` with Agg (as ``savefig`` does); returns the renderer for window extents."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_no_legend_covers_an_axes(figures):
    """Legends sit outside every plotting area (of their own axes and of the neighbours)."""
    for name, fig in figures.items():
        renderer = _drawn(fig)
        boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(other) for other in boxes), (name, ax.get_title())


def test_no_line_hides_another(figures):
    """Two lines of one axes that are equal to within 1 % of the axes' height must differ in line style."""
    for name, fig in figures.items():
        if not name.startswith(("history", "diagnose")):
            continue
        for ax in fig.axes:
            low, high = ax.get_ylim()
            for a, b in itertools.combinations(ax.get_lines(), 2):
                xa, xb = np.asarray(a.get_xdata(), dtype=float), np.asarray(b.get_xdata(), dtype=float)
                if xa.shape != xb.shape or not np.array_equal(xa, xb) or len(xa) < 2:
                    continue
                gap = np.nanmax(np.abs(np.asarray(a.get_ydata(), float) - np.asarray(b.get_ydata(), float)))
                if gap < 0.01 * (high - low):
                    assert a.get_linestyle() != b.get_linestyle(), (name, ax.get_title(), a.get_label(), b.get_label())


def test_a_series_of_one_point_is_drawn_as_a_marker(figures):
    for name in ("history_one_step", "history_dry_run", "diagnose_cpu_dry_run_history", "lr_1"):
        for ax in figures[name].axes:
            for line in ax.get_lines():
                points = np.isfinite(np.asarray(line.get_ydata(), dtype=float)).sum()
                if points == 1:
                    assert line.get_marker() not in ("None", "", None), (name, ax.get_title(), line.get_label())


def test_a_weighted_line_equal_to_its_raw_one_is_not_drawn(figures):
    ce_only = {ax.get_title(): ax for ax in figures["history_ce_only"].axes}
    (line,) = ce_only["CE loss (next token of the data)"].get_lines()  # alpha_ce 1: w_ce == ce
    assert line.get_label() == "ce (raw = weighted, weight 1)"
    assert [line.get_label() for line in ce_only["total loss (backpropagated)"].get_lines()] == ["loss"]


def test_a_single_eval_is_a_marked_value_on_sensible_axes(figures):
    for name, step in (("history_dry_run", 1), ("history_one_step", 0)):
        ax = next(ax for ax in figures[name].axes if ax.get_title().startswith("eval perplexity"))
        (line,) = ax.get_lines()
        value = 2600.0 - 100 * step
        assert line.get_marker() == "o" and list(line.get_ydata()) == [value]
        low, high = ax.get_xlim()
        assert low < step < high and high - low >= 1.0, (name, ax.get_xlim())  # not step +- 0.1
        bottom, top = ax.get_ylim()
        assert bottom < value < top and top - bottom >= 0.1 * value, (name, ax.get_ylim())
        assert f"{value:,.0f}" in [text.get_text() for text in ax.texts]


def test_eval_values_are_written_off_their_line(figures):
    """Each eval's value is written beside its point; a falling perplexity's last value was written above its
    point, on the line coming down to it. No value's text may cross its own line."""
    checked = 0
    for name in ("history_kd", "diagnose_cpu_dry_run_history"):
        fig = figures[name]
        renderer = _drawn(fig)
        ax = next(ax for ax in fig.axes if ax.get_title().startswith("eval perplexity"))
        (line,) = ax.get_lines()
        xy = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float))
        along = np.concatenate([np.linspace(a, b, 400) for a, b in zip(xy[:-1], xy[1:])]) if len(xy) > 1 else xy
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            inside = (along[:, 0] > box.x0) & (along[:, 0] < box.x1) & (along[:, 1] > box.y0) & (along[:, 1] < box.y1)
            assert not inside.any(), (name, text.get_text())
            checked += 1
    assert checked >= 3


def test_lr_plan_ticks_are_whole_steps_and_counts_agree(figures):
    for name in ("lr_1", "lr_3", "lr_7", "lr_400"):
        fig = figures[name]
        _drawn(fig)
        ax = fig.axes[0]
        for axis in (ax.xaxis, ax.child_axes[0].xaxis):  # optimizer steps, micro-batches
            low, high = sorted(axis.get_view_interval())
            ticks = [t for t in axis.get_majorticklocs() if low - 1e-9 <= t <= high + 1e-9]
            assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
    assert figures["lr_1"].axes[0].get_title().startswith("LR plan: 1 optimizer step, ")
    assert figures["lr_3"].axes[0].get_title().startswith("LR plan: 3 optimizer steps, ")
    assert "warmup: 1 step (" in " ".join(_labels(figures["lr_3"].axes[0]))
    assert "warmup: 10 steps (" in " ".join(_labels(figures["lr_400"].axes[0]))


def test_lr_plan_points_are_drawn_whole(figures):
    """The LR plan's first and last steps lay on the x limits (the last dot was cut in half at the right edge) and
    warmup's LR 0 on the bottom one: every point sits inside the x limits, and one on a y limit is not clipped."""
    for name in ("lr_1", "lr_3", "lr_7", "lr_400", "diagnose_cpu_lr_plan"):
        ax = figures[name].axes[0]
        (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
        for line in ax.get_lines():
            xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
            assert (xs > left).all() and (xs < right).all(), (name, line.get_label(), (left, right))
            on_edge = np.isclose(ys, bottom) | np.isclose(ys, top)
            if line.get_marker() not in ("None", "", None) and on_edge.any():
                assert not line.get_clip_on(), (name, line.get_label())


def test_a_small_memory_plan_shows_its_parts_zoomed(figures):
    """A plan of 1 % of the capacity was a sliver at the bottom of the bar chart: an inset shows the same stacked
    parts on their own scale; a plan that fills the chart gets none."""
    from kagglekd.memory import plan_memory

    plan = plan_memory(DistillConfig(), gpu="cpu", teacher_cfg=_tiny_config(), student_cfg=_tiny_config())
    assert plan.total < 0.05 * plan.capacity
    for fig in (plots.plot_memory(plan), figures["memory_cpu"], figures["memory_T4"]):
        (main,) = fig.axes
        (inset,) = main.child_axes
        assert inset.get_title().startswith("zoom: the ") and inset.get_ylabel() in ("MiB", "GiB")
        heights = sum(patch.get_height() for patch in inset.patches)
        assert inset.get_ylim()[1] >= heights > 0
    heights = sum(patch.get_height() for patch in plots.plot_memory(plan).axes[0].child_axes[0].patches)
    assert heights == pytest.approx(plan.total / plots.MiB)  # the parts, in MiB
    full = dataclasses.replace(plan, capacity=plan.total / 0.6)
    assert plots.plot_memory(full).axes[0].child_axes == []
    assert figures["diagnose_T4x2_memory"].axes[0].child_axes == []  # 36 % of a T4: the bar speaks for itself


def test_memory_labels_follow_the_plan_device(figures):
    for name in ("memory_cpu", "diagnose_cpu_memory"):
        labels = " | ".join(_labels(figures[name].axes[0]))
        assert "CUDA" not in labels and "CPU runtime" in labels and "system RAM" in labels, labels
        assert "RAM" in figures[name].axes[0].get_ylabel()
    for name in ("memory_T4", "diagnose_T4x2_memory"):
        labels = " | ".join(_labels(figures[name].axes[0]))
        assert "CUDA context" in labels and "CPU" not in labels, labels


def test_size_speed_panels_are_named_by_their_measure(figures):
    axes = figures["size_speed"].axes
    assert [ax.get_title() for ax in axes] == [t for _, t, _ in report.SIZE_SPEED_PANELS]
    assert [ax.get_ylabel() for ax in axes] == [y for _, _, y in report.SIZE_SPEED_PANELS]
    assert "0.643" in [text.get_text() for text in axes[0].texts]  # the value is on its bar, not in the title


def test_ablation_chart_names_its_counts_and_keeps_equal_bars_on_a_sensible_axis(figures):
    assert figures["ablation_seeds"]._suptitle.get_text().endswith("over 3 seeds")
    one = figures["ablation_one"]
    assert one._suptitle.get_text() == "Ablation: student after 60 steps, mean ± sd over 1 seed"
    for ax, value in zip(one.axes, (31.7, 0.72)):  # one variant, one seed: no sd, one bar
        bottom, top = ax.get_ylim()
        assert bottom < value < top and top - bottom >= 0.1 * value, (ax.get_title(), ax.get_ylim())


class _FakeHandle:
    def __init__(self):
        self.updates = 0

    def update(self, obj):
        self.updates += 1


def test_live_chart_writes_png_and_updates_one_display_handle(tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    import IPython
    from IPython import display as ipd

    shown: list = []
    handle = _FakeHandle()

    def fake_display(obj, display_id=False):
        shown.append((obj, display_id))
        return handle

    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(ipd, "display", fake_display)
    chart = plots.LiveChart(tmp_path, every_s=0.0)
    for row in _history(6).to_dict("records"):
        chart.on_log(row)
    chart.on_eval({"step": 6, "eval_ppl": 20.0})
    chart.on_end({"optimizer_steps": 6})
    assert _png(tmp_path / "live_chart.png")
    assert len(shown) == 1 and shown[0][1] is True  # one handle, created once
    assert handle.updates == 6 + 1 + 1 - 1  # every later render updates it


def test_live_chart_throttles_and_works_without_ipython(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "IPython", None)  # `import IPython` raises ImportError
    chart = plots.LiveChart(tmp_path, every_s=3600)
    chart.on_log({"step": 0, "loss": 1.0})
    first = (tmp_path / "live_chart.png").stat().st_mtime_ns
    chart.on_log({"step": 1, "loss": 0.9})  # within every_s: no re-render
    assert (tmp_path / "live_chart.png").stat().st_mtime_ns == first
    chart.on_end({})
    assert len(chart.rows) == 2 and _png(tmp_path / "live_chart.png")
