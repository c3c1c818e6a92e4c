"""Plots: each writes a non-empty PNG with the expected panels; LiveChart writes its PNG and updates one handle."""

from __future__ import annotations

import math
import sys

import pandas as pd
import pytest
from transformers import LlamaConfig

from kagglekd import plots
from kagglekd.config import DistillConfig
from kagglekd.memory import plan_memory
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
    assert titles == ["loss components", "learning rate", "gradient norm", "throughput", "eval perplexity"]
    eval_ax = fig.axes[-1]
    assert {line.get_label() for line in eval_ax.get_lines()} == {"eval_ppl", "eval_ppl_ema"}
    assert len(eval_ax.get_lines()[0].get_xdata()) == 4  # only rows with an eval
    sparse = plots.plot_history(pd.DataFrame({"step": [0, 1], "loss": [1.0, 0.9]}), tmp_path / "s.png")
    assert [ax.get_title() for ax in sparse.axes] == ["loss components"] and _png(tmp_path / "s.png")
    empty = plots.plot_history(pd.DataFrame(), tmp_path / "e.png")
    assert _png(tmp_path / "e.png") and len(empty.axes) == 1


def test_history_with_nan_losses_still_plots(tmp_path):
    history = _history(with_eval=False)
    history.loc[3:6, ["loss", "kd"]] = math.nan
    history.loc[:, "ce"] = math.nan
    fig = plots.plot_history(history, tmp_path / "nan.png")
    assert _png(tmp_path / "nan.png")
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert "ce" not in labels and {"loss", "kd", "w_ce", "w_kd"} <= labels


def test_component_shares_and_eval_comparison(tmp_path):
    fig = plots.plot_component_shares(_history(), tmp_path / "shares.png")
    assert _png(tmp_path / "shares.png") and len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["ce", "kd"]
    bars = plots.plot_eval_comparison({"teacher": 13.4, "CE-only": 15.9, "KD": 15.5}, tmp_path / "cmp.png")
    assert _png(tmp_path / "cmp.png") and len(bars.axes[0].patches) == 3


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
