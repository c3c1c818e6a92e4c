"""SAR trains the teacher's routers through the student's distillation loss, so the KD loss must differentiate the
teacher in every path: the fused closed forms (dense logits, top-k buckets, TeacherTopK fields), the cross-tokenizer
targets (exact and ULD), and, at model level, one trainer step of each path against a float64 re-run of the same
teacher and student with plain autograd. References are written here from log_softmax and the divergence formulas
of test_losses_closed_form, never from the code under test. Last, the router term (it trains the teacher) is kept
out of the student's balanced shares."""

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN
from test_fused import RecordStorages
from test_losses_closed_form import ALPHA, BETA, buckets, reference
from transformers import AutoTokenizer

from kagglekd import alignment, corpus, data, models
from kagglekd.config import DIVERGENCES, DistillConfig, KDOptions
from kagglekd.fused import fused_lm_head_kd
from kagglekd.losses import IGNORE_INDEX, TeacherTopK, teacher_topk, valid_count
from kagglekd.trainer import Distiller

F64 = torch.float64
NO_REGULARISERS = dict(sar_anchor_weight=0.0, sar_balance_weight=0.0, sar_entropy_weight=0.0, sar_teacher_ce_weight=0.0)


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal within ``rtol`` relative to each entry and to the largest entry, and not trivially zero."""
    assert want.abs().max() > 0, "the reference gradient is zero: nothing is tested"
    torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol, atol=rtol * float(want.abs().max()))


def options_of(divergence, temperature, top_k=None, scale_t2=True) -> KDOptions:
    return KDOptions(divergence=divergence, temperature=temperature, top_k=top_k, beta=BETA, skew_alpha=ALPHA,
                     scale_t2=scale_t2)  # fmt: skip


# ----- references -----------------------------------------------------------------------------------------


def reference_kd(student_logits, teacher, kd_labels, options: KDOptions, num_items) -> torch.Tensor:
    """Sum over rows with a KD label of D(p, q), times T² under scale_t2, / num_items, in float64 autograd.

    ``teacher`` dense ``[B, T, V]`` logits (k + 1 buckets when ``options.top_k``) or a TeacherTopK."""
    keep, temperature, vocab = kd_labels.reshape(-1) != IGNORE_INDEX, options.temperature, student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.reshape(-1, vocab)[keep].double() / temperature, -1)
    if isinstance(teacher, TeacherTopK):
        k = teacher.indices.shape[-1]
        log_p = torch.cat([teacher.logprobs.reshape(-1, k)[keep], teacher.tail.reshape(-1, 1)[keep]], -1).double()
        log_q = buckets(log_q, teacher.indices.reshape(-1, k)[keep])
    else:
        log_p = F.log_softmax(teacher.reshape(-1, vocab)[keep].double() / temperature, -1)
        if options.top_k is not None:
            indices = log_p.topk(options.top_k, -1).indices
            log_p, log_q = buckets(log_p, indices), buckets(log_q, indices)
    return reference(log_p, log_q, options.divergence) * (temperature**2 if options.scale_t2 else 1.0) / num_items


def reference_cross_kd(student_logits, teacher_logits, aligned, labels, vocab_map, options, num_items, mode="exact"):
    """Cross-tokenizer KD in float64 autograd: the teacher's distribution at each aligned position summed onto
    the student ids spelling the same bytes (a one-hot matrix product), buckets = shared tokens (or the top-k of
    them) + one tail on each side; ``uld``: the L1 distance of the sorted probability vectors."""
    keep = (aligned.target >= 0) & (labels != IGNORE_INDEX)
    rows, positions = keep.nonzero(as_tuple=True)
    temperature, scale = options.temperature, options.temperature**2 if options.scale_t2 else 1.0
    p = F.softmax(teacher_logits[rows, aligned.target[rows, positions]].double() / temperature, -1)
    q = F.softmax(student_logits[rows, positions].double() / temperature, -1)
    if mode == "uld":
        p, q = p.sort(-1, descending=True).values, q.sort(-1, descending=True).values
        width = max(p.shape[-1], q.shape[-1])
        l1 = (F.pad(p, (0, width - p.shape[-1])) - F.pad(q, (0, width - q.shape[-1]))).abs().sum()
        return l1 * scale / num_items
    shared, count = vocab_map.shared, vocab_map.shared.numel()
    slots = torch.where(vocab_map.teacher_to_shared >= 0, vocab_map.teacher_to_shared, count)
    mapped = p @ F.one_hot(slots, count + 1).double()  # [N, shared + 1]: shared tokens, then the unmapped mass
    p_shared, q_shared = mapped[:, :count], q[:, shared]
    if options.top_k is not None and options.top_k < count:
        top = p_shared.topk(options.top_k, -1).indices
        p_shared, q_shared = p_shared.gather(-1, top), q_shared.gather(-1, top)
    p_buckets = torch.cat([p_shared, 1 - p_shared.sum(-1, keepdim=True)], -1)
    q_buckets = torch.cat([q_shared, 1 - q_shared.sum(-1, keepdim=True)], -1)
    return reference(p_buckets.log(), q_buckets.log(), options.divergence) * scale / num_items


# ----- pure functions, float64 ----------------------------------------------------------------------------


def make_inputs(seed=0, batch=2, seq=6, hidden_size=8, vocab=11):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=gen, dtype=F64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=F64)
    teacher = 2 * torch.randn(batch, seq, vocab, generator=gen, dtype=F64)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, 1] = labels[1, 5] = IGNORE_INDEX
    kd_mask = torch.ones(batch, seq, dtype=torch.bool)
    kd_mask[0, 3] = kd_mask[1, 0] = False
    return hidden, weight, teacher, labels, kd_mask


def fused_and_reference_grads(hidden, weight, teacher, labels, options, kd_mask, leaves):
    """Gradients of the fused total and of the float64 reference total w.r.t. (hidden, weight, *teacher
    leaves); ``leaves(teacher_copy)`` returns (teacher input, its leaf tensors)."""
    alpha_kd, alpha_ce, num_items = 0.7, 0.3, 13
    kd_labels = labels if kd_mask is None else labels.masked_fill(~kd_mask, IGNORE_INDEX)
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        target, teacher_leaves = leaves(teacher)
        if fused:
            total, parts = fused_lm_head_kd(h, w, target, labels, options, alpha_kd=alpha_kd, alpha_ce=alpha_ce,
                                            num_items=num_items, chunk_size=5, kd_mask=kd_mask)  # fmt: skip
            kd = parts["kd"]
        else:
            logits = h @ w.T
            kd = reference_kd(logits, target, kd_labels, options, num_items)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
            total = alpha_kd * kd + alpha_ce * ce / num_items
        results.append((float(kd.detach()), torch.autograd.grad(total, (h, w, *teacher_leaves))))
    return results


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale_t2", [True, False])
def test_fused_gives_dense_teacher_logits_the_float64_autograd_gradient(divergence, temperature, top_k, masked,
                                                                        scale_t2):  # fmt: skip
    hidden, weight, teacher, labels, kd_mask = make_inputs()
    options = options_of(divergence, temperature, top_k, scale_t2)

    def leaves(teacher):
        leaf = teacher.clone().requires_grad_()
        return leaf, (leaf,)

    (kd, grads), (ref_kd, ref_grads) = fused_and_reference_grads(
        hidden, weight, teacher, labels, options, kd_mask if masked else None, leaves
    )
    assert kd == pytest.approx(ref_kd, rel=1e-9)
    for got, want in zip(grads, ref_grads):  # hidden, weight (unchanged by the teacher's grad), teacher
        assert_grad_close(got, want)
    if masked:  # rows outside the KD mask give the teacher nothing
        assert not grads[2][~kd_mask].any()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_gives_teacher_topk_fields_the_float64_autograd_gradient(divergence, temperature, masked):
    hidden, weight, teacher, labels, kd_mask = make_inputs(seed=1)
    targets = teacher_topk(teacher, 5, temperature=temperature)

    def leaves(_teacher):
        logprobs, tail = targets.logprobs.clone().requires_grad_(), targets.tail.clone().requires_grad_()
        return TeacherTopK(targets.indices, logprobs, tail), (logprobs, tail)

    (kd, grads), (ref_kd, ref_grads) = fused_and_reference_grads(
        hidden, weight, teacher, labels, options_of(divergence, temperature), kd_mask if masked else None, leaves
    )
    assert kd == pytest.approx(ref_kd, rel=1e-9)
    for got, want in zip(grads, ref_grads):  # hidden, weight, logprobs, tail
        assert_grad_close(got, want)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_topk_fields_built_from_logits_carry_the_gradient_to_the_logits(divergence):
    """Upstream autograd takes the fields' gradient to the logits: it equals the dense top-k gradient."""
    hidden, weight, teacher, labels, _ = make_inputs(seed=2)
    options = options_of(divergence, 2.0, top_k=4)
    logits = teacher.clone().requires_grad_()
    log_p = F.log_softmax(logits / 2.0, -1)
    indices = log_p.detach().topk(4, -1).indices
    tail = log_p.scatter(-1, indices, -torch.inf).logsumexp(-1)
    sparse = TeacherTopK(indices, log_p.gather(-1, indices), tail)
    total, _ = fused_lm_head_kd(hidden, weight, sparse, labels, options.replace(top_k=None), chunk_size=5)
    (got,) = torch.autograd.grad(total, logits)
    ref_logits = teacher.clone().requires_grad_()
    reference_total = 0.5 * reference_kd(hidden @ weight.T, ref_logits, labels, options, valid_count(labels))
    (want,) = torch.autograd.grad(reference_total, ref_logits)  # 0.5: the default alpha_kd
    assert_grad_close(got, want)


