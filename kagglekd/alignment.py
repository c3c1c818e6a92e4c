"""How a teacher's and a student's vocabularies relate, and distillation across different ones.

Token id i means the same token on both sides only when the tokenizers agree on it. Comparing logits of
unrelated vocabularies (or truncating the wider one to the narrower width) trains the student on noise,
so the kit classifies the pair before any logit is compared (``classify_vocab_pair``).

For a "different" pair (``cross_tokenizer: true``) the teacher reads the same text in its own tokens:

1. **Bytes.** Every token id of both tokenizers is turned into the bytes it stands for (``token_bytes``):
   byte-level BPE strings (``Ġ`` = space, GPT-2's byte alphabet) and SentencePiece strings (``▁`` = space,
   ``<0xNN>`` byte fallback) are normalised to raw UTF-8, special tokens have no bytes.
2. **Positions.** A student block is a run of token ids. Its bytes (specials split it into segments) are
   decoded to text, which the teacher's tokenizer encodes; both sides then have a byte span per token.
   Student position t predicts the token after byte ``end(t)``. The teacher position aligned to it is the
   teacher token that ends at exactly the same byte (the last one, when byte-level tokens split one
   character): both have read the same text and predict what follows it. A student position whose end falls
   inside a teacher token (or inside a character cut at the block's edge) has no such teacher position and
   is masked and counted. Specials (the document separator) align to the teacher's token of the same role;
   a teacher BOS is prepended when the teacher's tokenizer adds one, which only shifts teacher positions.
3. **Vocabulary.** The aligned teacher distribution is mapped onto the student's vocabulary through exact
   byte-string matches (``VocabMap``): a student token receives the probability of the teacher tokens
   spelling the same bytes, and the teacher's mass on tokens the student cannot spell goes to one tail
   bucket, which on the student side holds the mass of every student token with no teacher counterpart.
   The divergence then runs over (shared tokens + tail), exactly like ``kd_loss``'s top-k + tail buckets.
   ``cross_tokenizer_loss: uld`` instead compares the sorted probability vectors of both sides
   (Universal Logit Distillation), which needs no token matching.
4. **Features.** The teacher hidden state for student position t is the mean over the teacher tokens that
   end inside t's byte span (never one that reads past it), so no future text leaks into the target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# The data side lives in two modules (vocabulary, positions); its names are re-exported here, the one import
# callers need.
from kagglekd.alignment_data import (  # noqa: F401
    AlignedBatch,
    AlignmentTable,
    CrossTokenizer,
    align_run_blocks,
    precompute_alignment,
    report_alignment,
)
from kagglekd.alignment_vocab import (  # noqa: F401
    VocabMap,
    VocabRelation,
    _special_ids,
    build_vocab_map,
    classify_vocab_pair,
    token_bytes,
)
from kagglekd.config import KDOptions
from kagglekd.losses import (
    DEFAULT_KD,
    IGNORE_INDEX,
    TeacherTopK,
    _RowwiseLoss,
    _softmax_and_lse,
    _upcast,
    _valid_runs,
    _zero_with_grad,
    kd_loss,
    rows_per_block,
)

log = logging.getLogger(__name__)

# Stands in for log(0): exp() of it is exactly 0 in float32, and unlike -inf it never makes nan.
_LOG_ZERO = -1e30


# ---------------------------------------------------------------------------------------------------------
# Targets and losses
# ---------------------------------------------------------------------------------------------------------


def mapped_targets(
    teacher_logits: Tensor, vocab_map: VocabMap, temperature: float = 1.0, top_k: int | None = None
) -> tuple[TeacherTopK, Tensor]:
    """Teacher distributions mapped onto the student's vocabulary, as top-k + tail buckets.

    ``teacher_logits`` ``[N, V_teacher]`` (aligned positions only) -> ``(TeacherTopK, mapped_mass)`` with
    ``indices`` ``[N, k]`` student ids, ``logprobs`` ``[N, k]`` float32 (temperature applied), ``tail``
    ``[N]`` the log of everything else, and ``mapped_mass`` ``[N]`` the probability that landed on shared
    tokens. ``k`` is the number of shared tokens, or ``min(top_k, shared)`` keeping the most likely ones.
    """
    shared = vocab_map.shared.to(teacher_logits.device)
    primary, missing, extras, unmapped_ids = vocab_map.gather_plan(teacher_logits.shape[-1], teacher_logits.device)
    scaled = _upcast(teacher_logits)
    scaled = scaled / temperature if temperature != 1 else scaled
    rows = scaled.shape[0]
    # log-probabilities read off the logits with gathers (no [N, V_teacher] log-softmax copy, no scatter-add);
    # one exp pass gives both the normaliser and the unmapped tokens' mass
    peak = scaled.amax(dim=-1, keepdim=True)
    weights = (scaled - peak).exp()
    total = weights.sum(dim=-1, keepdim=True)
    lse = total.log() + peak
    log_mass = scaled.gather(1, primary.expand(rows, -1)).sub_(lse)
    for slots, ids in extras:  # a slot spelled by several teacher ids holds their summed probability
        extra = scaled.gather(1, ids.expand(rows, -1)) - lse
        log_mass = log_mass.index_copy(1, slots, torch.logaddexp(log_mass[:, slots], extra))
    if missing is not None:
        log_mass = log_mass.masked_fill(missing, _LOG_ZERO)
    log_mass = log_mass.clamp_min(_LOG_ZERO)
    # the teacher's mass on tokens the student cannot spell: the tail bucket (log 0 stands as _LOG_ZERO)
    share = weights.gather(1, unmapped_ids.expand(rows, -1)).sum(dim=-1) / total.squeeze(-1)
    unmapped = torch.where(share > 0, share.clamp_min(1e-45).log(), torch.full_like(share, _LOG_ZERO))
    mapped_mass = -torch.expm1(unmapped.detach())
    if top_k is not None and top_k < shared.numel():
        top, where = log_mass.topk(top_k, dim=-1)
        rest = torch.logsumexp(log_mass.scatter(-1, where, _LOG_ZERO), dim=-1)
        tail = torch.logaddexp(unmapped, rest)
        return TeacherTopK(shared[where], top, tail), mapped_mass
    return TeacherTopK(shared.expand(log_mass.shape[0], -1), log_mass, unmapped), mapped_mass


def uld_per_position(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Universal Logit Distillation: L1 distance between the sorted probability vectors.

    ``[N, V_s], [N, V_t] -> [N]`` float32. Both sides' probabilities (softmax at ``temperature``, float32)
    are sorted in descending order and the shorter vector is padded with zeros, so no token ids are compared.
    """
    q = F.softmax(_upcast(student_logits) / temperature, dim=-1).sort(dim=-1, descending=True).values
    p = F.softmax(_upcast(teacher_logits) / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1]))
    p = F.pad(p, (0, width - p.shape[-1]))
    return (p - q).abs().sum(-1)


