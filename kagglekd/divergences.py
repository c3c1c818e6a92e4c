"""Divergences between a teacher distribution p and a student distribution q: values and closed-form gradients.

Pure: tensors in, tensors out, last dim = vocabulary or buckets. ``divergence`` is the definition, differentiable
by autograd (``kagglekd.losses.kd_per_position`` uses it); ``divergence_and_grad`` computes the value together
with d D / d (student logits / T) in closed form, and ``teacher_log_grad`` gives d D / d log p (the teacher side:
SAR trains the teacher's routers through the KD loss). ``kagglekd.losses.kd_per_position`` defines the divergences.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kagglekd.config import KDOptions

__all__ = ["MASKED_LOGPROB", "ZERO_LOGPROB", "divergence", "divergence_and_grad", "teacher_log_grad"]

# Stands in for log(0) when masking entries before a logsumexp: exp() of it is exactly 0 in float32,
# but unlike -inf it never produces (-inf) - (-inf) = nan in a forward or backward pass.
MASKED_LOGPROB = -1e30
# A log-probability (or log-ratio) at or below this is a probability of exactly 0: -inf, or a masked entry.
ZERO_LOGPROB = 0.5 * MASKED_LOGPROB

# ---------------------------------------------------------------------------------------------------------
# Definitions on log-probability vectors (autograd-differentiable)
# ---------------------------------------------------------------------------------------------------------


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_i a_i (log a_i - log b_i) over the last dim; terms with a_i == 0 count as 0.

    ``[N, V], [N, V] -> [N]``. The zero-terms are masked on the log-ratio (not on the product) so that
    -inf log-probs give neither nan values nor nan gradients.
    """
    a = log_a.exp()
    log_ratio = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * log_ratio).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), elementwise, from log a and log b."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def reduced(options: KDOptions) -> str:
    """The divergence after its endpoint reductions: jsd at beta 0 / 1 is forward / reverse KL (the formula is
    0/0 there), a skew KL at alpha 0 is the plain KL."""
    name = options.divergence
    if name == "jsd" and options.beta in (0.0, 1.0):
        return "forward_kl" if options.beta == 0.0 else "reverse_kl"
    if name.startswith("skew_") and options.skew_alpha == 0.0:
        return name.removeprefix("skew_")
    return name


def divergence(log_p: Tensor, log_q: Tensor, options: KDOptions) -> Tensor:
    """Per-row divergence between teacher ``p`` and student ``q`` given as float32 log-probs.

    ``[N, V], [N, V] -> [N]``; see ``kagglekd.losses.kd_per_position`` for the definitions.
    """
    name, beta, alpha = reduced(options), options.beta, options.skew_alpha
    if name == "forward_kl":
        return kl(log_p, log_q)
    if name == "reverse_kl":
        # +inf where the teacher gives probability 0 (-inf or masked) to a token the student gives > 0
        teacher_zero = ((log_p <= ZERO_LOGPROB) & (log_q.exp() > 0)).any(-1)
        return kl(log_q, log_p).masked_fill(teacher_zero, math.inf)
    if name == "jsd":
        log_m = log_mixture(log_p, log_q, beta)
        weighted = beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)
        return weighted / (beta * (1.0 - beta))
    if name == "skew_forward_kl":
        return kl(log_p, log_mixture(log_p, log_q, alpha))
    return kl(log_q, log_mixture(log_q, log_p, alpha))  # skew_reverse_kl


# ---------------------------------------------------------------------------------------------------------
# Closed-form gradients: the value and d D / d student logits (and d D / d log p) in one pass
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
#
# The teacher side (SAR): with g_i = dD/dp_i taking the p_i as free variables (no sum-to-one constraint),
# G_i = dD/d log p_i = p_i g_i (``teacher_log_grad``):
#   forward KL   G = p (log p - log q + 1)
#   reverse KL   G = -q
#   jsd(beta)    G = p (log p - log m) / (1 - b)
#   skew fwd     G = p (log p - log m + 1 - a p / m)
#   skew rev     G = -q (1 - a q / m)
# Bucket log-probs given as inputs (TeacherTopK) receive G itself. Dense teacher logits t = logits / T, p =
# softmax(t), receive dD/dt = G - p sum_j G_j (the log-softmax's Jacobian); top-k buckets of dense logits send
# a top entry G_b - p_v sum G and an entry v outside the top k its share of the tail bucket,
# (p_v / P_tail) (G_tail - P_tail sum G) (the top-k selection itself is piecewise constant).


def finite(x: Tensor) -> Tensor:
    """In place: -inf -> -1e30 (p = 0 terms then vanish as 0 * finite), +inf -> 1e30, nan -> 0."""
    return x.nan_to_num_(nan=0.0, posinf=-MASKED_LOGPROB, neginf=MASKED_LOGPROB)


