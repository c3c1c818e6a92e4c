"""Offline teacher targets: the teacher's top-k tokens per position, on disk, memory-mapped.

Running the teacher once and reading its top-k targets back every later epoch removes the teacher's forward
pass (and its memory) from training. A cache directory holds

* ``shard-00000.indices.npy``  ``[n, L, k]`` int32  token ids of the k most likely tokens, most likely first
* ``shard-00000.logprobs.npy`` ``[n, L, k]`` float16 their log-probabilities at the cache's temperature
* ``shard-00000.tail.npy``     ``[n, L]``    float32 log of the probability mass outside the k tokens
* ``manifest.json``            what the targets were computed from (teacher id and revision, tokenizer hash,
  k, temperature, max_length, dataset fingerprint), ``num_blocks`` and the shard layout.

Shards are plain ``.npy`` files (``numpy.load(..., mmap_mode="r")`` opens them without reading them). The
manifest is written last and atomically: a directory without one is an interrupted write, never a cache.
Per token the cache costs ``6 k + 4`` bytes (k = 256: 1.5 KiB; 100 M tokens: 154 GB, 1 M tokens: 1.5 GB).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from kagglekd import env, rundir
from kagglekd.data import dataset_fingerprint, next_token_batch, tokenizer_fingerprint
from kagglekd.errors import ConfigError
from kagglekd.losses import TeacherTopK, teacher_topk

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KAGGLE_OUTPUT_BUDGET_BYTES = 20 * 10**9
# What the caller's manifest must say about the run; write_cache adds k, temperature and the layout.
REQUIRED_MANIFEST_KEYS = ("teacher_model", "teacher_revision", "tokenizer_hash", "max_length", "dataset_fingerprint")
_ARRAYS = {"indices": np.int32, "logprobs": np.float16, "tail": np.float32}
_FIX = (
    "Rebuild the cache for this run with `python -m kagglekd cache-teacher --config CONFIG --output PATH`, "
    "or point `teacher_cache` at a cache built with the same settings (or unset it to run the teacher live)."
)


def estimate_cache_bytes(num_tokens: int, k: int) -> int:
    """Bytes on disk of a cache of ``num_tokens`` positions with top-``k`` targets (shard headers excluded).

    Per token: k int32 indices + k float16 log-probs + one float32 tail log-mass = ``6 k + 4`` bytes.
    """
    if num_tokens < 0 or k < 1:
        raise ValueError(f"need num_tokens >= 0 and k >= 1, got {num_tokens} and {k}")
    return int(num_tokens) * (6 * int(k) + 4)


def _format_bytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"


def _shard_path(out_dir: Path, shard: int, name: str) -> Path:
    return out_dir / f"shard-{shard:05d}.{name}.npy"


def _check_budget(estimate: int, budget_bytes: int, allow_over_budget: bool, out_dir: Path) -> None:
    if estimate > budget_bytes and not allow_over_budget:
        raise ConfigError(
            f"The teacher cache would take {_format_bytes(estimate)}, over the output budget of "
            f"{_format_bytes(budget_bytes)} (Kaggle keeps 20 GB of /kaggle/working). Lower `kd_top_k`, cache "
            "fewer blocks (`subset_size`), or pass allow_over_budget=True (CLI: --allow-over-budget) if the "
            "destination really has the space.",
            field="teacher_cache",
        )
    free = shutil.disk_usage(out_dir).free
    if estimate > free:
        raise ConfigError(
            f"The teacher cache would take {_format_bytes(estimate)} but {out_dir} has only "
            f"{_format_bytes(free)} free. Free space there or write the cache elsewhere (--output).",
            field="teacher_cache",
        )


def _json_ready(manifest: Mapping) -> dict:
    """The manifest as it will read back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(dict(manifest)))


