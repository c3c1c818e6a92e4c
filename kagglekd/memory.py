"""Memory planner: predicted peak memory of one distillation step per GPU profile, before anything loads.

Parameter counts are exact: the model config is instantiated on the ``meta`` device (shapes, no storage)
with ``AutoModelForCausalLM.from_config`` and its parameters are summed (SmolLM-135M: 134,515,008).
Everything else is an estimate from tensor shapes, per GPU (under DDP every process holds both models):

=====================  ==================================================================================
part                   bytes
=====================  ==================================================================================
runtime_overhead       CUDA context + cuBLAS/cuDNN workspace, 0.4 GiB per GPU; on CPU 80 MiB: what a training process
                       holds beside its tensors (the trainer's setup, kernel and thread-pool state, heap the allocator
                       keeps), fitted to the residuals of the measured runs below (65-125 MiB, run to run +-20).
teacher_weights        teacher parameters x 2 (fp16 on GPU; fp32 = 4 on CPU); 0 when no teacher runs (``live_teacher``:
                       CE-only, or a teacher cache, whose top-k targets count under teacher_logits instead).
student_weights        student parameters x 4 (fp32 master weights).
student_grads          student parameters x 4.
optimizer_states       student parameters x 8 (AdamW exp_avg + exp_avg_sq in fp32).
autocast_copies        student parameters x 2 (fp16 copies autocast caches for the step; 0 on CPU).
student_activations    tensors saved for backward, per token per decoder layer (Llama/Qwen block):
                       ``2h(8+b) + b(2 h_q + 2 kv + 4 i)`` with b = 2 under fp16 autocast, 4 in fp32
                       (residual stream + RMSNorm outputs, q/k/v, attention output, SwiGLU gate/up/act/prod);
                       with gradient checkpointing only each layer's input (4h per token) plus one layer.
attention_maps         attention transfer only (``kagglekd.attention``): for each of the ``attention_layers`` chosen
                       layers (default 1) the student keeps float32 [B, H, T, T] probabilities for backward and a
                       [B, T, T] map; the teacher a map, plus one head chunk's scores/probabilities at a time.
teacher_activations    teacher forward without grad: one layer's transient tensors; all hidden states
                       when the feature loss is on; the whole saved graph under SAR (router gradients).
student_logits         the student's [B, T, V_s] logits (activation dtype); their gradient is the losses' held
                       buffers below (handed to autograd and summed in place), not a second [B, T, V_s].
teacher_logits         the teacher's [B, T, V_t] logits in its dtype, alive until top-k/KD is taken.
kd_intermediates       per row block (``losses.rows_per_block``: ``min(loss_chunk_size, B*T)`` rows on a GPU, about
                       0.5 MB of rows on a CPU): student fp32 logits, log-probs and their gradient (3 x V_s x 4) plus
                       teacher fp32 log-probs and probs (2 x V_t x 4, or the top-k + tail bucket); plus the gradient
                       that kd_loss and ce_loss each hold until backward ([B, T, V_s] in the logits' dtype, one per
                       loss). Under fused_kd instead: per chunk the [chunk, V_s] float32 logits (two alive with several
                       chunks) and the dense teacher's [chunk, V_t] rows, on a CPU as on a GPU, the row blocks, and the
                       float32 [V_s, H] + [B, T, H] gradients. With cross_tokenizer: the mapped targets over the k
                       shared tokens (``shared_tokens``; float32 log-probs + tail, int64 ids when only top-k of them)
                       and the mapping's [chunk, V_t] float32 buffers; unfused forward KL over every shared token
                       computes the closed form per row block instead, adding the block's [block, V_t] rows.
cpu_heap_kept          on a CPU run that keeps freed memory for reuse (``cputhreads``): one more copy of the step's
                       largest [B, T, V] logits, which the heap holds beside the live tensors.
sar_router_states      SAR: teacher router weights' grads + AdamW states + fp32 master copy.
=====================  ==================================================================================

Placement (``strategy``): under ``single`` and ``ddp`` one GPU holds everything above (DDP keeps a whole copy of
both models and a whole micro-batch per process). Under ``split`` the student GPU (cuda:0) holds the student's
parts, the KD intermediates and a copy of the teacher's logits moved over from the teacher GPU (cuda:1), which
holds the teacher's weights and activations and two micro-batches of its logits (the one being consumed and the
prefetched next one). ``choose_strategy`` compares these placements on a profile with several GPUs.

Verdict: ``fits`` below 85 % of the GPU's usable capacity, ``tight`` from 85 % (allocator fragmentation and
the transient peaks this model does not see can tip it over), ``OOM`` above 100 %.

Validation on CPU (``bench/planner_vs_measured.py``; ``tests/test_planner_measured.py`` runs the tiny pair): a
fresh process per case runs ``Distiller(config).train()`` for two optimizer steps and reads its peak resident set
size (``VmHWM``) above the one after importing torch, transformers, accelerate and the kit and a first load of the
text (``VmRSS``); ``plan_memory(..., gpu="cpu")`` must be within 15 % of it for the tiny demo pair and the
real-teacher pair (SmolLM2-135M's architecture, random weights, 49,152-row vocabulary), each as fused KD, unfused
KD, CE-only and cross-tokenizer. ``tests/test_memory.py::test_prediction_matches_measured_peak_on_cpu`` checks a
hand-written step (0.5x-2x) for two more shapes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from kagglekd.config import PRESETS_DIR, DistillConfig
from kagglekd.errors import KaggleKDError
from kagglekd.gpus import GiB, GpuProfile, resolve
from kagglekd.memory_parts import (  # noqa: F401 - Shape and the overheads are part of this module's API
    CPU_OVERHEAD_BYTES,
    CUDA_OVERHEAD_BYTES,
    Shape,
    Step,
    activation_parts,
    attention_maps,
    loss_parts,
    weight_parts,
)
from kagglekd.rules import moe_shape

TIGHT_FRACTION = 0.85
# Throughput of each extra data-parallel GPU relative to the first (gradient all-reduce, stragglers): an assumption
# for time estimates, not a measurement.
DDP_EFFICIENCY = 0.9
PLACEMENTS = ("both", "student", "teacher")
TEACHER_PARTS = ("teacher_weights", "teacher_activations", "sar_router_states")


# ---- model cards and configs ----------------------------------------------------------------------------
def card_path(model_id: str) -> Path:
    """``presets/card-<safe-name>.json``: the hub id lower-cased, '/' and '.' replaced by '-'."""
    safe = model_id.strip().lower().replace("/", "--").replace(".", "-")
    return PRESETS_DIR / f"card-{safe}.json"


def load_card(model_id: str) -> dict | None:
    """The model card of a hub id (published config.json facts + ``tokenizer_family``), or None."""
    path = card_path(model_id)
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def card_names() -> list[str]:
    return sorted(json.loads(p.read_text())["model_id"] for p in PRESETS_DIR.glob("card-*.json"))


def config_from_card(card: dict):
    """A real transformers config built from a card's config fields (keys starting with '_' are notes)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in card["config"].items() if not k.startswith("_")}
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


