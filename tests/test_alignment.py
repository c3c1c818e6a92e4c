"""Cross-tokenizer distillation: bytes, positions, vocabulary map, targets and losses.

Two BPE tokenizers trained on the same corpus with different vocab sizes and pre-tokenisation (byte-level
4096 vs SentencePiece-style 3000) are aligned on crafted strings; every aligned pair is checked against a
brute-force reading of both sides' bytes, and the KD of a permuted vocabulary against the identical case.
"""

import copy
import json
import math

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kagglekd import alignment
from kagglekd.config import KDOptions
from kagglekd.losses import TeacherTopK, kd_loss

CRAFTED = [
    "Café naïve résumé — déjà vu",
    "東京タワー and 北京 are cities",
    "emoji 🐍🚀 in text 👍🏽!",
    "\tindented\twith\ttabs\n\t\tdouble",
    "   leading spaces and  double  spaces",
    "x = 12345 + 67.89e-10",
    "def f(a, b):\n    return a ** 2  # comment\n",
]


def _block(tok, texts):
    """Documents joined by the eos separator, as packing does; returns an [L + 1] id list."""
    ids = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


def _prefix_ends(spellings):
    """Cumulative byte length after each token (specials spell nothing)."""
    out, total = [], 0
    for spelled in spellings:
        total += len(spelled or b"")
        out.append(total)
    return out


def _segments_read(spellings):
    """The text read so far, split at special tokens: a list of byte strings, one per segment."""
    segments = [b""]
    for spelled in spellings:
        if spelled is None:
            segments.append(b"")
        else:
            segments[-1] += spelled
    return segments


def _same_text(teacher_segments, student_segments):
    """Equal segment by segment, allowing only the one space a SentencePiece tokenizer prepends to a segment."""
    if len(teacher_segments) != len(student_segments):
        return False
    return all(t == s or (t == b" " + s and s[:1] != b" ") for t, s in zip(teacher_segments, student_segments))


def _check_against_brute_force(cross, block):
    """Every aligned student position has read exactly the text its teacher position has read, and it is the
    last teacher token to end there; returns (align_block result, aligned count)."""
    result = cross.align_block(block)
    teacher_ids = result["teacher_ids"]
    student_spelled = [cross.student_bytes[i] for i in block]
    teacher_spelled = [cross.teacher_bytes[i] for i in teacher_ids]
    if cross.teacher_bos is not None:
        teacher_spelled = teacher_spelled[1:]
        teacher_ids = teacher_ids[1:]
    aligned = 0
    for t in range(len(block) - 1):
        j = result["target"][t] - (1 if cross.teacher_bos is not None else 0)
        if student_spelled[t] is None:  # a separator: aligned to the teacher's token of the same role
            assert j < 0 or teacher_spelled[j] is None
            continue
        if j < 0:
            continue
        aligned += 1
        student_read = _segments_read(student_spelled[: t + 1])
        # bytes of a character cut at the block's start are text nobody can read: the teacher starts after them
        student_read[0] = student_read[0].lstrip(bytes(range(0x80, 0xC0)))
        assert _same_text(_segments_read(teacher_spelled[: j + 1]), student_read), t
        if j + 1 < len(teacher_spelled) and teacher_spelled[j + 1]:
            # the next teacher token spells text: the last token ending there was taken
            assert not _same_text(_segments_read(teacher_spelled[: j + 2]), student_read)
    return result, aligned


@pytest.mark.parametrize("direction", ["bytelevel-student", "metaspace-student"])
def test_crafted_strings_align_correctly(student_tok, metaspace_tok, direction):
    student, teacher = (
        (student_tok, metaspace_tok) if direction == "bytelevel-student" else (metaspace_tok, student_tok)
    )
    assert alignment.classify_vocab_pair(teacher, student) == "different"
    assert len(teacher) != len(student)
    cross = alignment.CrossTokenizer(teacher, student)
    for text in CRAFTED:
        block = _block(student, [text, "next document"])
        result, aligned = _check_against_brute_force(cross, block)
        assert aligned >= 0.4 * (len(block) - 1), (text, aligned, len(block))
        # the document separator aligns to the teacher's eos, which is where the next document starts
        eos_position = block.index(student.eos_token_id)
        j = result["target"][eos_position]
        assert j >= 0 and result["teacher_ids"][j] == teacher.eos_token_id