@torch.no_grad()
def write_cache(
    teacher_model: torch.nn.Module,
    blocks: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    k: int,
    temperature: float,
    batch_size: int,
    manifest: Mapping,
    budget_bytes: int = KAGGLE_OUTPUT_BUDGET_BYTES,
    allow_over_budget: bool = False,
    blocks_per_shard: int = 4096,
) -> Path:
    """Run the teacher on ``blocks[:, :-1]`` and write its top-k targets under ``out_dir``; return the path.

    ``blocks`` ``[N, L + 1]`` int64 are packed training blocks (the targets of position t are for
    ``blocks[:, t + 1]``, as in ``data.next_token_batch``). ``manifest`` must name the run
    (``REQUIRED_MANIFEST_KEYS``; ``max_length`` must equal L); ``k``, ``temperature``, ``num_blocks`` and the
    shard layout are added here. The size is estimated and logged first; over ``budget_bytes`` (or over the
    free disk space) is a ConfigError unless ``allow_over_budget``. An existing manifest in ``out_dir`` is
    removed before any shard is written, so an interrupted rewrite never passes for a cache. The teacher runs
    where its parameters are, in batches of ``batch_size`` blocks; top-k is taken chunkwise
    (``losses.teacher_topk``), so no float32 copy of the teacher's full-vocab logits is made.
    """
    num_blocks, max_length = _check_inputs(blocks, manifest, batch_size, blocks_per_shard)
    vocab = teacher_model.get_output_embeddings().weight.shape[0]
    k = min(int(k), vocab)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    estimate = estimate_cache_bytes(num_blocks * max_length, k)
    logger.info(
        "Teacher cache: %d blocks x %d tokens, top-%d -> %s in %s",
        num_blocks, max_length, k, _format_bytes(estimate), out_dir,
    )  # fmt: skip
    _check_budget(estimate, budget_bytes, allow_over_budget, out_dir)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    shard_sizes = [min(blocks_per_shard, num_blocks - start) for start in range(0, num_blocks, blocks_per_shard)]
    was_training = teacher_model.training
    teacher_model.eval()
    progress = env.progress_bar()(total=num_blocks, desc="teacher cache", unit="block")
    try:
        for shard, shard_size in enumerate(shard_sizes):
            start = shard * blocks_per_shard
            _write_shard(teacher_model, blocks[start : start + shard_size], out_dir, shard, k, temperature,
                         batch_size, progress)  # fmt: skip
    finally:
        progress.close()
        teacher_model.train(was_training)

    full_manifest = {
        **_json_ready(manifest),
        "format_version": FORMAT_VERSION,
        "k": k,
        "temperature": float(temperature),
        "num_blocks": num_blocks,
        "blocks_per_shard": blocks_per_shard,
        "shards": [
            {"blocks": size, **{name: _shard_path(out_dir, shard, name).name for name in _ARRAYS}}
            for shard, size in enumerate(shard_sizes)
        ],
        "bytes": estimate,
    }
    staging = out_dir / f".{MANIFEST_NAME}.tmp"
    staging.write_text(rundir.to_json_text(full_manifest, sort_keys=True), encoding="utf-8")
    os.replace(staging, out_dir / MANIFEST_NAME)
    logger.info("Wrote teacher cache %s (%d shards)", out_dir, len(shard_sizes))
    return out_dir


def _check_inputs(blocks: torch.Tensor, manifest: Mapping, batch_size: int, blocks_per_shard: int) -> tuple[int, int]:
    """``(num_blocks, max_length)`` of ``[N, L + 1]`` blocks after checking them against the manifest."""
    missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"manifest is missing {', '.join(missing)} (required: {', '.join(REQUIRED_MANIFEST_KEYS)})")
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N, L + 1] with L >= 1, got shape {tuple(blocks.shape)}")
    num_blocks, max_length = blocks.shape[0], blocks.shape[1] - 1
    if manifest["max_length"] != max_length:
        raise ValueError(f"manifest max_length {manifest['max_length']} != blocks' L = {max_length}")
    if batch_size < 1 or blocks_per_shard < 1:
        raise ValueError(f"batch_size and blocks_per_shard must be >= 1, got {batch_size}, {blocks_per_shard}")
    return num_blocks, max_length


@torch.no_grad()
def _write_shard(teacher_model, blocks, out_dir: Path, shard: int, k: int, temperature: float, batch_size: int,
                 progress) -> None:  # fmt: skip
    """The top-k targets of ``blocks`` (one shard's ``[n, L + 1]``) into that shard's memory-mapped arrays."""
    device = next(teacher_model.parameters()).device
    count, max_length = blocks.shape[0], blocks.shape[1] - 1
    arrays = {
        name: np.lib.format.open_memmap(
            _shard_path(out_dir, shard, name),
            mode="w+",
            dtype=dtype,
            shape=(count, max_length, k) if name != "tail" else (count, max_length),
        )  # fmt: skip
        for name, dtype in _ARRAYS.items()
    }
    for offset in range(0, count, batch_size):
        input_ids, _ = next_token_batch(blocks[offset : offset + batch_size])
        targets = teacher_topk(teacher_model(input_ids=input_ids.to(device)).logits, k, temperature)
        stop = offset + input_ids.shape[0]
        arrays["indices"][offset:stop] = targets.indices.cpu().numpy().astype(np.int32)
        arrays["logprobs"][offset:stop] = targets.logprobs.cpu().numpy().astype(np.float16)
        arrays["tail"][offset:stop] = targets.tail.cpu().numpy().astype(np.float32)
        progress.update(input_ids.shape[0])
    for array in arrays.values():
        array.flush()


