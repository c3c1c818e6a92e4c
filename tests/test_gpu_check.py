"""bench/gpu_check.py at tiny scale on CPU, so the GPU check cannot rot before a GPU runs it: a row per variant with
finite figures, what the trainer really ran, the on-policy rows' planned vs measured generation time, errors (OOM
included) recorded while the next variant still runs, the time budget, and the precision/accelerate switches the GPU
rows rely on."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from kagglekd import models

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up while the class is built
_spec.loader.exec_module(gpu_check)

# What each variant that runs on a CPU must have run: (fused_kd, kd_top_k, cross-tokenizer, SAR routers trained).
RAN = {
    "same:preset": (True, 256, False, False),
    "cross:preset": (True, 256, True, False),
    "same:unfused": (False, 256, False, False),
    "same:full-vocab": (True, None, False, False),
    "same:unfused,full-vocab": (False, None, False, False),
    "cross:sar": (True, 256, True, True),
    "cross:unfused": (False, 256, True, False),
    "same:on-policy": (True, 256, False, False),
    "cross:on-policy": (True, 256, True, False),
}
ON_POLICY = {"same:on-policy", "cross:on-policy"}  # lmbda 1: every micro-batch is the student's continuation
GENERATION = ("generation_s_measured", "generation_s_planned", "generation_ratio", "generated_length")


def _table(lines: list[str]) -> list[list[str]]:
    """The cells of the rows of the first Markdown table in ``lines`` (header and rule row left out)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [line.strip("| ").split(" | ") for line in lines[start + 2 : end]]


def _run(tmp_path, *extra: str) -> tuple[list[dict], list[str]]:
    """Run the check tiny; (rows of the JSON, variant ids of the main Markdown table's rows)."""
    out = tmp_path / "gpu.md"
    gpu_check.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work"), *extra])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    return rows, [cells[0] for cells in _table(out.read_text().splitlines())]


@pytest.mark.usefixtures("use_kit_cache")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the tiny run")
def test_tiny_run_measures_every_variant_a_cpu_can_run(tmp_path):
    rows, table = _run(tmp_path)
    ids = [variant.id for variant in gpu_check.VARIANTS]
    assert [row["id"] for row in rows] == ids and table == ids
    by_name = {row["variant"]: row for row in rows if row["status"] == "ok"}
    assert set(by_name) == set(RAN)  # every one-device fp16 variant ran (in fp32: no autocast on CPU)
    for name, (fused, top_k, cross, sar) in RAN.items():
        row, facts = by_name[name], by_name[name]["facts"]
        assert row["steps"] == 2 and row["dtype"] == "fp32" and facts["strategy"] == "single"
        for key in ("planned_gib", "planned_comparable_gib", "measured_gib"):
            assert len(row[key]) == 1 and math.isfinite(row[key][0]) and row[key][0] > 0, (name, key, row[key])
        assert math.isfinite(row["ratio"]) and math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        # the student's weights are loaded after the baseline and live through the steps
        assert row["measured_gib"][0] * 2**30 >= 4 * facts["student_parameters"], name
        assert (facts["fused_kd"], facts["kd_top_k"], facts["cross_tokenizer"]) == (fused, top_k, cross), name
        assert (facts["sar_router_parameters"] > 0) == sar, name
        assert facts["teacher_vocab"] == (8192 if cross else 4096) and facts["student_vocab"] == 4096
        assert (facts["lmbda"] == 1.0) == (name in ON_POLICY) and not facts["seq_kd"], name
        assert all(key not in row for key in GENERATION) or name in ON_POLICY, name  # off-policy: no figures
    for row in rows:
        if row["variant"] not in RAN:
            assert row["status"] == "skipped" and ("GPU" in row["note"] or "CPU" in row["note"]), row
    # on-policy: every step timed generate (tiny blocks: 16 prompt tokens, up to 17 new), planned on the CPU profile
    lines = (tmp_path / "gpu.md").read_text().splitlines()
    section = lines.index("## On-policy generation: planned vs measured seconds in generate per optimizer step")
    assert 'checks `DECODE_OVERHEAD_S["gpu"]` and `BANDWIDTH`' in lines[section + 2]
    generation_table = {cells[0]: cells for cells in _table(lines[section:])}
    assert set(generation_table) == {f"{name}/fp16" for name in ON_POLICY}
    for name in ON_POLICY:
        row = by_name[name]
        steps = row["generation_s_steps"]
        assert len(steps) == 2 and all(s is not None and s > 0 for s in steps), (name, steps)
        assert row["generation_s_measured"] == row["generation_s_steps"][1]  # the median after the first step
        for key in GENERATION:
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert 1 <= row["generated_length"] <= row["generation_new_tokens"] == 17, name
        assert row["generation_profile"] == "cpu" and row["generation_kv_cache_gib"] > 0, name
        cells = generation_table[f"{name}/fp16"]
        figures = (row["generation_s_measured"], row["generation_s_planned"], row["generation_ratio"])
        assert cells[2:5] == [f"{figures[0]:.3f}", f"{figures[1]:.3f}", f"{figures[2]:.2f}"], cells
        assert cells[5:7] == [f"{row['generated_length']:.1f}", "17"], cells


