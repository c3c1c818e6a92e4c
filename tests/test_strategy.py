"""The planner's strategy choice (single / ddp / split) per GPU profile, and how diagnose reports it."""

from __future__ import annotations

import dataclasses

import pytest

from kagglekd import gpus
from kagglekd.config import DistillConfig
from kagglekd.diagnose import diagnose, fix_config
from kagglekd.memory import (
    DDP_EFFICIENCY,
    GiB,
    choose_strategy,
    largest_fitting,
    plan_memory,
    resolve_model_config,
)

HUIHUI_TO_SMOLLM = "smollm-135m-from-huihui-moe-t4x2"  # 1.2B MoE teacher, 135M student, fp16 on the GPU


def _models(config: DistillConfig) -> dict:
    teacher, _ = resolve_model_config(config.teacher_model)
    student, _ = resolve_model_config(config.student_model)
    return {"teacher_cfg": teacher, "student_cfg": student}


def _two_gpus(gib: float):
    """A profile like T4x2 with ``gib`` GiB per GPU."""
    return dataclasses.replace(gpus.resolve("T4x2"), name=f"{gib:g}GiBx2", capacity_bytes=int(gib * GiB))


def test_tiny_preset_on_t4x2_is_ddp_with_the_numbers():
    config = DistillConfig.load("tiny-cpu")
    choice = choose_strategy(config, gpu="T4x2", **_models(config))
    assert (choice.strategy, choice.processes, choice.severity) == ("ddp", 2, "info")
    assert choice.speedup == pytest.approx(1 + DDP_EFFICIENCY)
    whole = plan_memory(config, gpu="T4x2", **_models(config))
    assert choice.plans == {"gpu": whole}  # ddp: every GPU holds both models and its own micro-batches
    assert "ddp: teacher" in choice.reason and "fit there" in choice.reason and "~1.9x tokens/s" in choice.reason
    assert f"{whole.total / GiB:.2f} GiB" in choice.reason and "15.00 GiB T4 GPU" in choice.reason
    assert set(choice.alternatives) == {"single", "split"} and choice.fallback == "split"


def test_one_gpu_or_cpu_is_single():
    config = DistillConfig.load("tiny-cpu")
    for gpu in ("T4", "A100", "cpu"):
        choice = choose_strategy(config, gpu=gpu, **_models(config))
        assert (choice.strategy, choice.processes, choice.speedup) == ("single", 1, 1.0), gpu
        assert choice.alternatives == {}


def test_pair_too_big_for_one_gpu_but_fitting_split_is_split():
    config = DistillConfig.load(HUIHUI_TO_SMOLLM)
    models = _models(config)
    gpu = _two_gpus(10)  # the pair needs ~10.5 GiB on one GPU; split: ~8.1 (student side) and ~4.6 (teacher side)
    choice = choose_strategy(config, gpu=gpu, **models)
    both = plan_memory(config, gpu=gpu, **models)
    student = plan_memory(config, gpu=gpu, placement="student", **models)
    teacher = plan_memory(config, gpu=gpu, placement="teacher", **models)
    assert both.verdict == "OOM" and student.verdict == teacher.verdict == "fits"
    assert choice.strategy == "split" and choice.processes == 1
    assert choice.plans == {"student": student, "teacher": teacher}
    assert "Not ddp" in choice.reason and "do not fit" in choice.reason
    # the split moves each part to one side: weights and activations of the teacher never reach the student GPU
    assert student.parts["teacher_weights"] == student.parts["teacher_activations"] == 0
    assert teacher.parts["student_weights"] == teacher.parts["optimizer_states"] == 0
    assert teacher.parts["teacher_weights"] == both.parts["teacher_weights"]
    assert teacher.parts["teacher_logits"] == 2 * both.parts["teacher_logits"]  # consumed + prefetched batch
    # batch search on every GPU of the split: larger than what fits one GPU holding both models
    assert (
        largest_fitting(config, gpu=gpu, strategy="split", **models)["batch_size"]
        > largest_fitting(config, gpu=gpu, **models)["batch_size"]
    )


def test_requested_strategies_are_honoured_and_checked():
    config = DistillConfig.load(HUIHUI_TO_SMOLLM)
    models = _models(config)
    # 8.5 GiB GPUs: the pair (~10.5 GiB) does not fit one, the split's student side (~8.1 GiB) does, tightly
    forced = choose_strategy(config.replace(strategy="ddp"), gpu=_two_gpus(8.5), **models)
    assert forced.strategy == "ddp" and forced.severity == "error" and forced.best == "split"
    assert "does not fit" in forced.problem and forced.fix.startswith("strategy split")
    slower = choose_strategy(config.replace(strategy="split"), gpu="T4x2", **models)
    assert slower.strategy == "split" and slower.severity == "warning" and slower.fix.startswith("strategy ddp")
    one_gpu = choose_strategy(config.replace(strategy="ddp"), gpu="T4", **models)
    assert one_gpu.severity == "error" and "needs two GPUs" in one_gpu.problem and one_gpu.strategy == "single"
    cached = config.replace(teacher_cache="/tmp/cache", kd_top_k=64, cross_tokenizer=False)
    cached.strategy = "split"  # DistillConfig itself refuses this now; the planner still says why (lenient parses)
    assert "no live teacher" in choose_strategy(cached, gpu="T4x2", **models).problem


def test_diagnose_reports_the_strategy_and_uses_it_for_time():
    raw = {**DistillConfig.load("tiny-cpu").to_dict(), "output_dir": "runs/x"}
    two, one = diagnose(raw, gpu="T4x2"), diagnose(raw, gpu="T4")
    finding = [f for f in two.findings if f.id == "strategy"][0]
    assert finding.severity == "info" and finding.message.startswith("ddp with 2 process(es)")
    assert "accelerate launch --multi_gpu --num_processes 2" in finding.message
    assert two.to_dict()["strategy"]["strategy"] == "ddp" and one.strategy["strategy"] == "single"
    assert two.time["tokens_per_s"] == pytest.approx(one.time["tokens_per_s"] * (1 + DDP_EFFICIENCY))
    assert "strategy: ddp, 2 process(es)" in two.format_text()


def test_diagnose_forced_strategy_that_does_not_fit_is_an_error_with_a_fix():
    raw = {**DistillConfig.load(HUIHUI_TO_SMOLLM).to_dict(), "cross_tokenizer": True, "strategy": "ddp"}
    report = diagnose(raw, gpu="T4")
    finding = [f for f in report.findings if f.id == "strategy"][0]
    assert finding.severity == "error" and "needs two GPUs" in finding.message and report.exit_code == 1
    assert fix_config(report)["strategy"] == "single"
