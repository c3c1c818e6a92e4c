"""The parts of a memory plan (``kagglekd.memory``): tensor shapes of one training step -> bytes per part.

``memory.plan_memory`` builds a ``Step`` from the config and the two models' ``Shape`` and sums what these
functions return; the module docstring of ``kagglekd.memory`` is the table of what each part counts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kagglekd import cputhreads
from kagglekd.config import DistillConfig
from kagglekd.gpus import GiB
from kagglekd.losses import rows_per_block
from kagglekd.rules import moe_shape

if TYPE_CHECKING:
    from kagglekd.memory import ParamCount

CUDA_OVERHEAD_BYTES = int(0.4 * GiB)
CPU_OVERHEAD_BYTES = 80 * 2**20


@dataclass(frozen=True)
class Shape:
    """The dimensions the activation model needs, read from a transformers config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # per token MLP width actually computed (top-k experts x expert width for MoE)
    vocab: int
    max_positions: int | None
    experts: int
    top_k: int

    @classmethod
    def of(cls, cfg) -> Shape:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        experts, top_k = moe_shape(cfg)
        if experts:
            intermediate = top_k * (getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
        else:
            intermediate = cfg.intermediate_size
        return cls(
            cfg.hidden_size,
            cfg.num_hidden_layers,
            heads,
            getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim,
            intermediate,
            cfg.vocab_size,
            getattr(cfg, "max_position_embeddings", None),
            experts,
            top_k,
        )

    def saved_bytes_per_token_layer(self, b: int) -> int:
        """Bytes one decoder layer saves for backward per token (see the module docstring)."""
        h, hq, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * h * (8 + b) + b * (2 * hq + 2 * kv + 4 * self.intermediate)


@dataclass(frozen=True)
class Step:
    """What the parts of one training step are computed from (built by ``plan_memory``)."""

    config: DistillConfig
    teacher: Shape | None  # None: no teacher config (a CE-only or teacher-cache run)
    student: Shape
    batch: int
    length: int
    on_gpu: bool
    live: bool  # the trainer loads and runs the teacher (``DistillConfig.live_teacher``)
    sar: bool
    tokens: int
    b: int  # activation bytes: 2 under fp16/bf16 autocast
    bt: int  # teacher weights/activations/logits bytes: fp16 on a GPU
    chunk: int  # token positions per loss chunk
    device: torch.device
    shared: int | None = None  # cross-tokenizer: tokens both vocabularies spell (None: not known, bounded)

    @property
    def mapped_width(self) -> int:
        """Width k of cross-tokenizer targets: the shared tokens (or ``kd_top_k`` of them). Unknown shared count:
        bounded by the smaller vocabulary (both models' rows)."""
        return min(self.config.kd_top_k or self.mapped_width_bound, self.mapped_width_bound)

    @property
    def mapped_width_bound(self) -> int:
        """The shared tokens of a cross-tokenizer pair, or (not known) the smaller vocabulary."""
        return self.shared or min(self.student.vocab, self.teacher.vocab if self.teacher else self.student.vocab)


def weight_parts(step: Step, t_params: ParamCount | None, s_params: ParamCount) -> dict[str, int]:
    amp = step.b == 2
    return {
        "runtime_overhead": CUDA_OVERHEAD_BYTES if step.on_gpu else CPU_OVERHEAD_BYTES,
        "teacher_weights": t_params.total * step.bt if step.live and t_params else 0,
        "student_weights": s_params.total * 4,
        "student_grads": s_params.total * 4,
        "optimizer_states": s_params.total * 8,
        "autocast_copies": s_params.total * 2 if amp else 0,
    }


def attention_maps(step: Step) -> tuple[int, int]:
    """(student, teacher) bytes of attention transfer (``kagglekd.attention``): the q/k of the chosen layers
    only are hooked and their maps recomputed in float32, the model keeping its SDPA/flash kernel. Student, per
    chosen layer: the softmax probabilities [B, H, T, T] saved for backward plus the head-averaged map [B, T, T];
    teacher (no grad), per chosen layer: its map, plus one head chunk's scores and probabilities at a time."""
    config, s, t = step.config, step.student, step.teacher
    if config.alpha_attention <= 0:
        return 0, 0
    from kagglekd.attention import AttentionCapture

    count = config.attention_layers or 1
    square = step.batch * step.length * step.length * 4
    student = min(count, s.layers) * square * (s.heads + 1)
    if t is None or not step.live:
        return student, 0
    head_chunk = inspect.signature(AttentionCapture.maps).parameters["head_chunk"].default
    return student, min(count, t.layers) * square + 2 * square * min(head_chunk, t.heads)


def activation_parts(step: Step, gradient_checkpointing: bool) -> dict[str, int]:
    s, t, tokens, b, bt = step.student, step.teacher, step.tokens, step.b, step.bt
    per_layer = s.saved_bytes_per_token_layer(b)
    edges = 3 * s.hidden * 4  # embedding output, final norm, lm_head input
    if gradient_checkpointing:
        student = tokens * (s.layers * s.hidden * 4 + per_layer + edges)
    else:
        student = tokens * (s.layers * per_layer + edges)
    teacher = 0
    if step.live and t is not None:
        if step.sar:
            teacher = tokens * t.layers * t.saved_bytes_per_token_layer(bt)
        else:
            teacher = tokens * bt * (4 * t.hidden + 2 * t.intermediate)  # one layer's transients
            if step.config.alpha_feature > 0:
                teacher += tokens * bt * t.hidden * (t.layers + 1)
    return {
        "student_activations": student,
        "attention_maps": sum(attention_maps(step)),
        "teacher_activations": teacher,
    }


def loss_parts(step: Step) -> tuple[dict[str, int], str]:
    """Logits and the losses' working memory (see the module docstring), and the KD mode."""
    config, s, t, tokens, chunk = step.config, step.student, step.teacher, step.tokens, step.chunk
    kd = config.alpha_kd > 0 and (step.live or config.teacher_cache is not None)
    top_k = config.kd_top_k
    teacher_vocab = t.vocab if t is not None else s.vocab
    if not kd:
        teacher_logits = 0
    elif step.live:
        teacher_logits = tokens * teacher_vocab * step.bt
    else:  # cached top-k targets as the cache hands them over: int64 ids + float32 log-probs, float32 tail
        teacher_logits = tokens * ((top_k or 0) * 12 + 4)
    cross = config.cross_tokenizer and kd and step.live
    # the widest target row the KD closed forms read: the dense teacher, top-k + tail, or the mapped targets + tail
    teacher_width = step.mapped_width + 1 if cross else (top_k + 1) if top_k else teacher_vocab
    kd_mode = ("top-k" if top_k else ("full" if chunk == tokens else "chunked")) if kd else "none"
    if config.fused_kd:
        # lm_head + KD + CE in token chunks: no [B, T, V_s] logits and no [B, T, V_s] gradient held
        dense = kd and not (top_k or cross)
        student_logits, intermediates = 0, fused_working_memory(step, kd, teacher_width, dense)
        kd_mode = f"fused {kd_mode}"
    else:
        # the model's [B, T, V_s] logits; their gradient is the losses' held ones (``losses._RowwiseLoss`` hands
        # its buffer to autograd, scaled in place, and autograd adds the second loss's into it in place)
        student_logits = tokens * s.vocab * step.b
        # the losses walk the rows in blocks: a chunk on a GPU, cache-sized on a CPU (the heavier, non-light kind)
        block = rows_per_block(s.vocab, chunk, step.device)
        held = (int(kd) + int(config.alpha_ce > 0)) * tokens * s.vocab * step.b
        intermediates = block * (3 * s.vocab * 4 + (2 * teacher_width * 4 if kd else 0)) + held
    if cross:
        every_shared = not top_k or top_k >= step.mapped_width_bound
        if _dense_cross(step, every_shared):
            # ``alignment._dense_forward_kl``: the closed form per block of rows (the losses' blocks above), plus
            # the block's float32 teacher rows and their exp [block, V_t]; no targets are built
            intermediates += block * teacher_vocab * 4 * 2
        else:
            # ``alignment.cross_targets``: float32 log-probs [B, T, k] and tail over the k mapped tokens for every
            # position, their int64 student ids [B, T, k] unless k is every shared token (then one [k] vector is
            # expanded), and one row chunk of the teacher's float32 log-probs and probabilities while mapping
            k = step.mapped_width
            intermediates += tokens * (k * (4 if every_shared else 12) + 4) + chunk * teacher_vocab * 4 * 2
    parts = {"student_logits": student_logits, "teacher_logits": teacher_logits, "kd_intermediates": intermediates}
    if not step.on_gpu and cputhreads.keeps_freed_memory():
        # a CPU run keeps freed blocks for reuse (``cputhreads.keep_freed_memory``): the heap holds up to one more
        # copy of the step's largest transient tensor, the teacher's or the student's [B, T, V] logits
        parts["cpu_heap_kept"] = max(teacher_logits if step.live else 0, tokens * s.vocab * step.b)
    return parts, kd_mode


def _dense_cross(step: Step, every_shared: bool) -> bool:
    """Whether unfused cross-tokenizer KD takes ``alignment``'s dense forward-KL path (``_dense_applies``)."""
    config = step.config
    return (
        not config.fused_kd
        and config.cross_tokenizer_loss == "exact"
        and config.divergence == "forward_kl"
        and every_shared
        and not step.sar
        and step.mapped_width_bound < step.student.vocab
    )


def fused_working_memory(step: Step, kd: bool, teacher_width: int, dense: bool) -> int:
    """What ``kagglekd.fused.fused_lm_head_kd`` allocates, on a CPU as on a GPU: per chunk of ``loss_chunk_size``
    positions the chunk's float32 logits [c, V_s] (overwritten by their gradient; with several chunks the previous
    chunk's buffer is still alive while the next one's logits are computed), the dense teacher's rows [c, V_t]
    copied out in the teacher's dtype, and the row blocks of ``losses.rows_per_block`` (light for top-k targets or
    CE only) that the KD/CE closed forms work in; plus the float32 gradients it holds until backward: the
    lm_head's [V_s, H] and the hidden states' [B, T, H]. ``dense``: the teacher is dense logits (not top-k or
    mapped cross-tokenizer targets)."""
    s, tokens, chunk = step.student, step.tokens, step.chunk
    dense_teacher = dense
    block = rows_per_block(s.vocab, chunk, step.device, light=not dense_teacher)
    logits = chunk * s.vocab * 4 * (2 if tokens > chunk else 1)
    teacher_rows = chunk * teacher_width * step.bt if dense_teacher else 0
    per_block = block * (3 * s.vocab * 4 + (2 * teacher_width * 4 if kd else 0))
    return logits + teacher_rows + per_block + s.vocab * s.hidden * 4 + (tokens + chunk) * s.hidden * 4
