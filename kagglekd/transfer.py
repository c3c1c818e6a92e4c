"""Feature (hidden-state) and attention-map transfer losses, and the student -> teacher layer map.

Pure functions, tensors in, tensors out, with the conventions of ``kagglekd.losses``: a loss is the sum over
valid tokens (or query rows) divided by ``num_items``, computed in float32. The model-side parts (q/k hooks,
attention maps of chosen layers) live in ``kagglekd.moe``; the projections beside the student in
``kagglekd.objective``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kagglekd.config import FEATURE_LOSS_KINDS
from kagglekd.losses import _normaliser, _upcast

__all__ = ["FEATURE_LOSS_KINDS", "attention_loss", "feature_loss", "layer_map"]


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
    renormalised over those keys (a no-op for maps from ``kagglekd.attention.attention_maps``). Sum over valid
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
