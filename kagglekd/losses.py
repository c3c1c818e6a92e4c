"""Distillation and language-model losses: pure functions, tensors in, tensors out.

Conventions every function here shares:

* logits are ``[B, T, V]`` in any float dtype; labels are ``[B, T]`` int64 and already aligned, so
  ``labels[b, t]`` is the target of position ``t``. ``-100`` (``IGNORE_INDEX``) marks an ignored position.
  Any leading shape works as long as ``logits.shape[:-1] == labels.shape``.
* a loss is the SUM over valid positions divided by ``num_items``: the valid-target count of the whole
  accumulation window (summed over ranks under DDP). ``None`` means this batch's own valid count.
  Dividing by the window count, not per micro-batch, is what makes GA=4 x bs=1 and GA=1 x bs=4 give
  the same gradients, and what keeps the loss independent of sequence length and padding.
* softmax / log-softmax always run in float32 whatever the input dtype (fp16/bf16 are upcast; float64 is
  kept, which tests use for tight references); the temperature divides the logits before the log-softmax.
  Losses come back as float32 scalars (float64 for float64 inputs).
* valid positions are gathered and processed ``chunk_size`` rows at a time. When gradients are needed each
  chunk runs under (non-reentrant) activation checkpointing, so the float32 full-vocab intermediates of
  one chunk only are alive at a time, in the forward and in the backward pass.
* when no position is valid the result is a float32 zero that is still attached to the student's graph,
  so ``.backward()`` works and yields zero gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")

# Stands in for log(0) when masking entries before a logsumexp: exp() of it is exactly 0 in float32,
# but unlike -inf it never produces (-inf) - (-inf) = nan in a forward or backward pass.
_MASKED_LOGPROB = -1e30


class TeacherTopK(NamedTuple):
    """Sparse teacher targets: the teacher's k most likely tokens per position plus a tail.

    ``indices``  ``[..., k]`` int64: token ids of the k most likely tokens, most likely first.
    ``logprobs`` ``[..., k]`` float: the teacher's log-probabilities of those tokens, computed in float32
                 with the distillation temperature ALREADY applied (log_softmax(teacher_logits / T)).
    ``tail``     ``[...]``   float: the LOG of the teacher's probability mass outside ``indices`` (same
                 temperature), so ``logprobs.exp().sum(-1) + tail.exp() == 1``.

    The leading shape ``[...]`` is the labels' shape (``[B, T]``) or ``[N]`` for flattened positions.
    Build it with ``teacher_topk``; ``kd_loss`` and ``kd_per_position`` accept it wherever a dense teacher
    tensor is accepted, and then apply the temperature to the student side only.
    """

    indices: Tensor
    logprobs: Tensor
    tail: Tensor

    @property
    def k(self) -> int:
        return self.indices.shape[-1]


Teacher = Tensor | TeacherTopK


def _upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32 (float64 stays float64): softmax never runs in fp16/bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def valid_count(labels: Tensor) -> int:
    """Number of valid (not ``-100``) targets in ``labels`` (any shape), as a Python int."""
    return int((labels != IGNORE_INDEX).sum().item())


# ---------------------------------------------------------------------------------------------------------
# Divergences on log-probability vectors (last dim = vocab or buckets)
# ---------------------------------------------------------------------------------------------------------


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_i a_i (log a_i - log b_i) over the last dim; terms with a_i == 0 count as 0.

    ``[N, V], [N, V] -> [N]``. The zero-terms are masked on the log-ratio (not on the product) so that
    -inf log-probs give neither nan values nor nan gradients.
    """
    a = log_a.exp()
    log_ratio = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * log_ratio).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), elementwise, from log a and log b."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _divergence(log_p: Tensor, log_q: Tensor, divergence: str, beta: float, skew_alpha: float) -> Tensor:
    """Per-row divergence between teacher ``p`` and student ``q`` given as float32 log-probs.

    ``[N, V], [N, V] -> [N]``; see ``kd_per_position`` for the definitions.
    """
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "jsd":
        # The weighted JSD divided by beta*(1-beta) tends to KL(p||q) as beta -> 0 and to KL(q||p) as
        # beta -> 1; the endpoints are dispatched explicitly because the formula is 0/0 there.
        if beta == 0.0:
            return _kl(log_p, log_q)
        if beta == 1.0:
            return _kl(log_q, log_p)
        log_m = _log_mixture(log_p, log_q, beta)
        weighted = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
        return weighted / (beta * (1.0 - beta))
    if divergence == "skew_forward_kl":
        return _kl(log_p, _log_mixture(log_p, log_q, skew_alpha))
    if divergence == "skew_reverse_kl":
        return _kl(log_q, _log_mixture(log_q, log_p, skew_alpha))
    raise ValueError(f"unknown divergence {divergence!r}; valid names: {', '.join(DIVERGENCES)}")