TINY_PRESETS = ("tiny-moe", "tiny-moe-8k", "tiny-random-moe", "tiny-random-dense")


def resolve_model_config(name: str, vocab_size: int | None = None):
    """(transformers config, source) for a tiny preset, a local directory or a carded hub id; (None, reason)."""
    if name in TINY_PRESETS:
        from kagglekd import models

        own = models.OWN_TOKENIZERS.get(name)  # a preset with a vocabulary of its own
        vocab = own[0] if own else vocab_size or 4096
        makers = {"tiny-random-dense": models.tiny_dense_config, "tiny-random-moe": models.tiny_moe_config}
        return makers.get(name, models.demo_teacher_config)(vocab), "tiny preset"  # tiny-moe(-8k): the demo teacher
    from kagglekd import gguf

    if gguf.is_gguf_reference(name):  # converted once into the cache (gguf.model_dir), then read like a local dir
        from kagglekd import models

        name = str(models.resolve_model(name))
    path = Path(name).expanduser()
    if (path / "config.json").exists():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path)), f"local {path}/config.json"
    card = load_card(name)
    if card is not None:
        return config_from_card(card), f"model card {card_path(name).name}"
    return None, "no model card and not a local directory with config.json"


# ---- parameter counts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCount:
    total: int
    embedding: int  # input embedding (+ untied output head)
    expert: int  # parameters inside MoE expert weights
    active: int  # parameters one token passes through (experts scaled by top-k / num_experts)
    router: int  # MoE router (gate) weights


def count_parameters(model_config) -> ParamCount:
    """Exact parameter counts by instantiating ``model_config`` on the meta device (no memory used)."""
    return _count_cached(model_config.to_json_string(use_diff=False))


