"""Positions: which teacher token has read the same text as each student token, computed once per block.

``CrossTokenizer.align_block`` aligns one packed student block to the teacher's tokenisation of the same text
(see ``kagglekd.alignment`` for the rules); ``precompute_alignment`` runs it over every train and eval block in
the data pipeline (a ``datasets`` map in worker processes, cached on disk by a fingerprint of both tokenizers
and the blocks), so a training step only looks its blocks up (``CrossTokenizer.align``).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor

from kagglekd.alignment_vocab import _map_spellings, _special_ids, token_bytes
from kagglekd.losses import IGNORE_INDEX

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Position alignment
# ---------------------------------------------------------------------------------------------------------

# Bump when what ``align_block`` returns changes, so alignments cached on disk are rebuilt.
ALIGNMENT_VERSION = 2
_FIELDS = ("target", "context", "span_lo", "span_hi")


@dataclass
class AlignedBatch:
    """What the teacher reads for a batch of student blocks, and how its positions map back.

    ``teacher_ids`` ``[B, T_teacher]`` int64, right-padded with the teacher's pad id (padding sits after every
    real position, so a causal teacher needs no attention mask). ``teacher_labels`` ``[B, T_teacher]``: the
    next teacher token, -100 on padding. ``target`` ``[B, T]``: the teacher position that has read exactly the
    text student position t has read (its prediction is aligned to t's), -1 where none has. ``span_lo`` /
    ``span_hi`` ``[B, T]``: the teacher positions ``[lo, hi)`` averaged for t's feature target (``lo == hi``:
    none). ``context`` ``[B, T]`` (None: not computed): the last teacher position that has read no more than t
    (equal to ``target`` where that is set), -1 where none has or the teacher cannot predict t's label: the
    teacher signal for a position that ends inside a teacher token (``cross_kd_loss``'s hybrid mode).
    """

    teacher_ids: Tensor
    teacher_labels: Tensor
    target: Tensor
    span_lo: Tensor
    span_hi: Tensor
    context: Tensor | None = None

    def to(self, device) -> AlignedBatch:
        moved = (getattr(self, f) for f in self.__dataclass_fields__)
        return AlignedBatch(*(t.to(device) if t is not None else None for t in moved))

    @property
    def aligned(self) -> Tensor:
        """``[B, T]`` bool: student positions with an aligned teacher prediction."""
        return self.target >= 0

    def at_student_positions(self) -> tuple[Tensor, AlignedBatch]:
        """The teacher rows the student's positions read, one per position, and this batch pointing at them.

        Returns ``rows`` ``[B, T]``: the teacher position whose prediction student position t reads (its
        ``target``, else its ``context``, else 0: no row is read there), and a copy whose ``target`` and
        ``context`` are t itself wherever they were set. Teacher logits taken at ``rows`` (``[B, T, V_t]``)
        then go with the copy: a loss reads student position t's teacher row at t, so blocks of positions are
        slices of the teacher's logits (no row gather), and the teacher's output layer runs on ``B x T`` rows
        whatever its own tokenisation's length. ``span_lo`` / ``span_hi`` still index teacher positions (its
        hidden states)."""
        read = self.target if self.context is None else torch.where(self.target >= 0, self.target, self.context)
        here = torch.arange(self.target.shape[1], device=self.target.device).expand_as(self.target)
        moved = {"target": torch.where(self.target >= 0, here, -1)}
        if self.context is not None:  # (losses read it only where target is not set: hybrid mode)
            moved["context"] = torch.where(self.context >= 0, here, -1)
        return read.clamp_min(0), replace(self, **moved)

    @property
    def teacher_tokens(self) -> Tensor:
        """``[B, T_teacher]`` bool: the rows' real teacher tokens, not their right padding (a token is real when it
        is the first or the label of the one before it; padding has no label and is no label)."""
        before = self.teacher_labels[:, :-1] != IGNORE_INDEX
        first = torch.ones((before.shape[0], 1), dtype=torch.bool, device=before.device)
        return torch.cat([first, before], dim=1)


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


def _char_offsets(text: str) -> np.ndarray:
    """``[len(text) + 1]`` byte offset of each character boundary of ``text`` in UTF-8."""
    return np.concatenate([[0], np.cumsum([len(ch.encode("utf-8")) for ch in text])]).astype(np.int64)


def rewritten_ends(text: bytes, spelled: bytes, ends: np.ndarray) -> np.ndarray:
    """Byte ends in the teacher's spelling of a segment -> byte ends in the original text; -1 inside a change.

    A normaliser (Qwen's NFC, a lowercaser) makes the teacher's tokens spell ``spelled`` for the student's
    ``text``. The two are diffed character by character (``difflib``): an end inside or at the edge of an
    unchanged run maps to the same point of the original; an end at the edge of a changed run maps to the
    edge of the original characters it replaced (both sides have then read the same text, one of them
    normalised); an end strictly inside a changed run maps nowhere (-1). So a normaliser only unaligns the
    characters it changed. ``ends`` ``[n]`` int64 offsets into ``spelled``.
    """
    try:
        original, rewritten = text.decode("utf-8"), spelled.decode("utf-8")
    except UnicodeDecodeError:
        return np.full(len(ends), -1, dtype=np.int64)
    to_original = np.full(len(rewritten) + 1, -1, dtype=np.int64)  # rewritten char boundary -> original's
    char_of = np.full(len(rewritten), -1, dtype=np.int64)  # rewritten char -> the unchanged original char
    matcher = difflib.SequenceMatcher(None, original, rewritten, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            to_original[j1 : j2 + 1] = np.arange(i1, i2 + 1)
            char_of[j1:j2] = np.arange(i1, i2)
        else:
            to_original[j1], to_original[j2] = i1, i2
    original_bytes, rewritten_bytes = _char_offsets(original), _char_offsets(rewritten)
    char = np.searchsorted(rewritten_bytes, ends, side="right") - 1
    out = np.full(len(ends), -1, dtype=np.int64)
    for n, (end, k) in enumerate(zip(ends.tolist(), char.tolist())):
        if rewritten_bytes[k] == end:  # a character boundary
            out[n] = original_bytes[to_original[k]] if to_original[k] >= 0 else -1
        elif char_of[k] >= 0:  # inside an unchanged character (byte-level tokens split characters)
            out[n] = original_bytes[char_of[k]] + end - rewritten_bytes[k]
    return out


class CrossTokenizer:
    """Aligns student token blocks to the teacher's tokenisation of the same text.

    ``align(blocks)`` takes ``[B, L + 1]`` student blocks (the trainer's packed blocks: inputs and the label
    token) and returns an ``AlignedBatch`` for the ``L`` input positions. Blocks held by an attached
    ``AlignmentTable`` (``attach``; the trainer precomputes every train and eval block) are looked up; any
    other block (generated text, a new batch) is aligned on the spot, with the same result.
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

        self.table: AlignmentTable | None = None

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
        """Teacher ids, the teacher positions of its text tokens and their byte ends in the student's text (-1
        where a normaliser changed the text under it), and for each special segment the teacher position
        standing for it (None when the teacher has no token of that role)."""
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
            lengths = [len(self.teacher_bytes[i] or b"") for i in tokens]
            spelled_ends = np.cumsum(lengths, dtype=np.int64)
            spelled = b"".join(self.teacher_bytes[i] or b"" for i in tokens)
            # SentencePiece-style tokenizers prepend a space to the first word; it spells no text of ours.
            extra = len(spelled) - len(text)
            if extra >= 0 and spelled[extra:] == text and (not extra or spelled[:extra].isspace()):
                mapped = spelled_ends - extra
            else:  # a normaliser rewrote the text: only the characters it changed lose their alignment
                mapped = rewritten_ends(text, spelled, spelled_ends)
            for token, end in zip(tokens, mapped.tolist()):
                if end != 0:  # a token spelling only a prepended space has read none of our text
                    text_positions.append(len(ids))
                    text_ends.append(offset + end if end >= 0 else -1)
                ids.append(token)
        return ids, np.asarray(text_positions, dtype=np.int64), np.asarray(text_ends, dtype=np.int64), special_at

    def align_block(self, block: list[int]) -> dict:
        """One ``[L + 1]`` block -> teacher ids, and per input position its target, context and span (numpy).

        ``target`` / ``context`` / ``span_lo`` / ``span_hi`` ``[L]`` int64 as in ``AlignedBatch``."""
        starts, ends, segments, special_segment = self._segments(block)
        ids, positions, text_ends, special_at = self._teacher_side(segments)
        inputs = len(block) - 1
        target = np.full(inputs, -1, dtype=np.int64)
        span_lo = np.zeros(inputs, dtype=np.int64)
        span_hi = np.zeros(inputs, dtype=np.int64)
        # A teacher token whose end a normaliser hid counts as ending where the next known end is: it is only
        # ever taken as having read more than it has, so no target reads past its student position.
        known = np.where(text_ends >= 0, text_ends, np.iinfo(np.int64).max)
        filled = np.minimum.accumulate(known[::-1])[::-1] if len(known) else known
        # teacher text tokens ending in (start, end] of a student token: the span; the last must end at end
        hi = np.searchsorted(filled, ends[:inputs], side="right")
        lo = np.searchsorted(filled, starts[:inputs], side="right")
        context = self._context(len(ids), positions, filled, special_at, special_segment, starts, ends, inputs)
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
                target[t] = context[t] = -1
        return {"teacher_ids": ids, "target": target, "context": context, "span_lo": span_lo, "span_hi": span_hi}

    def _context(self, width, positions, filled, special_at, special_segment, starts, ends, inputs) -> np.ndarray:
        """``[inputs]`` the last teacher position that has read no more than each student position (-1: none).

        Every teacher position gets a key that grows with what it has read: 2 x its byte end for a text token,
        2 x the separator's byte offset + 1 for a special (read after the text before it, before the text after
        it), -1 for a BOS, and a token that read none of the text (a prepended space) takes its predecessor's.
        A student position may use the teacher positions whose key is at most 2 x its byte end (+ 1 when it is
        the separator itself)."""
        keys = np.full(width, np.iinfo(np.int64).min, dtype=np.int64)
        keys[positions] = 2 * np.minimum(filled, np.iinfo(np.int64).max // 4)
        for t, number in special_segment.items():
            if special_at[number] is not None:
                keys[special_at[number]] = 2 * starts[t] + 1
        keys = np.maximum.accumulate(keys) if width else keys
        limit = 2 * ends[:inputs] + np.asarray([t in special_segment for t in range(inputs)], dtype=np.int64)
        return (np.searchsorted(keys, limit, side="right") - 1).astype(np.int64)

    def attach(self, table: AlignmentTable | None) -> None:
        """Look blocks up in ``table`` from now on (None: align every block on the spot)."""
        self.table = table

    def align(self, blocks: Tensor) -> AlignedBatch:
        """``[B, L + 1]`` student blocks -> an ``AlignedBatch`` (CPU tensors).

        Blocks in the attached table are looked up (no Python alignment work); the others are aligned here."""
        rows = blocks.cpu().numpy()
        found = self.table.rows(rows) if self.table is not None else [None] * len(rows)
        if all(index is not None for index in found):
            return self.table.batch(found, self.teacher_pad)
        aligned = []
        for row, index in zip(rows, found):
            aligned.append(self.table.row(index) if index is not None else self.align_block(row.tolist()))
        return _collate(aligned, self.teacher_pad)


def _collate(rows: list[dict], teacher_pad: int) -> AlignedBatch:
    """``align_block`` results -> one right-padded ``AlignedBatch``."""
    width = max(1, max(len(r["teacher_ids"]) for r in rows))
    teacher_ids = torch.full((len(rows), width), teacher_pad, dtype=torch.long)
    teacher_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, r in enumerate(rows):
        ids = torch.as_tensor(np.asarray(r["teacher_ids"], dtype=np.int64))
        teacher_ids[b, : len(ids)] = ids
        teacher_labels[b, : max(len(ids) - 1, 0)] = ids[1:]
    fields = {key: torch.from_numpy(np.stack([np.asarray(r[key], dtype=np.int64) for r in rows])) for key in _FIELDS}
    return AlignedBatch(teacher_ids, teacher_labels, fields["target"], fields["span_lo"], fields["span_hi"],
                        fields["context"])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Precomputed alignments (the data pipeline)
# ---------------------------------------------------------------------------------------------------------


class AlignmentTable:
    """Every block's alignment, computed once: looked up by the block's tokens.

    ``teacher_ids`` ``[N, W]`` right-padded with the teacher's pad id, ``lengths`` ``[N]`` the real teacher
    tokens per block, and ``target`` / ``context`` / ``span_lo`` / ``span_hi`` ``[N, L]`` as in ``AlignedBatch``
    (held as int32, handed out as int64). ``blocks`` ``[N, L + 1]`` are the student blocks they belong to (the
    lookup keys: a hash of each block's tokens).
    """

    def __init__(self, blocks: np.ndarray, teacher_ids: np.ndarray, lengths: np.ndarray, fields: dict, pad: int):
        # int32 in memory (positions and ids fit), int64 per batch: half the RAM of a large corpus's table
        self.teacher_ids, self.pad = torch.from_numpy(teacher_ids.astype(np.int32)), pad
        self.lengths = torch.from_numpy(lengths)
        self.fields = {
            key: torch.from_numpy(np.ascontiguousarray(value, dtype=np.int32)) for key, value in fields.items()
        }
        self._index = {_block_key(row): n for n, row in enumerate(np.ascontiguousarray(blocks, dtype=np.int64))}

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, blocks: np.ndarray) -> list[int | None]:
        """The table row of each ``[B, L + 1]`` block, None for a block the table does not hold."""
        return [self._index.get(_block_key(row)) for row in np.ascontiguousarray(blocks, dtype=np.int64)]

    def row(self, index: int) -> dict:
        """One row as ``CrossTokenizer.align_block`` returns it."""
        return {
            "teacher_ids": self.teacher_ids[index, : int(self.lengths[index])].long().numpy(),
            **{key: value[index].long().numpy() for key, value in self.fields.items()},
        }

    def batch(self, indices: list[int], teacher_pad: int) -> AlignedBatch:
        """The ``AlignedBatch`` of table rows ``indices``: gathers and a shift, no alignment work."""
        index = torch.as_tensor(indices, dtype=torch.long)
        lengths = self.lengths[index]
        width = max(1, int(lengths.max()))
        teacher_ids = self.teacher_ids[index, :width].long()
        if teacher_pad != self.pad:
            teacher_ids = teacher_ids.masked_fill(torch.arange(width) >= lengths[:, None], teacher_pad)
        labels = torch.cat([teacher_ids[:, 1:], teacher_ids.new_full((len(index), 1), IGNORE_INDEX)], dim=1)
        labels = labels.masked_fill(torch.arange(width) >= (lengths[:, None] - 1), IGNORE_INDEX)
        fields = {key: value[index].long() for key, value in self.fields.items()}
        return AlignedBatch(teacher_ids, labels, fields["target"], fields["span_lo"], fields["span_hi"],
                            fields["context"])  # fmt: skip

    def coverage(self, rows: slice = slice(None)) -> dict:
        """Student positions of table rows ``rows`` (every block position is a training target) with an exact
        teacher target, and with any teacher signal (exact or context)."""
        target, context = self.fields["target"][rows], self.fields["context"][rows]
        positions = target.numel()
        exact, signal = int((target >= 0).sum()), int(((target >= 0) | (context >= 0)).sum())
        return {
            "blocks": len(target),
            "student_positions": positions,
            "exact_positions": exact,
            "exact_fraction": exact / positions if positions else float("nan"),
            "covered_positions": signal,
            "covered_fraction": signal / positions if positions else float("nan"),
        }


def _block_key(row: np.ndarray) -> bytes:
    """A block's lookup key: a 16-byte hash of its tokens (not the tokens: a large corpus's keys stay small)."""
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


def _fingerprint(cross: CrossTokenizer, blocks: np.ndarray) -> str:
    """What decides a precomputed alignment: both tokenizers, the special-token roles and the blocks."""
    from kagglekd.data import tokenizer_fingerprint

    digest = hashlib.sha256(f"v{ALIGNMENT_VERSION}|{tokenizer_fingerprint(cross.teacher_tokenizer)}".encode())
    digest.update(b"\0".join(b"\1" if spelled is None else b"\2" + spelled for spelled in cross.student_bytes))
    digest.update(repr((sorted(cross.special_map.items()), cross.teacher_bos, cross.teacher_pad)).encode())
    digest.update(np.ascontiguousarray(blocks, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


class _BlockAligner:
    """The picklable part of a ``CrossTokenizer`` that worker processes need: ``align_block`` over a batch."""

    def __init__(self, cross: CrossTokenizer):
        self.cross = copy.copy(cross)
        self.cross.vocab_map, self.cross.table = None, None  # (the map may sit on a GPU; workers need neither)

    def __call__(self, batch: dict) -> dict:
        aligned = [self.cross.align_block(block) for block in batch["block"]]
        return {"teacher_ids": [a["teacher_ids"] for a in aligned], **{k: [a[k] for a in aligned] for k in _FIELDS}}


def precompute_alignment(
    cross: CrossTokenizer, blocks: Tensor, *, num_proc: int | None = None, cache_dir: str | Path | None = None
) -> AlignmentTable:
    """Align every ``[N, L + 1]`` block once, as a ``datasets`` map, and return the table of results.

    The map's output is cached in ``cache_dir`` (default: the kit's cache, ``alignments/``) under a fingerprint
    of both tokenizers and the blocks, so a second run on the same data reads it back. ``num_proc`` worker
    processes (None: one per 2,000 blocks, at most the CPU count) share the work.
    """
    from kagglekd.corpus import cache_root

    array = blocks.cpu().numpy().astype(np.int64)
    fingerprint = _fingerprint(cross, array)
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "alignments"
    folder.mkdir(parents=True, exist_ok=True)
    if num_proc is None:
        num_proc = max(1, min(os.cpu_count() or 1, len(array) // 2000))
    dataset = datasets.Dataset.from_dict({"block": array})
    aligned = dataset.map(
        _BlockAligner(cross), batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["block"], cache_file_name=str(folder / f"alignment-{fingerprint}.arrow"),
        new_fingerprint=fingerprint, desc="Aligning blocks to the teacher's tokens",
    )  # fmt: skip
    # read the Arrow columns back as flat numpy arrays (not row by row)
    ids_column = aligned.data.column("teacher_ids").combine_chunks()
    offsets = ids_column.offsets.to_numpy()
    lengths = np.diff(offsets).astype(np.int64)
    teacher_ids = np.full((len(array), max(1, int(lengths.max(initial=0)))), cross.teacher_pad, dtype=np.int64)
    flat_ids = ids_column.flatten().to_numpy()
    inside = np.arange(teacher_ids.shape[1]) < lengths[:, None]
    teacher_ids[inside] = flat_ids[offsets[0] : offsets[-1]]
    fields = {
        key: aligned.data.column(key).combine_chunks().flatten().to_numpy().astype(np.int64).reshape(len(array), -1)
        for key in _FIELDS
    }
    return AlignmentTable(array, teacher_ids, lengths, fields, cross.teacher_pad)


def align_run_blocks(cross: CrossTokenizer | None, blocks) -> dict | None:
    """A cross-tokenizer run's data step: align every train and eval block of ``blocks`` (``data.Blocks``) once,
    attach the table to ``cross`` (steps and evals then look their blocks up) and log the coverage; returns
    ``{"train": coverage, "eval": coverage}`` (``AlignmentTable.coverage``), or None without ``cross``."""
    if cross is None:
        return None
    table = precompute_alignment(cross, torch.cat([blocks.train, blocks.eval]))
    cross.attach(table)
    train_rows = len(blocks.train)
    coverage = {"train": table.coverage(slice(0, train_rows)), "eval": table.coverage(slice(train_rows, None))}
    for split, numbers in coverage.items():
        log.info(
            "cross-tokenizer alignment of the %s blocks: %.1f %% of student positions have an exact teacher "
            "target, %.1f %% a teacher signal (exact or the teacher's context)",
            split, 100 * numbers["exact_fraction"], 100 * numbers["covered_fraction"],
        )  # fmt: skip
    return coverage


def report_alignment(evaluator, path: Path, coverage: dict | None) -> None:
    """``alignment.json``: the evaluator's held-out measurement (``setup``), then the block coverage
    (``blocks``: ``align_run_blocks``'s per split)."""
    from kagglekd.rundir import merge_json

    evaluator.report_alignment(path)
    if coverage is not None:
        merge_json(path, "blocks", coverage)
