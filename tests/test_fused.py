"""Fused lm_head + KD: identity with the unfused path (logits = hidden @ W.T, then kd_loss / ce_loss), in values
and gradients, and the memory claims of the chunked teacher top-k."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kagglekd.config import KDOptions
from kagglekd.fused import fused_lm_head_kd
from kagglekd.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    TeacherTopK,
    ce_loss,
    kd_loss,
    teacher_topk,
)

F64 = torch.float64


def make_inputs(batch=2, seq=6, hidden_size=8, vocab=11, dtype=torch.float32, seed=0, ignore=((0, 1), (1, 5))):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=gen, dtype=F64).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=F64).to(dtype).requires_grad_()
    teacher = 2 * torch.randn(batch, seq, vocab, generator=gen, dtype=F64).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    for b, t in ignore:
        labels[b, t] = IGNORE_INDEX
    return hidden, weight, teacher, labels


def unfused(hidden, weight, teacher, labels, *, alpha_kd, alpha_ce, bias=None, num_items=None, **kd_kwargs):
    """The reference path: the full [B, T, V] logits in float32 (float64 stays), then kd_loss and ce_loss."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(compute) @ weight.to(compute).T
    if bias is not None:
        logits = logits + bias.to(compute)
    kd = kd_loss(logits, teacher, labels, KDOptions(**kd_kwargs), num_items=num_items)
    ce = ce_loss(logits, labels, num_items=num_items)
    return alpha_kd * kd + alpha_ce * ce, kd, ce


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k", [None, 4])
def test_fused_equals_unfused_values_and_gradients(divergence, top_k):
    hidden, weight, teacher, labels = make_inputs()
    options = dict(temperature=1.7, divergence=divergence, beta=0.3, skew_alpha=0.2, top_k=top_k)
    total, parts = fused_lm_head_kd(hidden, weight, teacher, labels, KDOptions(**options), alpha_kd=0.6,
                                    alpha_ce=0.4, chunk_size=3)  # fmt: skip
    ref_total, ref_kd, ref_ce = unfused(hidden, weight, teacher, labels, alpha_kd=0.6, alpha_ce=0.4, **options)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["kd"], ref_kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["ce"], ref_ce.detach(), rtol=1e-5, atol=1e-5)
    assert not parts["kd"].requires_grad and not parts["ce"].requires_grad
    for got, want in zip(grads(total, hidden, weight), grads(ref_total, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_with_teacher_topk_targets_equals_unfused(divergence):
    hidden, weight, teacher, labels = make_inputs(seed=1)
    targets = teacher_topk(teacher, k=5, temperature=2.0)
    options = dict(temperature=2.0, divergence=divergence, beta=0.5, skew_alpha=0.1, scale_t2=False)
    total, parts = fused_lm_head_kd(hidden, weight, targets, labels, KDOptions(**options), alpha_kd=1.0,
                                    alpha_ce=0.25, chunk_size=4, num_items=17)  # fmt: skip
    ref_total, ref_kd, _ = unfused(hidden, weight, targets, labels, alpha_kd=1.0, alpha_ce=0.25, num_items=17,
                                   **options)  # fmt: skip
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["kd"], ref_kd.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(total, hidden, weight), grads(ref_total, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_kd_mask_limits_kd_and_keeps_ce_everywhere(divergence):
    hidden, weight, teacher, labels = make_inputs(dtype=F64)
    kd_mask = torch.ones_like(labels, dtype=torch.bool)
    kd_mask[0, 2:4] = False
    kd_mask[1, 0] = False
    teacher[0, 2] = float("-inf")  # a masked row's placeholder target may be anything, even degenerate
    kd_labels = labels.masked_fill(~kd_mask, IGNORE_INDEX)
    options = KDOptions(temperature=1.3, divergence=divergence)
    total, parts = fused_lm_head_kd(
        hidden, weight, teacher, labels, options, alpha_kd=0.7, alpha_ce=0.3, chunk_size=4, kd_mask=kd_mask
    )
    logits = hidden @ weight.T
    valid = int((labels != IGNORE_INDEX).sum())  # both terms over the window's valid count
    kd = kd_loss(logits, teacher, kd_labels, options, num_items=valid)
    ce = ce_loss(logits, labels, num_items=valid)
    torch.testing.assert_close(parts["kd"], kd.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["ce"], ce.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads(total, hidden, weight), grads(0.7 * kd + 0.3 * ce, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(
    "options, infinite",
    [
        (KDOptions(divergence="reverse_kl", temperature=1.5), True),
        (KDOptions(divergence="jsd", beta=1.0), True),
        (KDOptions(divergence="skew_reverse_kl", skew_alpha=0.0), True),
        (KDOptions(divergence="forward_kl", temperature=1.5), False),
        (KDOptions(divergence="jsd", beta=0.5), False),
        (KDOptions(divergence="skew_reverse_kl", skew_alpha=0.3), False),
    ],
)
def test_fused_reverse_kl_against_a_narrow_teacher_padded_with_minus_inf_is_infinite(options, infinite, sparse):
    # a teacher with 8 real tokens padded with -inf to the student's 11 on batch row 0: p = 0 < q there, so
    # KL(q || p) = +inf (a hand check: q > 0 on a padded column), the other forms stay finite and equal the
    # unfused path; masking those rows out of the KD term (kd_mask) leaves a finite loss again.
    hidden, weight, teacher, labels = make_inputs(dtype=F64, seed=9)
    teacher[0, :, 8:] = float("-inf")
    assert (torch.softmax(hidden[0] @ weight.T, -1)[:, 8:] > 0).all()
    target = teacher_topk(teacher, 8, temperature=options.temperature) if sparse else teacher
    total, parts = fused_lm_head_kd(hidden, weight, target, labels, options, alpha_kd=0.5, alpha_ce=0.5, chunk_size=4)
    logits = hidden @ weight.T
    kd = kd_loss(logits, target, labels, options)
    assert torch.isposinf(parts["kd"]).item() == infinite and torch.isposinf(total).item() == infinite
    if not infinite:
        torch.testing.assert_close(parts["kd"], kd.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(total, 0.5 * kd + 0.5 * ce_loss(logits, labels), rtol=1e-10, atol=1e-12)
    kd_mask = torch.ones_like(labels, dtype=torch.bool)
    kd_mask[0] = False
    _, masked = fused_lm_head_kd(hidden, weight, target, labels, options, chunk_size=4, kd_mask=kd_mask)
    valid = int((labels != IGNORE_INDEX).sum())
    expected = kd_loss(logits, target, labels.masked_fill(~kd_mask, IGNORE_INDEX), options, num_items=valid)
    assert torch.isfinite(masked["kd"])
    torch.testing.assert_close(masked["kd"], expected.detach(), rtol=1e-10, atol=1e-12)


def test_fused_float64_is_exact_and_chunk_size_does_not_matter():
    hidden, weight, teacher, labels = make_inputs(dtype=F64, seed=2)
    ref_total, _, _ = unfused(hidden, weight, teacher, labels, alpha_kd=0.5, alpha_ce=0.5, divergence="jsd")
    ref_grads = grads(ref_total, hidden, weight)
    for chunk_size in (1, 2, 5, 1000):
        total, _ = fused_lm_head_kd(hidden, weight, teacher, labels, KDOptions(divergence="jsd"), chunk_size=chunk_size)
        assert total.dtype == F64
        torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads(total, hidden, weight), ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fused_fp16_hidden_is_cast_to_float32_inside():
    hidden, weight, teacher, labels = make_inputs(dtype=torch.float16, seed=3)
    total, parts = fused_lm_head_kd(hidden, weight, teacher, labels, KDOptions(temperature=2.0, top_k=3))
    assert total.dtype == torch.float32 and parts["kd"].dtype == torch.float32
    ref_total, _, _ = unfused(hidden, weight, teacher, labels, alpha_kd=0.5, alpha_ce=0.5, temperature=2.0, top_k=3)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    got_hidden, got_weight = grads(total, hidden, weight)
    want_hidden, want_weight = grads(ref_total, hidden, weight)
    assert got_hidden.dtype == torch.float16 and got_weight.dtype == torch.float16
    # both sides end with the same fp16 rounding of a float32 gradient
    torch.testing.assert_close(got_hidden, want_hidden, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got_weight, want_weight, rtol=1e-3, atol=1e-5)


def test_fused_bias_and_ignored_positions_get_zero_hidden_grad():
    hidden, weight, teacher, labels = make_inputs(seed=4)
    bias = torch.randn(weight.shape[0], dtype=torch.float32).requires_grad_()
    total, _ = fused_lm_head_kd(hidden, weight, teacher, labels, lm_head_bias=bias, chunk_size=2)
    ref_total, _, _ = unfused(hidden, weight, teacher, labels, alpha_kd=0.5, alpha_ce=0.5, bias=bias)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(total, hidden, weight, bias), grads(ref_total, hidden, weight, bias)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (grad_hidden,) = grads(fused_lm_head_kd(hidden, weight, teacher, labels)[0], hidden)
    assert grad_hidden[0, 1].abs().sum() == 0 and grad_hidden[1, 5].abs().sum() == 0


def test_fused_tied_embeddings_accumulate_both_uses():
    torch.manual_seed(5)
    vocab, hidden_size = 13, 6
    embedding = torch.nn.Embedding(vocab, hidden_size)
    proj = torch.nn.Linear(hidden_size, hidden_size)
    input_ids = torch.randint(0, vocab, (2, 7))
    labels = torch.randint(0, vocab, (2, 7))
    labels[0, 0] = IGNORE_INDEX
    teacher = torch.randn(2, 7, vocab)

    def run(fused):
        embedding.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        hidden = torch.tanh(proj(embedding(input_ids)))
        if fused:
            loss, _ = fused_lm_head_kd(hidden, embedding.weight, teacher, labels, chunk_size=4)
        else:
            loss, _, _ = unfused(hidden, embedding.weight, teacher, labels, alpha_kd=0.5, alpha_ce=0.5)
        loss.backward()
        return loss.detach(), embedding.weight.grad.clone(), proj.weight.grad.clone()

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_num_items_tensor_and_grad_accumulation_invariance():
    hidden, weight, teacher, labels = make_inputs(batch=4, seed=6, ignore=((0, 0), (3, 2)))
    window = int((labels != IGNORE_INDEX).sum())
    whole, _ = fused_lm_head_kd(hidden, weight, teacher, labels, num_items=torch.tensor(float(window)))
    whole_grad = grads(whole, weight)[0]
    micro_total, micro_grad = 0.0, torch.zeros_like(weight)
    for part in range(2):
        rows = slice(2 * part, 2 * part + 2)
        loss, _ = fused_lm_head_kd(hidden[rows], weight, teacher[rows], labels[rows], num_items=window)
        micro_total += loss.detach()
        micro_grad += grads(loss, weight)[0]
    torch.testing.assert_close(micro_total, whole.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(micro_grad, whole_grad, rtol=1e-5, atol=1e-6)


def test_fused_ce_only_needs_no_teacher_and_all_ignored_is_zero():
    hidden, weight, _, labels = make_inputs(seed=7)
    total, parts = fused_lm_head_kd(hidden, weight, None, labels, alpha_kd=0.0, alpha_ce=1.0)
    ref = ce_loss(hidden @ weight.T, labels)
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-6)
    assert parts["kd"] == 0
    ignored = torch.full_like(labels, IGNORE_INDEX)
    total, parts = fused_lm_head_kd(hidden, weight, None, ignored, alpha_kd=0.0, alpha_ce=1.0)
    total.backward()
    assert total.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_fused_identical_teacher_gives_zero_kd():
    hidden, weight, _, labels = make_inputs(dtype=F64, seed=8)
    teacher = (hidden @ weight.T).detach()
    for divergence in DIVERGENCES:
        _, parts = fused_lm_head_kd(hidden, weight, teacher, labels, KDOptions(divergence=divergence))
        assert abs(parts["kd"].item()) < 1e-12


def test_fused_rejects_bad_inputs():
    hidden, weight, teacher, labels = make_inputs()
    with pytest.raises(ValueError, match="alignment"):
        fused_lm_head_kd(hidden, weight, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="teacher is None"):
        fused_lm_head_kd(hidden, weight, None, labels)
    with pytest.raises(ValueError, match="hidden size"):
        fused_lm_head_kd(hidden, weight[:, :-1], teacher, labels)
    with pytest.raises(ValueError, match="not both 0"):
        fused_lm_head_kd(hidden, weight, teacher, labels, alpha_kd=0.0, alpha_ce=0.0)
    with pytest.raises(ValueError, match="top_k"):
        fused_lm_head_kd(hidden, weight, teacher_topk(teacher, 3), labels, KDOptions(top_k=4))


# ----- memory: no full-vocab float32 tensor ---------------------------------------------------------------


class RecordCreatedTensors(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an aten op returns while the mode is active."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.created.append((tuple(item.shape), item.dtype, item.numel()))
        return out


class RecordStorages(TorchDispatchMode):
    """Records (numel, storage address) of every float32 tensor an aten op returns (in-place results and views
    share their storage, so distinct addresses count allocations)."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor) and item.dtype == torch.float32:
                self.created.append((item.numel(), item.untyped_storage().data_ptr()))
        return out

    def storages_of(self, numel: int) -> set[int]:
        return {address for size, address in self.created if size == numel}

    def largest_other_than(self, numel: int) -> int:
        return max((size for size, _ in self.created if size != numel), default=0)


def largest_float32(created):
    return max((numel for _, dtype, numel in created if dtype == torch.float32), default=0)


def test_teacher_topk_never_allocates_a_full_vocab_float32_copy():
    batch, seq, vocab, chunk = 2, 64, 512, 16
    teacher = torch.randn(batch, seq, vocab).half()
    with RecordCreatedTensors() as recorder:
        targets = teacher_topk(teacher, k=8, temperature=2.0, chunk_size=chunk)
    assert recorder.created, "the dispatch mode recorded nothing"
    assert largest_float32(recorder.created) <= chunk * vocab
    # and the result is the same as the unchunked float32 computation
    reference = teacher_topk(teacher.float(), k=8, temperature=2.0, chunk_size=batch * seq)
    torch.testing.assert_close(targets.logprobs, reference.logprobs)
    assert torch.equal(targets.indices, reference.indices)


def test_fused_never_allocates_full_vocab_student_logits():
    batch, seq, hidden_size, vocab, chunk = 2, 64, 16, 512, 16
    hidden, weight, _, labels = make_inputs(batch, seq, hidden_size, vocab, ignore=())
    targets = teacher_topk(torch.randn(batch, seq, vocab), k=8)
    with RecordCreatedTensors() as recorder:
        total, _ = fused_lm_head_kd(hidden, weight, targets, labels, chunk_size=chunk)
        total.backward()
    full = batch * seq * vocab
    assert largest_float32(recorder.created) <= max(chunk * vocab, vocab * hidden_size) < full
    assert isinstance(targets, TeacherTopK)


@pytest.mark.parametrize("top_k", [None, 8])
def test_fused_teacher_gradient_is_one_buffer_the_size_of_the_teacher(top_k):
    """SAR: a teacher that requires grad gets its gradient from one buffer filled chunk by chunk in the forward
    pass and scaled in place in backward; nothing else as large as the teacher's logits is allocated."""
    batch, seq, hidden_size, vocab, chunk = 2, 64, 16, 512, 16
    hidden, weight, teacher, labels = make_inputs(batch, seq, hidden_size, vocab, ignore=())
    teacher.requires_grad_()
    with RecordStorages() as recorder:
        total, _ = fused_lm_head_kd(hidden, weight, teacher, labels, KDOptions(top_k=top_k), chunk_size=chunk)
        (grad,) = torch.autograd.grad(total, teacher)
    full = teacher.numel()
    assert recorder.largest_other_than(full) <= max(chunk * vocab, vocab * hidden_size) < full
    buffers = recorder.storages_of(full) - {teacher.untyped_storage().data_ptr()}  # not the teacher's own views
    assert buffers == {grad.untyped_storage().data_ptr()}
