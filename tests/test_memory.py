"""Memory planner: exact parameter counts, the parts' arithmetic, verdicts, and predicted vs measured peak on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from kagglekd import gpus
from kagglekd.config import DistillConfig
from kagglekd.errors import KaggleKDError
from kagglekd.gpus import UnknownGpuError
from kagglekd.losses import rows_per_block
from kagglekd.memory import (
    GiB,
    card_names,
    config_from_card,
    count_parameters,
    largest_fitting,
    load_card,
    plan_memory,
    resolve_model_config,
)
from kagglekd.models import tiny_dense_config, tiny_moe_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM = "HuggingFaceTB/SmolLM-135M"
HUIHUI = "huihui-ai/Huihui-MoE-1B-A0.6B"


def smollm_from_published_facts() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )


def test_smollm_135m_parameter_count_is_exact():
    assert count_parameters(smollm_from_published_facts()).total == 134_515_008
    assert count_parameters(config_from_card(load_card(SMOLLM))).total == 134_515_008


def test_every_card_builds_a_config_and_matches_its_recorded_count():
    names = card_names()
    assert {
        SMOLLM,
        HUIHUI,
        "huihui-ai/Huihui-MoE-1.2B-A0.6B",
        "Qwen/Qwen3-0.6B",
        "HuggingFaceTB/SmolLM2-360M",
        "HuggingFaceTB/SmolLM2-135M",
    } <= set(names)
    for name in names:
        card = load_card(name)
        assert card["tokenizer_family"] and card["_source"]
        counts = count_parameters(config_from_card(card))
        assert counts.total == card["parameters"], name
        assert counts.active <= counts.total


def test_moe_active_parameters_scale_experts_by_top_k():
    counts = count_parameters(config_from_card(load_card("huihui-ai/Huihui-MoE-1.2B-A0.6B")))
    assert counts.total == 1_280_200_704  # the published 1.28B
    assert counts.active == counts.total - counts.expert + counts.expert // 3


def test_unknown_model_has_no_card():
    assert load_card("someone/never-heard-of-it") is None
    cfg, reason = resolve_model_config("someone/never-heard-of-it")
    assert cfg is None and "config.json" in reason


def _pair():
    return resolve_model_config(HUIHUI)[0], resolve_model_config(SMOLLM)[0]


def test_parts_follow_the_documented_arithmetic():
    teacher, student = _pair()
    config = DistillConfig(batch_size=4, max_length=384, alpha_kd=0.7, alpha_ce=0.3)
    plan = plan_memory(config, gpu="T4", teacher_cfg=teacher, student_cfg=student)
    n_s, n_t = 134_515_008, 1_280_200_704
    assert plan.parts["teacher_weights"] == 2 * n_t
    assert plan.parts["student_weights"] == plan.parts["student_grads"] == 4 * n_s
    assert plan.parts["optimizer_states"] == 8 * n_s
    assert plan.parts["runtime_overhead"] == int(0.4 * GiB)
    assert plan.parts["teacher_logits"] == 4 * 384 * 151936 * 2
    assert plan.parts["attention_maps"] == 0
    assert plan.total == sum(plan.parts.values())
    assert plan.capacity == 15 * GiB and plan.fraction == plan.total / plan.capacity
    cpu = plan_memory(config, gpu="cpu", teacher_cfg=teacher, student_cfg=student)
    assert cpu.parts["runtime_overhead"] == 80 * 2**20 and cpu.parts["teacher_weights"] == 4 * n_t


def test_attention_transfer_checkpointing_and_topk_move_the_right_parts():
    teacher, student = _pair()
    base = DistillConfig(batch_size=4, max_length=384)
    kw = dict(gpu="T4x2", teacher_cfg=teacher, student_cfg=student)
    plain = plan_memory(base, **kw)
    attention = plan_memory(base.replace(alpha_attention=0.1, attention_layers=2), **kw)
    # the 2 chosen layers of each model (not all 30 + 28): student float32 [B, 9, T, T] probabilities + its map;
    # teacher its map per layer + one head chunk (4 heads) of scores and probabilities
    square = 4 * 384 * 384 * 4
    assert attention.parts["attention_maps"] == 2 * square * (9 + 1) + 2 * square + 2 * square * 4
    checkpointed = plan_memory(base, gradient_checkpointing=True, **kw)
    assert checkpointed.parts["student_activations"] < plain.parts["student_activations"] / 5
    topk = plan_memory(base.replace(kd_top_k=256), **kw)
    assert topk.parts["kd_intermediates"] < plain.parts["kd_intermediates"] and topk.kd_mode == "top-k"
    full = plan_memory(base.replace(loss_chunk_size=4 * 384), **kw)
    assert full.kd_mode == "full" and full.parts["kd_intermediates"] > plain.parts["kd_intermediates"]
    sar = plan_memory(base, sar=True, **kw)
    assert sar.parts["teacher_activations"] > 10 * plain.parts["teacher_activations"]
    assert sar.parts["sar_router_states"] > 0


def test_verdicts_and_largest_fitting():
    teacher, student = _pair()
    config = DistillConfig(batch_size=4, max_length=384)
    kw = dict(teacher_cfg=teacher, student_cfg=student)
    assert plan_memory(config, gpu="A100", **kw).verdict == "fits"
    assert plan_memory(config.replace(batch_size=64), gpu="T4", **kw).verdict == "OOM"
    best = largest_fitting(config, gpu="T4", **kw)
    assert plan_memory(config.replace(batch_size=best["batch_size"]), gpu="T4", **kw).fraction < 0.85
    assert plan_memory(config.replace(batch_size=best["batch_size"] + 1), gpu="T4", **kw).fraction >= 0.85
    assert plan_memory(config.replace(max_length=best["max_length"]), gpu="T4", **kw).fraction < 0.85
    tight = [b for b in range(1, 64) if plan_memory(config.replace(batch_size=b), gpu="T4", **kw).verdict == "tight"]
    assert tight, "some batch size lands in the 85-100 % band"
    assert largest_fitting(config, gpu="A100", **kw)["batch_size"] > best["batch_size"]


# ---- predicted vs measured on CPU -------------------------------------------------------------------------
MEASURE = r"""
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig
from kagglekd import losses
from kagglekd.config import KDOptions

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

