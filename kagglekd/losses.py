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
  ``ce_loss`` compute the gradient w.r.t. the student's logits in closed form during the forward pass (the
  formulas: ``kagglekd.divergences``), store it in the logits' dtype and only scale it in ``backward``: nothing
  is recomputed, so call ``backward`` once per loss call. When the teacher's logits require grad (SAR),
  ``kd_loss`` falls back to autograd over checkpointed chunks, which also differentiates the teacher side
  (``kagglekd.fused`` gives the teacher its gradient in closed form instead).
* when no position is valid the result is a float32 zero that is still attached to the student's graph,
  so ``.backward()`` works and yields zero gradients.
* the KD settings (temperature, divergence, beta, skew_alpha, top_k, scale_t2) come as one
  ``kagglekd.config.KDOptions``, which validates itself. The fused lm_head + KD path is ``kagglekd.fused``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kagglekd.config import DIVERGENCES, KDOptions
from kagglekd.divergences import MASKED_LOGPROB, divergence, divergence_and_grad, finite, teacher_log_grad

IGNORE_INDEX = -100
DEFAULT_KD = KDOptions()  # the default ``options`` of every KD call (KDOptions is frozen, so one shared instance)


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


def _check_options(options: KDOptions) -> None:
    if not isinstance(options, KDOptions):
        raise TypeError(f"KD options must be a kagglekd.config.KDOptions, got {type(options).__name__}")


# ---------------------------------------------------------------------------------------------------------
# Top-k buckets
# ---------------------------------------------------------------------------------------------------------


def _tail_logprob(log_probs: Tensor, indices: Tensor) -> Tensor:
    """log of the probability mass outside ``indices``: ``[N, V], [N, k] -> [N]``.

    Computed as a logsumexp over the complement rather than log(1 - sum top-k), so a tiny tail keeps its
    exact value (and gradient) instead of drowning in float32 rounding of 1 - (1 - tail).
    """
    return torch.logsumexp(log_probs.scatter(-1, indices, MASKED_LOGPROB), dim=-1)


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


def kd_per_position(student_logits: Tensor, teacher: Teacher, options: KDOptions = DEFAULT_KD) -> Tensor:
    """Per-position divergence between teacher and student, not scaled by T² and not normalised.

    ``student_logits`` ``[N, V]`` (any float dtype), ``teacher`` either dense logits ``[N, V]`` or a
    ``TeacherTopK`` with ``indices``/``logprobs`` ``[N, k]`` and ``tail`` ``[N]``. Returns float32 ``[N]``.
    ``options`` gives the temperature, divergence, beta, skew_alpha and top_k (``scale_t2`` is not used here).

    With ``p`` the teacher's and ``q`` the student's distribution (float32, logits / ``temperature``):

    * ``forward_kl``: KL(p || q) = sum p (log p - log q), the true KL (teacher entropy included), 0 for
      identical inputs; terms with p = 0 count as 0.
    * ``reverse_kl``: KL(q || p); +inf where the teacher gives probability exactly 0 (a -inf logit, e.g. a
      narrower teacher padded to the student's width, or an empty tail bucket) to a token the student gives
      probability > 0, so a non-finite check catches it. jsd at beta = 1 and skew_reverse_kl at alpha = 0
      are reverse KL and behave alike; the other forms stay finite.
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
    _check_options(options)
    vocab, temperature, top_k = student_logits.shape[-1], options.temperature, options.top_k
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
            return divergence(log_p, log_q, options)
        log_p_top, indices = log_p.topk(top_k, dim=-1)
        log_p_tail = _tail_logprob(log_p, indices)
    log_q_buckets = _buckets(log_q.gather(-1, indices), _tail_logprob(log_q, indices))
    return divergence(_buckets(log_p_top, log_p_tail), log_q_buckets, options)


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
# Closed-form rows: the loss and d loss / d logits per cache-sized row block (formulas: kagglekd.divergences)
# ---------------------------------------------------------------------------------------------------------
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


def _split_top(logits: Tensor, indices: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Top-k / tail split of one block of logits ``[c, V]`` at ``indices`` ``[c, k]``.

    Returns the logits at ``indices`` ``[c, k]``; the softmax over the other entries ``[c, V]`` (0 at
    ``indices``; None when k == V); the logsumexp over the other entries ``[c]`` (-inf when k == V); the
    logsumexp over all entries ``[c]``; both logsumexps in float64. The tail is summed directly, never as
    1 - (top-k mass). A row whose other entries are all -inf (a teacher padded with -inf) has an empty tail:
    probabilities 0 and logsumexp -inf, not the nan of a softmax over nothing.
    """
    top = logits.gather(-1, indices)
    wide = _wide(logits)
    if indices.shape[-1] < logits.shape[-1]:
        rest = logits.scatter(-1, indices, float("-inf"))
        tail_probs, lse_tail = _softmax_and_lse(rest)
        empty = rest.amax(-1) == float("-inf")
        tail_probs.masked_fill_(empty.unsqueeze(-1), 0.0)
        lse_tail.masked_fill_(empty, float("-inf"))
    else:
        tail_probs, lse_tail = None, torch.full(top.shape[:-1], float("-inf"), dtype=wide, device=top.device)
    return top, tail_probs, lse_tail, torch.logaddexp(torch.logsumexp(top.to(wide), -1), lse_tail)