def test_separator_maps_to_the_teachers_eos_when_the_student_token_holds_every_role(student_tok, metaspace_tok):
    """SmolLM's one special token is bos, eos and unk; Qwen's tokenizer has an eos but no bos or unk. The
    document separator must still become the teacher's eos, not None (documents run together)."""
    student, teacher = copy.deepcopy(student_tok), copy.deepcopy(metaspace_tok)
    student.bos_token = student.unk_token = student.eos_token
    teacher.bos_token = teacher.unk_token = None
    assert alignment._special_ids(teacher).keys() == {"eos", "pad"}
    cross = alignment.CrossTokenizer(teacher, student)
    assert cross.special_map == {student.eos_token_id: teacher.eos_token_id}
    block = _block(student, ["first document", "next document"])
    result, _ = _check_against_brute_force(cross, block)
    j = result["target"][block.index(student.eos_token_id)]
    assert j >= 0 and result["teacher_ids"][j] == teacher.eos_token_id


def test_token_bytes_normalise_both_spellings(student_tok, metaspace_tok):
    for tok in (student_tok, metaspace_tok):
        spelled = alignment.token_bytes(tok)
        assert spelled[tok.eos_token_id] is None
        for text in CRAFTED:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            joined = b"".join(spelled[i] for i in ids)
            assert joined.endswith(text.encode("utf-8"))  # metaspace may prepend one space
            assert len(joined) - len(text.encode("utf-8")) in (0, 1)
    # "Ġthe" (byte-level) and "▁the" (SentencePiece) are the same bytes, so they map to each other
    vocab_map = alignment.build_vocab_map(metaspace_tok, student_tok)
    teacher_the = metaspace_tok.convert_tokens_to_ids("▁the")
    student_the = student_tok.convert_tokens_to_ids("Ġthe")
    slot = int(vocab_map.teacher_to_shared[teacher_the])
    assert int(vocab_map.shared[slot]) == student_the
    # byte-fallback tokens map to the student's single-byte tokens
    slot = int(vocab_map.teacher_to_shared[metaspace_tok.convert_tokens_to_ids("<0x41>")])
    assert student_tok.convert_ids_to_tokens(int(vocab_map.shared[slot])) == "A"


def test_identical_tokenizers_align_one_to_one(student_tok):
    cross = alignment.CrossTokenizer(student_tok, student_tok)
    block = _block(student_tok, CRAFTED[:3])
    result = cross.align_block(block)
    assert result["teacher_ids"] == block
    assert result["target"].tolist() == list(range(len(block) - 1))
    assert (result["span_hi"] - result["span_lo"] == 1).all()


def test_bos_asymmetry_shifts_teacher_positions(student_tok, tmp_path):
    from tokenizers import processors

    teacher, _ = _permuted_tokenizer(student_tok, tmp_path, seed=None)
    backend = teacher.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", teacher.eos_token_id)]
    )
    assert teacher("a")["input_ids"][0] == teacher.bos_token_id
    cross = alignment.CrossTokenizer(teacher, student_tok)
    assert cross.teacher_bos == teacher.bos_token_id
    block = _block(student_tok, ["hello world"])
    result = cross.align_block(block)
    assert result["teacher_ids"][0] == teacher.bos_token_id
    assert result["target"].tolist() == list(range(1, len(block)))  # every position, shifted by the BOS


def test_block_edges_cut_inside_characters_are_masked(student_tok, metaspace_tok):
    cross = alignment.CrossTokenizer(metaspace_tok, student_tok)
    ids = student_tok("東京 x 🐍 y", add_special_tokens=False)["input_ids"]
    spelled = [cross.student_bytes[i] for i in ids]
    cut = next(i for i, s in enumerate(spelled) if s and (s[0] & 0xC0) == 0x80)  # starts mid-character
    block = ids[cut:]
    result, _ = _check_against_brute_force(cross, block)
    assert result["target"][0] == -1  # its bytes are the tail of a character the teacher never saw


def test_unaligned_positions_are_exactly_those_inside_teacher_tokens(student_tok, metaspace_tok):
    # the SentencePiece-style student splits digits one by one, the byte-level teacher merges some
    cross = alignment.CrossTokenizer(student_tok, metaspace_tok)
    block = _block(metaspace_tok, ["values 1234567 and 89 or 2024"])
    result, aligned = _check_against_brute_force(cross, block)
    teacher_ends = set(_prefix_ends([cross.teacher_bytes[i] for i in result["teacher_ids"]]))
    student_spelled = [cross.student_bytes[i] for i in block]
    student_ends = _prefix_ends(student_spelled)
    for t in range(len(block) - 1):
        if student_spelled[t] is not None:
            assert (result["target"][t] >= 0) == (student_ends[t] in teacher_ends), t
    assert 0 < aligned < len(block) - 2  # some positions end inside a teacher token: masked and counted