def _check_kd_args(divergence: str, temperature: float, beta: float, skew_alpha: float, top_k: int | None):
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid names: {', '.join(DIVERGENCES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if not 0.0 <= skew_alpha <= 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1], got {skew_alpha}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None (full vocabulary), got {top_k}")


# ---------------------------------------------------------------------------------------------------------
# Top-k buckets
# ---------------------------------------------------------------------------------------------------------


def _tail_logprob(log_probs: Tensor, indices: Tensor) -> Tensor:
    """log of the probability mass outside ``indices``: ``[N, V], [N, k] -> [N]``.

    Computed as a logsumexp over the complement rather than log(1 - sum top-k), so a tiny tail keeps its
    exact value (and gradient) instead of drowning in float32 rounding of 1 - (1 - tail).
    """
    return torch.logsumexp(log_probs.scatter(-1, indices, _MASKED_LOGPROB), dim=-1)


def _buckets(log_top: Tensor, log_tail: Tensor) -> Tensor:
    """``[N, k], [N] -> [N, k + 1]`` log-probs over k token buckets and one tail bucket."""
    return torch.cat([log_top, log_tail.unsqueeze(-1)], dim=-1)


def teacher_topk(
    teacher_logits: Tensor, k: int, temperature: float = 1.0, chunk_size: int = 1024
) -> TeacherTopK:
    """The teacher's k most likely tokens per position, their log-probs at ``temperature``, and the tail.

    ``teacher_logits`` ``[..., V]`` -> ``TeacherTopK`` with ``indices`` ``[..., k]`` int64, ``logprobs``
    ``[..., k]`` float32 and ``tail`` ``[...]`` float32, the log of the remaining mass (float64 stays
    float64). ``k`` larger than ``V`` is clamped to ``V``. Positions are processed ``chunk_size`` at a
    time, so no float32 copy of the whole ``[..., V]`` tensor is ever made. Every position is kept,
    including ignored ones (labels are not needed).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = teacher_logits.shape[-1]
    k = min(k, vocab)
    rows = teacher_logits.reshape(-1, vocab)
    indices, logprobs, tails = [], [], []
    for chunk in rows.split(chunk_size):
        log_p = F.log_softmax(_upcast(chunk) / temperature, dim=-1)
        top_logprobs, top_indices = log_p.topk(k, dim=-1)
        indices.append(top_indices)
        logprobs.append(top_logprobs)
        tails.append(_tail_logprob(log_p, top_indices))
    lead = teacher_logits.shape[:-1]
    if not indices:  # zero positions
        return TeacherTopK(
            rows.new_zeros((*lead, k), dtype=torch.long),
            rows.new_zeros((*lead, k), dtype=torch.float32),
            rows.new_zeros(lead, dtype=torch.float32),
        )
    return TeacherTopK(
        torch.cat(indices).reshape(*lead, k),
        torch.cat(logprobs).reshape(*lead, k),
        torch.cat(tails).reshape(lead),
    )


# ---------------------------------------------------------------------------------------------------------
# Per-position KD (the piece a fused lm_head + KD path reuses per chunk)
# ---------------------------------------------------------------------------------------------------------


def kd_per_position(
    student_logits: Tensor,
    teacher: Teacher,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    top_k: int | None = None,
) -> Tensor:
    """Per-position divergence between teacher and student, not scaled by T² and not normalised.

    ``student_logits`` ``[N, V]`` (any float dtype), ``teacher`` either dense logits ``[N, V]`` or a
    ``TeacherTopK`` with ``indices``/``logprobs`` ``[N, k]`` and ``tail`` ``[N]``. Returns float32 ``[N]``.

    With ``p`` the teacher's and ``q`` the student's distribution (float32, logits / ``temperature``):

    * ``forward_kl``: KL(p || q) = sum p (log p - log q), the true KL (teacher entropy included), 0 for
      identical inputs; terms with p = 0 count as 0.
    * ``reverse_kl``: KL(q || p).
    * ``jsd``: with m = beta * p + (1 - beta) * q, for 0 < beta < 1
      ``JSD_beta = [beta * KL(p || m) + (1 - beta) * KL(q || m)] / (beta * (1 - beta))``;
      ``JSD_0 = KL(p || q)`` and ``JSD_1 = KL(q || p)``. This is the beta-skewed Jensen-Shannon divergence
      rescaled by 1 / (beta (1 - beta)), which makes it continuous in beta: as beta -> 0 the first term
      tends to KL(p || q) and the second to 0 (KL(q || m) = O(beta²)); symmetrically at beta -> 1. At
      beta = 0.5 it is 4 x the ordinary JS divergence. It is 0 for identical inputs and bounded by
      ``min(KL(p||q) + KL(q||p), H(beta) / (beta (1 - beta)))`` with H the binary entropy in nats.
      In float32 its relative precision degrades like 1e-7 / (beta (1 - beta)) as beta nears 0 or 1.
    * ``skew_forward_kl``: KL(p || alpha p + (1 - alpha) q), alpha = ``skew_alpha`` (DistiLLM); alpha = 0
      is forward KL, alpha = 1 gives 0.
    * ``skew_reverse_kl``: KL(q || alpha q + (1 - alpha) p).

    ``top_k = k`` (or a ``TeacherTopK`` teacher) replaces both distributions by k + 1 buckets: the teacher's
    k most likely tokens plus one tail bucket holding each side's own remaining mass (a logsumexp over the
    complement, exact in log space), and computes the divergence over those buckets. ``top_k >= V`` with a
    dense teacher is the full-vocabulary computation. With a ``TeacherTopK`` teacher ``top_k`` may be None
    or must equal its k (after clamping to V), and the temperature applies to the student side only.
    """
    _check_kd_args(divergence, temperature, beta, skew_alpha, top_k)
    vocab = student_logits.shape[-1]
    log_q = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    if isinstance(teacher, TeacherTopK):
        if top_k is not None and min(top_k, vocab) != teacher.k:
            raise ValueError(f"top_k={top_k} does not match the k={teacher.k} of the TeacherTopK targets")
        indices = teacher.indices
        log_p_top, log_p_tail = _upcast(teacher.logprobs), _upcast(teacher.tail)
    else:
        if teacher.shape[-1] != vocab:
            raise ValueError(
                f"teacher vocab {teacher.shape[-1]} != student vocab {vocab}: token ids of different "
                "vocabularies do not correspond; use kagglekd.alignment for cross-tokenizer distillation"
            )
        log_p = F.log_softmax(_upcast(teacher) / temperature, dim=-1)
        if top_k is None or top_k >= vocab:
            return _divergence(log_p, log_q, divergence, beta, skew_alpha)
        log_p_top, indices = log_p.topk(top_k, dim=-1)
        log_p_tail = _tail_logprob(log_p, indices)
    log_q_buckets = _buckets(log_q.gather(-1, indices), _tail_logprob(log_q, indices))
    return _divergence(_buckets(log_p_top, log_p_tail), log_q_buckets, divergence, beta, skew_alpha)


# ---------------------------------------------------------------------------------------------------------
# Batch losses
# ---------------------------------------------------------------------------------------------------------


def _zero_with_grad(logits: Tensor) -> Tensor:
    # A sum over zero elements: exactly 0.0 and attached to the graph, without touching any value
    # (0 * sum(logits) would be nan for fp16 logits whose sum overflows).
    return _upcast(logits.reshape(-1)[:0]).sum()


def _normaliser(num_items: int | float | Tensor | None, batch_valid: int) -> int | float | Tensor:
    if num_items is None:
        return batch_valid
    if not isinstance(num_items, Tensor) and num_items <= 0:
        raise ValueError(f"num_items must be > 0 when there are valid positions, got {num_items}")
    return num_items


def _check_labels(logits: Tensor, labels: Tensor, what: str) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"{what} shape {tuple(logits.shape)} does not match labels {tuple(labels.shape)}: "
            "expected logits [..., V] with labels [...]"
        )


def _flat_rows(teacher: Teacher, vocab: int) -> Teacher:
    if isinstance(teacher, TeacherTopK):
        k = teacher.k
        return TeacherTopK(
            teacher.indices.reshape(-1, k), teacher.logprobs.reshape(-1, k), teacher.tail.reshape(-1)
        )
    return teacher.reshape(-1, vocab)


def _select_rows(teacher: Teacher, positions: Tensor) -> Teacher:
    if isinstance(teacher, TeacherTopK):
        return TeacherTopK(*(field.index_select(0, positions) for field in teacher))
    return teacher.index_select(0, positions)


def _needs_grad(*tensors: Tensor | TeacherTopK) -> bool:
    if not torch.is_grad_enabled():
        return False
    flat = [t for item in tensors for t in (item if isinstance(item, TeacherTopK) else (item,))]
    return any(t.requires_grad for t in flat)


def _chunked_sum(
    chunk_fn: Callable[..., Tensor], inputs: tuple, positions: Tensor, chunk_size: int
) -> Tensor:
    """sum over chunks of ``chunk_fn(*inputs, position_chunk)`` (each a float32 scalar).

    Under autograd each chunk is checkpointed: only ``inputs`` (already alive) and the index chunk are kept,
    and the chunk's float32 intermediates are rebuilt during its own backward.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    use_checkpoint = _needs_grad(*inputs)
    total = None
    for chunk in positions.split(chunk_size):
        if use_checkpoint:
            part = checkpoint(chunk_fn, *inputs, chunk, use_reentrant=False, preserve_rng_state=False)
        else:
            part = chunk_fn(*inputs, chunk)
        total = part if total is None else total + part
    return total