def test_teacher_without_grad_takes_the_common_path_and_gets_nothing():
    hidden, weight, teacher, labels, _ = make_inputs(seed=3)
    hidden.requires_grad_()
    total, _ = fused_lm_head_kd(hidden, weight, teacher, labels, options_of("jsd", 2.0))
    assert total.grad_fn is not None and not teacher.requires_grad
    with torch.no_grad():  # a teacher that requires grad, under no_grad: no gradient buffers, no error
        attached = teacher.clone().requires_grad_()
        fused_lm_head_kd(hidden, weight, attached, labels, options_of("jsd", 2.0))
    assert attached.grad is None


# ----- cross-tokenizer targets and ULD ------------------------------------------------------------------------


def cross_inputs(seed=0, batch=2, seq=7, teacher_seq=9, student_vocab=11, teacher_vocab=13):
    """Random logits, a vocabulary map with unmapped teacher tokens and teacher tokens sharing a student id, and an
    alignment with unaligned positions."""
    gen = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(batch, seq, student_vocab, generator=gen, dtype=F64)
    teacher = 2 * torch.randn(batch, teacher_seq, teacher_vocab, generator=gen, dtype=F64)
    shared = torch.tensor([0, 2, 3, 5, 7, 8, 10])
    vocab_map = alignment.VocabMap(torch.tensor([3, -1, 0, 1, 6, 2, 4, -1, 5, 0, 3, -1, 1]), shared, teacher_vocab,
                                   student_vocab)  # fmt: skip
    target = torch.stack([torch.randperm(teacher_seq, generator=gen)[:seq].sort().values for _ in range(batch)])
    target[0, 2] = target[1, 4] = -1
    zeros, teacher_zeros = torch.zeros(batch, seq, dtype=torch.long), torch.zeros(batch, teacher_seq, dtype=torch.long)
    aligned = alignment.AlignedBatch(teacher_zeros, teacher_zeros, target, zeros, zeros)
    labels = torch.randint(0, student_vocab, (batch, seq), generator=gen)
    labels[0, 5] = IGNORE_INDEX
    return student, teacher, aligned, labels, vocab_map


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, 3])
def test_cross_targets_carry_the_teachers_gradient_fused_and_unfused(divergence, temperature, top_k):
    student, teacher, aligned, labels, vocab_map = cross_inputs()
    options = options_of(divergence, temperature, top_k)
    ref_teacher = teacher.clone().requires_grad_()
    ref = reference_cross_kd(student, ref_teacher, aligned, labels, vocab_map, options, num_items=12)
    (want,) = torch.autograd.grad(ref, ref_teacher)

    leaf = teacher.clone().requires_grad_()
    loss, _ = alignment.cross_kd_loss(student, leaf, aligned, labels, vocab_map, options, num_items=12, chunk_size=4)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-9)
    assert_grad_close(torch.autograd.grad(loss, leaf)[0], want)

    # fused: the student's logits are hidden @ I, so the same reference applies
    leaf = teacher.clone().requires_grad_()
    targets, kd_labels, _ = alignment.cross_targets(leaf, aligned, labels, vocab_map, options, chunk_size=4)
    eye = torch.eye(student.shape[-1], dtype=F64)
    kd_mask = kd_labels != IGNORE_INDEX
    total, parts = fused_lm_head_kd(student, eye, targets, labels, options.replace(top_k=None), alpha_kd=1.0,
                                    alpha_ce=0.0, num_items=12, chunk_size=5, kd_mask=kd_mask)  # fmt: skip
    assert float(parts["kd"]) == pytest.approx(float(ref.detach()), rel=1e-9)
    assert_grad_close(torch.autograd.grad(total, leaf)[0], want)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_carries_the_teachers_gradient(temperature):
    student, teacher, aligned, labels, vocab_map = cross_inputs(seed=1)
    options = options_of("forward_kl", temperature)
    leaf, ref_teacher = teacher.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss, _ = alignment.cross_kd_loss(student, leaf, aligned, labels, vocab_map, options, mode="uld", num_items=12,
                                      chunk_size=4)  # fmt: skip
    ref = reference_cross_kd(student, ref_teacher, aligned, labels, vocab_map, options, 12, mode="uld")
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-9)
    assert_grad_close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(ref, ref_teacher)[0])


