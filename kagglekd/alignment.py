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

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kagglekd.config import KDOptions
from kagglekd.errors import ConfigError
from kagglekd.losses import DEFAULT_KD, IGNORE_INDEX, TeacherTopK, _upcast, kd_loss

log = logging.getLogger(__name__)

VocabRelation = Literal["identical", "padded", "different"]

# Stands in for log(0): exp() of it is exactly 0 in float32, and unlike -inf it never makes nan.
_LOG_ZERO = -1e30
# Roles whose special tokens correspond across tokenizers.
_SPECIAL_ROLES = ("eos", "bos", "pad", "unk")


def classify_vocab_pair(teacher_tokenizer, student_tokenizer) -> VocabRelation:
    """``identical``: same token -> id map. ``padded``: one map is the other plus tokens with higher ids
    (added specials, unused rows), so ids below the smaller size mean the same token. ``different``:
    anything else -- logit KD needs an alignment, not a slice.
    """
    teacher = teacher_tokenizer.get_vocab()
    student = student_tokenizer.get_vocab()
    if teacher == student:
        return "identical"
    small, large = (teacher, student) if len(teacher) <= len(student) else (student, teacher)
    if all(large.get(token) == index for token, index in small.items()):
        if min(index for token, index in large.items() if token not in small) >= len(small):
            return "padded"
    return "different"


# ---------------------------------------------------------------------------------------------------------
# Token -> bytes
# ---------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shift)
            shift += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _component_types(node) -> set[str]:
    """Every ``type`` named in a tokenizers JSON component (a decoder, pre-tokenizer, ...), nested too."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        for value in node.values():
            found |= _component_types(value)
        return found
    if isinstance(node, list):
        return set().union(*(_component_types(item) for item in node)) if node else set()
    return set()


def _spelling(tokenizer) -> str:
    """How the tokenizer writes bytes into token strings: ``byte-level`` or ``metaspace``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"cross_tokenizer needs fast (Rust) tokenizers; {type(tokenizer).__name__} is a slow one. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True) or point the config at a tokenizer.json.",
            field="cross_tokenizer",
        )
    state = json.loads(backend.to_str())
    types = _component_types(state.get("decoder")) | _component_types(state.get("pre_tokenizer"))
    if "ByteLevel" in types:
        return "byte-level"
    if "Metaspace" in types or "▁" in json.dumps(state.get("decoder")):
        return "metaspace"
    raise ConfigError(
        f"cross_tokenizer does not know how {getattr(tokenizer, 'name_or_path', 'this tokenizer')} spells bytes "
        f"(decoder/pre-tokenizer types {sorted(types)}); supported are byte-level BPE (GPT-2, Llama 3, Qwen, "
        "SmolLM) and SentencePiece-style tokenizers (Llama 2, Mistral, Gemma).",
        field="cross_tokenizer",
    )


def token_bytes(tokenizer) -> list[bytes | None]:
    """The UTF-8 bytes each token id stands for; ``None`` for special tokens (they spell no text).

    Byte-level strings are mapped back through GPT-2's byte alphabet; SentencePiece strings turn ``▁`` into
    a space and ``<0xNN>`` into the byte NN. Added non-special tokens spell their content literally.
    """
    spelling = _spelling(tokenizer)
    alphabet = _byte_level_alphabet()
    added = tokenizer.added_tokens_decoder
    special_ids = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    out: list[bytes | None] = []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if index in special_ids or token is None:
            out.append(None)
        elif index in added:
            out.append(added[index].content.encode("utf-8"))
        elif spelling == "byte-level":
            try:
                out.append(bytes(alphabet[ch] for ch in token))
            except KeyError:  # a string outside the byte alphabet: spelled literally
                out.append(token.encode("utf-8"))
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out.append(bytes([int(token[3:5], 16)]))
        else:
            out.append(token.replace("▁", " ").encode("utf-8"))
    return out


def _special_ids(tokenizer) -> dict[str, int]:
    """role -> id for the roles the tokenizer defines (eos, bos, pad, unk)."""
    return {
        role: getattr(tokenizer, f"{role}_token_id")
        for role in _SPECIAL_ROLES
        if getattr(tokenizer, f"{role}_token_id", None) is not None
    }


