"""Datasets loading, tokenisation, packing, and the fingerprints that identify packed data.

The pipeline is ``load_texts`` → ``build_blocks`` → ``next_token_batch``:

* ``load_texts`` turns a dataset reference (``"stdlib-docs"``, a local file or directory, or a hub id)
  into a ``datasets.Dataset`` with one document per row in the column ``text_column``.
* ``build_blocks`` tokenises the documents, splits them into train / eval **by document** (seeded) and
  packs each split into blocks of ``max_length + 1`` tokens: no padding, the remainder is dropped.
* ``next_token_batch`` is the one place where next-token alignment happens.

The offline corpus behind ``"stdlib-docs"``, the demo tokenizer and the kit's cache live in ``corpus.py``.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from kagglekd.corpus import (
    CORPUS_VERSION,
    cache_root,
    stdlib_corpus,
)
from kagglekd.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

STDLIB_DATASET = "stdlib-docs"

# Bump when what decides the packed blocks changes, so cached teacher targets are rebuilt.
_FINGERPRINT_VERSION = 1
# ``document_separator`` values with a meaning of their own (any other value names one token)
DEFAULT_SEPARATOR = "eos"
NO_SEPARATOR = "none"

# Local file types ``load_texts`` reads, mapped to the ``datasets`` builder that reads them.
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# ``datasets.config`` values of offline mode (HF_DATASETS_OFFLINE=1), each set where this version has it.
_OFFLINE = {"HF_HUB_OFFLINE": True, "HF_DATASETS_OFFLINE": True, "HF_UPDATE_DOWNLOAD_COUNTS": False}


@contextmanager
def local_only():
    """``datasets`` in offline mode for a load of local files only, then as it was.

    A packaged builder (json, text, csv, parquet) reading local files needs no network, yet outside offline mode
    ``load_dataset`` first counts the load on the hub (``datasets.load.increase_load_count``, an HTTP request with
    a 3 s timeout); in a Kaggle kernel with internet off every local load then waits on connections that cannot
    succeed. ``HF_DATASETS_OFFLINE=1`` is read once, when ``datasets`` is imported (before the kit can set it),
    so offline mode is switched on ``datasets.config`` for the load. Hub loads (``_load_hub``) are left alone.
    """
    saved = {name: getattr(datasets.config, name) for name in _OFFLINE if hasattr(datasets.config, name)}
    try:
        for name in saved:
            setattr(datasets.config, name, _OFFLINE[name])
        yield
    finally:
        for name, value in saved.items():
            setattr(datasets.config, name, value)


# ----------------------------------------------------------------------------- loading texts


def _looks_like_hub_id(reference: str) -> bool:
    """``name`` or ``owner/name`` without a path prefix or a data-file extension."""
    if reference.startswith(("/", ".", "~")) or Path(reference).suffix.lower() in _BUILDERS:
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", reference) is not None


def _check_utf8(path: Path) -> None:
    """Raise DataError naming ``path`` and the first bad byte offset unless the file is valid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path} is not valid UTF-8 text (first bad byte at offset {offset + err.start}). "
                    f"Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.txt`, "
                    "or re-save it as UTF-8 in your editor.",
                    path=str(path),
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(
                f"{path} is not valid UTF-8 text (it ends inside a multi-byte character). Re-encode it as UTF-8.",
                path=str(path),
            ) from None


def _load_file(path: Path) -> datasets.Dataset:
    """One local data file as a Dataset. ``.txt``: one document per blank-line-separated paragraph group."""
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path} has an unsupported extension {path.suffix!r}; use one of "
            f"{', '.join(sorted(_BUILDERS))}, or a directory saved with Dataset.save_to_disk.",
            path=str(path),
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: add text to it or point `dataset` to another file.", path=str(path))
    if builder != "parquet":
        _check_utf8(path)
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        with local_only():
            loaded = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=str(cache_root() / "datasets"), **options
            )
    except Exception as err:  # a parser error of any kind: report the file and the parser's words
        raise DataError(f"Could not read {path} as {builder}: {type(err).__name__}: {err}", path=str(path)) from err
    return loaded


def _load_directory(path: Path, split: str, text_column: str) -> datasets.Dataset:
    """A ``save_to_disk`` directory (Dataset or DatasetDict), or a folder of data files concatenated."""
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        with local_only():
            loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{path} holds splits {sorted(loaded)} but not {split!r}; set `dataset_split` to one of them.",
                    path=str(path),
                )
            loaded = loaded[split]
        return loaded
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
    if not files:
        raise DataError(
            f"Directory {path} contains no data files ({', '.join(sorted(_BUILDERS))}) and is not a "
            "directory saved with Dataset.save_to_disk; point `dataset` to your data.",
            path=str(path),
        )
    parts = []
    for file in files:
        part = _load_file(file)
        _check_text_column(part, text_column, str(file))
        parts.append(part.select_columns([text_column]))
    return datasets.concatenate_datasets(parts)