@dataclass
class AlignmentStats:
    """What the alignment delivered: valid student positions, how many had an aligned teacher prediction, the
    summed teacher probability (over aligned positions) that maps onto the student vocabulary, and (hybrid
    mode) how many more had the teacher's context position as their signal."""

    positions: int = 0
    aligned: int = 0
    mapped_mass_sum: float = 0.0
    context: int = 0  # hybrid mode: positions without an exact target that learned from the teacher's context

    def __iadd__(self, other: AlignmentStats) -> AlignmentStats:
        self.positions += other.positions
        self.aligned += other.aligned
        self.mapped_mass_sum += other.mapped_mass_sum
        self.context += other.context
        return self

    def to_dict(self) -> dict:
        covered = self.aligned + self.context
        return {
            "student_positions": self.positions,
            "aligned_positions": self.aligned,
            "aligned_fraction": self.aligned / self.positions if self.positions else float("nan"),
            "teacher_mass_mapped": self.mapped_mass_sum / self.aligned if self.aligned else float("nan"),
            "context_positions": self.context,
            "covered_fraction": covered / self.positions if self.positions else float("nan"),
        }


def _attached(teacher_logits: Tensor) -> bool:
    """Whether the teacher's gradient is wanted (SAR): the loss then keeps the teacher's logits attached."""
    return torch.is_grad_enabled() and teacher_logits.requires_grad