# ---------------------------------------------------------------------------------------------------------
# Vocabulary map
# ---------------------------------------------------------------------------------------------------------


@dataclass
class VocabMap:
    """Teacher ids -> student ids through exact byte-string matches.

    ``teacher_to_shared`` ``[V_teacher]`` int64: index into ``shared`` of the student token spelling the same
    bytes (or of the same special role), -1 where the student has no such token. ``shared`` ``[S]`` int64:
    the student ids that receive teacher probability, ascending. Several teacher ids may share one student
    id (a teacher with both a merged token and its byte-fallback spelling); their probabilities add up.
    """

    teacher_to_shared: Tensor
    shared: Tensor
    teacher_vocab: int
    student_vocab: int

    @property
    def shared_fraction(self) -> float:
        """Fraction of the student vocabulary with a teacher counterpart."""
        return self.shared.numel() / max(self.student_vocab, 1)

    def to(self, device) -> VocabMap:
        return VocabMap(
            self.teacher_to_shared.to(device), self.shared.to(device), self.teacher_vocab, self.student_vocab
        )


def build_vocab_map(teacher_tokenizer, student_tokenizer, teacher_vocab: int | None = None) -> VocabMap:
    """The exact-match map between two tokenizers. ``teacher_vocab`` is the width of the teacher's logits
    (embedding rows beyond the tokenizer's length map nowhere)."""
    return _map_spellings(
        teacher_tokenizer,
        student_tokenizer,
        token_bytes(teacher_tokenizer),
        token_bytes(student_tokenizer),
        teacher_vocab,
    )


def _map_spellings(teacher_tokenizer, student_tokenizer, teacher_bytes, student_bytes, teacher_vocab) -> VocabMap:
    """``build_vocab_map`` from both sides' ``token_bytes``."""
    # Byte-fallback tokens (<0xNN>) are looked up last, so the plain token for a byte wins.
    order = sorted(
        range(len(student_bytes)), key=lambda i: student_tokenizer.convert_ids_to_tokens(i).startswith("<0x")
    )
    lookup: dict[bytes, int] = {}
    for index in order:
        spelled = student_bytes[index]
        if spelled is not None and spelled not in lookup:
            lookup[spelled] = index
    student_special = _special_ids(student_tokenizer)
    teacher_width = max(teacher_vocab or 0, len(teacher_bytes))
    to_student = np.full(teacher_width, -1, dtype=np.int64)
    for index, spelled in enumerate(teacher_bytes):
        if spelled is not None:
            to_student[index] = lookup.get(spelled, -1)
    for role, index in _special_ids(teacher_tokenizer).items():
        if role in student_special and teacher_bytes[index] is None:
            to_student[index] = student_special[role]
    shared = np.unique(to_student[to_student >= 0])
    position = np.full(len(student_bytes) + 1, -1, dtype=np.int64)
    position[shared] = np.arange(len(shared))
    to_shared = np.where(to_student >= 0, position[to_student], -1)
    return VocabMap(
        teacher_to_shared=torch.from_numpy(to_shared),
        shared=torch.from_numpy(shared),
        teacher_vocab=teacher_width,
        student_vocab=len(student_bytes),
    )


# ---------------------------------------------------------------------------------------------------------
# Position alignment
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AlignedBatch:
    """What the teacher reads for a batch of student blocks, and how its positions map back.

    ``teacher_ids`` ``[B, T_teacher]`` int64, right-padded with the teacher's pad id (padding sits after every
    real position, so a causal teacher needs no attention mask). ``teacher_labels`` ``[B, T_teacher]``: the
    next teacher token, -100 on padding. ``target`` ``[B, T]``: the teacher position whose prediction is
    aligned to student position t, -1 where none is. ``span_lo`` / ``span_hi`` ``[B, T]``: the teacher
    positions ``[lo, hi)`` averaged for t's feature target (``lo == hi``: none).
    """

    teacher_ids: Tensor
    teacher_labels: Tensor
    target: Tensor
    span_lo: Tensor
    span_hi: Tensor

    def to(self, device) -> AlignedBatch:
        return AlignedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def aligned(self) -> Tensor:
        """``[B, T]`` bool: student positions with an aligned teacher prediction."""
        return self.target >= 0