spec = json.loads(sys.argv[1])
torch.manual_seed(0)
teacher_cfg, student_cfg = AutoConfig.for_model(**spec["teacher"]), AutoConfig.for_model(**spec["student"])
batch, length, chunk = spec["batch"], spec["length"], spec["chunk"]
ids = torch.randint(0, spec["student"]["vocab_size"], (batch, length + 1))
# Warm up: import the modeling code and initialise the CPU kernels (fixed costs, not part of a step).
warm = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
    num_attention_heads=2, intermediate_size=32))
AutoModelForCausalLM.from_config(Qwen3MoeConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim=8, moe_intermediate_size=16, num_experts=2,
    num_experts_per_tok=1))
warm(input_ids=ids[:1, :8] % 64).logits.sum().backward()
torch.optim.AdamW(warm.parameters()).step()
del warm
baseline = rss("VmRSS")
teacher = AutoModelForCausalLM.from_config(teacher_cfg).float().eval()
student = AutoModelForCausalLM.from_config(student_cfg).float()
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
inputs, labels = ids[:, :-1], ids[:, 1:]
with torch.no_grad():
    teacher_logits = teacher(input_ids=inputs).logits
if spec.get("fused"):
    from kagglekd.fused import fused_lm_head_kd
    hidden = student.model(input_ids=inputs).last_hidden_state
    loss = fused_lm_head_kd(hidden, student.get_output_embeddings().weight, teacher_logits, labels,
        KDOptions(temperature=2.0), alpha_kd=0.5, alpha_ce=0.5, chunk_size=chunk)[0]
else:
    student_logits = student(input_ids=inputs).logits
    loss = 0.5 * losses.ce_loss(student_logits, labels, chunk_size=chunk) + 0.5 * losses.kd_loss(
        student_logits, teacher_logits, labels, KDOptions(temperature=2.0), chunk_size=chunk)