def _valid_positions(labels: Tensor) -> Tensor:
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Teacher,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    top_k: int | None = None,
    scale_t2: bool = True,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Knowledge-distillation loss: sum over valid positions of the per-position divergence / ``num_items``.

    ``student_logits`` ``[B, T, V]``; ``teacher_logits`` dense ``[B, T, V]`` (same vocabulary) or a
    ``TeacherTopK`` with leading shape ``[B, T]``; ``labels`` ``[B, T]`` int64 (only its ``-100`` mask is
    used). Returns a float32 scalar. The divergences, ``top_k`` and the tail bucket are described in
    ``kd_per_position``. ``scale_t2`` multiplies the result by ``temperature ** 2`` (keeps the gradient scale
    comparable across temperatures). ``num_items`` is the valid-target count of the whole accumulation
    window (``None`` = this batch's count). The teacher is not detached here: run its forward under
    ``torch.no_grad()`` unless gradients are meant to reach it.
    """
    _check_kd_args(divergence, temperature, beta, skew_alpha, top_k)
    _check_labels(student_logits, labels, "student_logits")
    vocab = student_logits.shape[-1]
    if isinstance(teacher_logits, TeacherTopK):
        _check_labels(teacher_logits.logprobs, labels, "TeacherTopK.logprobs")
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)}; different vocabularies need kagglekd.alignment, never truncation"
        )
    positions = _valid_positions(labels)
    if positions.numel() == 0:
        return _zero_with_grad(student_logits)

    def chunk_fn(student_rows: Tensor, teacher_rows: Teacher, chunk: Tensor) -> Tensor:
        per_position = kd_per_position(
            student_rows.index_select(0, chunk),
            _select_rows(teacher_rows, chunk),
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            skew_alpha=skew_alpha,
            top_k=top_k,
        )
        return per_position.sum()

    inputs = (student_logits.reshape(-1, vocab), _flat_rows(teacher_logits, vocab))
    total = _chunked_sum(chunk_fn, inputs, positions, chunk_size)
    if scale_t2:
        total = total * (temperature**2)
    return total / _normaliser(num_items, positions.numel())


def ce_loss(
    logits: Tensor, labels: Tensor, num_items: int | float | Tensor | None = None, chunk_size: int = 1024
) -> Tensor:
    """Token cross-entropy: sum over valid positions of -log softmax(logits)[label] / ``num_items``.

    ``logits`` ``[B, T, V]`` (any float dtype; log-softmax runs in float32), ``labels`` ``[B, T]`` int64 with
    ``-100`` ignored. Returns a float32 scalar; equals
    ``F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="sum") / num_items``.
    """
    _check_labels(logits, labels, "logits")
    vocab = logits.shape[-1]
    positions = _valid_positions(labels)
    if positions.numel() == 0:
        return _zero_with_grad(logits)

    def chunk_fn(rows: Tensor, targets: Tensor, chunk: Tensor) -> Tensor:
        chunk_logits = _upcast(rows.index_select(0, chunk))
        return F.cross_entropy(chunk_logits, targets.index_select(0, chunk), reduction="sum")

    total = _chunked_sum(chunk_fn, (logits.reshape(-1, vocab), labels.reshape(-1)), positions, chunk_size)
    return total / _normaliser(num_items, positions.numel())


def token_log_probs(logits: Tensor, labels: Tensor, chunk_size: int = 1024) -> Tensor:
    """log p(label) per position: ``[B, T, V], [B, T] -> [B, T]`` float32, 0.0 at ignored positions.

    Meant for evaluation (per-sequence scores); it is differentiable but not checkpointed.
    """
    _check_labels(logits, labels, "logits")
    vocab = logits.shape[-1]
    rows, targets = logits.reshape(-1, vocab), labels.reshape(-1)
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    parts = []
    for row_chunk, target_chunk in zip(rows.split(chunk_size), safe_targets.split(chunk_size)):
        log_p = F.log_softmax(_upcast(row_chunk), dim=-1)
        parts.append(log_p.gather(-1, target_chunk.unsqueeze(-1)).squeeze(-1))
    if not parts:
        return rows.new_zeros(labels.shape, dtype=torch.float32)
    return torch.where(valid, torch.cat(parts), 0.0).reshape(labels.shape)


__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "TeacherTopK",
    "ce_loss",
    "kd_loss",
    "kd_per_position",
    "teacher_topk",
    "token_log_probs",
    "valid_count",
]