def _trim_to_utf8(raw: bytes) -> tuple[int, int]:
    """(start, end) of the longest valid UTF-8 run after dropping a character cut at either edge."""
    start = 0
    while start < len(raw) and start < 3 and (raw[start] & 0xC0) == 0x80:
        start += 1
    end = len(raw)
    for cut in range(0, min(4, end - start) + 1):
        try:
            raw[start : end - cut].decode("utf-8")
            return start, end - cut
        except UnicodeDecodeError:
            continue
    return start, start


class CrossTokenizer:
    """Aligns student token blocks to the teacher's tokenisation of the same text.

    ``align(blocks)`` takes ``[B, L + 1]`` student blocks (the trainer's packed blocks: inputs and the label
    token) and returns an ``AlignedBatch`` for the ``L`` input positions.
    """

    def __init__(self, teacher_tokenizer, student_tokenizer, teacher_vocab: int | None = None):
        self.teacher_tokenizer = teacher_tokenizer
        self.student_bytes = token_bytes(student_tokenizer)
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.vocab_map = _map_spellings(
            teacher_tokenizer, student_tokenizer, self.teacher_bytes, self.student_bytes, teacher_vocab
        )
        teacher_special = _special_ids(teacher_tokenizer)
        # student special id -> teacher id of its first role (eos, bos, pad, unk) the teacher also has: one
        # student token often holds several roles (SmolLM: bos = eos = unk), the teacher fewer (Qwen: no bos/unk)
        self.special_map: dict[int, int | None] = {}
        for role, index in _special_ids(student_tokenizer).items():
            if self.special_map.get(index) is None:
                self.special_map[index] = teacher_special.get(role)
        self.teacher_pad = teacher_tokenizer.pad_token_id
        if self.teacher_pad is None:
            self.teacher_pad = teacher_tokenizer.eos_token_id if teacher_tokenizer.eos_token_id is not None else 0
        with_special = teacher_tokenizer("a", add_special_tokens=True)["input_ids"]
        without = teacher_tokenizer("a", add_special_tokens=False)["input_ids"]
        bos = teacher_tokenizer.bos_token_id
        self.teacher_bos = bos if bos is not None and with_special[:1] == [bos] and without[:1] != [bos] else None

    # ---- one block ----
    def _segments(self, ids: list[int]):
        """Student tokens -> byte starts and ends, the runs of text between specials, and which segment
        each special token is: ``(starts, ends, segments, special_segment)``; a segment is ``(bytes, offset)``
        for text or the special's student id."""
        starts = np.zeros(len(ids), dtype=np.int64)
        ends = np.zeros(len(ids), dtype=np.int64)
        segments: list[tuple[bytes, int] | int] = []
        special_segment: dict[int, int] = {}
        position, run_start, run = 0, 0, []
        for t, token in enumerate(ids):
            spelled = self.student_bytes[token] if token < len(self.student_bytes) else None
            starts[t] = position
            if spelled is None:
                if run:
                    segments.append((b"".join(run), run_start))
                    run = []
                special_segment[t] = len(segments)
                segments.append(token)
            else:
                if not run:
                    run_start = position
                run.append(spelled)
                position += len(spelled)
            ends[t] = position
        if run:
            segments.append((b"".join(run), run_start))
        return starts, ends, segments, special_segment

    def _teacher_side(self, segments):
        """Teacher ids, with the positions of its text tokens and their byte ends, and for each special
        segment the teacher position standing for it (None when the teacher has no token of that role)."""
        ids: list[int] = [self.teacher_bos] if self.teacher_bos is not None else []
        text_positions: list[int] = []
        text_ends: list[int] = []
        special_at: dict[int, int | None] = {}
        texts: dict[int, tuple[bytes, int]] = {}
        for number, segment in enumerate(segments):
            if isinstance(segment, tuple):
                raw, offset = segment
                start, end = _trim_to_utf8(raw)
                texts[number] = (raw[start:end], offset + start)
        encoded = (
            self.teacher_tokenizer([t.decode("utf-8") for t, _ in texts.values()], add_special_tokens=False)[
                "input_ids"
            ]
            if texts
            else []
        )
        encoded_by_segment = dict(zip(texts, encoded))
        for number, segment in enumerate(segments):
            if isinstance(segment, int):
                teacher_special = self.special_map.get(segment)
                special_at[number] = len(ids) if teacher_special is not None else None
                if teacher_special is not None:
                    ids.append(teacher_special)
                continue
            text, offset = texts[number]
            tokens = encoded_by_segment[number]
            spelled = b"".join(self.teacher_bytes[i] or b"" for i in tokens)
            # SentencePiece-style tokenizers prepend a space to the first word; it spells no text of ours.
            extra = len(spelled) - len(text)
            if extra < 0 or spelled[extra:] != text or not spelled[:extra].isspace() and extra:
                # The teacher's tokenizer rewrote the text (a normaliser): its tokens are read but not aligned.
                ids.extend(tokens)
                continue
            cursor = offset - extra
            for token in tokens:
                cursor += len(self.teacher_bytes[token] or b"")
                if cursor > offset:  # a token spelling only the prepended space has read none of our text
                    text_positions.append(len(ids))
                    text_ends.append(cursor)
                ids.append(token)
        return ids, np.asarray(text_positions, dtype=np.int64), np.asarray(text_ends, dtype=np.int64), special_at

    def align_block(self, block: list[int]) -> dict:
        """One ``[L + 1]`` block -> teacher ids, and per input position its target and span (numpy)."""
        starts, ends, segments, special_segment = self._segments(block)
        ids, positions, text_ends, special_at = self._teacher_side(segments)
        inputs = len(block) - 1
        target = np.full(inputs, -1, dtype=np.int64)
        span_lo = np.zeros(inputs, dtype=np.int64)
        span_hi = np.zeros(inputs, dtype=np.int64)
        # teacher text tokens ending in (start, end] of a student token: the span; the last must end at end
        hi = np.searchsorted(text_ends, ends[:inputs], side="right")
        lo = np.searchsorted(text_ends, starts[:inputs], side="right")
        for t in range(inputs):
            if t in special_segment:
                j = special_at[special_segment[t]]
                if j is not None:
                    target[t], span_lo[t], span_hi[t] = j, j, j + 1
                continue
            h = hi[t]
            if h > lo[t]:
                span_lo[t], span_hi[t] = positions[lo[t]], positions[h - 1] + 1
                if text_ends[h - 1] == ends[t]:
                    target[t] = positions[h - 1]
            # A label the teacher cannot predict (a special it has no token for) leaves the position unaligned.
            if t + 1 in special_segment and special_at[special_segment[t + 1]] is None:
                target[t] = -1
        return {"teacher_ids": ids, "target": target, "span_lo": span_lo, "span_hi": span_hi}

    def align(self, blocks: Tensor) -> AlignedBatch:
        """``[B, L + 1]`` student blocks -> an ``AlignedBatch`` (CPU tensors)."""
        rows = [self.align_block(block) for block in blocks.tolist()]
        width = max(1, max(len(r["teacher_ids"]) for r in rows))
        teacher_ids = torch.full((len(rows), width), self.teacher_pad, dtype=torch.long)
        teacher_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for b, r in enumerate(rows):
            ids = torch.tensor(r["teacher_ids"], dtype=torch.long)
            teacher_ids[b, : len(ids)] = ids
            teacher_labels[b, : max(len(ids) - 1, 0)] = ids[1:]
        stack = lambda key: torch.from_numpy(np.stack([r[key] for r in rows]))  # noqa: E731
        return AlignedBatch(teacher_ids, teacher_labels, stack("target"), stack("span_lo"), stack("span_hi"))


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
    to_shared = vocab_map.teacher_to_shared.to(teacher_logits.device)
    shared = vocab_map.shared.to(teacher_logits.device)
    width = teacher_logits.shape[-1]
    to_shared = (
        to_shared[:width] if to_shared.numel() >= width else F.pad(to_shared, (0, width - to_shared.numel()), value=-1)
    )
    log_p = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    # one extra column collects the unmapped tokens' mass (the tail), so the scatter needs no masked copy
    slots = torch.where(to_shared >= 0, to_shared, shared.numel())
    full = log_p.new_zeros((log_p.shape[0], shared.numel() + 1)).index_add_(1, slots, log_p.exp())
    log_full = torch.where(full > 0, full.clamp_min(1e-45).log(), torch.full_like(full, _LOG_ZERO))
    mass, log_mass, unmapped = full[:, :-1], log_full[:, :-1], log_full[:, -1]
    mapped_mass = mass.sum(-1)
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
    """What the alignment delivered: valid student positions, how many had an aligned teacher prediction,
    and the summed teacher probability (over aligned positions) that maps onto the student vocabulary."""

    positions: int = 0
    aligned: int = 0
    mapped_mass_sum: float = 0.0

    def __iadd__(self, other: AlignmentStats) -> AlignmentStats:
        self.positions += other.positions
        self.aligned += other.aligned
        self.mapped_mass_sum += other.mapped_mass_sum
        return self

    def to_dict(self) -> dict:
        return {
            "student_positions": self.positions,
            "aligned_positions": self.aligned,
            "aligned_fraction": self.aligned / self.positions if self.positions else float("nan"),
            "teacher_mass_mapped": self.mapped_mass_sum / self.aligned if self.aligned else float("nan"),
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
        indices, logprobs, tail = (torch.cat(field) for field in zip(*(targets for targets, _ in pieces)))
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
    full = TeacherTopK(
        indices.new_zeros((count, k)).index_copy(0, flat, indices).reshape(*shape, k),
        logprobs.new_zeros((count, k)).index_copy(0, flat, logprobs).reshape(*shape, k),
        tail.new_zeros(count).index_copy(0, flat, tail).reshape(shape),
    )
    kd_labels = torch.full_like(labels.reshape(-1), IGNORE_INDEX)
    kd_labels[flat] = labels.reshape(-1)[flat]
    return full, kd_labels.reshape(shape), AlignmentStats(batch_valid, int(flat.numel()), mass_sum)


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
    ``uld_per_position`` at ``options.temperature``, scaled by T² when ``options.scale_t2``. Both modes
    differentiate the teacher too when ``teacher_logits`` requires grad (SAR), and detach it otherwise.
    """
    if mode == "exact":
        targets, kd_labels, stats = cross_targets(
            teacher_logits, aligned, labels, vocab_map, options, chunk_size=chunk_size
        )
        window = num_items if num_items is not None else max(stats.positions, 1)
        loss = kd_loss(
            student_logits, targets, kd_labels, options.replace(top_k=None), num_items=window, chunk_size=chunk_size
        )
        return loss, stats
    if mode != "uld":
        raise ValueError(f"mode must be 'exact' or 'uld', got {mode!r}")
    flat, sources, batch_valid = _aligned_positions(aligned, labels, teacher_logits)
    attached = _attached(teacher_logits)
    teacher_rows = teacher_logits.flatten(0, 1) if attached else teacher_logits.detach().flatten(0, 1)
    student_rows = student_logits.reshape(-1, student_logits.shape[-1])
    total = student_rows[:0].float().sum()  # 0, attached to the graph even with nothing aligned
    mass = 0.0
    for chunk, source in zip(flat.split(chunk_size), sources.split(chunk_size)):
        # checkpointed: only one chunk's rows and sorted probability vectors are alive at a time (the rows are
        # gathered inside, so no chunk's [chunk, V_teacher] copy waits for the backward pass)
        def part(s: Tensor, t: Tensor, c: Tensor = chunk, src: Tensor = source) -> Tensor:
            return uld_per_position(s[c], t[src], options.temperature).sum()

        if torch.is_grad_enabled() and (student_rows.requires_grad or attached):
            total = total + checkpoint(part, student_rows, teacher_rows, use_reentrant=False)
        else:
            total = total + part(student_rows, teacher_rows)
        with torch.no_grad():
            mass += float(mapped_targets(teacher_rows[source], vocab_map, options.temperature)[1].sum())
    if options.scale_t2:
        total = total * options.temperature**2
    stats = AlignmentStats(batch_valid, int(flat.numel()), mass)
    return total / (num_items if num_items is not None else max(batch_valid, 1)), stats


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
