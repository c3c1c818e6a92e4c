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
* valid positions are processed at most ``chunk_size`` rows at a time (on a CPU in smaller, cache-sized
  blocks), so the float32 full-vocab intermediates of one chunk only are alive at a time. ``kd_loss`` and
  ``ce_loss`` compute the gradient w.r.t. the student's logits in closed form during the forward pass (see
  "Closed-form gradients"), store it in the logits' dtype and only scale it in ``backward``: nothing is
  recomputed, so call ``backward`` once per loss call. When the teacher's logits require grad, ``kd_loss``
  falls back to autograd over checkpointed chunks, which also differentiates the teacher side.
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


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0, chunk_size: int = 1024) -> TeacherTopK:
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
    _check_topk_k(teacher, top_k, vocab)
    if isinstance(teacher, TeacherTopK):
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
        return TeacherTopK(teacher.indices.reshape(-1, k), teacher.logprobs.reshape(-1, k), teacher.tail.reshape(-1))
    return teacher.reshape(-1, vocab)


def _select_rows(teacher: Teacher, positions: Tensor | slice) -> Teacher:
    if isinstance(teacher, TeacherTopK):
        return TeacherTopK(*(field[positions] for field in teacher))
    # advanced indexing, not index_select: on CPU index_select of wide rows is ~10x slower
    return teacher[positions]


def _needs_grad(*tensors: Tensor | TeacherTopK) -> bool:
    if not torch.is_grad_enabled():
        return False
    flat = [t for item in tensors for t in (item if isinstance(item, TeacherTopK) else (item,))]
    return any(t.requires_grad for t in flat)


def _chunked_sum(chunk_fn: Callable[..., Tensor], inputs: tuple, positions: Tensor, chunk_size: int) -> Tensor:
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


# ---------------------------------------------------------------------------------------------------------
# Closed-form gradients: the loss and d loss / d student logits in one pass over cache-sized row blocks
# ---------------------------------------------------------------------------------------------------------
# With s = student_logits / T, q = softmax(s), every divergence here is a function D(p, q) whose gradient
# w.r.t. s has a closed form built from p, q and log p - log q; so the forward pass computes the value and
# the gradient together, once, and the backward pass only scales the stored gradient by the incoming one.
# Written as h_i = dD/dq_i, dD/ds_i = q_i (h_i - sum_j q_j h_j):
#   forward KL   KL(p || q)                         dD/ds = q sum(p) - p
#   reverse KL   KL(q || p)                         dD/ds = q (log q - log p - D)
#   jsd(beta)    [b KL(p||m) + (1-b) KL(q||m)] / (b (1-b)), m = b p + (1-b) q
#                                                   dD/ds = q (log q - log m - KL(q||m)) / b
#   skew fwd     KL(p || m), m = a p + (1-a) q      dD/ds = (1-a) q (sum_j q_j w_j - w), w = p / m
#   skew rev     KL(q || m), m = a q + (1-a) p      dD/ds = q (u - sum_j q_j u_j), u = log(q/m) - a q/m
# For top-k buckets the same formulas run over the k + 1 buckets (g = the bucket gradient); a vocabulary
# entry v outside the top k receives g_tail * q_v / Q_tail, its share of the student's tail bucket.
# On a CPU the rows go through in blocks of about half a megabyte per [rows, V] buffer, so the dozen passes
# of a block hit the cache; over a whole [1024, V] chunk every pass would run from main memory (4-8x slower).

_CPU_BLOCK_BYTES = 1 << 19