def _load_hub(reference: str, dataset_config: str | None, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(reference, dataset_config, split=split)
    except Exception as err:
        raise DataError(
            f"Could not load dataset {reference!r} (config {dataset_config!r}, split {split!r}) from the "
            f"Hugging Face hub: {type(err).__name__}: {err}. No local file or directory of that name "
            "exists either. Kaggle kernels usually run offline: attach the data as a Kaggle dataset "
            "(Add Input -> Datasets) and set `dataset` to its local path under /kaggle/input (a "
            ".jsonl/.json/.parquet/.csv/.txt file, or a directory saved with Dataset.save_to_disk), "
            f"or use dataset={STDLIB_DATASET!r} for the built-in offline corpus.",
            path=reference,
        ) from err


def _check_text_column(dataset: datasets.Dataset, text_column: str, source: str) -> None:
    if text_column not in dataset.column_names:
        raise DataError(
            f"{source} has no column {text_column!r}; its columns are {dataset.column_names}. "
            "Set `text_column` to the column that holds the text.",
            path=source,
        )
    feature = dataset.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(
            f"Column {text_column!r} of {source} holds {feature}, not text. Set `text_column` to a column of strings.",
            path=source,
        )


def load_texts(
    dataset: str | os.PathLike,
    *,
    text_column: str = "text",
    dataset_config: str | None = None,
    split: str = "train",
    subset_size: int | None = None,
) -> datasets.Dataset:
    """Load documents as a ``datasets.Dataset`` whose column ``text_column`` holds one document per row.

    ``dataset`` (the config field ``dataset``) is one of

    * ``"stdlib-docs"``: the offline pydoc corpus (one module per document; column ``text``);
    * a local file: ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` (one row per document) or ``.txt``
      (**one document per blank-line-separated paragraph group**, so a single text file still gives
      many documents for the train / eval split); must be UTF-8;
    * a local directory: saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (then
      ``split`` picks the split), or a folder of the files above (read in sorted order, concatenated);
    * otherwise a hub id, loaded with ``datasets.load_dataset(dataset, dataset_config, split=split)``.

    ``dataset_config`` and ``split`` apply to hub ids (and ``split`` to saved DatasetDicts); local files
    are read whole. Empty or whitespace-only documents are dropped. ``subset_size`` keeps the first N
    documents (the order of the source, so the choice is reproducible and cheap).
    Raises DataError naming the file / column and the fix for: a missing or empty file, a file that is not
    UTF-8, a missing text column, no documents, or a hub dataset that cannot be loaded offline.
    """
    reference = os.fspath(dataset)
    if subset_size is not None and subset_size < 1:
        raise ConfigError(
            f"dataset_subset_size must be a positive number of documents or null, got {subset_size}.",
            field="dataset_subset_size",
        )
    path = Path(reference).expanduser()
    if reference == STDLIB_DATASET:
        corpus = stdlib_corpus()
        with local_only():
            loaded = datasets.load_dataset(
                "json", data_files=str(corpus), split="train", cache_dir=str(cache_root() / "datasets")
            )
    elif path.is_file():
        loaded = _load_file(path)
    elif path.is_dir():
        loaded = _load_directory(path, split, text_column)
    elif _looks_like_hub_id(reference):
        loaded = _load_hub(reference, dataset_config, split)
    else:
        raise DataError(
            f"Data file {path} does not exist. Check the `dataset` path (Kaggle inputs live under "
            "/kaggle/input/...; find them with glob rather than a hard-coded path).",
            path=str(path),
        )

    _check_text_column(loaded, text_column, reference)
    nonblank = loaded.filter(
        lambda batch: [isinstance(t, str) and t.strip() != "" for t in batch[text_column]],
        batched=True,
        desc="Dropping empty documents",
    )
    if len(nonblank) == 0:
        raise DataError(
            f"{reference} contains no documents (no non-empty {text_column!r} values); add text or point "
            "`dataset` to the right file.",
            path=reference,
        )
    if len(nonblank) < len(loaded):
        logger.info("Dropped %d empty documents from %s", len(loaded) - len(nonblank), reference)
    if subset_size is not None and subset_size < len(nonblank):
        nonblank = nonblank.select(range(subset_size))
    logger.info("Loaded %d documents from %s", len(nonblank), reference)
    return nonblank


# ----------------------------------------------------------------------------- packing


@dataclass
class Blocks:
    """Packed token blocks ready for next-token training.

    ``train`` / ``eval`` are int64 tensors ``[N, max_length + 1]``: one extra token per block, because
    ``next_token_batch`` turns a block into ``max_length`` inputs and their ``max_length`` targets.
    ``info`` describes the build: documents, tokens, blocks per split, source, tokenizer vocab size.
    """

    train: torch.Tensor
    eval: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        """Tokens per block, ``max_length + 1``."""
        return int(self.train.shape[1])


def _split_documents(
    lengths: np.ndarray, eval_fraction: float, block_size: int, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded document-level split: return (train_indices, eval_indices), each sorted.

    Eval takes ``round(eval_fraction * documents)`` documents (at least 1 when ``eval_fraction > 0`` and
    there are 2+ documents), and keeps taking documents until it holds one whole block, as long as the
    train split keeps one block too. A split can only ever see whole documents: no eval text leaks into
    training through a shared block.
    """
    documents = len(lengths)
    if eval_fraction <= 0 or documents < 2:
        return list(range(documents)), []
    order = np.random.default_rng(seed).permutation(documents)
    wanted = min(documents - 1, max(1, round(eval_fraction * documents)))
    total = int(lengths.sum())
    eval_tokens = 0
    taken = 0
    for position, index in enumerate(order[: documents - 1]):
        enough_docs = position >= wanted
        enough_tokens = eval_tokens >= block_size or total - eval_tokens - lengths[index] < block_size
        if enough_docs and enough_tokens:
            break
        eval_tokens += int(lengths[index])
        taken = position + 1
    eval_set = sorted(int(i) for i in order[:taken])
    train_set = sorted(int(i) for i in order[taken:])
    return train_set, eval_set


def _pack(split: datasets.Dataset, block_size: int, name: str) -> torch.Tensor:
    """Concatenate a split's token lists and cut them into ``[N, block_size]`` blocks (remainder dropped)."""
    if len(split) == 0:
        return torch.empty((0, block_size), dtype=torch.int64)

    def group(batch):
        tokens = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(tokens) - len(tokens) % block_size
        return {"block": [tokens[i : i + block_size] for i in range(0, usable, block_size)]}

    # One batch per split: the remainder (< one block) is dropped once, not once per map batch.
    packed = split.map(group, batched=True, batch_size=None, remove_columns=split.column_names, desc=f"Packing {name}")
    if len(packed) == 0:
        return torch.empty((0, block_size), dtype=torch.int64)
    return torch.from_numpy(np.asarray(packed.with_format("numpy")["block"], dtype=np.int64))


def build_blocks(
    texts: datasets.Dataset,
    tokenizer,
    *,
    max_length: int,
    text_column: str = "text",
    eval_fraction: float = 0.05,
    seed: int = 0,
    num_proc: int | None = None,
    source: str | None = None,
    document_separator: str = DEFAULT_SEPARATOR,
) -> Blocks:
    """Tokenise documents, split train / eval by document, and pack each split into blocks.

    Each document is encoded without special tokens and followed by the ``document_separator`` (``separator_id``:
    eos by default, another single token, or none). The seeded document split happens before packing
    (``_split_documents``); each split is then packed into blocks of ``max_length + 1`` tokens with no padding,
    dropping the last partial block. ``source`` is recorded in ``info`` (``load_texts``'s ``dataset`` argument).

    Raises DataError when a split cannot fill one block (each needs ``max_length + 1`` tokens): lower
    ``max_length``, add text, or (for the eval split) change ``eval_fraction``.
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be at least 1, got {max_length}.", field="max_length")
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}.", field="eval_fraction")
    _check_text_column(texts, text_column, source or "the dataset")
    block_size = max_length + 1
    eos_id = separator_id(tokenizer, document_separator)

    def tokenize(batch):
        encoded = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        if eos_id is not None:
            encoded = [ids + [eos_id] for ids in encoded]
        return {"input_ids": encoded, "length": [len(ids) for ids in encoded]}

    tokenized = texts.map(
        tokenize, batched=True, remove_columns=texts.column_names, num_proc=num_proc, desc="Tokenizing"
    )
    lengths = np.asarray(tokenized["length"], dtype=np.int64)
    train_docs, eval_docs = _split_documents(lengths, eval_fraction, block_size, seed)
    train = _pack(tokenized.select(train_docs), block_size, "train")
    evaluation = _pack(tokenized.select(eval_docs), block_size, "eval")

    total = int(lengths.sum())
    train_tokens = int(lengths[train_docs].sum()) if train_docs else 0
    eval_tokens = int(lengths[eval_docs].sum()) if eval_docs else 0
    needs_eval = eval_fraction > 0
    if len(train) == 0 or (needs_eval and len(evaluation) == 0):
        raise DataError(
            f"Too little text to form one block of max_length + 1 = {block_size} tokens in each split: "
            f"the corpus has {total} tokens in {len(lengths)} documents (train split {train_tokens} tokens "
            f"in {len(train_docs)} documents, eval split {eval_tokens} tokens in {len(eval_docs)} "
            f"documents); at least {block_size} per split are needed"
            + (f", {2 * block_size} in all" if needs_eval else "")
            + ". Lower `max_length`, add text to the dataset, or change `eval_fraction`.",
            path=source,
        )
    info = {
        "source": source,
        "documents": len(lengths),
        "train_documents": len(train_docs),
        "eval_documents": len(eval_docs),
        "tokens": total,
        "train_tokens": train_tokens,
        "eval_tokens": eval_tokens,
        "train_blocks": len(train),
        "eval_blocks": len(evaluation),
        "block_size": block_size,
        "max_length": max_length,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "vocab_size": len(tokenizer),
        "document_separator": None if eos_id is None else _token_text(tokenizer, eos_id),
    }
    logger.info(
        "Packed %d documents (%d tokens) into %d train / %d eval blocks of %d tokens",
        len(lengths), total, len(train), len(evaluation), block_size,
    )  # fmt: skip
    return Blocks(train=train, eval=evaluation, info=info)


def _token_text(tokenizer, token_id: int) -> str:
    """The separator's token string (``convert_ids_to_tokens``), or ``<id N>`` for a tokenizer without one."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    return convert(token_id) if convert is not None else f"<id {token_id}>"


def next_token_batch(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[B, L + 1]`` blocks into ``input_ids [B, L]`` and ``labels [B, L]``, both contiguous.

    The one place next-token alignment happens: ``labels[b, t]`` is the target of position ``t``, i.e.
    the token that follows ``input_ids[b, t]``. Losses compare ``logits[:, t]`` with ``labels[:, t]``
    and never shift again.
    """
    return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


def separator_id(tokenizer, document_separator: str = DEFAULT_SEPARATOR) -> int | None:
    """The token id packed after each document for the ``document_separator`` config key, or None for none.

    ``"eos"``: the tokenizer's eos token (None, with a warning, when it has none); ``"none"``: no separator;
    any other string must be exactly one token of ``tokenizer`` (a ConfigError naming the key otherwise)."""
    if document_separator == NO_SEPARATOR:
        return None
    if document_separator == DEFAULT_SEPARATOR:
        if tokenizer.eos_token_id is None:
            logger.warning("Tokenizer has no eos token: documents are packed without a separator")
        return tokenizer.eos_token_id
    ids = tokenizer.convert_tokens_to_ids([document_separator])
    unknown = tokenizer.unk_token_id
    if not ids or ids[0] is None or (ids[0] == unknown and document_separator != tokenizer.unk_token):
        encoded = tokenizer(document_separator, add_special_tokens=False)["input_ids"]
        raise ConfigError(
            f"document_separator = {document_separator!r} is not one token of the tokenizer (it encodes to "
            f"{len(encoded)} tokens {encoded}). Use one of its tokens (eos is {tokenizer.eos_token!r}), "
            f"{DEFAULT_SEPARATOR!r} (the eos token) or {NO_SEPARATOR!r}.",
            field="document_separator",
        )
    return ids[0]


# ----------------------------------------------------------------------------- fingerprints


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of what decides token ids: the fast tokenizer's full JSON, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)])
    return hashlib.sha256((payload + special).encode("utf-8")).hexdigest()[:16]


def _source_identity(source: str) -> Any:
    """What identifies a data source beyond its name: the Python version for stdlib-docs, sizes for files."""
    if source == STDLIB_DATASET:
        return [STDLIB_DATASET, f"py{sys.version_info.major}.{sys.version_info.minor}", CORPUS_VERSION]
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path.resolve()), path.stat().st_size]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path.resolve()), [[str(p.relative_to(path)), p.stat().st_size] for p in files]]
    return [source]


def dataset_fingerprint(
    *,
    source: str,
    tokenizer,
    max_length: int,
    eval_fraction: float,
    seed: int,
    subset_size: int | None = None,
    text_column: str = "text",
    dataset_config: str | None = None,
    split: str = "train",
    document_separator: str = DEFAULT_SEPARATOR,
) -> str:
    """A stable hex digest of everything that decides the packed blocks, for cache manifests.

    Local sources are identified by resolved path and file sizes (edit a file in a way that keeps its
    size and you must clear the cache by hand); "stdlib-docs" by the Python version.
    """
    key = {
        "version": _FINGERPRINT_VERSION,
        "source": _source_identity(str(source)),
        "dataset_config": dataset_config,
        "split": split,
        "text_column": text_column,
        "subset_size": subset_size,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "eval_fraction": eval_fraction,
        "seed": seed,
    }
    if document_separator != DEFAULT_SEPARATOR:  # the default keeps the fingerprints (and caches) of before
        key["document_separator"] = document_separator
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
