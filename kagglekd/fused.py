"""Fused lm_head + KD: the student's lm_head and the KD/CE losses in one pass over chunks of valid positions.

Per chunk the logits ``[c, V]`` are computed in float32, the losses and d loss / d logits are taken at once
(the closed forms of ``kagglekd.losses``), and the chunk's contribution to the gradients of the hidden states
and of the lm_head weight is accumulated right away. The ``[B, T, V]`` student logits (and their gradient)
are never materialised and nothing is recomputed in the backward pass (unlike checkpointed chunks, which run
every chunk's forward twice). Pure: tensors in, tensors out; the conventions of ``kagglekd.losses`` apply.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kagglekd.config import KDOptions
from kagglekd.losses import (
    DEFAULT_KD,
    Teacher,
    TeacherTopK,
    _ce_rows,
    _check_labels,
    _check_options,
    _check_topk_k,
    _flat_rows,
    _kd_rows,
    _normaliser,
    _select_rows,
    _valid_positions,
    _zero_with_grad,
    rows_per_block,
)

__all__ = ["fused_lm_head_kd"]


def _fused_chunk(logits, teacher_rows, targets, need_grad, settings, kd_mask=None, store_teacher=None):
    """The chunk's KD sum, CE sum and d(weighted loss)/d logits ``[c, V]`` (None without grad).

    ``kd_mask`` ``[c]`` bool (None = all): rows whose KD term counts; the others contribute CE only.
    ``store_teacher`` (None = the teacher needs no gradient): called as ``store_teacher(start, end, grad)``
    with d(weighted loss) / d teacher of rows ``start:end`` of the chunk: ``[rows, V]`` for dense logits,
    ``[rows, k + 1]`` (logprobs, then tail) for ``TeacherTopK`` targets.

    The closed forms of ``_kd_rows`` and ``_ce_rows`` (d CE / dz = softmax(z) - onehot(label)), in cache-sized
    row blocks. The gradient overwrites ``logits`` block by block (the chunk's logits are not needed again).
    """
    options: KDOptions = settings["kd"]
    alpha_kd, alpha_ce, kd_scale = settings["alpha_kd"], settings["alpha_ce"], settings["kd_scale"]
    kd_weight = alpha_kd * kd_scale / options.temperature
    sparse = isinstance(teacher_rows, TeacherTopK)
    teacher_weight = alpha_kd * kd_scale if sparse else kd_weight  # TeacherTopK log-probs hold the temperature
    kd_sums, ce_sums = [], []
    light = alpha_kd == 0 or sparse
    block_rows = rows_per_block(logits.shape[-1], logits.shape[0], logits.device, light)
    for start in range(0, logits.shape[0], block_rows):
        end = start + block_rows
        block, grad = logits[start:end], None
        if alpha_kd != 0:
            teacher_block = _select_rows(teacher_rows, slice(start, end))
            values, grad, teacher_grad = _kd_rows(block, teacher_block, options, need_grad, store_teacher is not None)
            if kd_mask is not None:  # where, not a product: a masked row's placeholder targets may give inf
                drop = ~kd_mask[start:end]
                values = values.masked_fill(drop, 0.0)
                for tensor in (grad, teacher_grad):
                    if tensor is not None:
                        tensor.masked_fill_(drop.unsqueeze(-1), 0.0)
            kd_sums.append(values.sum())
            if need_grad:
                grad.mul_(kd_weight)
            if teacher_grad is not None:
                store_teacher(start, end, teacher_grad.mul_(teacher_weight))
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


class _TeacherGrads:
    """d(weighted loss) / d teacher input, filled chunk by chunk in the forward pass: a buffer the size and dtype
    of the teacher input (dense ``[M, V]``, or ``[M, k]`` and ``[M]`` for ``TeacherTopK`` fields), zero at rows
    no KD term reaches. The only full-size buffer SAR adds to the fused path."""

    def __init__(self, dense: Tensor | None, logprobs: Tensor | None, tail: Tensor | None):
        self.dense = torch.zeros_like(dense) if dense is not None else None
        self.logprobs = torch.zeros_like(logprobs) if dense is None else None
        self.tail = torch.zeros_like(tail) if dense is None else None

    def storer(self, chunk: Tensor):
        """``store(start, end, grad)`` for rows ``chunk[start:end]`` of the flattened positions."""

        def store(start: int, end: int, grad: Tensor) -> None:
            rows = chunk[start:end]
            if self.dense is not None:
                self.dense[rows] = grad.to(self.dense.dtype)
            else:
                self.logprobs[rows] = grad[:, :-1].to(self.logprobs.dtype)
                self.tail[rows] = grad[:, -1].to(self.tail.dtype)

        return store

    def scaled(self, factor: Tensor, needed: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
        """The gradients for (dense, logprobs, tail) times ``factor``, in place (so once only), None where not
        ``needed``."""
        return tuple(g.mul_(factor) if g is not None and need else None
                     for g, need in zip((self.dense, self.logprobs, self.tail), needed))  # fmt: skip


class _FusedLMHeadKD(torch.autograd.Function):
    """Sums over valid positions of the weighted KD + CE, with gradients computed chunkwise in forward.

    Inputs: ``hidden`` ``[M, H]`` (all flattened positions), ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None,
    ``positions`` ``[N]`` (valid rows of ``hidden``), ``targets`` ``[M]``, the teacher as dense ``[M, V]``
    or TeacherTopK fields ``[M, k]``, ``[M, k]``, ``[M]``, and a dict of settings. Outputs three scalars in
    the compute dtype: the weighted sum ``alpha_kd * kd_scale * kd_sum + alpha_ce * ce_sum`` (differentiable
    w.r.t. hidden, weight, bias and the teacher's dense logits or log-probs) and the unweighted ``kd_sum``
    and ``ce_sum`` (non-differentiable). A teacher that requires grad makes ``backward`` once-only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, positions, targets, teacher_dense, top_indices, top_logprobs,
                top_tail, settings):  # fmt: skip
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_grad = need_hidden or need_weight or need_bias
        ctx.teacher_needed = (ctx.needs_input_grad[5], *ctx.needs_input_grad[7:9])  # dense, logprobs, tail
        teacher_grads = _TeacherGrads(teacher_dense, top_logprobs, top_tail) if any(ctx.teacher_needed) else None
        compute_dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        weight_c = weight.to(compute_dtype)
        bias_c = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.zeros(hidden.shape, dtype=compute_dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros_like(weight_c) if need_weight else None
        grad_bias = torch.zeros_like(bias_c) if need_bias else None
        kd_total = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        ce_total = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        alpha_kd, alpha_ce, kd_scale = settings["alpha_kd"], settings["alpha_ce"], settings["kd_scale"]

        for chunk in positions.split(settings["chunk_size"]):
            # advanced indexing, not index_select: on CPU index_select of wide rows is ~10x slower
            rows = hidden[chunk].to(compute_dtype)
            logits = rows @ weight_c.T if bias_c is None else torch.addmm(bias_c, rows, weight_c.T)
            teacher_rows: Teacher | None = None
            if alpha_kd != 0:
                if teacher_dense is not None:
                    teacher_rows = teacher_dense[chunk]
                else:
                    teacher_rows = TeacherTopK(top_indices[chunk], top_logprobs[chunk], top_tail[chunk])
            kd_mask = settings["kd_mask"][chunk] if settings["kd_mask"] is not None else None
            store = teacher_grads.storer(chunk) if teacher_grads is not None else None
            kd_sum, ce_sum, grad_logits = _fused_chunk(
                logits, teacher_rows, targets[chunk], need_grad, settings, kd_mask, store
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
        ctx.teacher_grads = teacher_grads
        weighted = alpha_kd * kd_scale * kd_total + alpha_ce * ce_total
        ctx.mark_non_differentiable(kd_total, ce_total)
        return weighted, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_weighted, _grad_kd, _grad_ce):
        grads = []
        for needed, saved, dtype in zip(ctx.needs_input_grad[:3], ctx.saved_tensors, ctx.input_dtypes):
            grads.append((saved * grad_weighted).to(dtype) if needed else None)
        dense = logprobs = tail = None
        if any(ctx.teacher_needed):
            teacher_grads, ctx.teacher_grads = ctx.teacher_grads, None
            if teacher_grads is None:
                raise RuntimeError("the teacher's gradient was already handed out: call backward once per loss call")
            dense, logprobs, tail = teacher_grads.scaled(grad_weighted, ctx.teacher_needed)
        return (*grads, None, None, dense, None, logprobs, tail, None)


def _teacher_fields(
    teacher: Teacher | None, labels: Tensor, vocab: int, options: KDOptions, alpha_kd: float
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The teacher as flat rows: ``(dense [M, V], indices [M, k], logprobs [M, k], tail [M])``, the unused side
    None (all None when ``alpha_kd == 0``); still attached to the teacher's graph when it requires grad. Checks
    shapes against the labels and the vocabulary."""
    if alpha_kd == 0:
        return None, None, None, None
    if teacher is None:
        raise ValueError("teacher is None but alpha_kd != 0: pass teacher logits or TeacherTopK targets")
    if isinstance(teacher, TeacherTopK):
        _check_labels(teacher.logprobs, labels, "TeacherTopK.logprobs")
        _check_topk_k(teacher, options.top_k, vocab)
        return (None, *_flat_rows(teacher, vocab))
    if teacher.shape != (*labels.shape, vocab):
        raise ValueError(
            f"teacher logits shape {tuple(teacher.shape)} != student logits shape {(*labels.shape, vocab)}; "
            "different vocabularies need kagglekd.alignment, never truncation"
        )
    return teacher.reshape(-1, vocab), None, None, None


def fused_lm_head_kd(
    hidden: Tensor,
    lm_head_weight: Tensor,
    teacher: Teacher | None,
    labels: Tensor,
    options: KDOptions = DEFAULT_KD,
    *,
    alpha_kd: float = 0.5,
    alpha_ce: float = 0.5,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
    kd_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KD + CE straight from the student's last hidden states, without the ``[B, T, V]`` student logits.

    ``hidden`` ``[B, T, H]`` (any float dtype; cast to float32 per chunk), ``lm_head_weight`` ``[V, H]``
    (the embedding matrix when embeddings are tied: its gradient from here adds to the embedding's),
    ``teacher`` dense logits ``[B, T, V]`` or a ``TeacherTopK`` with leading shape ``[B, T]`` (None is
    allowed when ``alpha_kd == 0``), ``labels`` ``[B, T]`` with ``-100`` ignored; ``options`` the KD settings
    (as in ``kd_loss``); ``lm_head_bias`` ``[V]``; ``kd_mask`` ``[B, T]`` bool (None = every valid position):
    where the KD term counts, e.g. the positions a cross-tokenizer alignment covers; CE always covers every
    valid position (``kd`` then equals ``kd_loss(logits, teacher, labels masked to kd_mask, options, ...)``).

    Returns ``(total, {"kd": kd, "ce": ce})`` where, with ``logits = hidden @ lm_head_weight.T + bias``,
    ``kd == kd_loss(logits, teacher, labels, options, ...)`` (T² scaling and ``num_items`` normalisation
    included), ``ce == ce_loss(logits, labels, num_items)`` and ``total = alpha_kd * kd + alpha_ce * ce``; ``kd``
    and ``ce`` are detached float32 scalars (float64 for float64 inputs), ``total`` carries the gradient.

    Valid positions are processed ``chunk_size`` at a time: only one chunk's ``[chunk_size, V]`` float32
    logits and their intermediates are alive at once. The gradients for ``hidden``, the weight and the bias
    are computed during the forward pass and held until ``backward`` (a float32 ``[V, H]`` buffer the size of
    the weight's own gradient, and ``[B, T, H]``), so the backward pass costs two multiplications by the
    incoming scalar gradient. A teacher that requires grad (SAR trains the teacher's routers through this loss)
    receives its gradient the same way: dense logits get d total / d logits, ``TeacherTopK`` targets d total /
    d ``logprobs`` and d total / d ``tail`` (their ``indices`` are constants; with ``options.top_k`` on dense
    logits the top-k selection is piecewise constant), computed in closed form per chunk and held in one buffer
    the size and dtype of the teacher input; the teacher is not detached, so run its forward under
    ``torch.no_grad()`` unless gradients are meant to reach it. Call ``backward`` once per call (like every
    loss), and compute the loss outside autocast or let it be: the math here is float32 regardless.
    """
    _check_options(options)
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
    teacher_fields = _teacher_fields(teacher, labels, vocab, options, alpha_kd)

    positions = _valid_positions(labels)
    if positions.numel() == 0:
        zero = _zero_with_grad(hidden) + _zero_with_grad(lm_head_weight)
        return zero, {"kd": zero.detach().clone(), "ce": zero.detach().clone()}

    kd_scale = options.temperature**2 if options.scale_t2 else 1.0
    settings = {
        "alpha_kd": float(alpha_kd),
        "alpha_ce": float(alpha_ce),
        "kd_scale": kd_scale,
        "chunk_size": chunk_size,
        "kd_mask": kd_mask.reshape(-1) if kd_mask is not None and alpha_kd != 0 else None,
        "kd": options,
    }
    weighted, kd_sum, ce_sum = _FusedLMHeadKD.apply(
        hidden.reshape(-1, hidden_size), lm_head_weight, lm_head_bias, positions, labels.reshape(-1),
        *teacher_fields, settings,
    )  # fmt: skip
    normaliser = _normaliser(num_items, positions.numel())
    total = weighted / normaliser
    return total, {"kd": (kd_sum * kd_scale / normaliser).detach(), "ce": (ce_sum / normaliser).detach()}
