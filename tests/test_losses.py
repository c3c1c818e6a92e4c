"""Loss tests: every check is a golden value, an identity, or an independent reference (F.kl_div,
F.cross_entropy, explicit probability arithmetic in float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical

from kagglekd.config import KDOptions
from kagglekd.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    TeacherTopK,
    ce_loss,
    kd_loss,
    kd_per_position,
    teacher_topk,
    token_log_probs,
    valid_count,
)

F64 = torch.float64


def make_batch(batch=2, seq=5, vocab=7, seed=0, dtype=F64, ignore=((0, 1), (1, 4))):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=gen, dtype=F64).to(dtype).requires_grad_()
    teacher = torch.randn(batch, seq, vocab, generator=gen, dtype=F64).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    for b, t in ignore:
        labels[b, t] = IGNORE_INDEX
    return student, teacher, labels


def valid_rows(x, labels):
    return x.reshape(-1, x.shape[-1])[labels.reshape(-1) != IGNORE_INDEX]


# ----- independent references (float64, probabilities, F.kl_div) --------------------------------------------


def ref_kl(log_q, p):
    """KL(p || q) summed over rows, via F.kl_div (which is sum target * (log target - input))."""
    return F.kl_div(log_q, p, reduction="sum")


def ref_divergence(student_rows, teacher_rows, divergence, temperature=1.0, beta=0.5, alpha=0.1):
    """Sum over rows of the divergence, from probabilities (not from the code under test)."""
    p = F.softmax(teacher_rows.double() / temperature, -1)
    q = F.softmax(student_rows.double() / temperature, -1)
    if divergence == "forward_kl":
        return ref_kl(q.log(), p)
    if divergence == "reverse_kl":
        return ref_kl(p.log(), q)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return (beta * ref_kl(m.log(), p) + (1 - beta) * ref_kl(m.log(), q)) / (beta * (1 - beta))
    if divergence == "skew_forward_kl":
        return ref_kl((alpha * p + (1 - alpha) * q).log(), p)
    if divergence == "skew_reverse_kl":
        return ref_kl((alpha * q + (1 - alpha) * p).log(), q)
    raise AssertionError(divergence)


def ref_topk_divergence(student_rows, teacher_rows, k, divergence, temperature=1.0):
    """Top-k + tail buckets built from probabilities: [p_i for i in top-k(p)] + [1 - sum], same for q."""
    p = F.softmax(teacher_rows.double() / temperature, -1)
    q = F.softmax(student_rows.double() / temperature, -1)
    idx = p.argsort(-1, descending=True)[:, :k]
    p_top, q_top = p.gather(-1, idx), q.gather(-1, idx)
    p_buckets = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_buckets = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    # feed bucket log-probs back as "logits": softmax of log-probs is the bucket distribution itself
    return ref_divergence(q_buckets.log(), p_buckets.log(), divergence)


# ----- identities -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_identical_student_and_teacher_give_zero(divergence, top_k):
    student, _, labels = make_batch(dtype=torch.float32)
    same = student.detach().clone()
    loss = kd_loss(student, same, labels, KDOptions(divergence=divergence, top_k=top_k, temperature=2.0))
    assert abs(loss.item()) < 1e-6
    if top_k is not None:
        sparse = teacher_topk(same, top_k, temperature=2.0)
        assert abs(kd_loss(student, sparse, labels, KDOptions(divergence=divergence, temperature=2.0)).item()) < 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocab_matches_probability_reference_values_and_grads(divergence, temperature):
    student, teacher, labels = make_batch()
    loss = kd_loss(student, teacher, labels, KDOptions(divergence=divergence, temperature=temperature, beta=0.3))
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().clone().requires_grad_()
    n = valid_count(labels)
    ref = (
        ref_divergence(valid_rows(ref_student, labels), valid_rows(teacher, labels), divergence, temperature, beta=0.3)
        * temperature**2
        / n
    )
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_teacher_with_masked_vocabulary_entries_gives_finite_reference_values(divergence, top_k):
    # -inf teacher logits (a masked / padded vocabulary slice): p = 0 there, and those terms must count as 0
    # without nan in the value or the gradient. (Reverse KL is genuinely infinite here, so it is left out.)
    student, teacher, labels = make_batch(vocab=6)
    teacher = teacher.clone()
    teacher[..., 4:] = float("-inf")
    loss = kd_loss(student, teacher, labels, KDOptions(divergence=divergence, top_k=top_k, scale_t2=False))
    (grad,) = torch.autograd.grad(loss, student)
    rows_s, rows_t = valid_rows(student, labels), valid_rows(teacher, labels)
    if top_k is None:
        ref = ref_divergence(rows_s, rows_t, divergence) / valid_count(labels)
    else:
        ref = ref_topk_divergence(rows_s, rows_t, top_k, divergence) / valid_count(labels)
    (ref_grad,) = torch.autograd.grad(ref, student)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-12)


def narrow_teacher_rows(student_rows, teacher_rows, options, k=None):
    """Independent float64 reference per row (torch.distributions), optionally over top-k + tail buckets whose
    tail is a direct sum (exactly 0 when only zero-probability tokens are left)."""
    p = F.softmax(teacher_rows.double() / options.temperature, -1)
    q = F.softmax(student_rows.double() / options.temperature, -1)
    if k is not None:
        index = p.argsort(dim=-1, descending=True, stable=True)[:, :k]
        rest = torch.ones_like(p).scatter(-1, index, 0.0)
        p = torch.cat([p.gather(-1, index), (p * rest).sum(-1, keepdim=True)], -1)
        q = torch.cat([q.gather(-1, index), (q * rest).sum(-1, keepdim=True)], -1)
    kl = lambda a, b: torch.distributions.kl_divergence(Categorical(probs=a), Categorical(probs=b))
    beta, alpha = options.beta, options.skew_alpha
    divergence = options.divergence
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))
    if divergence == "skew_forward_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    return kl(q, alpha * q + (1 - alpha) * p)


NARROW_TEACHER_CASES = [
    KDOptions(divergence="reverse_kl"),
    KDOptions(divergence="reverse_kl", temperature=2.0),
    KDOptions(divergence="jsd", beta=1.0),
    KDOptions(divergence="skew_reverse_kl", skew_alpha=0.0),
    KDOptions(divergence="forward_kl", temperature=2.0),
    KDOptions(divergence="jsd", beta=0.7),
    KDOptions(divergence="skew_forward_kl", skew_alpha=0.2),
    KDOptions(divergence="skew_reverse_kl", skew_alpha=0.2),
]


@pytest.mark.parametrize("options", NARROW_TEACHER_CASES, ids=repr)
@pytest.mark.parametrize("targets", ["dense", "top_k=4", "top_k=5", "teacher_topk=4", "teacher_requires_grad"])
def test_narrow_teacher_padded_with_minus_inf_makes_reverse_kl_infinite(options, targets):
    # A teacher with 4 real tokens padded with -inf to the student's 6 (batch row 0 only): p = 0 on tokens the
    # student gives q > 0, so KL(q || p) = +inf there (the trainer's finiteness check must see it), while the
    # forms that stay finite keep their reference values. Row 1 is an ordinary teacher: finite for every form.
    student, teacher, labels = make_batch(vocab=6, ignore=())
    teacher = teacher.clone()
    teacher[0, :, 4:] = float("-inf")
    k = int(targets.split("=")[1]) if "=" in targets else None
    target, kd_options = teacher, options.replace(top_k=k)
    if targets.startswith("teacher_topk"):
        target, kd_options = teacher_topk(teacher, k, temperature=options.temperature), options
    elif targets == "teacher_requires_grad":  # the autograd path over kd_per_position
        target = teacher.detach().requires_grad_()
    rows_s, rows_t = valid_rows(student, labels), valid_rows(teacher, labels)
    ref = narrow_teacher_rows(rows_s.detach(), rows_t, options, k)
    infinite = options.divergence == "reverse_kl" or (options.divergence, options.beta) == ("jsd", 1.0)
    infinite = infinite or (options.divergence, options.skew_alpha) == ("skew_reverse_kl", 0.0)
    assert torch.isinf(ref[:5]).all() == infinite and torch.isfinite(ref[5:]).all()  # the reference agrees

    per_position = kd_per_position(rows_s, _flat(target), kd_options)
    assert torch.equal(torch.isposinf(per_position), torch.isposinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(per_position[finite], ref[finite], rtol=1e-9, atol=1e-12)
    loss = kd_loss(student, target, labels, kd_options, num_items=7)
    scale = options.temperature**2 / 7
    if infinite:
        assert loss.item() == math.inf
    else:
        assert loss.item() == pytest.approx(ref.sum().item() * scale, rel=1e-9)
    # the ordinary teacher's rows alone are finite and exact on every path
    only_row_1 = labels.clone()
    only_row_1[0] = IGNORE_INDEX
    row_1 = kd_loss(student, target, only_row_1, kd_options, num_items=7)
    assert row_1.item() == pytest.approx(ref[5:].sum().item() * scale, rel=1e-9)


def _flat(target):
    if isinstance(target, TeacherTopK):
        return TeacherTopK(*(field.reshape(-1, *field.shape[2:]) for field in target))
    return target.reshape(-1, target.shape[-1])


def test_jsd_endpoints_equal_forward_and_reverse_kl_div():
    student, teacher, labels = make_batch(dtype=torch.float32)
    s_rows, t_rows = valid_rows(student.detach(), labels).double(), valid_rows(teacher, labels).double()
    n = valid_count(labels)
    log_q, log_p = F.log_softmax(s_rows, -1), F.log_softmax(t_rows, -1)
    forward_ref = F.kl_div(log_q, log_p.exp(), reduction="sum").item() / n
    reverse_ref = F.kl_div(log_p, log_q.exp(), reduction="sum").item() / n
    jsd = lambda beta: kd_loss(student, teacher, labels, KDOptions(divergence="jsd", beta=beta)).item()
    assert jsd(0.0) == pytest.approx(forward_ref, rel=1e-5)
    assert jsd(1.0) == pytest.approx(reverse_ref, rel=1e-5)
    skew = lambda name: kd_loss(student, teacher, labels, KDOptions(divergence=name, skew_alpha=0.0)).item()
    assert skew("skew_forward_kl") == pytest.approx(forward_ref, rel=1e-5)
    assert skew("skew_reverse_kl") == pytest.approx(reverse_ref, rel=1e-5)
    # skew with alpha = 1 compares a distribution with itself
    assert abs(kd_loss(student, teacher, labels, KDOptions(divergence="skew_forward_kl", skew_alpha=1.0)).item()) < 1e-7


def test_jsd_is_continuous_at_the_endpoints_and_four_js_at_half():
    student, teacher, labels = make_batch()
    kd = lambda **kw: kd_loss(student, teacher, labels, KDOptions(**kw)).item()
    assert kd(divergence="jsd", beta=1e-5) == pytest.approx(kd(divergence="forward_kl"), rel=1e-3)
    assert kd(divergence="jsd", beta=1 - 1e-5) == pytest.approx(kd(divergence="reverse_kl"), rel=1e-3)
    p = F.softmax(valid_rows(teacher, labels), -1)
    q = F.softmax(valid_rows(student.detach(), labels), -1)
    m = (p + q) / 2
    js = (0.5 * ref_kl(m.log(), p) + 0.5 * ref_kl(m.log(), q)).item() / valid_count(labels)
    assert kd(divergence="jsd", beta=0.5) == pytest.approx(4 * js, rel=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_golden_tiny_case_by_hand(temperature):
    # One position, V = 3. Probabilities and KLs written out with math.exp / math.log.
    teacher_logits, student_logits = [2.0, 1.0, 0.0], [0.0, 1.0, 0.5]

    def softmax(z):
        e = [math.exp(v / temperature) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax(teacher_logits), softmax(student_logits)
    forward = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    reverse = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    m = [0.5 * pi + 0.5 * qi for pi, qi in zip(p, q)]
    js = 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + 0.5 * sum(
        qi * math.log(qi / mi) for qi, mi in zip(q, m)
    )
    skew = [0.1 * pi + 0.9 * qi for pi, qi in zip(p, q)]
    skew_forward = sum(pi * math.log(pi / si) for pi, si in zip(p, skew))
    scale = temperature**2
    if temperature == 1.0:  # literal golden numbers, so a shared mistake in the lines above would show
        assert forward == pytest.approx(0.558130, abs=1e-6)
        assert reverse == pytest.approx(0.508287, abs=1e-6)
    student = torch.tensor([[student_logits]], requires_grad=True)
    teacher = torch.tensor([[teacher_logits]])
    labels = torch.tensor([[0]])
    kd = lambda name: kd_loss(student, teacher, labels, KDOptions(divergence=name, temperature=temperature)).item()
    assert kd("forward_kl") == pytest.approx(scale * forward, rel=1e-6)
    assert kd("reverse_kl") == pytest.approx(scale * reverse, rel=1e-6)
    assert kd("jsd") == pytest.approx(scale * 4 * js, rel=1e-5)
    assert kd("skew_forward_kl") == pytest.approx(scale * skew_forward, rel=1e-6)
    unscaled = kd_loss(student, teacher, labels, KDOptions(temperature=temperature, scale_t2=False)).item()
    assert unscaled == pytest.approx(forward, rel=1e-6)
    # top-1 targets built by hand, as a teacher cache would store them: token 0 plus the tail bucket
    hand_made = TeacherTopK(
        indices=torch.tensor([[[0]]]),
        logprobs=torch.tensor([[[math.log(p[0])]]]),
        tail=torch.tensor([[math.log(p[1] + p[2])]]),
    )
    top1 = p[0] * math.log(p[0] / q[0]) + (1 - p[0]) * math.log((1 - p[0]) / (1 - q[0]))
    assert kd_loss(student, hand_made, labels, KDOptions(temperature=temperature)).item() == pytest.approx(
        scale * top1, rel=1e-5
    )
    assert kd_loss(student, teacher, labels, KDOptions(temperature=temperature, top_k=1)).item() == pytest.approx(
        scale * top1, rel=1e-6
    )


# ----- top-k targets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_top_k_at_least_vocab_and_v_minus_one_equal_full(divergence):
    student, teacher, labels = make_batch(vocab=6)
    full = kd_loss(student, teacher, labels, KDOptions(divergence=divergence)).item()
    for k in (6, 50):
        assert kd_loss(student, teacher, labels, KDOptions(divergence=divergence, top_k=k)).item() == full
    # k = V - 1: the tail bucket holds exactly one token, so the buckets are the full distribution
    assert kd_loss(student, teacher, labels, KDOptions(divergence=divergence, top_k=5)).item() == pytest.approx(
        full, rel=1e-9
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_top_k_matches_probability_bucket_reference_and_never_exceeds_full(divergence):
    student, teacher, labels = make_batch(vocab=9)
    n = valid_count(labels)
    values = []
    for k in range(1, 9):  # k = V is covered by the "equals full" test
        loss = kd_loss(student, teacher, labels, KDOptions(divergence=divergence, top_k=k, scale_t2=False))
        ref = ref_topk_divergence(valid_rows(student, labels), valid_rows(teacher, labels), k, divergence) / n
        assert loss.item() == pytest.approx(ref.item(), rel=1e-8, abs=1e-12)
        (grad,) = torch.autograd.grad(loss, student)
        (ref_grad,) = torch.autograd.grad(ref, student)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)
        values.append(loss.item())
    values.append(kd_loss(student, teacher, labels, KDOptions(divergence=divergence, scale_t2=False)).item())
    # merging a bucket into the tail cannot increase an f-divergence (data processing inequality)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_teacher_topk_matches_full_sort_reference_and_sums_to_one(temperature):
    _, teacher, _ = make_batch(batch=3, seq=4, vocab=11, ignore=())
    k = 4
    sparse = teacher_topk(teacher, k, temperature=temperature, chunk_size=5)
    sorted_logprobs, sorted_ids = F.log_softmax(teacher / temperature, -1).sort(-1, descending=True)
    assert sparse.indices.shape == (3, 4, k) and sparse.tail.shape == (3, 4)
    assert torch.equal(sparse.indices, sorted_ids[..., :k])
    torch.testing.assert_close(sparse.logprobs, sorted_logprobs[..., :k], rtol=0, atol=1e-12)
    torch.testing.assert_close(sparse.tail, sorted_logprobs[..., k:].logsumexp(-1), rtol=0, atol=1e-12)
    total_mass = sparse.logprobs.exp().sum(-1) + sparse.tail.exp()
    torch.testing.assert_close(total_mass, torch.ones_like(total_mass), rtol=0, atol=1e-12)
    unchunked = teacher_topk(teacher, k, temperature=temperature, chunk_size=10_000)
    assert all(torch.equal(a, b) for a, b in zip(sparse, unchunked))


def test_teacher_topk_keeps_a_tiny_tail_exact_in_float32():
    # tail mass ~ exp(-30): 1 - sum(top-k probs) rounds to 0 in float32; the complement logsumexp does not
    teacher = torch.tensor([[[30.0, 0.0, 0.0, 0.0]]])
    sparse = teacher_topk(teacher, 1)
    assert sparse.tail.item() == pytest.approx(math.log(3) - 30 - math.log1p(3 * math.exp(-30)), abs=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_teacher_with_top_k_equals_teacher_topk_targets(divergence, temperature):
    student, teacher, labels = make_batch(dtype=torch.float32, vocab=13)
    kw = dict(divergence=divergence, temperature=temperature)
    dense = kd_loss(student, teacher, labels, KDOptions(top_k=4, **kw))
    (dense_grad,) = torch.autograd.grad(dense, student)
    sparse = kd_loss(student, teacher_topk(teacher, 4, temperature=temperature), labels, KDOptions(**kw))
    (sparse_grad,) = torch.autograd.grad(sparse, student)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-7)


def test_teacher_topk_with_a_different_top_k_is_refused():
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match="top_k=2"):
        kd_loss(student, teacher_topk(teacher, 3), labels, KDOptions(top_k=2))


# ----- chunking, ignored positions, invariances -------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k", [None, 3, "sparse"])
def test_chunked_equals_unchunked_values_and_grads(divergence, top_k):
    student, teacher, labels = make_batch(batch=3, seq=7, vocab=10, dtype=torch.float32)
    if top_k == "sparse":
        teacher, top_k = teacher_topk(teacher, 3, temperature=2.0), None
    results = []
    for chunk_size in (3, 10_000):
        loss = kd_loss(
            student,
            teacher,
            labels,
            KDOptions(divergence=divergence, top_k=top_k, temperature=2.0),
            chunk_size=chunk_size,
        )
        results.append((loss, *torch.autograd.grad(loss, student)))
    (small, small_grad), (big, big_grad) = results
    assert small.item() == pytest.approx(big.item(), rel=1e-6)
    torch.testing.assert_close(small_grad, big_grad, rtol=1e-5, atol=1e-8)


def test_ce_chunked_equals_unchunked():
    student, _, labels = make_batch(batch=3, seq=7, dtype=torch.float32)
    small, big = (ce_loss(student, labels, chunk_size=c) for c in (3, 10_000))
    assert small.item() == pytest.approx(big.item(), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(small, student), torch.autograd.grad(big, student))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_ignored_labels_give_zero_with_zero_grad(dtype):
    student, teacher, labels = make_batch(dtype=dtype)
    labels = torch.full_like(labels, IGNORE_INDEX)
    assert valid_count(labels) == 0
    for loss in (
        kd_loss(student, teacher, labels),
        kd_loss(student, teacher, labels, KDOptions(top_k=2), num_items=8),
        kd_loss(student, teacher_topk(teacher, 2), labels),
        ce_loss(student, labels),
    ):
        assert loss.item() == 0.0 and loss.dtype == torch.float32
        student.grad = None
        loss.backward()
        assert student.grad is not None and torch.count_nonzero(student.grad) == 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_per_token_loss_is_invariant_to_sequence_length_and_padding(divergence):
    student, teacher, labels = make_batch(batch=1, seq=6, vocab=8, dtype=torch.float32, ignore=((0, 2),))
    base = kd_loss(student, teacher, labels, KDOptions(divergence=divergence)).item()
    repeated = kd_loss(
        torch.cat([student] * 3, 1), torch.cat([teacher] * 3, 1), labels.repeat(1, 3), KDOptions(divergence=divergence)
    )
    assert repeated.item() == pytest.approx(base, rel=1e-6)
    pad_logits = torch.randn(1, 5, 8) * 10
    padded = kd_loss(
        torch.cat([student, pad_logits], 1),
        torch.cat([teacher, -pad_logits], 1),
        torch.cat([labels, torch.full((1, 5), IGNORE_INDEX)], 1),
        KDOptions(divergence=divergence),
    )
    assert padded.item() == pytest.approx(base, rel=1e-6)


@pytest.mark.parametrize("loss_name", ["kd", "kd_top_k", "ce"])
def test_four_micro_batches_with_window_count_match_one_batch_of_four(loss_name):
    student, teacher, labels = make_batch(batch=4, seq=6, vocab=8, ignore=((0, 0), (1, 2), (1, 3), (3, 5)))
    losses = {
        "kd": lambda s, t, y, n: kd_loss(s, t, y, KDOptions(divergence="jsd", temperature=2.0), num_items=n),
        "kd_top_k": lambda s, t, y, n: kd_loss(s, t, y, KDOptions(top_k=3), num_items=n),
        "ce": lambda s, t, y, n: ce_loss(s, y, num_items=n),
    }[loss_name]
    whole = losses(student, teacher, labels, None)
    (whole_grad,) = torch.autograd.grad(whole, student)
    window = torch.tensor(valid_count(labels))  # a tensor, as an all-reduced count would be
    micro = sum(losses(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1], window) for i in range(4))
    (micro_grad,) = torch.autograd.grad(micro, student)
    assert micro.item() == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(micro_grad, whole_grad, rtol=1e-6, atol=1e-15)


# ----- half precision ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_of_magnitude_1e4_give_finite_loss_and_grads(divergence, temperature, dtype):
    gen = torch.Generator().manual_seed(1)
    student = ((torch.rand(2, 3, 32, generator=gen) * 2 - 1) * 1e4).to(dtype).requires_grad_()
    teacher = ((torch.rand(2, 3, 32, generator=gen) * 2 - 1) * 1e4).to(dtype)
    labels = torch.zeros(2, 3, dtype=torch.long)
    for target, top_k in ((teacher, None), (teacher, 5), (teacher_topk(teacher, 5, temperature), None)):
        loss = kd_loss(student, target, labels, KDOptions(divergence=divergence, temperature=temperature, top_k=top_k))
        student.grad = None
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() >= 0
        assert torch.isfinite(student.grad).all()
    ce = ce_loss(student, labels)
    assert torch.isfinite(ce) and torch.isfinite(torch.autograd.grad(ce, student)[0]).all()


def test_half_precision_matches_float32_on_the_same_values():
    student, teacher, labels = make_batch(dtype=torch.float16)
    half = kd_loss(student, teacher, labels, KDOptions(divergence="jsd")).item()
    full = kd_loss(student.detach().float(), teacher.float(), labels, KDOptions(divergence="jsd")).item()
    assert half == pytest.approx(full, rel=1e-6)


# ----- cross-entropy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_items", [None, 23])
def test_ce_loss_equals_f_cross_entropy(num_items):
    student, _, labels = make_batch(batch=3, seq=6, vocab=9)
    loss = ce_loss(student, labels, num_items=num_items)
    ref = F.cross_entropy(student.reshape(-1, 9), labels.reshape(-1), ignore_index=-100, reduction="sum")
    ref = ref / (num_items or valid_count(labels))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, student), torch.autograd.grad(ref, student))


def test_token_log_probs_equal_negative_cross_entropy_and_zero_when_ignored():
    student, _, labels = make_batch(batch=3, seq=6, vocab=9)
    per_token = token_log_probs(student, labels, chunk_size=4)
    ref = -F.cross_entropy(student.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(per_token, ref, rtol=1e-12, atol=0)
    assert per_token[0, 1].item() == 0.0


# ----- structure and errors ---------------------------------------------------------------------------------


def test_kd_loss_is_sum_of_kd_per_position_scaled_and_normalised():
    student, teacher, labels = make_batch()
    per_position = kd_per_position(
        valid_rows(student, labels), valid_rows(teacher, labels), KDOptions(temperature=3.0, divergence="reverse_kl")
    )
    assert per_position.shape == (valid_count(labels),)
    loss = kd_loss(student, teacher, labels, KDOptions(temperature=3.0, divergence="reverse_kl"), num_items=17)
    assert loss.item() == pytest.approx(per_position.sum().item() * 9 / 17, rel=1e-12)


def test_bad_arguments_raise_value_errors_that_say_what_to_do():
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError) as info:
        kd_loss(student, teacher, labels, KDOptions(divergence="kl"))
    assert all(name in str(info.value) for name in DIVERGENCES)
    with pytest.raises(ValueError, match="alignment"):
        kd_loss(student, teacher[..., :5], labels)
    with pytest.raises(ValueError, match="beta"):
        kd_loss(student, teacher, labels, KDOptions(divergence="jsd", beta=1.5))
    with pytest.raises(ValueError, match="labels"):
        ce_loss(student, labels[:, :3])


# ----- properties -------------------------------------------------------------------------------------------


@st.composite
def logit_pairs(draw):
    rows, vocab = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    values = st.floats(-30.0, 30.0, allow_nan=False, width=32)
    flat = draw(st.lists(values, min_size=2 * rows * vocab, max_size=2 * rows * vocab))
    pair = torch.tensor(flat, dtype=torch.float32).reshape(2, 1, rows, vocab)
    return pair[0], pair[1]


@settings(max_examples=60, deadline=None)
@given(logit_pairs(), st.floats(0.05, 0.95), st.sampled_from([1.0, 2.0]), st.sampled_from([None, 1]))
def test_divergences_are_nonnegative_and_jsd_is_bounded(pair, beta, temperature, top_k):
    student, teacher = pair
    labels = torch.zeros(student.shape[:-1], dtype=torch.long)
    kd = lambda name: kd_loss(
        student,
        teacher,
        labels,
        KDOptions(divergence=name, beta=beta, temperature=temperature, top_k=top_k, scale_t2=False),
    ).item()
    forward, reverse, jsd = kd("forward_kl"), kd("reverse_kl"), kd("jsd")
    assert forward >= -1e-6 and reverse >= -1e-6
    assert kd("skew_forward_kl") >= -1e-6 and kd("skew_reverse_kl") >= -1e-6
    binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    tolerance = 1e-5 / (beta * (1 - beta))
    assert -tolerance <= jsd <= min(forward + reverse, binary_entropy / (beta * (1 - beta))) + tolerance