# ---- vocabulary map and targets ----
def _permuted_tokenizer(tok, directory, seed=0):
    """The tokenizer with its non-special ids permuted (same merges, so the same segmentation)."""
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    specials = {t["content"] for t in state["added_tokens"]}
    movable = sorted((i for t, i in vocab.items() if t not in specials))
    order = movable[:]
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        order = [movable[i] for i in torch.randperm(len(movable), generator=generator).tolist()]
    mapping = dict(zip(movable, order))
    state["model"]["vocab"] = {t: mapping.get(i, i) for t, i in vocab.items()}
    from tokenizers import Tokenizer

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        unk_token=tok.unk_token,
        pad_token=tok.pad_token,
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(directory)
    permutation = torch.arange(len(tok))
    for old, new in mapping.items():
        permutation[old] = new
    return AutoTokenizer.from_pretrained(directory) if seed is not None else wrapped, permutation


def test_permuted_vocabulary_gives_exactly_the_identical_kd(student_tok, tmp_path):
    teacher_tok, permutation = _permuted_tokenizer(student_tok, tmp_path)
    assert alignment.classify_vocab_pair(teacher_tok, student_tok) == "different"
    text = " ".join(CRAFTED)
    assert teacher_tok(text)["input_ids"] == permutation[student_tok(text)["input_ids"]].tolist()
    cross = alignment.CrossTokenizer(teacher_tok, student_tok)
    assert cross.vocab_map.shared.numel() == len(student_tok)  # every token matched
    rows = [_block(student_tok, [CRAFTED[0], CRAFTED[4]]), _block(student_tok, [CRAFTED[5], CRAFTED[6]])]
    blocks = torch.tensor([row[:24] for row in rows])
    aligned = cross.align(blocks)
    assert (aligned.target == torch.arange(23)).all()
    generator = torch.Generator().manual_seed(0)
    vocab = len(student_tok)
    student = torch.randn(2, 23, vocab, generator=generator, dtype=torch.float64) * 3
    teacher_student_vocab = torch.randn(2, 23, vocab, generator=generator, dtype=torch.float64) * 3
    teacher = torch.empty_like(teacher_student_vocab)
    teacher[..., permutation] = teacher_student_vocab  # the teacher's logit for token x sits at its own id
    labels = blocks[:, 1:].clone()
    labels[0, -3:] = -100
    for divergence, temperature in (("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.0)):
        options = KDOptions(divergence=divergence, temperature=temperature)
        expected = kd_loss(student, teacher_student_vocab, labels, options)
        got, stats = alignment.cross_kd_loss(student, teacher, aligned, labels, cross.vocab_map, options)
        assert got.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
        assert stats.aligned == stats.positions == 43 and stats.mapped_mass_sum == pytest.approx(43)


def test_mapped_targets_golden_and_conservation():
    # teacher tokens 0..4; student shares three of them (teacher 1 and 3 both spell student 0)
    vocab_map = alignment.VocabMap(
        teacher_to_shared=torch.tensor([1, 0, -1, 0, 2]),
        shared=torch.tensor([0, 5, 7]),
        teacher_vocab=5,
        student_vocab=8,
    )
    p = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]], dtype=torch.float64)
    targets, mass = alignment.mapped_targets(p.log(), vocab_map)
    assert targets.indices.tolist() == [[0, 5, 7]]
    assert targets.logprobs.exp().tolist()[0] == pytest.approx([0.35, 0.1, 0.25])
    assert math.exp(targets.tail) == pytest.approx(0.3) and float(mass) == pytest.approx(0.7)
    top, _ = alignment.mapped_targets(p.log(), vocab_map, top_k=1)
    assert top.indices.tolist() == [[0]] and math.exp(top.tail) == pytest.approx(0.65)
    logits = torch.randn(6, 50, dtype=torch.float64)
    random_map = alignment.VocabMap(
        teacher_to_shared=torch.randint(-1, 20, (50,)), shared=torch.arange(20) * 2, teacher_vocab=50, student_vocab=40
    )
    for k in (None, 5):
        t, _ = alignment.mapped_targets(logits, random_map, temperature=1.7, top_k=k)
        total = t.logprobs.exp().sum(-1) + t.tail.exp()
        assert torch.allclose(total, torch.ones(6, dtype=total.dtype), atol=1e-6)


def test_uld_identities_and_golden_value():
    logits = torch.randn(4, 30, dtype=torch.float64)
    assert alignment.uld_per_position(logits, logits).abs().max() < 1e-7
    # permuting either vocabulary changes nothing: ULD compares sorted probabilities
    shuffled = logits[:, torch.randperm(30)]
    assert alignment.uld_per_position(logits, shuffled).abs().max() < 1e-7
    # golden: p = (0.5, 0.3, 0.2), q = (0.6, 0.4) padded -> |0.5-0.6| + |0.3-0.4| + |0.2-0| = 0.4
    p = torch.tensor([[0.2, 0.5, 0.3]]).log()
    q = torch.tensor([[0.4, 0.6]]).log()
    assert float(alignment.uld_per_position(q, p)) == pytest.approx(0.4, abs=1e-6)