loss.backward()
optimizer.step()
print(json.dumps({"measured": rss("VmHWM") - baseline}))
"""

# The demo's own shapes (kagglekd.models owns them), as JSON for the measuring subprocess.
TINY = {
    "teacher": tiny_moe_config(4096).to_dict(),
    "student": tiny_dense_config(4096).to_dict(),
    "batch": 8,
    "length": 128,
    "chunk": 1024,
}
MID = {
    "teacher": dict(
        model_type="qwen3_moe",
        vocab_size=16384,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1024,
        moe_intermediate_size=512,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    "student": dict(
        model_type="llama",
        vocab_size=16384,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=768,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "batch": 4,
    "length": 256,
    "chunk": 512,
}


# Fused lm_head + KD on a 49,152-token vocabulary with small layers, so the loss's [chunk, V] float32 buffers
# dominate the step: two chunks of 512 positions, a dense teacher.
FUSED_WIDE_VOCAB = {
    "teacher": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        tie_word_embeddings=True,
    ),
    "student": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
    ),
    "batch": 8,
    "length": 128,
    "chunk": 512,
    "fused": True,
}


def measure_and_predict(spec: dict) -> tuple[int, int]:
    """(measured peak RSS delta, predicted bytes) of one teacher forward + student fwd/bwd + AdamW step on CPU."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
    config = DistillConfig(
        batch_size=spec["batch"],
        max_length=spec["length"],
        loss_chunk_size=spec["chunk"],
        alpha_kd=0.5,
        alpha_ce=0.5,
        use_amp=False,
        fused_kd=spec.get("fused", False),
    )
    plan = plan_memory(
        config,
        gpu="cpu",
        teacher_cfg=AutoConfig.for_model(**spec["teacher"]),
        student_cfg=AutoConfig.for_model(**spec["student"]),
    )
    return measured, plan.total


@pytest.mark.parametrize("spec", [TINY, MID], ids=["tiny", "mid"])
def test_prediction_matches_measured_peak_on_cpu(spec):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc to read VmRSS/VmHWM")
    measured, predicted = measure_and_predict(spec)
    ratio = predicted / measured
    print(f"predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, ratio {ratio:.2f}")
    assert 0.5 <= ratio <= 2.0


def test_fused_kd_plans_no_student_logits():
    from kagglekd.config import DistillConfig
    from kagglekd.memory import plan_memory, resolve_model_config

    config = DistillConfig.load("smollm2-360m-to-135m-t4x2")
    (teacher, _), (student, _) = resolve_model_config(config.teacher_model), resolve_model_config(config.student_model)
    fused = plan_memory(config, gpu="T4x2", teacher_cfg=teacher, student_cfg=student)
    plain = plan_memory(config.replace(fused_kd=False), gpu="T4x2", teacher_cfg=teacher, student_cfg=student)
    assert fused.parts["student_logits"] == 0 < plain.parts["student_logits"]
    assert fused.total < plain.total


def test_cross_tokenizer_targets_are_planned():
    from kagglekd.config import DistillConfig
    from kagglekd.memory import plan_memory, resolve_model_config

    config = DistillConfig.load("smollm-135m-from-huihui-moe-t4x2")
    (teacher, _), (student, _) = resolve_model_config(config.teacher_model), resolve_model_config(config.student_model)
    kw = dict(gpu="T4x2", teacher_cfg=teacher, student_cfg=student)
    cross = plan_memory(config, **kw)
    plain = plan_memory(config.replace(cross_tokenizer=False), **kw)
    tokens, chunk = config.batch_size * config.max_length, min(config.loss_chunk_size, 8 * 384)
    # top-k of the shared tokens: float32 log-probs + int64 student ids [B, T, k], a float32 tail [B, T], and one
    # chunk of the teacher's float32 log-probs and probabilities while mapping
    expected = tokens * (config.kd_top_k * 12 + 4) + chunk * teacher.vocab_size * 8
    assert cross.parts["kd_intermediates"] - plain.parts["kd_intermediates"] == expected
    # every shared token (k = the shared count, bounded by the smaller vocabulary when not given): their ids are
    # one expanded [k] vector, so float32 log-probs and tail only; the fused loss reads k + 1 wide targets, not
    # the teacher's dense rows
    for shared in (None, 30_000):
        k = shared or min(student.vocab_size, teacher.vocab_size)
        full = plan_memory(config.replace(kd_top_k=None), shared_tokens=shared, **kw)
        mapped = plan_memory(config.replace(kd_top_k=k - 1), shared_tokens=shared, **kw)  # k - 1 + tail wide rows
        # (+ one more target column, float32 log-probs and probabilities, in the fused loss's row block of `chunk`)
        difference = tokens * (4 * k - 12 * (k - 1)) + chunk * 2 * 4
        assert full.parts["kd_intermediates"] - mapped.parts["kd_intermediates"] == difference