def mixture_log_ratios(d: Tensor, weight_p: float) -> tuple[Tensor, Tensor]:
    """``(log p - log m, log q - log m)`` for ``m = weight_p p + (1 - weight_p) q``, from ``d = log p - log q``.

    Exact in log space without forming m: for p <= q, log m - log q = log1p(weight_p expm1(d)); for p > q,
    log m - log p = log1p((1 - weight_p) expm1(-d)). Identical inputs (d = 0) give exactly 0.
    """
    coef = (d <= 0).to(d.dtype).mul_(2 * weight_p - 1).add_(1 - weight_p)
    larger_side = torch.log1p(torch.expm1(-d.abs()).mul_(coef)).neg_()  # log max(p, q) - log m
    log_p_ratio = larger_side + d.clamp(max=0)
    return log_p_ratio, larger_side.sub_(d.clamp(min=0))


def vecdot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b)


def divergence_and_grad(
    p: Tensor, q: Tensor, d: Tensor, options: KDOptions, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-row divergence ``[c]`` and its gradient ``[c, n]`` w.r.t. the student's (scaled) logits.

    ``p``, ``q`` ``[c, n]`` probabilities (q a softmax of the student's logits or bucket log-probs), ``d`` =
    log p - log q, finite (``finite``: p = 0 < q gives d <= ``ZERO_LOGPROB``). Same definitions as
    ``divergence``. ``q`` and ``d`` may be overwritten.
    """
    name, beta, skew_alpha = reduced(options), options.beta, options.skew_alpha
    if name.startswith("skew_") and skew_alpha == 1.0:  # m equals the first argument: KL = 0
        return p.new_zeros(p.shape[:-1]), (torch.zeros_like(q) if need_grad else None)
    grad = None
    if name == "forward_kl":
        value = vecdot(p, d)
        if need_grad:
            grad = q.mul_(p.sum(-1, keepdim=True)).sub_(p)
    elif name == "reverse_kl":
        value = -vecdot(q, d)
        teacher_zero = ((d <= ZERO_LOGPROB) & (q > 0)).any(-1)  # p = 0 < q somewhere: KL(q || p) = +inf
        if need_grad:
            grad = d.add_(value.unsqueeze(-1)).mul_(q).neg_().masked_fill_(teacher_zero.unsqueeze(-1), math.nan)
        value = value.masked_fill_(teacher_zero, math.inf)
    elif name == "jsd":
        log_p_ratio, log_q_ratio = mixture_log_ratios(d, beta)
        kl_q = vecdot(q, log_q_ratio)
        value = (beta * vecdot(p, log_p_ratio) + (1.0 - beta) * kl_q) / (beta * (1.0 - beta))
        if need_grad:
            grad = log_q_ratio.sub_(kl_q.unsqueeze(-1)).mul_(q).div_(beta)
    elif name == "skew_forward_kl":
        log_p_ratio, _ = mixture_log_ratios(d, skew_alpha)
        value = vecdot(p, log_p_ratio)
        if need_grad:
            ratio = log_p_ratio.exp_()  # p / m
            grad = ratio.sub_(vecdot(q, ratio).unsqueeze(-1)).mul_(q).mul_(skew_alpha - 1.0)
    else:  # skew_reverse_kl
        _, log_q_ratio = mixture_log_ratios(d, 1.0 - skew_alpha)
        value = vecdot(q, log_q_ratio)
        if need_grad:
            u = log_q_ratio.exp().mul_(-skew_alpha).add_(log_q_ratio)  # log(q/m) - a q/m
            grad = u.sub_(vecdot(q, u).unsqueeze(-1)).mul_(q)
    return value, grad


def teacher_log_grad(p: Tensor, q: Tensor, d: Tensor, options: KDOptions) -> Tensor:
    """d D / d log p ``[c, n]`` per row, the p_i taken as free variables (the table above): what bucket
    log-probs given as inputs receive; dense teacher logits need the log-softmax's Jacobian on top of it.

    ``p``, ``q``, ``d`` as in ``divergence_and_grad`` (read, never modified: call this one first). A row where
    reverse KL is +inf (p = 0 < q) gets nan, like the student's gradient there.
    """
    name, beta, skew_alpha = reduced(options), options.beta, options.skew_alpha
    if name.startswith("skew_") and skew_alpha == 1.0:
        return torch.zeros_like(p)
    if name == "forward_kl":
        return p * (d + 1.0)
    if name == "reverse_kl":
        teacher_zero = ((d <= ZERO_LOGPROB) & (q > 0)).any(-1, keepdim=True)
        return q.neg().masked_fill_(teacher_zero, math.nan)
    if name == "jsd":
        return mixture_log_ratios(d, beta)[0].mul_(p).div_(1.0 - beta)
    if name == "skew_forward_kl":
        log_p_ratio = mixture_log_ratios(d, skew_alpha)[0]
        return log_p_ratio.exp().mul_(-skew_alpha).add_(log_p_ratio).add_(1.0).mul_(p)
    q_ratio = mixture_log_ratios(d, 1.0 - skew_alpha)[1].exp_()  # skew_reverse_kl: q / m
    return q_ratio.mul_(skew_alpha).sub_(1.0).mul_(q)