def test_cross_targets_without_teacher_grad_are_detached_and_equal():
    student, teacher, aligned, labels, vocab_map = cross_inputs(seed=2)
    options = options_of("forward_kl", 2.0, top_k=3)
    detached, kd_labels, stats = alignment.cross_targets(teacher, aligned, labels, vocab_map, options, chunk_size=4)
    attached, kd_labels2, stats2 = alignment.cross_targets(
        teacher.clone().requires_grad_(), aligned, labels, vocab_map, options, chunk_size=4
    )
    assert not detached.logprobs.requires_grad and not detached.tail.requires_grad
    assert attached.logprobs.requires_grad and attached.tail.requires_grad
    for a, b in zip(detached, attached):
        assert torch.equal(a, b.detach())
    assert torch.equal(kd_labels, kd_labels2) and stats == stats2


def test_cross_targets_backward_keeps_one_teacher_sized_buffer():
    """The backward re-maps one chunk at a time into a single gradient buffer: no other tensor as large as the
    teacher's logits, and no float32 intermediate larger than one chunk's [chunk, V_teacher]."""
    batch, seq, teacher_vocab, chunk = 2, 48, 600, 8
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(batch, seq, teacher_vocab, generator=gen).requires_grad_()
    vocab_map = alignment.VocabMap(torch.randint(-1, 40, (teacher_vocab,), generator=gen), torch.arange(40) * 2,
                                   teacher_vocab, 80)  # fmt: skip
    target = torch.arange(seq).expand(batch, seq).clone()
    zeros = torch.zeros(batch, seq, dtype=torch.long)
    aligned = alignment.AlignedBatch(zeros, zeros, target, zeros, zeros)
    labels = torch.zeros(batch, seq, dtype=torch.long)
    with RecordStorages() as recorder:
        targets, _, _ = alignment.cross_targets(teacher, aligned, labels, vocab_map, chunk_size=chunk)
        (targets.logprobs.sum() + targets.tail.sum()).backward()
    assert recorder.largest_other_than(teacher.numel()) <= chunk * teacher_vocab
    buffers = recorder.storages_of(teacher.numel()) - {teacher.untyped_storage().data_ptr()}  # not its own views
    assert len(buffers) == 1  # the gradient buffer, written in place chunk by chunk
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