def _aligned_positions(aligned: AlignedBatch, labels: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor, int]:
    """Flat student positions that are valid and aligned, the rows of ``teacher_logits.flatten(0, 1)`` aligned
    to them, and the batch's valid count."""
    valid = labels != IGNORE_INDEX
    flat = (aligned.aligned.to(labels.device) & valid).reshape(-1).nonzero().squeeze(-1)
    target = aligned.target.to(labels.device).reshape(-1)[flat]
    return flat, flat // labels.shape[-1] * teacher_logits.shape[1] + target, int(valid.sum())


def _every_shared_token(vocab_map: VocabMap, top_k: int | None) -> bool:
    """Whether ``mapped_targets`` keeps every shared token (then its indices are ``shared`` in every row)."""
    return top_k is None or top_k >= vocab_map.shared.numel()


class _MappedRows(torch.autograd.Function):
    """``mapped_targets`` of ``teacher_rows[sources]`` chunk by chunk, differentiable w.r.t. ``teacher_rows``.

    ``teacher_rows`` ``[M, V_t]``, ``sources`` ``[N]`` rows to map, ``settings`` ``(vocab_map, temperature, top_k,
    chunk_size)`` -> ``indices`` ``[N, k]``, ``logprobs`` ``[N, k]``, ``tail`` ``[N]``, ``mapped_mass`` ``[N]``
    (indices and mass non-differentiable). The forward keeps no graph; the backward maps one chunk again with
    grad (a checkpoint per chunk) and adds its rows' gradient into one ``[M, V_t]`` buffer in the teacher's
    dtype, where per-chunk autograd of ``teacher_rows[chunk]`` would allocate a full-size buffer per chunk.
    """

    @staticmethod
    def forward(ctx, teacher_rows, sources, settings):
        vocab_map, temperature, top_k, chunk_size = settings
        pieces = [mapped_targets(teacher_rows[c], vocab_map, temperature, top_k) for c in sources.split(chunk_size)]
        logprobs, tail = (torch.cat(field) for field in zip(*((t.logprobs, t.tail) for t, _ in pieces)))
        if _every_shared_token(vocab_map, top_k):  # the same indices in every row: one expanded view, no copy
            indices = vocab_map.shared.to(teacher_rows.device).expand(sources.numel(), -1)
        else:
            indices = torch.cat([t.indices for t, _ in pieces])
        mass = torch.cat([chunk_mass for _, chunk_mass in pieces])
        ctx.save_for_backward(teacher_rows, sources)
        ctx.settings = settings
        ctx.mark_non_differentiable(indices, mass)
        return indices, logprobs, tail, mass

    @staticmethod
    def backward(ctx, _grad_indices, grad_logprobs, grad_tail, _grad_mass):
        teacher_rows, sources = ctx.saved_tensors
        vocab_map, temperature, top_k, chunk_size = ctx.settings
        grad = torch.zeros_like(teacher_rows)
        start = 0
        for chunk in sources.split(chunk_size):
            end = start + chunk.numel()
            with torch.enable_grad():
                rows = teacher_rows[chunk].detach().requires_grad_()
                targets, _ = mapped_targets(rows, vocab_map, temperature, top_k)
                pairs = ((targets.logprobs, grad_logprobs), (targets.tail, grad_tail))
                wanted = [(out, g[start:end]) for out, g in pairs if g is not None]
                if wanted:
                    outputs, grad_outputs = zip(*wanted)
                    (rows_grad,) = torch.autograd.grad(outputs, rows, grad_outputs)
                    grad.index_add_(0, chunk, rows_grad)  # index_add: a teacher row may serve several positions
            start = end
        return grad, None, None