@lru_cache(maxsize=64)
def _count_cached(config_json: str) -> ParamCount:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(config_json)
    model_type = data.pop("model_type")
    config = AutoConfig.for_model(model_type, **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = embedding = expert = router = 0
    for name, param in model.named_parameters():  # tied weights are yielded once
        count = param.numel()
        total += count
        if "embed_tokens" in name or name.startswith("lm_head"):
            embedding += count
        elif ".experts." in name:
            expert += count
        elif name.endswith("mlp.gate.weight") or ".router." in name:
            router += count
    experts, top_k = moe_shape(config)
    active = total - expert + (expert * top_k // experts if experts else 0)
    return ParamCount(total, embedding, expert, active, router)


# ---- the plan -------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    gpu: str
    parts: dict[str, int]
    capacity: int
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    kd_mode: str  # "full", "chunked" or "top-k"
    notes: list[str] = field(default_factory=list)
    placement: str = "both"  # both models on this device, or (strategy split) its "student" or "teacher" GPU

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fraction(self) -> float:
        return self.total / self.capacity

    @property
    def verdict(self) -> str:
        if self.fraction > 1.0:
            return "OOM"
        return "tight" if self.fraction >= TIGHT_FRACTION else "fits"

    def summary(self) -> str:
        where = "per device" if self.placement == "both" else f"on the {self.placement} GPU"
        return (
            f"{self.total / GiB:.2f} GiB of {self.capacity / GiB:.1f} GiB {where} on {self.gpu} "
            f"({self.fraction:.0%}, {self.verdict}) at batch_size {self.batch_size}, max_length {self.max_length}"
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)  # parts and notes copied
        out.update(total=self.total, fraction=self.fraction, verdict=self.verdict)
        return out


def _placed(parts: dict[str, int], placement: str, step: Step) -> dict[str, int]:
    """The parts one GPU holds under ``placement`` (see the module docstring)."""
    student_maps, teacher_maps = attention_maps(step)
    if placement == "student":
        parts = {**parts, **dict.fromkeys(TEACHER_PARTS, 0)}  # teacher_logits stays: the copy moved over
        parts["attention_maps"] = student_maps
    elif placement == "teacher":
        parts = {name: (value if name in ("runtime_overhead", *TEACHER_PARTS) else 0) for name, value in parts.items()}
        parts["attention_maps"] = teacher_maps
        # the micro-batch being consumed and the prefetched next one
        teacher = step.teacher
        kd = step.config.alpha_kd > 0 and teacher is not None
        parts["teacher_logits"] = 2 * (step.tokens * teacher.vocab * step.bt if kd else 0)
    return parts


def plan_memory(
    config: DistillConfig,
    *,
    gpu: str | GpuProfile,
    teacher_cfg,
    student_cfg,
    gradient_checkpointing: bool = False,
    sar: bool = False,
    batch_size: int | None = None,
    max_length: int | None = None,
    placement: str = "both",
    shared_tokens: int | None = None,
) -> MemoryPlan:
    """Predicted peak bytes per device of one training step of ``config`` on ``gpu``.

    ``gpu``: a ``GpuProfile`` or anything ``gpus.resolve`` names; it must have a capacity (an unknown GPU read
    off a device does; an unknown name raises ``UnknownGpuError``). ``teacher_cfg``/``student_cfg`` are
    transformers configs (see ``resolve_model_config``); ``teacher_cfg`` may be None when the run loads no
    teacher (``config.live_teacher``: CE-only or a teacher cache), whose plan counts no teacher weights or
    activations.
    ``batch_size`` and ``max_length`` override the config's (used by ``largest_fitting``). ``placement``:
    ``both`` (one device holds both models: strategies single and ddp) or, under strategy split, the ``student``
    or the ``teacher`` GPU. ``shared_tokens``: under cross_tokenizer, the tokens both tokenizers spell
    (``alignment.VocabMap.shared``), the width of the mapped targets; None bounds it by the smaller vocabulary.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: one of {', '.join(PLACEMENTS)}")
    profile = plannable(gpu)
    live = config.live_teacher
    if live and teacher_cfg is None:
        raise ValueError("teacher_cfg is None, but this config runs a live teacher (see DistillConfig.live_teacher)")
    teacher = Shape.of(teacher_cfg) if teacher_cfg is not None else None
    batch, length, on_gpu = batch_size or config.batch_size, max_length or config.max_length, profile.name != "cpu"
    step = Step(
        config, teacher, Shape.of(student_cfg), batch, length, on_gpu, live, sar and live, batch * length,
        2 if on_gpu and config.use_amp else 4, 2 if on_gpu else 4, min(config.loss_chunk_size, batch * length),
        torch.device("cuda" if on_gpu else "cpu"), shared_tokens,
    )  # fmt: skip
    t_params = count_parameters(teacher_cfg) if teacher_cfg is not None else None
    parts = weight_parts(step, t_params, count_parameters(student_cfg))
    parts.update(activation_parts(step, gradient_checkpointing))
    losses_held, kd_mode = loss_parts(step)
    parts.update(losses_held)
    parts["sar_router_states"] = t_params.router * 16 if step.sar else 0
    parts = _placed(parts, placement, step)
    from kagglekd import onpolicy

    generation = onpolicy.generation_plan(config, gpu=profile, teacher_cfg=teacher_cfg, student_cfg=student_cfg)
    notes = []
    if generation.kv_cache_bytes and placement != "teacher":  # lmbda / seq_kd: the KV cache of generate
        parts["generation_kv_cache"] = generation.kv_cache_bytes
        notes.append(
            f"on-policy generation: {generation.generated_micro_batches:.2f} generated micro-batches per step, "
            f"~{generation.seconds_per_step:.2f} s per step in generate (estimate)"
        )
    if config.alpha_attention > 0:
        notes.append(
            f"attention transfer: float32 [B,H,T,T] maps of the {config.attention_layers or 1} chosen layer(s) of "
            "each model (the models keep their SDPA/flash attention)"
        )
    if not live:
        notes.append("no live teacher (CE-only or a teacher cache): no teacher weights or activations")
    if not profile.known:
        notes.append(f"{profile.name}: no kagglekd profile for this GPU; its memory was read off the device")
    if not profile.supported:
        notes.append(f"{profile.name} is not supported by the current Kaggle PyTorch (no sm_60 kernels)")
    return MemoryPlan(
        profile.name, parts, profile.capacity_bytes, batch, length, gradient_checkpointing, kd_mode, notes, placement
    )


def plannable(gpu: str | GpuProfile) -> GpuProfile:
    """The profile ``gpu`` names, one the planner can plan on: known, or unknown with a capacity read off a device.
    Raises ``gpus.UnknownGpuError`` for an unknown name and ``KaggleKDError`` for a profile without a capacity."""
    profile = resolve(gpu, strict=not isinstance(gpu, GpuProfile))
    if profile.capacity_bytes <= 0:
        raise KaggleKDError(f"GPU {profile.name}: its memory is not known, so nothing can be planned on it")
    return profile


def largest_fitting(
    config: DistillConfig,
    *,
    gpu: str | GpuProfile,
    teacher_cfg,
    student_cfg,
    gradient_checkpointing: bool = False,
    sar: bool = False,
    limit: float = TIGHT_FRACTION,
    strategy: str = "single",
) -> dict[str, int]:
    """Largest ``batch_size`` (at the config's max_length) and ``max_length`` (at its batch size) whose plan
    stays below ``limit`` of capacity (default: the 'fits' verdict) on every GPU of ``strategy``. 0 when nothing
    fits."""
    kw: dict[str, Any] = dict(
        gpu=gpu,
        teacher_cfg=teacher_cfg,
        student_cfg=student_cfg,
        gradient_checkpointing=gradient_checkpointing,
        sar=sar,
    )
    placements = ("student", "teacher") if strategy == "split" else ("both",)

    def ok_batch(value: int) -> bool:
        return all(plan_memory(config, batch_size=value, placement=p, **kw).fraction < limit for p in placements)

    def ok_length(value: int) -> bool:
        return all(plan_memory(config, max_length=value, placement=p, **kw).fraction < limit for p in placements)

    positions = [Shape.of(c).max_positions or 1 << 20 for c in (student_cfg, teacher_cfg) if c is not None]
    return {"batch_size": _largest(ok_batch, 1, 4096), "max_length": _largest(ok_length, 8, min(positions))}


def _largest(ok, low: int, high: int) -> int:
    """Largest value in [low, high] with ok(value) (ok is monotone: true then false); 0 if none."""
    if not ok(low):
        return 0
    if ok(high):
        return high
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 1024**2:.1f} MiB"


def flops_per_token(teacher_cfg, student_cfg, max_length: int) -> float:
    """Training FLOPs per token: 6 N_student + 2 N_teacher (forward only) over active parameters, plus
    attention (12 L h T for the student forward+backward, 4 L h T for the teacher forward).
    The usual dense-transformer approximation; embeddings counted as they pass through the lm_head."""
    s, t = Shape.of(student_cfg), Shape.of(teacher_cfg)
    s_active, t_active = count_parameters(student_cfg).active, count_parameters(teacher_cfg).active
    attention = 12 * s.layers * s.heads * s.head_dim * max_length + 4 * t.layers * t.heads * t.head_dim * max_length
    return 6 * s_active + 2 * t_active + attention


# ---- strategy: how a run uses the GPUs of a profile ------------------------------------------------------
_VERDICT_RANK = {"fits": 0, "tight": 1, "OOM": 2}


@dataclass
class StrategyChoice:
    """How a run uses the GPUs of a profile (see ``choose_strategy``), with the memory numbers that decided it."""

    strategy: str  # single | ddp | split
    processes: int  # processes to launch: one per GPU under ddp, else 1
    speedup: float  # expected tokens/s relative to one GPU (ddp: 1 + (N-1) x DDP_EFFICIENCY; split counted as 1)
    plans: dict[str, MemoryPlan]  # per GPU role: {"gpu": plan} (single, ddp) or {"student": ..., "teacher": ...}
    reason: str
    alternatives: dict[str, str]  # every other strategy of this profile -> what it would give
    requested: str = "auto"  # the config's strategy
    severity: str = "info"  # warning: a requested strategy is slower than one that fits; error: it cannot run/fit
    problem: str | None = None
    fix: str | None = None
    fallback: str = "single"  # the best strategy for one process (a notebook that cannot launch several)
    best: str = ""  # what auto would choose (the fix when a requested strategy is an error)

    @property
    def worst(self) -> MemoryPlan:
        """The plan of the fullest GPU under this strategy."""
        return max(self.plans.values(), key=lambda plan: plan.fraction)

    @property
    def verdict(self) -> str:
        return self.worst.verdict

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "plans"}
        out.update(verdict=self.verdict, alternatives=dict(self.alternatives))
        return {**out, "devices": {role: plan.to_dict() for role, plan in self.plans.items()}}


def _teacher_student_split(plan: MemoryPlan) -> tuple[int, int]:
    """(teacher bytes, student bytes) of a one-device plan; the runtime overhead counts on neither side."""
    teacher = sum(plan.parts.get(name, 0) for name in (*TEACHER_PARTS, "teacher_logits"))
    return teacher, plan.total - teacher - plan.parts.get("runtime_overhead", 0)


def _describe(name: str, plans: dict[str, MemoryPlan], speed: float, devices: int, device: str) -> str:
    if name == "split":
        s, t = plans["student"], plans["teacher"]
        return (
            f"split: student GPU {format_bytes(s.total)} ({s.fraction:.0%}, {s.verdict}), teacher GPU "
            f"{format_bytes(t.total)} ({t.fraction:.0%}, {t.verdict}) of {format_bytes(s.capacity)} each; one "
            "process, ~1x tokens/s (the teacher's prefetch overlaps the student's backward at best)"
        )
    plan = plans["gpu"]
    teacher, student = _teacher_student_split(plan)
    runtime = plan.total - teacher - student
    sizes = (
        f"teacher {format_bytes(teacher)} + student {format_bytes(student)} (+ {format_bytes(runtime)} runtime) = "
        f"{format_bytes(plan.total)}, {plan.fraction:.0%} of one {format_bytes(plan.capacity)} {device}"
    )
    if name == "single":
        return f"single: {sizes} ({plan.verdict}); one device, 1x tokens/s"
    if plan.verdict == "OOM":
        return f"ddp: {sizes}: they do not fit, and under ddp every GPU holds both models"
    fit = "fit" if plan.verdict == "fits" else "fit, tightly (>= 85 %),"
    return (
        f"ddp: {sizes}: they {fit} there, so each of the {devices} GPUs trains its own micro-batches "
        f"(global batch x{devices}): ~{speed:.1f}x tokens/s"
    )


_Candidates = dict[str, tuple[dict[str, MemoryPlan], float, int]]  # strategy -> (plans per GPU role, speed, processes)


def _candidates(config: DistillConfig, profile: GpuProfile, devices: int, kw: dict[str, Any]) -> _Candidates:
    both = {"gpu": plan_memory(config, gpu=profile, placement="both", **kw)}
    candidates: _Candidates = {"single": (both, 1.0, 1)}
    if devices > 1:
        candidates["ddp"] = (both, 1 + (devices - 1) * DDP_EFFICIENCY, devices)
        if config.live_teacher:
            split = {p: plan_memory(config, gpu=profile, placement=p, **kw) for p in ("student", "teacher")}
            candidates["split"] = (split, 1.0, 1)
    return candidates


def _rank(name: str, plans: dict[str, MemoryPlan], speed: float) -> tuple:
    """Fits before tight before OOM; then faster; a split beats single at equal speed (both GPUs hold memory)."""
    worst = max(plans.values(), key=lambda plan: plan.fraction)
    verdict = _VERDICT_RANK[worst.verdict]
    return (verdict, -speed if verdict < 2 else worst.fraction, name == "single")


def choose_strategy(
    config: DistillConfig,
    *,
    gpu: str | GpuProfile,
    teacher_cfg,
    student_cfg,
    gradient_checkpointing: bool = False,
    sar: bool = False,
) -> StrategyChoice:
    """The placement that fits and is fastest on ``gpu``, and why, in memory numbers.

    With several GPUs: ``ddp`` when the whole pair (teacher + student training + activations) fits one GPU (each
    GPU then trains its own micro-batches: ~1 + (N-1) x DDP_EFFICIENCY times the tokens/s), else ``split`` when
    the teacher fits one GPU and the student's training the other (fits, ~1x), else whichever is least full. One
    GPU (or CPU): ``single``. A ``config.strategy`` other than auto is honoured and checked: one that cannot run
    on the profile, or does not fit where another does, gets ``severity`` error with a ``fix``; one slower than a
    fitting alternative gets a warning.
    """
    profile = plannable(gpu)
    devices = 1 if profile.name == "cpu" else profile.devices
    kw = dict(teacher_cfg=teacher_cfg, student_cfg=student_cfg, gradient_checkpointing=gradient_checkpointing, sar=sar)
    candidates = _candidates(config, profile, devices, kw)

    def rank(name: str) -> tuple:
        return _rank(name, *candidates[name][:2])

    device = "CPU (RAM)" if profile.name == "cpu" else f"{profile.name.split('x')[0]} GPU"
    described = {name: _describe(name, plans, speed, devices, device) for name, (plans, speed, _) in candidates.items()}
    pool = [name for name in candidates if devices == 1 or name != "single"]
    best = min(pool, key=rank)
    fallback = min((name for name in ("split", "single") if name in candidates), key=rank)
    requested = config.strategy
    chosen, severity, problem, fix = best, "info", None, None
    if requested != "auto" and requested not in candidates:
        severity, fix = "error", f"strategy {best} (or auto)."
        if requested in ("ddp", "split") and devices < 2:
            problem = f"strategy {requested} needs two GPUs; {profile.name} has {devices}."
        else:
            problem = (
                "strategy split puts the teacher on a GPU of its own, but this run has no live teacher "
                "(teacher_cache or a CE-only run)."
            )
    elif requested != "auto":
        chosen = requested
        own, wanted = rank(requested), rank(best)
        if own[0] == 2 and wanted[0] < 2:
            severity, problem = "error", f"strategy {requested} does not fit ({described[requested]})."
            fix = f"strategy {best}: {described[best]}."
        elif own > wanted:
            severity, problem = "warning", f"strategy {requested} is not the best fit on {profile.name}."
            fix = f"strategy {best} (or auto): {described[best]}."
    plans, speed, processes = candidates[chosen]
    if chosen == best and requested == "auto":
        reason = described[chosen] + (f". Not ddp: {described['ddp']}" if devices > 1 and chosen == "split" else "")
    else:
        reason = described[chosen] + (f" (strategy {requested} requested)" if requested != "auto" else "")
    return StrategyChoice(
        strategy=chosen,
        processes=processes,
        speedup=speed,
        plans=plans,
        reason=reason,
        alternatives={name: text for name, text in described.items() if name != chosen},
        requested=requested,
        severity=severity,
        problem=problem,
        fix=fix,
        fallback=fallback,
        best=best,
    )