@pytest.mark.usefixtures("use_kit_cache")
def test_an_error_is_recorded_and_the_next_variant_runs(tmp_path, monkeypatch):
    variants = (
        gpu_check.Variant("same:bad-divergence", "same", {"divergence": "nonsense"}),
        gpu_check.Variant("same:oom", "same"),
        gpu_check.Variant("same:preset", "same"),
    )
    monkeypatch.setattr(gpu_check, "VARIANTS", variants)
    measure = gpu_check.measure

    def out_of_memory_once(config, dtype, steps, finish=None):
        if config.output_dir.endswith("same-oom-fp16"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return measure(config, dtype, steps, finish)

    monkeypatch.setattr(gpu_check, "measure", out_of_memory_once)
    rows, table = _run(tmp_path)
    assert table == [variant.id for variant in variants]
    assert [row["status"] for row in rows] == ["error", "error", "ok"]
    assert "divergence" in rows[0]["note"] and rows[1]["note"].startswith("OOM: OutOfMemoryError")


@pytest.mark.usefixtures("use_kit_cache")
def test_time_budget_skips_the_rest_with_a_note(tmp_path):
    rows, table = _run(tmp_path, "--budget-s", "0", "--only", "same:preset")
    assert table == ["same:preset/fp16", "same:preset/bf16"]
    assert rows[0]["status"] == "skipped" and "time budget" in rows[0]["note"]
    assert not (tmp_path / "work" / "models").exists()  # nothing was built


def test_generation_seconds_are_the_share_of_the_step_time_and_the_table_names_the_constants():
    class NoMeter:
        def step(self):
            pass

    recorder = gpu_check.StepRecorder(NoMeter())
    history = [{"step": s, "tokens": 100, "tokens_per_s": 50.0 * (s + 1), "generation_share": 0.25,
                "generated_length": 7.0 + s} for s in range(3)]  # fmt: skip
    for row in history:
        recorder.on_log(row)
    recorder.on_log({"step": 3, "tokens": 100, "tokens_per_s": 50.0})  # off-policy row: no generation figures
    assert [r.get("generation_s") for r in recorder.rows] == [0.5, 0.25, pytest.approx(0.5 / 3), None]
    plan = {"seconds_per_step": 0.5, "kv_cache_bytes": 2**30, "new_tokens": 17, "profile": "H100", "peak_flops": 1e15}
    figures = gpu_check.generation_figures({"rows": recorder.rows[:3], "generation_plan": plan})
    assert figures["generation_s_measured"] == pytest.approx((0.25 + 0.5 / 3) / 2)  # median after the first step
    assert figures["generation_ratio"] == pytest.approx(figures["generation_s_measured"] / 0.5)
    assert figures["generated_length"] == 8.5 and figures["generation_kv_cache_gib"] == 1.0
    assert gpu_check.generation_figures({"rows": recorder.rows, "generation_plan": None}) == {}
    row = {"id": "same:on-policy/fp16", "dtype": "fp16+GradScaler", **figures}
    text = "\n".join(gpu_check._generation_table([row]))
    assert 'DECODE_OVERHEAD_S["gpu"]` and `BANDWIDTH["H100"]`' in text and "no peak_flops" not in text
    unknown = {**row, "generation_profile": "unknown (NVIDIA H200)", "generation_peak_flops": 0.0}
    text = "\n".join(gpu_check._generation_table([unknown]))
    assert '`BANDWIDTH["H200"]` (no peak_flops for unknown (NVIDIA H200): no compute bound in the plan)' in text
    assert gpu_check._generation_table([{"id": "same:preset/fp16", "status": "ok"}]) == []


def test_skip_reasons_follow_the_gpus_and_their_compute_capability():
    def info(count: int, capability: str = "7.5") -> dict:
        return {"gpu_count": count, "gpus": [{"capability": capability}] * count}

    args = gpu_check.parse_args(["--tiny"])
    bf16, split, ddp = (next(v for v in gpu_check.VARIANTS if v.id == i) for i in
                        ("same:preset/bf16", "same:split/fp16", "same:ddp/fp16"))  # fmt: skip
    assert "compute capability 7.5" in gpu_check.skip_reason(bf16, info(2, "7.5"), args)
    assert gpu_check.skip_reason(bf16, info(1, "9.0"), args) is None
    assert "needs 2 GPUs, 1 visible" in gpu_check.skip_reason(split, info(1, "9.0"), args)
    assert gpu_check.skip_reason(split, info(2), args) is None and gpu_check.skip_reason(ddp, info(2), args) is None
    assert "--cpu-ddp" in gpu_check.skip_reason(ddp, info(0), args)
    assert gpu_check.skip_reason(ddp, info(0), gpu_check.parse_args(["--tiny", "--cpu-ddp"])) is None


def test_precision_rows_force_the_kits_plan_and_accelerate_can_switch():
    from accelerate import Accelerator

    with gpu_check.precision("fp16"):
        assert models.precision_for("cuda") == models.precision_for("cuda", capability=(7, 5))
        assert models.precision_for("cuda")["use_grad_scaler"] and models.precision_for("cpu")["autocast_dtype"] is None
    with gpu_check.precision("bf16"):
        assert models.precision_for("cuda")["autocast_dtype"] == torch.bfloat16
    assert models.precision_for.__name__ == "precision_for"  # restored
    gpu_check.reset_accelerate()
    Accelerator(cpu=True, mixed_precision="no")
    gpu_check.reset_accelerate()
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    gpu_check.reset_accelerate()


@pytest.mark.slow
@pytest.mark.usefixtures("use_kit_cache")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launch of the ddp rows")
def test_ddp_rows_launch_workers_that_measure_every_rank(tmp_path):
    rows, table = _run(tmp_path, "--cpu-ddp", "--only", "same:ddp")
    assert table == ["same:ddp/fp16"]
    row = rows[0]
    assert row["status"] == "ok", row.get("note")
    assert row["facts"]["strategy"] == "ddp" and row["facts"]["processes"] == 2
    assert row["devices"] == ["rank 0 cpu", "rank 1 cpu"]
    assert all(math.isfinite(value) and value > 0 for value in row["measured_gib"] + row["planned_gib"])
    assert row["steps"] == 2 and math.isfinite(row["tokens_per_s"])
