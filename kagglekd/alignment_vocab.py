"""Token ids as bytes, and the exact-match map between two vocabularies (``kagglekd.alignment``'s first two steps).

Every token id of both tokenizers is turned into the UTF-8 bytes it stands for (``token_bytes``); a teacher id
and a student id correspond when they spell the same bytes (``VocabMap``). ``classify_vocab_pair`` decides
before any of this whether the two vocabularies need it at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from kagglekd.errors import ConfigError

VocabRelation = Literal["identical", "padded", "different"]

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
    _plans: dict = field(default_factory=dict, repr=False, compare=False)  # gather_plan's, by (width, device)

    @property
    def shared_fraction(self) -> float:
        """Fraction of the student vocabulary with a teacher counterpart."""
        return self.shared.numel() / max(self.student_vocab, 1)

    def gather_plan(self, width: int, device) -> tuple[Tensor, Tensor | None, list[tuple[Tensor, Tensor]], Tensor]:
        """How to read the mapped distribution off ``[N, width]`` teacher log-probabilities with gathers only.

        Returns ``primary`` ``[S]`` one teacher id per shared slot (0 where the slot has none within
        ``width``), ``missing`` ``[S]`` bool marking those slots (None when there are none), ``extras``:
        ``(slots, teacher ids)`` pairs, each with distinct slots, whose log-probabilities are log-added onto
        ``primary``'s in turn (slots spelled by several teacher ids), and ``unmapped`` ``[U]`` the teacher ids
        that map nowhere (the tail bucket)."""
        key = (width, str(device))
        if key not in self._plans:
            to_shared = self.teacher_to_shared.cpu().numpy()[:width]
            to_shared = np.pad(to_shared, (0, width - len(to_shared)), constant_values=-1)
            ids = np.nonzero(to_shared >= 0)[0]
            slots = to_shared[ids]
            order = np.lexsort((ids, slots))
            ids, slots = ids[order], slots[order]
            first = np.r_[True, slots[1:] != slots[:-1]] if len(slots) else np.zeros(0, dtype=bool)
            rank = np.arange(len(slots)) - np.maximum.accumulate(np.where(first, np.arange(len(slots)), 0))
            primary = np.zeros(self.shared.numel(), dtype=np.int64)
            primary[slots[first]] = ids[first]
            missing = np.ones(self.shared.numel(), dtype=bool)
            missing[slots[first]] = False
            extras = [(slots[rank == r], ids[rank == r]) for r in range(1, int(rank.max(initial=0)) + 1)]
            as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
            self._plans[key] = (
                as_tensor(primary),
                as_tensor(missing) if missing.any() else None,
                [(as_tensor(s), as_tensor(i)) for s, i in extras],
                as_tensor(np.nonzero(to_shared < 0)[0]),
            )
        return self._plans[key]

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