def rows_per_block(vocab: int, chunk_size: int, device: torch.device, light: bool = False) -> int:
    """Rows per block: cache-sized on a CPU, ``chunk_size`` elsewhere (a GPU wants wide kernels).

    ``light``: the block keeps about half as many ``[rows, V]`` buffers alive (sparse teacher targets, CE),
    so twice the rows fit, and fewer blocks mean less per-op overhead.
    """
    if device.type != "cpu":
        return chunk_size
    return max(1, min(chunk_size, (_CPU_BLOCK_BYTES << light) // (4 * vocab)))


def _scaled(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """``logits / temperature`` in ``dtype`` (may be ``logits`` itself: never modify it in place)."""
    logits = logits.to(dtype)
    return logits / temperature if temperature != 1.0 else logits


def _wide(x: Tensor) -> torch.dtype:
    """float64 for per-row scalars (cheap, ``[c]``), except on MPS which has no float64."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _softmax_and_lse(x: Tensor) -> tuple[Tensor, Tensor]:
    """softmax ``[c, n]`` (dtype of ``x``) and logsumexp ``[c]`` (float64) over the last dim with one exp pass.

    The largest probability is ``exp(max - lse)`` up to the rounding of the normaliser that every
    probability shares, which ``log(sum(probs))`` measures: ``lse = max - log(max prob) + log(sum probs)``,
    kept in float64: within ~1.2e-7 of the exact value from float32 inputs (a float32 ``logsumexp`` is off by
    up to ~7e-7 at V = 49152, being rounded at the magnitude of the result).
    """
    probs = torch.softmax(x, dim=-1)
    wide = _wide(x)
    lse = x.amax(-1).to(wide) - probs.amax(-1).to(wide).log() + probs.sum(-1).to(wide).log()
    return probs, lse


def _finite(x: Tensor) -> Tensor:
    """In place: -inf -> -1e30 (p = 0 terms then vanish as 0 * finite), +inf -> 1e30, nan -> 0."""
    return x.nan_to_num_(nan=0.0, posinf=-_MASKED_LOGPROB, neginf=_MASKED_LOGPROB)


def _mixture_log_ratios(d: Tensor, weight_p: float) -> tuple[Tensor, Tensor]:
    """``(log p - log m, log q - log m)`` for ``m = weight_p p + (1 - weight_p) q``, from ``d = log p - log q``.

    Exact in log space without forming m: for p <= q, log m - log q = log1p(weight_p expm1(d)); for p > q,
    log m - log p = log1p((1 - weight_p) expm1(-d)). Identical inputs (d = 0) give exactly 0.
    """
    coef = (d <= 0).to(d.dtype).mul_(2 * weight_p - 1).add_(1 - weight_p)
    larger_side = torch.log1p(torch.expm1(-d.abs()).mul_(coef)).neg_()  # log max(p, q) - log m
    log_p_ratio = larger_side + d.clamp(max=0)
    return log_p_ratio, larger_side.sub_(d.clamp(min=0))


def _vecdot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b)


def _divergence_and_grad(
    p: Tensor, q: Tensor, d: Tensor, divergence: str, beta: float, skew_alpha: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-row divergence ``[c]`` and its gradient ``[c, n]`` w.r.t. the student's (scaled) logits.

    ``p``, ``q`` ``[c, n]`` probabilities (q a softmax of the student's logits or bucket log-probs), ``d`` =
    log p - log q, finite. Same definitions as ``_divergence``. ``q`` and ``d`` may be overwritten.
    """
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence.startswith("skew_"):
        if skew_alpha == 1.0:  # m equals the first argument: KL = 0
            return p.new_zeros(p.shape[:-1]), (torch.zeros_like(q) if need_grad else None)
        if skew_alpha == 0.0:
            divergence = divergence.removeprefix("skew_")
    grad = None
    if divergence == "forward_kl":
        value = _vecdot(p, d)
        if need_grad:
            grad = q.mul_(p.sum(-1, keepdim=True)).sub_(p)
    elif divergence == "reverse_kl":
        value = -_vecdot(q, d)
        if need_grad:
            grad = d.add_(value.unsqueeze(-1)).mul_(q).neg_()
    elif divergence == "jsd":
        log_p_ratio, log_q_ratio = _mixture_log_ratios(d, beta)
        kl_q = _vecdot(q, log_q_ratio)
        value = (beta * _vecdot(p, log_p_ratio) + (1.0 - beta) * kl_q) / (beta * (1.0 - beta))
        if need_grad:
            grad = log_q_ratio.sub_(kl_q.unsqueeze(-1)).mul_(q).div_(beta)
    elif divergence == "skew_forward_kl":
        log_p_ratio, _ = _mixture_log_ratios(d, skew_alpha)
        value = _vecdot(p, log_p_ratio)
        if need_grad:
            ratio = log_p_ratio.exp_()  # p / m
            grad = ratio.sub_(_vecdot(q, ratio).unsqueeze(-1)).mul_(q).mul_(skew_alpha - 1.0)
    elif divergence == "skew_reverse_kl":
        _, log_q_ratio = _mixture_log_ratios(d, 1.0 - skew_alpha)
        value = _vecdot(q, log_q_ratio)
        if need_grad:
            u = log_q_ratio.exp().mul_(-skew_alpha).add_(log_q_ratio)  # log(q/m) - a q/m
            grad = u.sub_(_vecdot(q, u).unsqueeze(-1)).mul_(q)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; valid names: {', '.join(DIVERGENCES)}")
    return value, grad


def _split_top(logits: Tensor, indices: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Top-k / tail split of one block of logits ``[c, V]`` at ``indices`` ``[c, k]``.

    Returns the logits at ``indices`` ``[c, k]``; the softmax over the other entries ``[c, V]`` (0 at
    ``indices``; None when k == V); the logsumexp over the other entries ``[c]`` (-inf when k == V); the
    logsumexp over all entries ``[c]``; both logsumexps in float64. The tail is summed directly, never as
    1 - (top-k mass).
    """
    top = logits.gather(-1, indices)
    wide = _wide(logits)
    if indices.shape[-1] < logits.shape[-1]:
        tail_probs, lse_tail = _softmax_and_lse(logits.scatter(-1, indices, float("-inf")))
    else:
        tail_probs, lse_tail = None, torch.full(top.shape[:-1], float("-inf"), dtype=wide, device=top.device)
    return top, tail_probs, lse_tail, torch.logaddexp(torch.logsumexp(top.to(wide), -1), lse_tail)


def _kd_rows(
    student: Tensor,
    teacher: Teacher,
    *,
    temperature: float,
    divergence: str,
    beta: float,
    skew_alpha: float,
    top_k: int | None,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Divergence per row ``[c]`` and its gradient w.r.t. ``student / temperature`` ``[c, V]`` (or None).

    ``student`` ``[c, V]`` logits, ``teacher`` dense ``[c, V]`` logits or a ``TeacherTopK`` with ``[c, k]``
    fields; the same values as ``kd_per_position``. Math in float32 (float64 if either side is float64).
    Multiply the gradient by 1 / temperature to get d / d student.
    """
    vocab = student.shape[-1]
    if isinstance(teacher, TeacherTopK):
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.logprobs.dtype), torch.float32)
        indices, log_p_top, log_p_tail = teacher.indices, teacher.logprobs.to(dtype), teacher.tail.to(dtype)
    else:
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    s = _scaled(student, temperature, dtype)
    if not isinstance(teacher, TeacherTopK):
        t = _scaled(teacher, temperature, dtype)
        if top_k is None or top_k >= vocab:
            q, lse_s = _softmax_and_lse(s)
            p, lse_t = _softmax_and_lse(t)
            d = _finite(torch.sub(t, s).sub_((lse_t - lse_s).to(dtype).unsqueeze(-1)))
            del t
            return _divergence_and_grad(p, q, d, divergence, beta, skew_alpha, need_grad)
        indices = t.topk(top_k, dim=-1, sorted=False).indices
        t_top, _, t_lse_tail, t_lse = _split_top(t, indices)
        log_p_top, log_p_tail = t_top.to(t_lse.dtype) - t_lse.unsqueeze(-1), t_lse_tail - t_lse
        del t
    s_top, tail_probs, lse_tail, lse = _split_top(s, indices)
    log_q = torch.cat([s_top.to(lse.dtype) - lse.unsqueeze(-1), (lse_tail - lse).unsqueeze(-1)], -1)
    log_q = log_q.to(dtype).clamp_min_(_MASKED_LOGPROB)
    log_p = torch.cat([log_p_top, log_p_tail.unsqueeze(-1)], -1).to(dtype).clamp_min_(_MASKED_LOGPROB)
    value, bucket_grad = _divergence_and_grad(
        log_p.exp(), log_q.exp(), _finite(log_p - log_q), divergence, beta, skew_alpha, need_grad
    )
    if not need_grad:
        return value, None
    # an entry outside the top k moves with the student's tail bucket, in proportion to its share of it
    grad = tail_probs.mul_(bucket_grad[:, -1:]) if tail_probs is not None else torch.zeros_like(s)
    return value, grad.scatter_(-1, indices, bucket_grad[:, :-1])


def _ce_rows(logits: Tensor, targets: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Cross-entropy per row ``[c]`` (float32, float64 stays) and its gradient softmax - onehot ``[c, V]``."""
    z = _upcast(logits)
    probs, lse = _softmax_and_lse(z)
    target_rows = targets.unsqueeze(-1)
    value = (lse - z.gather(-1, target_rows).squeeze(-1).to(lse.dtype)).to(z.dtype)
    if not need_grad:
        return value, None
    return value, probs.scatter_add_(-1, target_rows, torch.full(target_rows.shape, -1.0, dtype=probs.dtype,
                                                                  device=probs.device))  # fmt: skip


def _valid_runs(labels: Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of consecutive valid positions of the flattened labels."""
    valid = (labels.reshape(-1) != IGNORE_INDEX).to(device="cpu", dtype=torch.int8)
    edges = torch.diff(valid, prepend=valid.new_zeros(1), append=valid.new_zeros(1)).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


class _RowwiseLoss(torch.autograd.Function):
    """Sum over valid rows of a per-row loss whose gradient w.r.t. the rows comes with its value.

    ``rows`` ``[M, V]``; ``row_fn(start, end, need_grad)`` returns the per-row losses of ``rows[start:end]``
    and their gradient ``[end - start, V]`` (or None); ``runs`` the valid row ranges; ``grad_scale`` multiplies
    the stored gradient (1 / temperature). The gradient ``[M, V]`` is built in the forward pass, in the rows'
    dtype and with zeros at ignored rows, and handed to autograd in ``backward`` after an in-place scaling:
    no recomputation and no second ``[M, V]`` buffer. So ``backward`` can run once per call.
    """

    @staticmethod
    def forward(ctx, rows, row_fn, runs, block_rows, grad_scale):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device) if need_grad else None
        sums, done = [], 0
        for start, end in runs:
            if need_grad:
                grad[done:start].zero_()
            for block_start in range(start, end, block_rows):
                block_end = min(block_start + block_rows, end)
                values, block_grad = row_fn(block_start, block_end, need_grad)
                sums.append(values.sum())
                if need_grad:
                    grad[block_start:block_end].copy_(block_grad)
            done = end
        if need_grad:
            grad[done:].zero_()
        ctx.grad, ctx.grad_scale = grad, grad_scale
        return torch.stack(sums).sum()

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("this loss's gradient was already handed out: call backward once per loss call")
        return grad.mul_(grad_output * ctx.grad_scale), None, None, None, None


def _check_topk_k(teacher: Teacher, top_k: int | None, vocab: int) -> None:
    if isinstance(teacher, TeacherTopK) and top_k is not None and min(top_k, vocab) != teacher.k:
        raise ValueError(f"top_k={top_k} does not match the k={teacher.k} of the TeacherTopK targets")


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
    _check_topk_k(teacher_logits, top_k, vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    runs = _valid_runs(labels)
    valid = sum(end - start for start, end in runs)
    if valid == 0:
        return _zero_with_grad(student_logits)
    rows, teacher_rows = student_logits.reshape(-1, vocab), _flat_rows(teacher_logits, vocab)
    kd_kwargs = {"temperature": temperature, "divergence": divergence, "beta": beta, "skew_alpha": skew_alpha,
                 "top_k": top_k}  # fmt: skip
    if _needs_grad(teacher_rows):
        # Gradients for the teacher too (SAR trains the teacher's routers through this loss): plain autograd
        # over checkpointed chunks, which differentiates both sides.
        def chunk_fn(student_rows: Tensor, teacher_chunk: Teacher, chunk: Tensor) -> Tensor:
            return kd_per_position(student_rows[chunk], _select_rows(teacher_chunk, chunk), **kd_kwargs).sum()

        total = _chunked_sum(chunk_fn, (rows, teacher_rows), _valid_positions(labels), chunk_size)
    else:

        def row_fn(start: int, end: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
            return _kd_rows(
                rows[start:end], _select_rows(teacher_rows, slice(start, end)), need_grad=need_grad, **kd_kwargs
            )

        light = isinstance(teacher_rows, TeacherTopK)
        block_rows = rows_per_block(vocab, chunk_size, student_logits.device, light)
        total = _RowwiseLoss.apply(rows, row_fn, runs, block_rows, 1.0 / temperature)
    if scale_t2:
        total = total * (temperature**2)
    return total / _normaliser(num_items, valid)


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
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    runs = _valid_runs(labels)
    valid = sum(end - start for start, end in runs)
    if valid == 0:
        return _zero_with_grad(logits)
    rows, targets = logits.reshape(-1, vocab), labels.reshape(-1)

    def row_fn(start: int, end: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        return _ce_rows(rows[start:end], targets[start:end], need_grad)

    total = _RowwiseLoss.apply(rows, row_fn, runs, rows_per_block(vocab, chunk_size, logits.device, light=True), 1.0)
    return total / _normaliser(num_items, valid)


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


# ---- fused lm_head + KD ----
# The student's lm_head and the KD/CE losses in one pass over chunks of valid positions: per chunk the
# logits [c, V] are computed in float32, the losses and d loss / d logits are taken at once, and the
# chunk's contribution to the gradients of the hidden states and of the lm_head weight is accumulated
# right away. The [B, T, V] student logits (and their gradient) are never materialised and nothing is
# recomputed in the backward pass (unlike checkpointed chunks, which run every chunk's forward twice).


def _fused_chunk(logits, teacher_rows, targets, need_grad, options, kd_mask=None):
    """The chunk's KD sum, CE sum and d(weighted loss)/d logits ``[c, V]`` (None without grad).

    ``kd_mask`` ``[c]`` bool (None = all): rows whose KD term counts; the others contribute CE only.

    The closed forms of ``_kd_rows`` and ``_ce_rows`` (d CE / dz = softmax(z) - onehot(label)), in cache-sized
    row blocks. The gradient overwrites ``logits`` block by block (the chunk's logits are not needed again).
    """
    kd_kwargs = options["kd_kwargs"]
    alpha_kd, alpha_ce, kd_scale = options["alpha_kd"], options["alpha_ce"], options["kd_scale"]
    kd_weight = alpha_kd * kd_scale / kd_kwargs["temperature"]
    kd_sums, ce_sums = [], []
    light = alpha_kd == 0 or isinstance(teacher_rows, TeacherTopK)
    block_rows = rows_per_block(logits.shape[-1], logits.shape[0], logits.device, light)
    for start in range(0, logits.shape[0], block_rows):
        end = start + block_rows
        block, grad = logits[start:end], None
        if alpha_kd != 0:
            values, grad = _kd_rows(
                block, _select_rows(teacher_rows, slice(start, end)), need_grad=need_grad, **kd_kwargs
            )
            if kd_mask is not None:  # where, not a product: a masked row's placeholder targets may give inf
                keep = kd_mask[start:end]
                values = values.masked_fill(~keep, 0.0)
                if need_grad:
                    grad.masked_fill_(~keep.unsqueeze(-1), 0.0)
            kd_sums.append(values.sum())
            if need_grad:
                grad.mul_(kd_weight)
        if alpha_ce != 0:
            values, ce_grad = _ce_rows(block, targets[start:end], need_grad)
            ce_sums.append(values.sum())
            if need_grad:
                grad = ce_grad.mul_(alpha_ce) if grad is None else grad.add_(ce_grad, alpha=alpha_ce)
        if need_grad:
            block.copy_(grad)
    kd_sum = torch.stack(kd_sums).sum() if kd_sums else None
    ce_sum = torch.stack(ce_sums).sum() if ce_sums else None
    return kd_sum, ce_sum, logits if need_grad else None


class _FusedLMHeadKD(torch.autograd.Function):
    """Sums over valid positions of the weighted KD + CE, with gradients computed chunkwise in forward.

    Inputs: ``hidden`` ``[M, H]`` (all flattened positions), ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None,
    ``positions`` ``[N]`` (valid rows of ``hidden``), ``targets`` ``[M]``, the teacher as dense ``[M, V]``
    or TeacherTopK fields ``[M, k]``, ``[M, k]``, ``[M]``, and a dict of options. Outputs three scalars in
    the compute dtype: the weighted sum ``alpha_kd * kd_scale * kd_sum + alpha_ce * ce_sum`` (differentiable
    w.r.t. hidden, weight and bias) and the unweighted ``kd_sum`` and ``ce_sum`` (non-differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, positions, targets, teacher_dense, top_indices, top_logprobs,
                top_tail, options):  # fmt: skip
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_grad = need_hidden or need_weight or need_bias
        compute_dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        weight_c = weight.to(compute_dtype)
        bias_c = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.zeros(hidden.shape, dtype=compute_dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros_like(weight_c) if need_weight else None
        grad_bias = torch.zeros_like(bias_c) if need_bias else None
        kd_total = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        ce_total = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        alpha_kd, alpha_ce, kd_scale = options["alpha_kd"], options["alpha_ce"], options["kd_scale"]

        for chunk in positions.split(options["chunk_size"]):
            # advanced indexing, not index_select: on CPU index_select of wide rows is ~10x slower
            rows = hidden[chunk].to(compute_dtype)
            logits = rows @ weight_c.T if bias_c is None else torch.addmm(bias_c, rows, weight_c.T)
            teacher_rows: Teacher | None = None
            if alpha_kd != 0:
                if teacher_dense is not None:
                    teacher_rows = teacher_dense[chunk]
                else:
                    teacher_rows = TeacherTopK(top_indices[chunk], top_logprobs[chunk], top_tail[chunk])
            kd_mask = options["kd_mask"][chunk] if options["kd_mask"] is not None else None
            kd_sum, ce_sum, grad_logits = _fused_chunk(
                logits, teacher_rows, targets[chunk], need_grad, options, kd_mask
            )
            if need_grad:
                if need_hidden:
                    grad_hidden[chunk] = grad_logits @ weight_c
                if need_weight:
                    grad_weight.addmm_(grad_logits.T, rows)
                if need_bias:
                    grad_bias += grad_logits.sum(0)
            if kd_sum is not None:
                kd_total += kd_sum.detach()
            if ce_sum is not None:
                ce_total += ce_sum.detach()

        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.input_dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        weighted = alpha_kd * kd_scale * kd_total + alpha_ce * ce_total
        ctx.mark_non_differentiable(kd_total, ce_total)
        return weighted, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_weighted, _grad_kd, _grad_ce):
        grads = []
        for needed, saved, dtype in zip(ctx.needs_input_grad[:3], ctx.saved_tensors, ctx.input_dtypes):
            grads.append((saved * grad_weighted).to(dtype) if needed else None)
        return (*grads, None, None, None, None, None, None, None)


def fused_lm_head_kd(
    hidden: Tensor,
    lm_head_weight: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    *,
    alpha_kd: float = 0.5,
    alpha_ce: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    top_k: int | None = None,
    scale_t2: bool = True,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
    kd_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KD + CE straight from the student's last hidden states, without the ``[B, T, V]`` student logits.

    ``hidden`` ``[B, T, H]`` (any float dtype; cast to float32 per chunk), ``lm_head_weight`` ``[V, H]``
    (the embedding matrix when embeddings are tied: its gradient from here adds to the embedding's),
    ``teacher`` dense logits ``[B, T, V]`` or a ``TeacherTopK`` with leading shape ``[B, T]`` (None is
    allowed when ``alpha_kd == 0``), ``labels`` ``[B, T]`` with ``-100`` ignored; ``lm_head_bias`` ``[V]``;
    ``kd_mask`` ``[B, T]`` bool (None = every valid position): where the KD term counts, e.g. the positions a
    cross-tokenizer alignment covers; CE always covers every valid position (``kd`` then equals
    ``kd_loss(logits, teacher, labels masked to kd_mask, num_items=...)``).

    Returns ``(total, {"kd": kd, "ce": ce})`` where, with ``logits = hidden @ lm_head_weight.T + bias``,
    ``kd == kd_loss(logits, teacher, labels, ...)`` (T² scaling and ``num_items`` normalisation included),
    ``ce == ce_loss(logits, labels, num_items)`` and ``total = alpha_kd * kd + alpha_ce * ce``; ``kd`` and
    ``ce`` are detached float32 scalars (float64 for float64 inputs), ``total`` carries the gradient.

    Valid positions are processed ``chunk_size`` at a time: only one chunk's ``[chunk_size, V]`` float32
    logits and their intermediates are alive at once. The gradients for ``hidden``, the weight and the bias
    are computed during the forward pass and held until ``backward`` (a float32 ``[V, H]`` buffer the size of
    the weight's own gradient, and ``[B, T, H]``), so the backward pass costs two multiplications by the
    incoming scalar gradient. The teacher receives no gradient. Call ``backward`` once per call (like
    every loss), and compute the loss outside autocast or let it be: the math here is float32 regardless.
    """
    _check_kd_args(divergence, temperature, beta, skew_alpha, top_k)
    if alpha_kd < 0 or alpha_ce < 0 or alpha_kd + alpha_ce == 0:
        raise ValueError(f"alpha_kd and alpha_ce must be >= 0 and not both 0, got {alpha_kd} and {alpha_ce}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden shape {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    vocab, hidden_size = lm_head_weight.shape
    if hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden size {hidden.shape[-1]} != lm_head_weight {tuple(lm_head_weight.shape)}")
    if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias shape {tuple(lm_head_bias.shape)} != ({vocab},)")
    teacher_dense = top_indices = top_logprobs = top_tail = None
    if alpha_kd != 0:
        if teacher is None:
            raise ValueError("teacher is None but alpha_kd != 0: pass teacher logits or TeacherTopK targets")
        if isinstance(teacher, TeacherTopK):
            _check_labels(teacher.logprobs, labels, "TeacherTopK.logprobs")
            _check_topk_k(teacher, top_k, vocab)
            top_indices, top_logprobs, top_tail = _flat_rows(teacher, vocab)
        elif teacher.shape != (*labels.shape, vocab):
            raise ValueError(
                f"teacher logits shape {tuple(teacher.shape)} != student logits shape {(*labels.shape, vocab)}; "
                "different vocabularies need kagglekd.alignment, never truncation"
            )
        else:
            teacher_dense = teacher.detach().reshape(-1, vocab)
        if top_indices is not None:
            top_indices, top_logprobs, top_tail = top_indices.detach(), top_logprobs.detach(), top_tail.detach()

    hidden_rows = hidden.reshape(-1, hidden_size)
    positions = _valid_positions(labels)
    if positions.numel() == 0:
        zero = _zero_with_grad(hidden) + _zero_with_grad(lm_head_weight)
        return zero, {"kd": zero.detach().clone(), "ce": zero.detach().clone()}

    kd_scale = temperature**2 if scale_t2 else 1.0
    options = {
        "alpha_kd": float(alpha_kd),
        "alpha_ce": float(alpha_ce),
        "kd_scale": kd_scale,
        "chunk_size": chunk_size,
        "kd_mask": kd_mask.reshape(-1) if kd_mask is not None and alpha_kd != 0 else None,
        "kd_kwargs": {
            "temperature": temperature, "divergence": divergence, "beta": beta, "skew_alpha": skew_alpha,
            "top_k": top_k,
        },
    }  # fmt: skip
    weighted, kd_sum, ce_sum = _FusedLMHeadKD.apply(
        hidden_rows, lm_head_weight, lm_head_bias, positions, labels.reshape(-1),
        teacher_dense, top_indices, top_logprobs, top_tail, options,
    )  # fmt: skip
    normaliser = _normaliser(num_items, positions.numel())
    total = weighted / normaliser
    return total, {"kd": (kd_sum * kd_scale / normaliser).detach(), "ce": (ce_sum / normaliser).detach()}


__all__ += ["fused_lm_head_kd"]


# ---- feature and attention transfer ----
# Hidden-state (feature) and attention-map transfer. The model-side parts (q/k hooks, attention maps of
# chosen layers) live in kagglekd.moe; these are the pure losses and the layer map.

FEATURE_LOSS_KINDS = ("mse", "cosine")


def layer_map(
    student_layers: int, teacher_layers: int, spec: str | list[int] = "uniform", count: int | None = None
) -> list[tuple[int, int]]:
    """``(student layer, teacher layer)`` pairs, 0-based decoder-layer indices.

    ``"uniform"``: ``count`` student layers (default all) evenly spaced and ending at the last, each mapped to
    the teacher layer at the same relative depth, ``round((s + 1) * teacher_layers / student_layers) - 1``,
    so the last student layer always meets the last teacher layer. A list gives the teacher layer of each
    student layer (length ``student_layers``; negative indices count from the end). Out-of-range indices
    raise ValueError. With HF ``output_hidden_states`` the output of layer i is ``hidden_states[i + 1]``.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student {student_layers}, teacher {teacher_layers}")
    if isinstance(spec, str):
        if spec != "uniform":
            raise ValueError(f"layer map must be 'uniform' or a list of teacher layer indices, got {spec!r}")
        count = student_layers if count is None else count
        if not 1 <= count <= student_layers:
            raise ValueError(f"layer map count must be in [1, {student_layers}], got {count}")
        students = [math.floor((j + 1) * student_layers / count + 0.5) - 1 for j in range(count)]
        return [(s, math.floor((s + 1) * teacher_layers / student_layers + 0.5) - 1) for s in students]
    if len(spec) != student_layers:
        raise ValueError(
            f"explicit layer map has {len(spec)} entries; give one teacher layer per student layer ({student_layers})"
        )
    pairs = []
    for student, teacher in enumerate(spec):
        if not -teacher_layers <= teacher < teacher_layers:
            raise ValueError(
                f"layer map entry {student} names teacher layer {teacher}, but the teacher has {teacher_layers} "
                f"layers (valid: 0..{teacher_layers - 1}, or negative from the end)"
            )
        pairs.append((student, teacher % teacher_layers))
    return pairs


def feature_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    projection: Callable[[Tensor], Tensor],
    mask: Tensor,
    kind: str = "mse",
    num_items: int | float | Tensor | None = None,
) -> Tensor:
    """Hidden-state transfer loss for one layer pair: sum over valid tokens / ``num_items``.

    ``student_hidden`` ``[B, T, Hs]``, ``teacher_hidden`` ``[B, T, Ht]`` (detached here), ``projection`` maps
    ``Hs -> Ht`` (an ``nn.Linear`` kept outside the student), ``mask`` ``[B, T]`` bool of valid tokens.
    Per valid token with ``p = projection(student)`` and ``t = teacher`` (float32):

    * ``"mse"``: ``mean_d (p - t)^2 / var(t)``, ``var(t)`` the teacher's per-dimension variance over the
      valid tokens averaged over dimensions (detached). Invariant to the teacher's scale (when the student
      side scales with it); a projection that outputs the teacher's mean vector scores 1.
    * ``"cosine"``: ``1 - cos(p, t)``.

    Returns a float32 scalar; zero (attached to the graph) when no token is valid. A trainer averages it over
    the layer pairs so the weight does not grow with their number.
    """
    if kind not in FEATURE_LOSS_KINDS:
        raise ValueError(f"feature loss kind must be one of {', '.join(FEATURE_LOSS_KINDS)}, got {kind!r}")
    if student_hidden.shape[:-1] != mask.shape or teacher_hidden.shape[:-1] != mask.shape:
        raise ValueError(
            f"hidden shapes {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} do not match mask "
            f"{tuple(mask.shape)}"
        )
    valid = mask.reshape(-1).bool()
    projected = _upcast(projection(student_hidden.reshape(-1, student_hidden.shape[-1])[valid]))
    target = _upcast(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[valid])
    if projected.shape[-1] != target.shape[-1]:
        raise ValueError(f"projection outputs {projected.shape[-1]} dims, teacher hidden has {target.shape[-1]}")
    if projected.shape[0] == 0:
        return projected.sum()
    if kind == "mse":
        variance = target.var(dim=0, unbiased=False).mean()
        # One valid token has no spread; fall back to a tiny fraction of its energy instead of dividing by 0.
        variance = variance.clamp_min(1e-6 * target.pow(2).mean()).clamp_min(1e-12)
        per_token = (projected - target).pow(2).mean(-1) / variance
    else:
        per_token = 1.0 - F.cosine_similarity(projected, target, dim=-1, eps=1e-8)
    return per_token.sum() / _normaliser(num_items, projected.shape[0])


def attention_loss(
    student_maps: Tensor, teacher_maps: Tensor, mask: Tensor, num_items: int | float | Tensor | None = None
) -> Tensor:
    """KL(teacher || student) over keys of each valid query row of head-averaged attention maps.

    ``student_maps`` / ``teacher_maps`` ``[B, T, T]`` (row t = distribution over keys s), ``mask`` ``[B, T]``
    bool of valid (non-padding) tokens. Keys are restricted to ``s <= t`` and valid; both rows are
    renormalised over those keys (a no-op for maps from ``kagglekd.moe.attention_maps``). Sum over valid
    query rows / ``num_items`` (default: their count, i.e. the mean). Float32 scalar; zero attached to the
    graph when no row is valid.
    """
    if student_maps.shape != teacher_maps.shape or student_maps.shape[:2] != mask.shape:
        raise ValueError(
            f"attention maps {tuple(student_maps.shape)} / {tuple(teacher_maps.shape)} and mask {tuple(mask.shape)} "
            "must be [B, T, T], [B, T, T], [B, T]"
        )
    seq = mask.shape[1]
    mask = mask.bool()
    causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
    allowed = (causal & mask[:, None, :]).reshape(-1, seq)
    rows = mask.reshape(-1)
    allowed = allowed[rows]
    student = _upcast(student_maps.reshape(-1, seq)[rows]) * allowed
    teacher = _upcast(teacher_maps.detach().reshape(-1, seq)[rows]) * allowed
    if student.shape[0] == 0:
        return student.sum()
    student = student / student.sum(-1, keepdim=True).clamp_min(1e-30)
    teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(1e-30)
    # Terms with teacher probability 0 count as 0; the student side is floored so an underflowed
    # probability gives a large finite penalty rather than inf.
    log_ratio = torch.where(teacher > 0, teacher.clamp_min(1e-30).log() - student.clamp_min(1e-30).log(), 0.0)
    return (teacher * log_ratio).sum() / _normaliser(num_items, student.shape[0])


__all__ += ["FEATURE_LOSS_KINDS", "attention_loss", "feature_loss", "layer_map"]