def test_span_average_matches_a_loop():
    hidden = torch.randn(2, 7, 3)
    lo = torch.tensor([[0, 1, 1, 3, 0], [2, 2, 4, 6, 6]])
    hi = torch.tensor([[1, 3, 1, 7, 0], [4, 3, 6, 7, 6]])
    aligned = alignment.AlignedBatch(
        torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long), hi - 1, lo, hi
    )
    got, mask = alignment.span_average(hidden, aligned)
    for b in range(2):
        for t in range(5):
            if hi[b, t] > lo[b, t]:
                assert torch.allclose(got[b, t], hidden[b, lo[b, t] : hi[b, t]].mean(0), atol=1e-6)
                assert mask[b, t]
            else:
                assert not mask[b, t]


def test_cross_targets_and_top1_agreement():
    vocab_map = alignment.VocabMap(torch.tensor([2, -1, 0, 1]), torch.tensor([3, 0, 1]), 4, 5)
    aligned = alignment.AlignedBatch(
        torch.zeros(1, 3, dtype=torch.long),
        torch.zeros(1, 3, dtype=torch.long),
        torch.tensor([[1, -1, 2]]),
        torch.zeros(1, 3, dtype=torch.long),
        torch.zeros(1, 3, dtype=torch.long),
    )
    teacher = torch.full((1, 3, 4), -10.0)
    teacher[0, 1, 0] = 5.0  # position 0 reads teacher row 1: argmax teacher id 0 -> student 1
    teacher[0, 2, 1] = 5.0  # position 2 reads teacher row 2: argmax teacher id 1, which no student token spells
    student = torch.full((1, 3, 5), -10.0)
    student[0, 0, 1] = 5.0
    student[0, 2, 4] = 5.0
    labels = torch.tensor([[1, 2, 3]])
    targets, kd_labels, stats = alignment.cross_targets(teacher, aligned, labels, vocab_map)
    assert kd_labels.tolist() == [[1, -100, 3]] and (stats.positions, stats.aligned) == (3, 2)
    assert alignment.top1_agreement(student, teacher, aligned, labels, vocab_map) == (1, 2)
    loss, _ = alignment.cross_kd_loss(student, teacher, aligned, labels, vocab_map)
    assert torch.isfinite(loss)


def test_kd_uses_teacher_topk_tail_when_nothing_is_outside():
    # with every teacher token mapped the tail is empty; kd_loss must stay finite and equal the full KL
    student = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 6, dtype=torch.float64)
    vocab_map = alignment.VocabMap(torch.arange(6), torch.arange(6), 6, 6)
    targets, _ = alignment.mapped_targets(teacher, vocab_map)
    labels = torch.zeros(3, dtype=torch.long)
    got = kd_loss(student, TeacherTopK(*targets), labels)
    expected = kd_loss(student, teacher, labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)
    got.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_alignment_stats_count_and_mass_without_targets(temperature):
    # teacher id 1 has no student spelling; positions 0 and 2 read teacher rows 1 and 2, position 1 none
    vocab_map = alignment.VocabMap(torch.tensor([2, -1, 0, 1]), torch.tensor([3, 0, 1]), 4, 5)
    aligned = alignment.AlignedBatch(*(torch.zeros(1, 3, dtype=torch.long),) * 2, torch.tensor([[1, -1, 2]]),
                                     *(torch.zeros(1, 3, dtype=torch.long),) * 2)  # fmt: skip
    teacher = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    labels = torch.tensor([[1, 2, -100]])  # position 2 has no target: not counted, aligned or not
    stats = alignment.alignment_stats(teacher, aligned, labels, vocab_map, temperature, chunk_size=1)
    unmapped = torch.softmax(teacher[0, 1] / temperature, -1)[1]  # the only aligned valid row's id-1 share
    assert (stats.positions, stats.aligned) == (2, 1)
    assert stats.mapped_mass_sum == pytest.approx(float(1 - unmapped), rel=1e-12)
    # the same figures as the targets' own count (cross_targets), over every valid row
    labels = torch.tensor([[1, 2, 3]])
    options = KDOptions(temperature=temperature)
    reference = alignment.cross_targets(teacher, aligned, labels, vocab_map, options)[2]
    got = alignment.alignment_stats(teacher, aligned, labels, vocab_map, temperature, chunk_size=1)
    assert (got.positions, got.aligned) == (reference.positions, reference.aligned) == (3, 2)
    assert got.mapped_mass_sum == pytest.approx(reference.mapped_mass_sum, rel=1e-12)