def cross_targets(
    teacher_logits: Tensor,
    aligned: AlignedBatch,
    labels: Tensor,
    vocab_map: VocabMap,
    options: KDOptions = DEFAULT_KD,
    *,
    chunk_size: int = 1024,
) -> tuple[TeacherTopK, Tensor, AlignmentStats]:
    """Mapped teacher targets for every student position, and the KD labels that mask the unaligned ones.

    ``teacher_logits`` ``[B, T_teacher, V_t]``, ``labels`` ``[B, T]`` -> ``(TeacherTopK`` with leading shape
    ``[B, T]`` (zeros at unaligned positions), ``kd_labels`` ``[B, T]`` (``labels`` with unaligned positions set
    to -100), ``AlignmentStats)``. ``options.temperature`` and ``options.top_k`` shape the targets (the other
    fields are not used). Feed both to ``kd_loss`` or ``fused_lm_head_kd`` with ``options.replace(top_k=None)``
    (the targets are already top-k). The teacher rows are mapped ``chunk_size`` at a time, so one chunk's float32
    ``[chunk, V_teacher]`` copies are alive at a time. When ``teacher_logits`` requires grad (SAR trains the
    teacher's routers through KD) the targets stay attached to it: ``logprobs`` and ``tail`` are differentiable
    (the mapped indices and the top-k selection are constants), and the backward pass re-runs one chunk at a
    time (a checkpoint per chunk) into one gradient buffer the size of ``teacher_logits``. Otherwise the
    teacher is detached.
    """
    flat, sources, batch_valid = _aligned_positions(aligned, labels, teacher_logits)
    shape = labels.shape
    if flat.numel() == 0:
        empty = TeacherTopK(
            labels.new_zeros((*shape, 1)),
            torch.zeros((*shape, 1), device=labels.device),
            torch.zeros(shape, device=labels.device),
        )
        return empty, torch.full_like(labels, IGNORE_INDEX), AlignmentStats(batch_valid, 0, 0.0)
    teacher_rows = teacher_logits.flatten(0, 1) if _attached(teacher_logits) else teacher_logits.detach().flatten(0, 1)
    settings = (vocab_map, options.temperature, options.top_k, chunk_size)
    indices, logprobs, tail, mass = _MappedRows.apply(teacher_rows, sources, settings)
    mass_sum = float(mass.sum())
    count, k = shape.numel(), indices.shape[-1]
    if _every_shared_token(vocab_map, options.top_k):  # (unaligned rows hold the same indices; kd_labels mask them)
        full_indices = vocab_map.shared.to(labels.device).expand(*shape, k)
    else:
        full_indices = indices.new_zeros((count, k)).index_copy(0, flat, indices).reshape(*shape, k)
    full = TeacherTopK(
        full_indices,
        logprobs.new_zeros((count, k)).index_copy(0, flat, logprobs).reshape(*shape, k),
        tail.new_zeros(count).index_copy(0, flat, tail).reshape(shape),
    )
    kd_labels = torch.full_like(labels.reshape(-1), IGNORE_INDEX)
    kd_labels[flat] = labels.reshape(-1)[flat]
    return full, kd_labels.reshape(shape), AlignmentStats(batch_valid, int(flat.numel()), mass_sum)


def alignment_stats(
    teacher_logits: Tensor,
    aligned: AlignedBatch,
    labels: Tensor,
    vocab_map: VocabMap,
    temperature: float = 1.0,
    *,
    chunk_size: int = 1024,
) -> AlignmentStats:
    """``AlignmentStats`` of a batch without its targets (what ``alignment.json`` reports): the valid and aligned
    student positions, and the teacher probability (at ``temperature``) on tokens the student can spell, summed
    over the aligned rows, as ``cross_targets`` counts it (1 - the unmapped tokens' mass). One cache-sized block
    of aligned teacher rows ``[c, V_t]`` is alive at a time: no ``[N, V_t]`` copy and no ``[B, T, k]`` targets
    (at setup those cost more memory than a training step, 49,152 wide)."""
    flat, sources, batch_valid = _aligned_positions(aligned, labels, teacher_logits)
    rows = teacher_logits.detach().flatten(0, 1)
    unmapped = _unmapped_mask(vocab_map, rows.shape[-1], rows.device)
    block, mass = rows_per_block(rows.shape[-1], chunk_size, rows.device), rows.new_zeros((), dtype=torch.float64)
    for start in range(0, sources.numel(), block):
        x = _upcast(rows.index_select(0, sources[start : start + block]))
        tail = _exp_pass(x / temperature if temperature != 1 else x, unmapped)[3]
        mass += (1 - tail).sum()
    return AlignmentStats(batch_valid, int(flat.numel()), float(mass))


