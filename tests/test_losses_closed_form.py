"""The closed-form KD / CE gradients (computed in the forward pass, no autograd through the divergence) against an
independent float64 autograd reference built from F.log_softmax and F.kl_div, for every divergence, full vocab,
top-k from dense logits, TeacherTopK targets, temperatures other than 1, several row blocks per chunk, and a
teacher that requires grad (which takes the autograd path and must give the teacher its gradient)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kagglekd import losses
from kagglekd.config import KDOptions
from kagglekd.losses import DIVERGENCES, IGNORE_INDEX, TeacherTopK, ce_loss, kd_loss, teacher_topk

F64 = torch.float64
BETA, ALPHA = 0.3, 0.2


def make_batch(batch=2, seq=4, vocab=9, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(batch, seq, vocab, generator=gen, dtype=F64)).to(dtype).requires_grad_()
    teacher = (2 * torch.randn(batch, seq, vocab, generator=gen, dtype=F64)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, 1] = labels[1, 3] = IGNORE_INDEX
    return student, teacher, labels


def kl_sum(log_a, log_b):
    """KL(a || b) summed over rows, by F.kl_div (input log b, target log a)."""
    return F.kl_div(log_b, log_a, reduction="sum", log_target=True)


def reference(log_p, log_q, divergence):
    """Sum over rows of the divergence from float64 log-probabilities, differentiable by autograd."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return kl_sum(log_p, log_q)
    if divergence == "reverse_kl":
        return kl_sum(log_q, log_p)
    if divergence == "jsd":
        log_m = (BETA * p + (1 - BETA) * q).log()
        return (BETA * kl_sum(log_p, log_m) + (1 - BETA) * kl_sum(log_q, log_m)) / (BETA * (1 - BETA))
    if divergence == "skew_forward_kl":
        return kl_sum(log_p, (ALPHA * p + (1 - ALPHA) * q).log())
    return kl_sum(log_q, (ALPHA * q + (1 - ALPHA) * p).log())


def buckets(log_probs, indices):
    """[N, V] log-probs -> [N, k + 1]: the entries at indices plus log(1 - their sum), in float64."""
    top = log_probs.gather(-1, indices)
    return torch.cat([top, torch.log1p(-top.exp().sum(-1, keepdim=True))], -1)


def valid(x, labels):
    return x.reshape(-1, *x.shape[labels.dim() :])[labels.reshape(-1) != IGNORE_INDEX]


def reference_loss(student, teacher, labels, divergence, temperature, top_k=None):
    """T^2 / N * sum over valid rows, every piece in float64 autograd; teacher dense logits or TeacherTopK."""
    log_q = F.log_softmax(valid(student, labels).double() / temperature, -1)
    if isinstance(teacher, TeacherTopK):
        indices = valid(teacher.indices, labels)
        log_p = torch.cat([valid(teacher.logprobs, labels), valid(teacher.tail, labels).unsqueeze(-1)], -1).double()
        log_q = buckets(log_q, indices)
    else:
        log_p = F.log_softmax(valid(teacher, labels).double() / temperature, -1)
        if top_k is not None:
            indices = log_p.topk(top_k, -1).indices
            log_p, log_q = buckets(log_p, indices), buckets(log_q, indices)
    return reference(log_p, log_q, divergence) * temperature**2 / log_q.shape[0]