class TeacherCache:
    """Read access to a cache written by ``write_cache``; build it with ``open_cache``.

    ``get(block_indices)`` returns the ``TeacherTopK`` targets of those blocks: ``indices`` ``[b, L, k]``
    int64, ``logprobs`` ``[b, L, k]`` float32 (stored as float16), ``tail`` ``[b, L]`` float32, aligned
    with ``data.next_token_batch(blocks[block_indices])``. Only the requested rows are read from disk.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.k: int = manifest["k"]
        self.temperature: float = manifest["temperature"]
        self.max_length: int = manifest["max_length"]
        self.num_blocks: int = manifest["num_blocks"]
        self.blocks_per_shard: int = manifest["blocks_per_shard"]
        self._shards = [
            {name: np.load(path / shard[name], mmap_mode="r") for name in _ARRAYS} for shard in manifest["shards"]
        ]

    def __len__(self) -> int:
        return self.num_blocks

    def get(self, block_indices: torch.Tensor | list[int], device: str | torch.device = "cpu") -> TeacherTopK:
        """Targets of the blocks ``block_indices`` (``[b]`` int) as a ``TeacherTopK`` on ``device``."""
        block_indices = torch.as_tensor(block_indices, dtype=torch.long).reshape(-1)
        if block_indices.numel() and (block_indices.min() < 0 or block_indices.max() >= self.num_blocks):
            raise IndexError(f"block index out of range for a cache of {self.num_blocks} blocks")
        parts = {name: [] for name in _ARRAYS}
        for block in block_indices.tolist():
            shard, row = divmod(block, self.blocks_per_shard)
            for name in _ARRAYS:
                parts[name].append(self._shards[shard][name][row])
        stacked = {name: np.stack(values) if values else None for name, values in parts.items()}
        if stacked["indices"] is None:
            empty = (0, self.max_length)
            return TeacherTopK(
                torch.zeros((*empty, self.k), dtype=torch.long, device=device),
                torch.zeros((*empty, self.k), dtype=torch.float32, device=device),
                torch.zeros(empty, dtype=torch.float32, device=device),
            )
        return TeacherTopK(
            torch.from_numpy(stacked["indices"]).to(device=device, dtype=torch.long),
            torch.from_numpy(stacked["logprobs"]).to(device=device, dtype=torch.float32),
            torch.from_numpy(stacked["tail"]).to(device=device, dtype=torch.float32),
        )


def open_cache(path: str | os.PathLike, expected_manifest: Mapping) -> TeacherCache:
    """Open the cache at ``path`` after checking it was built for this run.

    Every key of ``expected_manifest`` (e.g. teacher_model, teacher_revision, tokenizer_hash, k, temperature,
    max_length, dataset_fingerprint) must equal the stored value; otherwise a ConfigError names each
    mismatching key with both values and how to fix it. A directory without ``manifest.json`` is not a cache
    (an interrupted write); missing shard files are an error too.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ConfigError(
            f"teacher_cache {path} is not a teacher cache: it has no {MANIFEST_NAME} (missing directory, or a "
            f"write that did not finish). {_FIX}",
            field="teacher_cache",
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"teacher_cache {path} has format version {manifest.get('format_version')!r}, this kit reads "
            f"version {FORMAT_VERSION}. {_FIX}",
            field="teacher_cache",
        )
    expected = _json_ready(expected_manifest)
    mismatches = [
        f"{key}: cache has {manifest.get(key, '<missing>')!r}, this run needs {value!r}"
        for key, value in expected.items()
        if manifest.get(key, object()) != value
    ]
    if mismatches:
        raise ConfigError(
            f"teacher_cache {path} was built for a different run ({'; '.join(mismatches)}). {_FIX}",
            field="teacher_cache",
        )
    missing_files = [
        shard[name] for shard in manifest["shards"] for name in _ARRAYS if not (path / shard[name]).is_file()
    ]
    if missing_files:
        raise ConfigError(
            f"teacher_cache {path} is incomplete: missing {', '.join(missing_files[:3])}. {_FIX}",
            field="teacher_cache",
        )
    return TeacherCache(path, manifest)


__all__ = ["TeacherCache", "estimate_cache_bytes", "open_cache", "write_cache"]


def cache_manifest(cfg, tokenizer) -> dict:
    """What a teacher cache must have been built for to serve a run of ``cfg`` with ``tokenizer``."""
    fingerprint = dataset_fingerprint(
        source=cfg.dataset, tokenizer=tokenizer, max_length=cfg.max_length, eval_fraction=cfg.eval_fraction,
        seed=cfg.split_seed, subset_size=cfg.dataset_subset_size, text_column=cfg.text_column,
        dataset_config=cfg.dataset_config, split=cfg.dataset_split, document_separator=cfg.document_separator,
    )  # fmt: skip
    return {
        "teacher_model": cfg.teacher_model,
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "max_length": cfg.max_length,
        "dataset_fingerprint": fingerprint,
        "k": cfg.kd_top_k,
        "temperature": cfg.temperature,
    }