# ----- model level: one trainer step against a float64 re-run ------------------------------------------------


@pytest.fixture
def metaspace_teacher(tmp_path, use_kit_cache):
    """A tiny random Qwen3-MoE that reads text with a SentencePiece-style tokenizer (vocab 3000)."""
    tok = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(3000, pre_tokenizer="whitespace-digits"))
    out = tmp_path / "metaspace-teacher"
    models.tiny_random_moe(len(tok), seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def reference_router_grads(distiller: Distiller, window) -> dict[str, torch.Tensor]:
    """d (alpha_kd x KD) / d routers for the window, re-run in float64 with plain autograd: both models' logits
    from ``model(...).logits``, the KD loss from the references above (SAR's regularisers are all 0 here)."""
    cfg, options = distiller.config, distiller.config.kd_options
    teacher = copy.deepcopy(distiller.teacher).double()
    teacher.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    student = copy.deepcopy(distiller.accelerator.unwrap_model(distiller.student)).double()
    routers = {name: p for name, p in teacher.named_parameters() if p.requires_grad}
    num_items = sum(valid_count(data.next_token_batch(mb)[1]) for mb in window.micro_batches)
    total = 0.0
    for micro_batch in window.micro_batches:
        input_ids, labels = data.next_token_batch(micro_batch)
        student_logits = student(input_ids=input_ids).logits
        if distiller.cross is None:
            teacher_logits = teacher(input_ids=input_ids).logits
            kd = reference_kd(student_logits, teacher_logits, labels, options, num_items)
        else:
            aligned = distiller.cross.align(micro_batch)
            teacher_logits = teacher(input_ids=aligned.teacher_ids).logits
            kd = reference_cross_kd(student_logits, teacher_logits, aligned, labels, distiller.cross.vocab_map,
                                    options, num_items, mode=cfg.cross_tokenizer_loss)  # fmt: skip
        total = total + cfg.alpha_kd * kd
    return dict(zip(routers, torch.autograd.grad(total, list(routers.values()))))


CASES = {
    "unfused": dict(divergence="forward_kl"),
    "fused": dict(fused_kd=True, divergence="jsd", jsd_beta=BETA, temperature=2.0),
    "fused_topk": dict(fused_kd=True, kd_top_k=16, divergence="skew_reverse_kl", skew_alpha=ALPHA),
    "cross_unfused": dict(cross_tokenizer=True, divergence="reverse_kl", temperature=2.0),
    "cross_fused": dict(cross_tokenizer=True, fused_kd=True, divergence="skew_forward_kl", skew_alpha=ALPHA),
    "cross_uld": dict(cross_tokenizer=True, cross_tokenizer_loss="uld", temperature=2.0),
}


@pytest.mark.usefixtures("use_kit_cache")
@pytest.mark.parametrize("case", list(CASES))
def test_one_step_gives_the_routers_the_float64_kd_gradient_and_touches_nothing_else(tmp_path, request, case):
    changes = dict(CASES[case])
    if changes.get("cross_tokenizer"):
        changes["teacher_model"] = str(request.getfixturevalue("metaspace_teacher"))
    run = dict(batch_size=2, gradient_accumulation_steps=2, max_steps=2, warmup_steps=0, loss_chunk_size=13)
    sar = dict(sar=True, router_lr=1e-2, **NO_REGULARISERS)  # LR > 0 at step 0: the update moves the routers
    config = DistillConfig.from_dict({**TINY_RUN, "output_dir": str(tmp_path / "run"), **run, **sar, **changes})
    distiller = Distiller(config).setup()
    assert (distiller.cross is not None) == bool(changes.get("cross_tokenizer"))
    teacher = distiller.teacher
    window = next(distiller._windows(0))
    want = reference_router_grads(distiller, window)

    distiller._train_step(window, apply=False)  # the gradient only
    got = {name: p.grad for name, p in teacher.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and all(name.endswith("mlp.gate.weight") for name in got)
    for name in want:
        assert got[name] is not None, name
        assert_grad_close(got[name], want[name])
        assert float((got[name].double() - want[name]).norm() / want[name].norm()) < 1e-5, name

    distiller.optimizer.zero_grad(set_to_none=True)
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    distiller._train_step(window)  # a real update
    for name, p in teacher.named_parameters():
        assert torch.equal(p.detach(), before[name]) != (name in want), name  # routers moved, nothing else did


# ----- the router term is no share of the student's objective ------------------------------------------------


def test_router_term_keeps_weight_one_and_the_shares_cover_the_student_only(tmp_path):
    from kagglekd.objective import Objective

    alphas = dict(alpha_kd=0.5, alpha_ce=0.2, alpha_feature=0.2, alpha_attention=0.1)
    config = DistillConfig.from_dict({**TINY_RUN, "output_dir": str(tmp_path), "sar": True, "feature_layers": 1,
                                      "loss_balance": "normalized", **alphas})  # fmt: skip
    objective = Objective(config)
    sums = {"kd": 2.0, "ce": 4.0, "feature": 0.5, "attention": 0.25, "router": 3.0}
    objective.update_balance(sums)
    assert "router" not in objective.balance and objective.weight("router") == 1.0
    objective.balance["router"] = 10.0  # a balance saved before the router term left it is ignored
    assert objective.weight("router") == 1.0
    weighted = {name: objective.weight(name) * value for name, value in sums.items()}
    row = objective.columns({**sums, "loss": sum(weighted.values())})
    assert row["router"] == row["w_router"] == 3.0 and row["share_router"] != row["share_router"]  # NaN
    student = {name: row[f"share_{name}"] for name in ("kd", "ce", "feature", "attention")}
    assert sum(student.values()) == pytest.approx(1.0)
    # after one update every balanced component weighs alpha / |value|: the shares ARE the alphas
    assert student == pytest.approx({name.removeprefix("alpha_"): alpha for name, alpha in alphas.items()})


@pytest.mark.usefixtures("use_kit_cache")
def test_normalized_balance_under_sar_realises_the_alphas(tmp_path):
    alphas = {"kd": 0.5, "ce": 0.2, "feature": 0.2, "attention": 0.1}
    changes = dict(sar=True, feature_layers=1, attention_layers=1, loss_balance="normalized", max_steps=40,
                   batch_size=2, learning_rate=1e-3, **{f"alpha_{n}": a for n, a in alphas.items()})  # fmt: skip
    distiller = Distiller(DistillConfig.from_dict({**TINY_RUN, "output_dir": str(tmp_path / "run"), **changes}))
    distiller.train()
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    last = history.iloc[-10:].mean()
    for name, alpha in alphas.items():
        assert abs(last[f"share_{name}"] - alpha) <= 0.1 * alpha, (name, last[f"share_{name}"])
    assert history["share_router"].isna().all() and (history["w_router"] == history["router"]).all()
    # the loss column is the total backpropagated: the student's weighted components plus the router term
    student = history[[f"w_{name}" for name in alphas]].sum(axis=1)
    assert ((history["loss"] - student - history["w_router"]).abs() <= 1e-5 * history["loss"].abs()).all()
