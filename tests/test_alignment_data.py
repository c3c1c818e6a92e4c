"""Alignment in the data pipeline: precomputed tables, the teacher's context position, normalisers.

The table's rows equal an on-the-spot alignment and a second build reads the cache; every context position is
checked against a brute-force reading of both sides' bytes; a teacher with an NFC normaliser aligns a decomposed
accent like its composed twin except inside the characters NFC changed (an oracle from ``unicodedata``).
"""

import copy
import dataclasses
import unicodedata

import numpy as np
import pytest
import torch
from test_alignment import CRAFTED, _block, _check_against_brute_force, _permuted_tokenizer, _segments_read
from tokenizers import normalizers

from kagglekd import alignment, alignment_data
from kagglekd.config import KDOptions
from kagglekd.losses import kd_loss
from kagglekd.teacher import take_rows


def _blocks(tok, texts, length=48):
    """Packed ``[N, length + 1]`` blocks of the texts (eos-separated), the remainder dropped."""
    ids = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    usable = len(ids) - len(ids) % (length + 1)
    return torch.tensor(ids[:usable]).reshape(-1, length + 1)


def _same_batch(a: alignment.AlignedBatch, b: alignment.AlignedBatch) -> None:
    for name in a.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_precomputed_table_equals_aligning_on_the_spot_and_is_cached(student_tok, metaspace_tok, tmp_path):
    blocks = _blocks(student_tok, CRAFTED * 3)
    assert len(blocks) >= 6
    fresh = alignment.CrossTokenizer(metaspace_tok, student_tok)
    expected = fresh.align(blocks)
    cross = alignment.CrossTokenizer(metaspace_tok, student_tok)
    table = alignment.precompute_alignment(cross, blocks[:-1], cache_dir=tmp_path)
    assert len(table) == len(blocks) - 1 and len(list(tmp_path.glob("alignment-*.arrow"))) == 1
    cross.attach(table)
    head = fresh.align(blocks[:-1])
    _same_batch(cross.align(blocks[:-1]), head)  # every block looked up
    _same_batch(cross.align(blocks), expected)  # the last block is not in the table: aligned on the spot
    shuffled = blocks[[3, 0, 5, 1]]
    _same_batch(cross.align(shuffled), fresh.align(shuffled))
    # a second build with the same tokenizers and blocks reads the cache: no block is aligned again
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alignment_data.CrossTokenizer, "align_block", lambda *_: pytest.fail("aligned again"))
        again = alignment.precompute_alignment(cross, blocks[:-1], cache_dir=tmp_path)
        cross.attach(again)
        _same_batch(cross.align(blocks[:-1]), head)
    # worker processes give the same table
    parallel = alignment.precompute_alignment(cross, blocks[:-1], cache_dir=tmp_path / "two", num_proc=2)
    cross.attach(parallel)
    _same_batch(cross.align(blocks[:-1]), head)


def _context_reads_a_prefix(cross, block, result):
    """Brute force: the teacher at ``context[t]`` has read a prefix of what student position t has read, the
    next teacher position has read more (or is not text the student reads), and ``context == target`` where
    the target is set."""
    student = [cross.student_bytes[i] for i in block]
    teacher = [cross.teacher_bytes[i] for i in result["teacher_ids"]]
    bos = 1 if cross.teacher_bos is not None else 0

    def starts(student_segment, teacher_segment):  # allowing the space a SentencePiece teacher prepends
        spaced = teacher_segment[:1] == b" " and student_segment[:1] != b" "
        return student_segment.startswith(teacher_segment[1:] if spaced else teacher_segment)

    def is_prefix(teacher_read, student_read):
        if len(teacher_read) > len(student_read):
            return False
        *done, last = teacher_read
        whole = all(starts(s, t) and len(t) - len(s) in (0, 1) for t, s in zip(done, student_read))
        return whole and starts(student_read[len(done)], last)

    covered = 0
    for t in range(len(block) - 1):
        c = result["context"][t]
        if result["target"][t] >= 0:
            assert c == result["target"][t], t
        if c < 0:
            continue
        covered += 1
        student_read = _segments_read(student[: t + 1])
        student_read[0] = student_read[0].lstrip(bytes(range(0x80, 0xC0)))
        assert is_prefix(_segments_read(teacher[bos : c + 1]), student_read), t
        if c + 1 < len(teacher):
            assert not is_prefix(_segments_read(teacher[bos : c + 2]), student_read), t
    return covered


