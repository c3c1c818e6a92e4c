"""bench/gpu_check.py at tiny scale on CPU, so the GPU check cannot rot before a GPU runs it: a row per variant with
finite figures, what the trainer really ran, errors (OOM included) recorded while the next variant still runs, the
time budget, and the precision/accelerate switches the GPU rows rely on."""

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
}


def _run(tmp_path, *extra: str) -> tuple[list[dict], list[str]]:
    """Run the check tiny; (rows of the JSON, variant ids of the Markdown table's rows)."""
    out = tmp_path / "gpu.md"
    gpu_check.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work"), *extra])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    table = [line.split(" | ")[0].removeprefix("| ") for line in out.read_text().splitlines() if line.startswith("| ")]
    return rows, table[1:]  # after the header row


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
    for row in rows:
        if row["variant"] not in RAN:
            assert row["status"] == "skipped" and ("GPU" in row["note"] or "CPU" in row["note"]), row


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