def _dense_applies(student_logits: Tensor, teacher_logits: Tensor, vocab_map: VocabMap, options: KDOptions) -> bool:
    """Whether ``_dense_forward_kl`` gives the bucket KD exactly: forward KL over every shared token, a detached
    teacher, and student tokens outside the shared ones to spread the teacher's tail over."""
    return (
        options.divergence == "forward_kl"
        and _every_shared_token(vocab_map, options.top_k)
        and not _attached(teacher_logits)
        and vocab_map.shared.numel() < student_logits.shape[-1]
    )


def _dense_forward_kl(student_logits, teacher_logits, aligned, labels, vocab_map, options, num_items, chunk_size):
    """``cross_kd_loss``'s exact mode for forward KL, in closed form over the student's whole vocabulary. The
    teacher's distribution there: its mapped probability on each shared token, and its tail mass P_tail spread
    over the other student tokens j as the student spreads its own tail there, P_tail q_j / Q_tail (held
    constant). Then sum_j p_j log(p_j / q_j) over those j is exactly P_tail log(P_tail / Q_tail), the tail
    bucket's term, and the gradient (q - p) / T is the buckets' too. Block by block (cache-sized on a CPU):
    a block's teacher rows are read into student-id order with one column gather and compared while they are
    in cache, so no ``[N, V_t]`` copy, ``[B, T, V_s]`` target or top-k bucket is ever built; positions without
    an aligned teacher row are zeroed inside their block (no run split at every unaligned position).
    ``[B, T, V_s]``, ``[B, T_t, V_t]`` -> ``(loss, AlignmentStats)`` as ``cross_kd_loss``."""
    flat, sources, batch_valid = _aligned_positions(aligned, labels, teacher_logits)
    vocab, temperature = student_logits.shape[-1], options.temperature
    stats = AlignmentStats(batch_valid, int(flat.numel()), 0.0)
    if flat.numel() == 0:
        return _zero_with_grad(student_logits), stats
    source_of = torch.full((labels.numel(),), -1, dtype=torch.long, device=flat.device)
    source_of[flat] = sources
    teacher_rows, student_rows = teacher_logits.detach().flatten(0, 1), student_logits.reshape(-1, vocab)
    plan = _student_order_plan(vocab_map, teacher_rows.shape[-1], vocab, student_rows.device)
    # teacher rows at the student's positions (AlignedBatch.at_student_positions): a block's are a slice
    in_place = teacher_logits.shape[:2] == labels.shape and torch.equal(sources, flat)
    masses = []

    def row_fn(start: int, end: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            source = source_of[start:end]
            teacher = teacher_rows[start:end] if in_place else teacher_rows.index_select(0, source.clamp_min(0))
            value, grad, mass = _forward_kl_rows(student_rows[start:end], teacher, plan, temperature)
            keep = source >= 0
            masses.append((mass * keep).sum())
            return value * keep, grad.mul_(keep.unsqueeze(-1).to(grad.dtype)) if need_grad else None

    block_rows = rows_per_block(vocab, chunk_size, student_logits.device)
    total = _RowwiseLoss.apply(student_rows, row_fn, _valid_runs(labels), block_rows, 1.0 / temperature)
    stats.mapped_mass_sum = float(torch.stack(masses).sum())
    if options.scale_t2:
        total = total * temperature**2
    return total / (num_items if num_items is not None else max(batch_valid, 1)), stats


@dataclass(frozen=True)
class _StudentOrderPlan:
    """``VocabMap.gather_plan`` in student-id order: ``columns`` ``[V_s]`` the teacher id read for each student
    id (0 for the ``rest``, which is overwritten), ``extras`` ``(student ids, teacher ids)`` log-added on top,
    ``missing`` student ids with no teacher id within the width, ``unmapped`` ``_unmapped_mask``."""

    columns: Tensor
    rest: Tensor
    extras: list
    missing: Tensor | None
    unmapped: Tensor


def _unmapped_mask(vocab_map: VocabMap, width: int, device) -> Tensor:
    """``[V_t]`` float32, 1.0 at the teacher ids no student token spells (the tail), cached on ``vocab_map``."""
    key = ("unmapped-mask", width, str(device))
    if key not in vocab_map._plans:
        unmapped = vocab_map.gather_plan(width, device)[3]
        vocab_map._plans[key] = torch.zeros(width, device=device).index_fill_(0, unmapped, 1.0)
    return vocab_map._plans[key]


def _exp_pass(x: Tensor, unmapped: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One exp pass over teacher rows ``x`` ``[c, V_t]`` (temperature applied): ``exp(x - max)``, its row sums
    ``[c, 1]``, the row max ``[c, 1]`` and the share of the ``unmapped`` ids ``[c, 1]`` (a matrix-vector product
    with the 0/1 mask, ~5x faster than a gather and a sum)."""
    peak = x.amax(dim=-1, keepdim=True)
    weights = (x - peak).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    return weights, total, peak, (weights @ unmapped.to(x.dtype)).unsqueeze(-1).div_(total)


def _student_order_plan(vocab_map: VocabMap, width: int, vocab: int, device) -> _StudentOrderPlan:
    key = ("student-order", width, vocab, str(device))
    if key not in vocab_map._plans:
        primary, missing, extras, _ = vocab_map.gather_plan(width, device)
        shared = vocab_map.shared.to(device)
        columns = torch.zeros(vocab, dtype=torch.long, device=device).index_copy_(0, shared, primary)
        is_rest = torch.ones(vocab, dtype=torch.bool, device=device)
        is_rest[shared] = False
        vocab_map._plans[key] = _StudentOrderPlan(
            columns,
            is_rest.nonzero().squeeze(-1),
            [(shared[slots], ids) for slots, ids in extras],
            shared[missing] if missing is not None else None,
            _unmapped_mask(vocab_map, width, device),
        )
    return vocab_map._plans[key]


def _forward_kl_rows(student: Tensor, teacher: Tensor, plan: _StudentOrderPlan, temperature: float):
    """Forward KL per row ``[c]`` of the mapped teacher ``[c, V_t]`` against the student ``[c, V_s]`` (the tail
    spread as ``_dense_forward_kl`` says), its gradient w.r.t. ``student / T`` ``[c, V_s]`` and the teacher
    mass mapped onto shared tokens ``[c]``. float32 (float64 if either side is). One exp pass per side: the
    teacher's probabilities (shared tokens and tail) are read off ``exp(x - max)``, the student's tail off q."""
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    x = teacher.to(dtype)
    x = x / temperature if temperature != 1 else x
    weights, total, peak, tail = _exp_pass(x, plan.unmapped)
    lse_t = total.log() + peak
    log_p = x.index_select(1, plan.columns).sub_(lse_t)
    p = weights.index_select(1, plan.columns).div_(total)
    for cols, ids in plan.extras:  # a student id spelled by several teacher ids holds their summed probability
        log_p[:, cols] = torch.logaddexp(log_p.index_select(1, cols), x.index_select(1, ids) - lse_t)
        p[:, cols] += weights.index_select(1, ids) / total
    if plan.missing is not None:
        log_p[:, plan.missing], p[:, plan.missing] = _LOG_ZERO, 0.0
    s = student.to(dtype)
    s = s / temperature if temperature != 1 else s
    q, lse_s = _softmax_and_lse(s)
    log_q = s - lse_s.to(dtype).unsqueeze(-1)
    # the teacher's tail goes where the student's went: P_tail q_j / Q_tail (in logs: Q_tail never underflows)
    rest_log_q = log_q.index_select(1, plan.rest)
    rest_log_p = rest_log_q + (tail.log() - torch.logsumexp(rest_log_q, dim=-1, keepdim=True))
    log_p[:, plan.rest], p[:, plan.rest] = rest_log_p, rest_log_p.exp()
    value = (p * (log_p.clamp_min_(_LOG_ZERO) - log_q)).sum(-1)
    return value, q.sub_(p), 1 - tail.squeeze(-1)


def cross_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    aligned: AlignedBatch,
    labels: Tensor,
    vocab_map: VocabMap,
    options: KDOptions = DEFAULT_KD,
    *,
    mode: str = "exact",
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, AlignmentStats]:
    """KD between a student and a teacher with different vocabularies, on aligned positions only.

    ``student_logits`` ``[B, T, V_s]``, ``teacher_logits`` ``[B, T_teacher, V_t]`` (the teacher run on
    ``aligned.teacher_ids``), ``labels`` ``[B, T]`` (-100 ignored). Returns ``(loss, stats)``: the sum over
    aligned valid positions divided by ``num_items`` (the window's valid-target count, like every loss;
    ``None`` = this batch's valid count), so unaligned positions contribute 0. ``mode="exact"``: ``kd_loss``
    against ``cross_targets`` (``options``' divergence, top-k and T² scaling as there). ``mode="uld"``:
    ``uld_per_position`` at ``options.temperature``, scaled by T² when ``options.scale_t2``. ``mode="hybrid"``
    (as TRL's GOLD): ``exact`` where a teacher position has read exactly the student's text, plus ULD against
    the teacher's context position (``AlignedBatch.context``: the last one that has not read past the student)
    at the positions that end inside a teacher token; ``stats.context`` counts those. All modes
    differentiate the teacher too when ``teacher_logits`` requires grad (SAR), and detach it otherwise.
    """
    if mode == "exact" and _dense_applies(student_logits, teacher_logits, vocab_map, options):
        return _dense_forward_kl(student_logits, teacher_logits, aligned, labels, vocab_map, options,
                                 num_items, chunk_size)  # fmt: skip
    if mode == "exact":
        targets, kd_labels, stats = cross_targets(
            teacher_logits, aligned, labels, vocab_map, options, chunk_size=chunk_size
        )
        window = num_items if num_items is not None else max(stats.positions, 1)
        loss = kd_loss(
            student_logits, targets, kd_labels, options.replace(top_k=None), num_items=window, chunk_size=chunk_size
        )
        return loss, stats
    if mode == "hybrid":
        exact, stats = cross_kd_loss(student_logits, teacher_logits, aligned, labels, vocab_map, options,
                                     mode="exact", num_items=num_items, chunk_size=chunk_size)  # fmt: skip
        flat, sources, _ = _context_positions(aligned, labels, teacher_logits)
        total, _ = _uld_sum(student_logits, teacher_logits, flat, sources, vocab_map, options, chunk_size, False)
        stats.context = int(flat.numel())
        return exact + total / (num_items if num_items is not None else max(stats.positions, 1)), stats
    if mode != "uld":
        raise ValueError(f"mode must be 'exact', 'uld' or 'hybrid', got {mode!r}")
    flat, sources, batch_valid = _aligned_positions(aligned, labels, teacher_logits)
    total, mass = _uld_sum(student_logits, teacher_logits, flat, sources, vocab_map, options, chunk_size, True)
    stats = AlignmentStats(batch_valid, int(flat.numel()), mass)
    return total / (num_items if num_items is not None else max(batch_valid, 1)), stats


def _context_positions(aligned: AlignedBatch, labels: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor, int]:
    """Like ``_aligned_positions`` for the valid positions with no exact target but a context position."""
    if aligned.context is None:
        raise ValueError("cross_tokenizer_loss hybrid needs AlignedBatch.context (CrossTokenizer.align sets it)")
    valid = labels != IGNORE_INDEX
    context = aligned.context.to(labels.device)
    wanted = valid & ~aligned.aligned.to(labels.device) & (context >= 0)
    flat = wanted.reshape(-1).nonzero().squeeze(-1)
    return flat, flat // labels.shape[-1] * teacher_logits.shape[1] + context.reshape(-1)[flat], int(valid.sum())


def _uld_sum(student, teacher_logits, flat, sources, vocab_map, options, chunk_size, with_mass: bool):
    """ULD summed over student rows ``flat`` against teacher rows ``sources`` (T² applied when
    ``options.scale_t2``), and, ``with_mass``, the teacher mass those rows map onto the student vocabulary.
    ``student``: logits ``[B, T, V_s]``, or ``(hidden [B, T, H], lm_head weight [V_s, H], bias or None)`` whose
    rows are turned into logits one chunk at a time (the fused path, which never builds the logits)."""
    attached = _attached(teacher_logits)
    teacher_rows = teacher_logits.flatten(0, 1) if attached else teacher_logits.detach().flatten(0, 1)
    if isinstance(student, tuple):
        hidden, weight, bias = student
        inputs = (hidden.reshape(-1, hidden.shape[-1]), weight) + ((bias,) if bias is not None else ())
        rows_of = lambda c, h, w, *b: F.linear(h[c], w, *b)  # noqa: E731
    else:
        inputs = (student.reshape(-1, student.shape[-1]),)
        rows_of = lambda c, rows: rows[c]  # noqa: E731
    total = inputs[0][:0].float().sum()  # 0, attached to the graph even with nothing aligned
    mass = 0.0
    for chunk, source in zip(flat.split(chunk_size), sources.split(chunk_size)):
        # checkpointed: only one chunk's rows and sorted probability vectors are alive at a time (the rows are
        # gathered inside, so no chunk's [chunk, V_teacher] copy waits for the backward pass)
        def part(t: Tensor, *student_inputs: Tensor, c: Tensor = chunk, src: Tensor = source) -> Tensor:
            return uld_per_position(rows_of(c, *student_inputs), t[src], options.temperature).sum()

        if torch.is_grad_enabled() and (any(x.requires_grad for x in inputs) or attached):
            total = total + checkpoint(part, teacher_rows, *inputs, use_reentrant=False)
        else:
            total = total + part(teacher_rows, *inputs)
        if with_mass:
            with torch.no_grad():
                mass += float(mapped_targets(teacher_rows[source], vocab_map, options.temperature)[1].sum())
    if options.scale_t2:
        total = total * options.temperature**2
    return total, mass


def context_uld(hidden, head, teacher_logits, aligned, labels, options, *, chunk_size: int = 1024):
    """The fused path's share of ``cross_kd_loss``'s hybrid mode: ULD against the teacher's context position at
    the valid positions with no exact target, from the student's last hidden states ``[B, T, H]`` and its
    ``head`` (an ``nn.Linear``), one chunk of rows through the lm_head at a time. Returns ``(sum over those
    positions, their count)``; divide by the window's ``num_items`` as every loss does."""
    flat, sources, _ = _context_positions(aligned, labels, teacher_logits)
    student = (hidden, head.weight, head.bias)
    total, _ = _uld_sum(student, teacher_logits, flat, sources, None, options, chunk_size, False)
    return total, int(flat.numel())


def span_average(teacher_hidden: Tensor, aligned: AlignedBatch) -> tuple[Tensor, Tensor]:
    """Teacher hidden states averaged over each student position's span.

    ``teacher_hidden`` ``[B, T_teacher, H]`` -> ``([B, T, H], mask [B, T])``; the mask is False where the span
    is empty (the mean there is 0).
    """
    lo = aligned.span_lo.to(teacher_hidden.device)
    hi = aligned.span_hi.to(teacher_hidden.device)
    prefix = F.pad(teacher_hidden.float().cumsum(dim=1), (0, 0, 1, 0))  # prefix[:, j] = sum of positions < j
    gather = lambda index: prefix.gather(1, index.unsqueeze(-1).expand(-1, -1, prefix.shape[-1]))  # noqa: E731
    count = (hi - lo).clamp_min(1).unsqueeze(-1).to(prefix.dtype)
    return (gather(hi) - gather(lo)) / count, hi > lo


def top1_agreement(
    student_logits: Tensor, teacher_logits: Tensor, aligned: AlignedBatch, labels: Tensor, vocab_map: VocabMap
) -> tuple[int, int]:
    """(agreeing, compared) over aligned valid positions: the student's argmax is the student token that spells
    the teacher's argmax (a teacher argmax the student cannot spell counts as disagreement)."""
    flat, sources, _ = _aligned_positions(aligned, labels, teacher_logits)
    if flat.numel() == 0:
        return 0, 0
    teacher_top = teacher_logits.argmax(-1).reshape(-1)[sources]
    slot = vocab_map.teacher_to_shared.to(teacher_top.device)[teacher_top]
    mapped = torch.where(slot >= 0, vocab_map.shared.to(slot.device)[slot.clamp_min(0)], torch.full_like(slot, -1))
    student_top = student_logits.reshape(-1, student_logits.shape[-1])[flat].argmax(-1)
    return int((student_top == mapped).sum()), int(flat.numel())