@pytest.mark.parametrize("direction", ["bytelevel-student", "metaspace-student"])
def test_context_is_the_last_teacher_position_that_has_not_read_ahead(student_tok, metaspace_tok, direction):
    student, teacher = (
        (student_tok, metaspace_tok) if direction == "bytelevel-student" else (metaspace_tok, student_tok)
    )
    cross = alignment.CrossTokenizer(teacher, student)
    for text in CRAFTED:
        block = _block(student, [text, "next document"])
        result, aligned = _check_against_brute_force(cross, block)
        covered = _context_reads_a_prefix(cross, block, result)
        # every position but those before the teacher's first token ends has a teacher signal
        assert covered >= len(block) - 1 - 2 and covered > aligned, (text, covered, aligned)


def _nfc_teacher(tok):
    teacher = copy.deepcopy(tok)
    existing = teacher.backend_tokenizer.normalizer
    nfc = normalizers.NFC()
    teacher.backend_tokenizer.normalizer = normalizers.Sequence([nfc, existing]) if existing else nfc
    return teacher


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _nfc_oracle(cross, block, result):
    """Per student position of the first segment: whether it must be aligned, and to which teacher position.

    Position t (student bytes ``prefix``) can be aligned when NFC(prefix) is a prefix of NFC(segment) -- the
    end does not cut a character NFC composes (a character cut by a byte-level token stays as bytes) -- and a
    teacher token ends exactly at NFC(prefix)'s length; it is then the last such teacher token."""
    student = [cross.student_bytes[i] for i in block]
    first_special = student.index(None)
    segment = b"".join(student[:first_special]).decode("utf-8")
    normal = unicodedata.normalize("NFC", segment).encode("utf-8")
    bos = 1 if cross.teacher_bos is not None else 0
    ends, total = [], 0
    teacher_ids = result["teacher_ids"]
    for j in range(bos, len(teacher_ids)):
        spelled = cross.teacher_bytes[teacher_ids[j]]
        if spelled is None:
            break
        total += len(spelled)
        ends.append((total, j))
    extra = total - len(normal)  # a prepended space (SentencePiece style)
    expected, read, cut = {}, b"", 0
    for t in range(first_special):
        read += student[t]
        # byte-level tokens split characters: NFC of the whole characters read, then the bytes of a split one
        whole = next(k for k in range(len(read), len(read) - 4, -1) if _decodes(read[:k]))
        prefix = unicodedata.normalize("NFC", read[:whole].decode("utf-8")).encode("utf-8") + read[whole:]
        matches = [j for end, j in ends if end - extra == len(prefix)] if normal.startswith(prefix) else []
        expected[t] = matches[-1] if matches else -1
        cut += not normal.startswith(prefix)
    return expected, cut


@pytest.mark.parametrize("teacher_kind", ["metaspace", "bytelevel"])
def test_a_normaliser_only_unaligns_the_characters_it_changed(student_tok, metaspace_tok, teacher_kind, tmp_path):
    composed = "Café naïve résumé: déjà vu, señor Müller's ångström."
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed and unicodedata.normalize("NFC", decomposed) == composed
    # bytelevel: the student's own tokenizer with its ids permuted (a "different" vocabulary, same spelling)
    other = metaspace_tok if teacher_kind == "metaspace" else _permuted_tokenizer(student_tok, tmp_path)[0]
    teacher = _nfc_teacher(other)
    cross = alignment.CrossTokenizer(teacher, student_tok)
    counts = {}
    for name, text in (("composed", composed), ("decomposed", decomposed)):
        block = _block(student_tok, [text, "next document"])
        result = cross.align_block(block)
        oracle, cut = _nfc_oracle(cross, block, result)
        assert {t: int(result["target"][t]) for t in oracle} == oracle, name
        counts[name] = (sum(j < 0 for j in oracle.values()), cut, len(oracle))
    # the composed twin has nothing to cut; the decomposed sentence loses the positions inside the characters
    # NFC changed, and at most a couple more where its own tokens split differently (before: every position)
    (unaligned_c, cut_c, _), (unaligned_d, cut_d, positions_d) = counts["composed"], counts["decomposed"]
    assert cut_c == 0 and 0 < cut_d < positions_d / 2 and unaligned_d <= unaligned_c + cut_d + 2, counts