def test_fused_kd_cpu_working_memory_is_not_under_planned():
    """The fused loss's CPU working memory: its [chunk, V] float32 logits (two alive across chunks) and the dense
    teacher's [chunk, V] rows are what dominates a wide-vocabulary step; the plan must cover the measured peak."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc to read VmRSS/VmHWM")
    measured, predicted = measure_and_predict(FUSED_WIDE_VOCAB)
    print(f"predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert measured <= predicted <= 2 * measured


def test_fused_kd_counts_the_chunk_buffers_on_cpu_and_gpu():
    spec = FUSED_WIDE_VOCAB
    teacher, student = AutoConfig.for_model(**spec["teacher"]), AutoConfig.for_model(**spec["student"])
    config = DistillConfig(batch_size=8, max_length=128, loss_chunk_size=512, fused_kd=True, use_amp=False)
    vocab, hidden, tokens, chunk = 49152, 64, 8 * 128, 512
    for gpu, teacher_bytes in (("cpu", 4), ("T4", 2)):
        plan = plan_memory(config, gpu=gpu, teacher_cfg=teacher, student_cfg=student)
        block = rows_per_block(vocab, chunk, torch.device("cpu" if gpu == "cpu" else "cuda"))
        expected = (
            2 * chunk * vocab * 4  # this chunk's float32 logits and the previous one's (several chunks)
            + chunk * vocab * teacher_bytes  # the dense teacher's rows of the chunk
            + block * (3 * vocab * 4 + 2 * vocab * 4)  # one row block of the KD/CE closed forms
            + vocab * hidden * 4  # float32 lm_head gradient
            + (tokens + chunk) * hidden * 4  # float32 hidden-state gradient and the chunk's float32 rows
        )
        assert plan.parts["kd_intermediates"] == expected, gpu
        assert plan.parts["student_logits"] == 0
    one_chunk = plan_memory(config.replace(loss_chunk_size=tokens), gpu="cpu", teacher_cfg=teacher, student_cfg=student)
    assert one_chunk.parts["kd_intermediates"] >= tokens * vocab * 4 + tokens * vocab * 4  # logits + teacher rows


def test_attention_maps_only_on_the_chosen_layers():
    config = DistillConfig.load("smollm2-360m-to-135m-t4x2").replace(alpha_attention=0.1)
    (teacher, _), (student, _) = resolve_model_config(config.teacher_model), resolve_model_config(config.student_model)
    kw = dict(gpu="T4x2", teacher_cfg=teacher, student_cfg=student)
    square = config.batch_size * config.max_length**2 * 4  # float32 [B, T, T]
    s_heads, t_heads = student.num_attention_heads, teacher.num_attention_heads
    teacher_transient = 2 * square * min(4, t_heads)  # one head chunk of scores + probabilities
    default = plan_memory(config.replace(attention_layers=None), **kw)  # None = the last layer only
    assert default.parts["attention_maps"] == square * (s_heads + 1) + square + teacher_transient
    three = plan_memory(config.replace(attention_layers=3), **kw)
    assert three.parts["attention_maps"] == 3 * square * (s_heads + 1) + 3 * square + teacher_transient
    # nowhere near every layer of both models in the activation dtype (what eager attention would keep)
    every_layer = (
        config.batch_size
        * config.max_length**2
        * 2
        * (student.num_hidden_layers * s_heads + teacher.num_hidden_layers * t_heads)
    )
    assert default.parts["attention_maps"] < every_layer / 10


def test_ce_only_and_teacher_cache_plans_count_no_teacher():
    teacher, student = _pair()
    base = DistillConfig(batch_size=4, max_length=384)
    kw = dict(gpu="T4", student_cfg=student)
    ce_only = plan_memory(base.replace(alpha_kd=0.0, alpha_ce=1.0), teacher_cfg=teacher, **kw)
    for part in ("teacher_weights", "teacher_activations", "teacher_logits", "sar_router_states"):
        assert ce_only.parts[part] == 0, part
    assert ce_only.kd_mode == "none"
    # the trainer loads no teacher then, so the plan needs no teacher config
    assert plan_memory(base.replace(alpha_kd=0.0, alpha_ce=1.0), teacher_cfg=None, **kw).parts == ce_only.parts
    cached = plan_memory(base.replace(teacher_cache="cache", kd_top_k=32), teacher_cfg=teacher, **kw)
    assert cached.parts["teacher_weights"] == cached.parts["teacher_activations"] == 0
    assert cached.parts["teacher_logits"] == 4 * 384 * (32 * 12 + 4)  # int64 ids + float32 log-probs, tail
    live = plan_memory(base.replace(kd_top_k=32), teacher_cfg=teacher, **kw)
    assert live.parts["teacher_weights"] == 2 * 1_280_200_704 and cached.total < live.total - 2 * GiB
    with pytest.raises(ValueError, match="teacher_cfg"):
        plan_memory(base, teacher_cfg=None, **kw)


def test_plans_need_a_profile_with_memory():
    teacher, student = _pair()
    kw = dict(teacher_cfg=teacher, student_cfg=student)
    with pytest.raises(UnknownGpuError):
        plan_memory(DistillConfig(), gpu="H200", **kw)
    with pytest.raises(KaggleKDError, match="not known"):
        plan_memory(DistillConfig(), gpu=gpus.resolve("cuda"), **kw)
    read_off_a_device = dataclasses.replace(gpus.resolve("H200"), capacity_bytes=80 * GiB)
    plan = plan_memory(DistillConfig(), gpu=read_off_a_device, **kw)
    assert plan.gpu == "unknown (H200)" and plan.capacity == 80 * GiB
    assert any("no kagglekd profile" in note for note in plan.notes)


def test_unfused_logits_are_counted_once_their_gradient_is_the_losses_held_buffer():
    """Unfused on CPU: the student's [B, T, V] float32 logits once; each loss (KD, CE) holds one [B, T, V] gradient
    that autograd receives (scaled in place) as the logits' gradient, so there is no third [B, T, V] buffer."""
    teacher, student = AutoConfig.for_model(**TINY["teacher"]), AutoConfig.for_model(**TINY["student"])
    config = DistillConfig(batch_size=8, max_length=128, alpha_kd=0.5, alpha_ce=0.5, use_amp=False)
    kd = plan_memory(config, gpu="cpu", teacher_cfg=teacher, student_cfg=student)
    ce = plan_memory(config.replace(alpha_kd=0.0, alpha_ce=1.0), gpu="cpu", teacher_cfg=None, student_cfg=student)
    logits = 8 * 128 * 4096 * 4
    assert kd.parts["student_logits"] == ce.parts["student_logits"] == logits
    block = rows_per_block(4096, 1024, torch.device("cpu"))
    assert ce.parts["kd_intermediates"] == logits + block * 3 * 4096 * 4  # CE's held gradient + one row block
    assert kd.parts["kd_intermediates"] == 2 * logits + block * (3 + 2) * 4096 * 4  # + KD's, teacher rows