def _kd_rows(
    student: Tensor, teacher: Teacher, options: KDOptions, need_grad: bool, need_teacher_grad: bool = False
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Divergence per row ``[c]``, its gradient w.r.t. ``student / temperature`` ``[c, V]`` (or None) and,
    with ``need_teacher_grad``, the teacher's gradient (else None).

    ``student`` ``[c, V]`` logits, ``teacher`` dense ``[c, V]`` logits or a ``TeacherTopK`` with ``[c, k]``
    fields; the same values as ``kd_per_position``. Math in float32 (float64 if either side is float64).
    Multiply the student's gradient by 1 / temperature to get d / d student. The teacher's gradient is
    d D / d ``(teacher / temperature)`` ``[c, V]`` for dense logits (multiply by 1 / temperature too), or
    d D / d ``(logprobs, tail)`` ``[c, k + 1]`` for ``TeacherTopK`` targets (temperature already inside).
    """
    vocab, temperature, top_k = student.shape[-1], options.temperature, options.top_k
    if isinstance(teacher, TeacherTopK):
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.logprobs.dtype), torch.float32)
        indices, log_p_top, log_p_tail = teacher.indices, teacher.logprobs.to(dtype), teacher.tail.to(dtype)
    else:
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    s = _scaled(student, temperature, dtype)
    teacher_grad, t_tail_probs = None, None
    if not isinstance(teacher, TeacherTopK):
        t = _scaled(teacher, temperature, dtype)
        if top_k is None or top_k >= vocab:
            q, lse_s = _softmax_and_lse(s)
            p, lse_t = _softmax_and_lse(t)
            d = finite(torch.sub(t, s).sub_((lse_t - lse_s).to(dtype).unsqueeze(-1)))
            del t
            if need_teacher_grad:  # through the log-softmax: G - p sum(G)
                log_grad = teacher_log_grad(p, q, d, options)
                teacher_grad = log_grad.sub_(p * log_grad.sum(-1, keepdim=True))
            return *divergence_and_grad(p, q, d, options, need_grad), teacher_grad
        indices = t.topk(top_k, dim=-1, sorted=False).indices
        t_top, t_tail_probs, t_lse_tail, t_lse = _split_top(t, indices)
        log_p_top, log_p_tail = t_top.to(t_lse.dtype) - t_lse.unsqueeze(-1), t_lse_tail - t_lse
        del t
    s_top, tail_probs, lse_tail, lse = _split_top(s, indices)
    log_q = torch.cat([s_top.to(lse.dtype) - lse.unsqueeze(-1), (lse_tail - lse).unsqueeze(-1)], -1)
    log_q = log_q.to(dtype).clamp_min_(MASKED_LOGPROB)
    log_p = torch.cat([log_p_top, log_p_tail.unsqueeze(-1)], -1).to(dtype).clamp_min_(MASKED_LOGPROB)
    p, q, d = log_p.exp(), log_q.exp(), finite(log_p - log_q)
    if need_teacher_grad:
        teacher_grad = teacher_log_grad(p, q, d, options)
        if t_tail_probs is not None:  # top-k of dense logits: back through the buckets and the log-softmax
            teacher_grad = _bucket_to_logit_grad(teacher_grad, p, t_tail_probs, indices)
    value, bucket_grad = divergence_and_grad(p, q, d, options, need_grad)
    if not need_grad:
        return value, None, teacher_grad
    # an entry outside the top k moves with the student's tail bucket, in proportion to its share of it
    grad = tail_probs.mul_(bucket_grad[:, -1:]) if tail_probs is not None else torch.zeros_like(s)
    return value, grad.scatter_(-1, indices, bucket_grad[:, :-1]), teacher_grad


def _bucket_to_logit_grad(log_grad: Tensor, p: Tensor, tail_probs: Tensor, indices: Tensor) -> Tensor:
    """d D / d (teacher logits / T) ``[c, V]`` from d D / d log p over the k + 1 buckets ``[c, k + 1]``.

    ``p`` ``[c, k + 1]`` the teacher's bucket probabilities, ``tail_probs`` ``[c, V]`` the softmax over the
    entries outside ``indices`` ``[c, k]`` (overwritten). log p_b = t_b - lse(t) for a top entry and
    log P_tail = lse(t outside) - lse(t), so entry v gets G_b - p_v sum(G) in the top k and
    (p_v / P_tail) (G_tail - P_tail sum(G)) outside it.
    """
    total = log_grad.sum(-1, keepdim=True)
    grad = tail_probs.mul_(log_grad[:, -1:] - p[:, -1:] * total)
    return grad.scatter_(-1, indices, log_grad[:, :-1] - p[:, :-1] * total)


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
    options: KDOptions = DEFAULT_KD,
    *,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Knowledge-distillation loss: sum over valid positions of the per-position divergence / ``num_items``.

    ``student_logits`` ``[B, T, V]``; ``teacher_logits`` dense ``[B, T, V]`` (same vocabulary) or a
    ``TeacherTopK`` with leading shape ``[B, T]``; ``labels`` ``[B, T]`` int64 (only its ``-100`` mask is
    used). Returns a float32 scalar. The divergences, ``options.top_k`` and the tail bucket are described in
    ``kd_per_position``. ``options.scale_t2`` multiplies the result by ``temperature ** 2`` (keeps the
    gradient scale comparable across temperatures). ``num_items`` is the valid-target count of the whole accumulation
    window (``None`` = this batch's count). The teacher is not detached here: run its forward under
    ``torch.no_grad()`` unless gradients are meant to reach it.
    """
    _check_options(options)
    _check_labels(student_logits, labels, "student_logits")
    vocab, temperature = student_logits.shape[-1], options.temperature
    if isinstance(teacher_logits, TeacherTopK):
        _check_labels(teacher_logits.logprobs, labels, "TeacherTopK.logprobs")
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)}; different vocabularies need kagglekd.alignment, never truncation"
        )
    _check_topk_k(teacher_logits, options.top_k, vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    runs = _valid_runs(labels)
    valid = sum(end - start for start, end in runs)
    if valid == 0:
        return _zero_with_grad(student_logits)
    rows, teacher_rows = student_logits.reshape(-1, vocab), _flat_rows(teacher_logits, vocab)
    if _needs_grad(teacher_rows):
        # Gradients for the teacher too (SAR trains the teacher's routers through this loss): plain autograd
        # over checkpointed chunks, which differentiates both sides.
        def chunk_fn(student_rows: Tensor, teacher_chunk: Teacher, chunk: Tensor) -> Tensor:
            return kd_per_position(student_rows[chunk], _select_rows(teacher_chunk, chunk), options).sum()

        total = _chunked_sum(chunk_fn, (rows, teacher_rows), _valid_positions(labels), chunk_size)
    else:

        def row_fn(start: int, end: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
            return _kd_rows(rows[start:end], _select_rows(teacher_rows, slice(start, end)), options, need_grad)[:2]

        light = isinstance(teacher_rows, TeacherTopK)
        block_rows = rows_per_block(vocab, chunk_size, student_logits.device, light)
        total = _RowwiseLoss.apply(rows, row_fn, runs, block_rows, 1.0 / temperature)
    if options.scale_t2:
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