def test_rewritten_ends_maps_edges_of_changes_and_drops_their_insides():
    text = unicodedata.normalize("NFD", "aé b").encode("utf-8")  # a, e, U+0301, space, b
    spelled = "aé b".encode()  # a, é (2 bytes), space, b
    ends = np.array([1, 2, 3, 4, 5])
    # 1: after a; 2: inside é (changed) -> -1; 3: after é -> after U+0301 (byte 4); 4, 5: shifted by one
    assert alignment_data.rewritten_ends(text, spelled, ends).tolist() == [1, -1, 4, 5, 6]


def _real_batch(student_tok, metaspace_tok, dtype=torch.float64):
    """A SentencePiece-style teacher on byte-level student blocks, random float64 logits of both sides."""
    cross = alignment.CrossTokenizer(metaspace_tok, student_tok)
    blocks = _blocks(student_tok, CRAFTED, length=40)[:3]
    aligned = cross.align(blocks)
    labels = blocks[:, 1:].clone()
    labels[0, 5] = -100  # an ignored position
    generator = torch.Generator().manual_seed(0)
    student = torch.randn((*labels.shape, len(student_tok)), generator=generator, dtype=dtype) * 2
    teacher = torch.randn((*aligned.teacher_ids.shape, len(metaspace_tok)), generator=generator, dtype=dtype) * 2
    return cross, aligned, labels, student.requires_grad_(), teacher


def _with_extras_and_missing(vocab_map, teacher):
    """The map with two unmapped teacher ids added to shared slots 0 and 1 (slots spelled by several teacher
    ids) and the teacher's logits cut before the last mapped id (a slot with no teacher id within the width)."""
    to_shared = vocab_map.teacher_to_shared.clone()
    unmapped = (to_shared < 0).nonzero().squeeze(-1)
    to_shared[unmapped[:2]] = torch.tensor([0, 1])
    mapped = (to_shared >= 0).nonzero().squeeze(-1)
    width = int(mapped[-1])  # the last mapped teacher id falls outside the logits
    assert int((to_shared == to_shared[mapped[-1]]).sum()) == 1
    changed = alignment.VocabMap(to_shared, vocab_map.shared, vocab_map.teacher_vocab, vocab_map.student_vocab)
    return changed, teacher[..., :width].detach().clone()