def test_unfused_cross_tokenizer_forward_kl_plans_dense_targets():
    """Unfused forward KL over every shared token computes its closed form per row block (plus the block's two
    [block, V_t] teacher buffers) and builds no targets; another divergence keeps the k-wide mapped targets and
    the mapping's [chunk, V_t] buffers."""
    teacher = AutoConfig.for_model(**{**MID["teacher"], "vocab_size": 8192})
    student = AutoConfig.for_model(**MID["student"])
    config = DistillConfig(batch_size=4, max_length=256, loss_chunk_size=512, cross_tokenizer=True, use_amp=False)
    kw = dict(gpu="cpu", teacher_cfg=teacher, student_cfg=student, shared_tokens=3000)
    dense = plan_memory(config, **kw).parts["kd_intermediates"]
    mapped = plan_memory(config.replace(divergence="reverse_kl"), **kw).parts["kd_intermediates"]
    tokens, vocab, chunk = 4 * 256, 16384, 512
    block = rows_per_block(vocab, chunk, torch.device("cpu"))
    assert dense - mapped == block * 8192 * 8 - (tokens * (3000 * 4 + 4) + chunk * 8192 * 8)


def test_on_policy_generation_adds_the_kv_cache_of_the_generating_model():
    teacher, student = _pair()
    base = DistillConfig(batch_size=4, max_length=256, alpha_kd=1.0, alpha_ce=0.0)
    plain = plan_memory(base, gpu="T4", teacher_cfg=teacher, student_cfg=student)
    assert "generation_kv_cache" not in plain.parts
    on_policy = plan_memory(base.replace(lmbda=1.0), gpu="T4", teacher_cfg=teacher, student_cfg=student)
    # fp16 KV cache of SmolLM-135M: 2 (k, v) x 30 layers x 3 KV heads x 64 x 4 rows x (128 prompt + 129 new) x 2 B
    kv = 2 * student.num_hidden_layers * student.num_key_value_heads * 64 * 4 * (128 + 129) * 2
    assert on_policy.parts["generation_kv_cache"] == kv
    assert on_policy.total == plain.total + kv and any("on-policy generation" in note for note in on_policy.notes)