def assert_matches_reference(student, teacher, labels, divergence, temperature, top_k=None, rtol=1e-9, atol=1e-12):
    options = KDOptions(divergence=divergence, temperature=temperature, top_k=top_k, beta=BETA, skew_alpha=ALPHA)
    loss = kd_loss(student, teacher, labels, options)
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().double().requires_grad_()
    ref = reference_loss(ref_student, teacher, labels, divergence, temperature, top_k)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    assert loss.item() == pytest.approx(ref.item(), rel=rtol, abs=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("top_k", [None, 1, 4])
def test_dense_teacher_values_and_grads_match_float64_autograd(divergence, temperature, top_k):
    student, teacher, labels = make_batch()
    assert_matches_reference(student, teacher, labels, divergence, temperature, top_k)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_teacher_topk_targets_values_and_grads_match_float64_autograd(divergence, temperature):
    student, teacher, labels = make_batch(seed=1)
    targets = teacher_topk(teacher, 3, temperature=temperature)
    assert_matches_reference(student, targets, labels, divergence, temperature)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float32_closed_form_is_within_float32_rounding_of_float64(divergence):
    student, teacher, labels = make_batch(vocab=300, seed=2, dtype=torch.float32)
    for target, top_k in ((teacher, None), (teacher, 16), (teacher_topk(teacher, 16, temperature=2.0), None)):
        assert_matches_reference(student, target, labels, divergence, 2.0, top_k, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k", [None, 3, "sparse"])
def test_one_row_blocks_equal_one_block(monkeypatch, divergence, top_k):
    # blocks of 1-2 rows (the CPU block size is tied to the cache) must sum to the same loss and gradient
    student, teacher, labels = make_batch(batch=3, seq=5, vocab=8, seed=3)
    if top_k == "sparse":
        teacher, top_k = teacher_topk(teacher, 3, temperature=1.5), None

    def loss_and_grad():
        loss = kd_loss(student, teacher, labels, KDOptions(divergence=divergence, top_k=top_k, temperature=1.5))
        return loss, *torch.autograd.grad(loss, student)

    whole, whole_grad = loss_and_grad()
    monkeypatch.setattr(losses, "_CPU_BLOCK_BYTES", 4 * 8 * 2)
    assert losses.rows_per_block(8, 1024, student.device) == 2
    blocked, blocked_grad = loss_and_grad()
    assert blocked.item() == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(blocked_grad, whole_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k", [None, 3])
def test_teacher_that_requires_grad_gets_the_reference_gradient(divergence, top_k):
    # SAR trains the teacher's routers through the KD loss: both sides must receive their gradients
    student, teacher, labels = make_batch(seed=4)
    teacher = teacher.detach().requires_grad_()
    options = KDOptions(divergence=divergence, temperature=1.5, top_k=top_k, beta=BETA, skew_alpha=ALPHA)
    loss = kd_loss(student, teacher, labels, options)
    grads = torch.autograd.grad(loss, (student, teacher))
    ref_student, ref_teacher = (x.detach().clone().requires_grad_() for x in (student, teacher))
    ref = reference_loss(ref_student, ref_teacher, labels, divergence, 1.5, top_k)
    ref_grads = torch.autograd.grad(ref, (ref_student, ref_teacher))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert torch.count_nonzero(grads[1]) > 0


@pytest.mark.parametrize("tail", [float("-inf"), -1e30])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_teacher_topk_covering_the_whole_vocabulary_with_no_tail_mass_is_finite(tail, dtype):
    # cross-tokenizer targets: k = V (or close) and no mass outside the k tokens, signalled by a -inf/-1e30 tail
    student, teacher, labels = make_batch(vocab=6, seed=5, dtype=dtype)
    log_p = F.log_softmax(teacher.double(), -1)
    for k in (6, 5):
        top, indices = log_p.topk(k, -1)
        top = top - top.logsumexp(-1, keepdim=True)  # all the mass on the k tokens
        targets = TeacherTopK(indices, top.to(dtype), torch.full(labels.shape, tail, dtype=dtype))
        for divergence in ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"):
            loss = kd_loss(student, targets, labels, KDOptions(divergence=divergence, beta=BETA, skew_alpha=ALPHA))
            (grad,) = torch.autograd.grad(loss, student)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
        if k == 6:  # every token in the top k: the full-vocabulary forward KL with the same teacher
            full = kd_loss(student, teacher, labels)
            got = kd_loss(student, targets, labels)
            assert got.item() == pytest.approx(full.item(), rel=1e-5 if dtype == torch.float32 else 1e-9)


def test_ce_gradient_equals_f_cross_entropy_autograd():
    student, _, labels = make_batch(batch=3, seq=5, vocab=11, seed=6)
    loss = ce_loss(student, labels, num_items=7)
    ref = F.cross_entropy(student.reshape(-1, 11), labels.reshape(-1), reduction="sum") / 7
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(ref, student)[0])


def test_no_grad_gives_the_same_value_and_second_backward_says_what_to_do():
    student, teacher, labels = make_batch(seed=7)
    loss = kd_loss(student, teacher, labels, KDOptions(divergence="jsd"))
    with torch.no_grad():
        assert kd_loss(student, teacher, labels, KDOptions(divergence="jsd")).item() == loss.item()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward once"):
        loss.backward()


def test_fp16_logits_get_an_fp16_gradient_equal_to_the_float32_one_rounded():
    student, teacher, labels = make_batch(vocab=64, seed=8, dtype=torch.float16)
    options = KDOptions(temperature=2.0, divergence="skew_reverse_kl")
    loss = kd_loss(student, teacher, labels, options)
    (grad,) = torch.autograd.grad(loss, student)
    wide = student.detach().float().requires_grad_()
    (wide_grad,) = torch.autograd.grad(kd_loss(wide, teacher.float(), labels, options), wide)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(grad.float(), wide_grad, rtol=1e-3, atol=1e-6)
    assert math.isfinite(loss.item())