@pytest.mark.parametrize("variant", ["plain", "extras-and-missing"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_forward_kl_equals_the_tail_bucket_loss(student_tok, metaspace_tok, temperature, variant):
    cross, aligned, labels, student, teacher = _real_batch(student_tok, metaspace_tok)
    if variant != "plain":
        vocab_map, teacher = _with_extras_and_missing(cross.vocab_map, teacher)
        primary, missing, extras, _ = vocab_map.gather_plan(teacher.shape[-1], teacher.device)
        assert extras and missing is not None and int(missing.sum()) == 1
        cross.vocab_map = vocab_map
    options = KDOptions(temperature=temperature)
    assert alignment._dense_applies(student, teacher, cross.vocab_map, options)
    dense, stats = alignment.cross_kd_loss(student, teacher, aligned, labels, cross.vocab_map, options)
    (grad_dense,) = torch.autograd.grad(dense, student)
    # the reference: kd_loss over (shared tokens + tail) buckets, the path top-k and other divergences take
    targets, kd_labels, bucket_stats = alignment.cross_targets(teacher, aligned, labels, cross.vocab_map, options)
    valid = int((labels != -100).sum())
    buckets = kd_loss(student, targets, kd_labels, options.replace(top_k=None), num_items=valid)
    (grad_buckets,) = torch.autograd.grad(buckets, student)
    assert stats.aligned == bucket_stats.aligned > 0 and stats.mapped_mass_sum == pytest.approx(
        bucket_stats.mapped_mass_sum
    )
    assert float(dense) == pytest.approx(float(buckets), rel=1e-12)
    assert torch.allclose(grad_dense, grad_buckets, rtol=0, atol=1e-15)


def test_hybrid_adds_uld_against_the_context_position(student_tok, metaspace_tok):
    cross, aligned, labels, student, teacher = _real_batch(student_tok, metaspace_tok)
    options = KDOptions(temperature=2.0)
    valid = int((labels != -100).sum())
    hybrid, stats = alignment.cross_kd_loss(
        student, teacher, aligned, labels, cross.vocab_map, options, mode="hybrid", num_items=valid
    )
    exact, exact_stats = alignment.cross_kd_loss(
        student, teacher, aligned, labels, cross.vocab_map, options, num_items=valid
    )
    # independent reference: loop over positions, sorted probability vectors, L1, T^2
    uld, context_positions = torch.zeros((), dtype=torch.float64), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            c = int(aligned.context[b, t])
            if labels[b, t] == -100 or aligned.target[b, t] >= 0 or c < 0:
                continue
            context_positions += 1
            q = torch.softmax(student[b, t] / 2.0, -1).sort(descending=True).values
            p = torch.softmax(teacher[b, c] / 2.0, -1).sort(descending=True).values
            width = max(len(p), len(q))
            uld = (
                uld
                + (torch.nn.functional.pad(p, (0, width - len(p))) - torch.nn.functional.pad(q, (0, width - len(q))))
                .abs()
                .sum()
            )
    assert context_positions > 0 and stats.context == context_positions and stats.aligned == exact_stats.aligned
    assert float(hybrid) == pytest.approx(float(exact) + 4.0 * float(uld) / valid, rel=1e-10)
    report = stats.to_dict()
    assert report["covered_fraction"] == (stats.aligned + context_positions) / valid > report["aligned_fraction"]


@pytest.mark.parametrize("mode", ["exact", "hybrid", "uld"])
def test_teacher_rows_at_student_positions_give_the_same_losses(student_tok, metaspace_tok, mode):
    """The teacher's rows taken at the student's positions (``at_student_positions``, what a live teacher now
    hands the losses) give every cross loss, its gradient and the step's statistics exactly as the teacher's own
    positions do."""
    cross, aligned, labels, student, teacher = _real_batch(student_tok, metaspace_tok)
    target, context = aligned.target.clone(), aligned.context.clone()
    target[1, 3] = context[1, 3] = -1  # a position with no teacher signal at all
    aligned = dataclasses.replace(aligned, target=target, context=context)
    rows, moved = aligned.at_student_positions()
    here = torch.arange(labels.shape[1]).expand_as(labels)
    exact, context = aligned.target >= 0, (aligned.target < 0) & (aligned.context >= 0)
    assert exact.any() and context.any() and (~exact & ~context).any()
    # each student position reads its exact target, else its context row, at its own index
    assert torch.equal(rows[exact], aligned.target[exact]) and torch.equal(rows[context], aligned.context[context])
    assert torch.equal(moved.target, torch.where(exact, here, -1))
    assert torch.equal(moved.context, torch.where(aligned.context >= 0, here, -1))
    at_positions = take_rows(teacher, rows)
    assert at_positions.shape == (*labels.shape, teacher.shape[-1])
    options = KDOptions(temperature=2.0)
    results = []
    for logits, batch in ((teacher, aligned), (at_positions, moved)):
        loss, stats = alignment.cross_kd_loss(student, logits, batch, labels, cross.vocab_map, options, mode=mode)
        (grad,) = torch.autograd.grad(loss, student)
        seen = alignment.alignment_stats(logits, batch, labels, cross.vocab_map, options.temperature)
        agreement = alignment.top1_agreement(student, logits, batch, labels, cross.vocab_map)
        results.append((float(loss), grad, stats.to_dict(), seen.to_dict(), agreement))
    (loss_a, grad_a, stats_a, seen_a, agree_a), (loss_b, grad_b, stats_b, seen_b, agree_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-12) and torch.allclose(grad_b, grad_a, rtol=0, atol=1e-15)
    assert stats_b == pytest.approx(stats_a, rel=1e-12) and seen_b == pytest.approx(seen_a, rel=1e-12)
    assert agree_b == agree_a and agree_a[1] > 0
