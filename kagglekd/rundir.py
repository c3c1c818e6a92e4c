"""The run directory: its file names (defined once) and the JSON I/O every part writes through.

A run dir holds ``config.json``, ``plan.json``, ``data.json``, ``history.csv``, ``summary.json``, optional
``alignment.json`` / ``failure_report.json``, ``checkpoints/step-N/``, ``student/`` and (SAR) ``teacher_routers/``.
Every JSON file is written to a temp name and renamed, so a killed write never leaves half a file, and is strictly
valid JSON (``to_json_text``: a non-finite float is written as ``null``, never a bare ``NaN``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from kagglekd.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
DATA_FILE = "data.json"
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.json"
ALIGNMENT_FILE = "alignment.json"
FAILURE_FILE = "failure_report.json"
CHECKPOINTS_DIR = "checkpoints"
STUDENT_DIR = "student"
ROUTERS_DIR = "teacher_routers"


def write_json(path: Path, payload, *, sort_keys: bool = False) -> None:
    """Atomic write (temp file + rename) of ``payload`` as strictly valid JSON (see ``to_json_text``)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_json_text(payload, sort_keys=sort_keys), encoding="utf-8")
    tmp.replace(path)


def to_json_text(payload, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """``payload`` as strictly valid JSON text (RFC 8259), newline-terminated: the one JSON writer of the kit.

    Python's ``json`` writes a non-finite float as a bare ``NaN`` / ``Infinity``, which strict parsers (``jq``,
    JavaScript, ``json.loads(..., parse_constant=...)``) reject; here every non-finite float (Python, numpy or a
    0-d tensor) becomes ``null``, numpy/torch scalars their Python value, tuples and sets lists, and any other
    object its ``str``. A reader of a summary that says ``null`` for ``kd_loss`` sees "not measured" (a CE-only
    run), as the CSV's empty cell says."""
    return json.dumps(json_safe(payload), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"


def json_safe(value):
    """``value`` with non-finite floats -> None, numpy/torch scalars -> Python numbers, tuples/sets -> lists,
    dict keys -> str and unknown objects (paths, dtypes, devices) -> their ``str``, recursively."""
    if isinstance(value, dict):
        return {key if isinstance(key, str) else str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (np.generic, np.ndarray)) or type(value).__name__ == "Tensor":
        value = value.tolist() if getattr(value, "ndim", 0) else value.item()
        return json_safe(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, int):
        return int(value)
    return str(value)


def merge_json(path: Path, key: str, value: dict) -> None:
    """Set ``key`` in the JSON object at ``path`` (created when missing), keeping its other keys."""
    path = Path(path)
    report = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, {**report, key: value})


def prepare(output_dir: Path) -> None:
    """Create ``output_dir`` and prove it is writable, before any step spends time."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"output_dir {output_dir} is not writable ({err.strerror or err}). On Kaggle write under "
            "/kaggle/working (kept) or /kaggle/temp (scratch); /kaggle/input is read-only.",
            field="output_dir",
        ) from None


def export_student(model, tokenizer, path: str | os.PathLike) -> Path:
    """``save_pretrained`` of ``model`` and ``tokenizer`` into ``path``, through a temp dir and a rename.

    ``config.tie_word_embeddings`` is first made to say what the module does (``sync_tie_flag``): transformers
    stores a tied ``lm_head`` once and re-ties it on reload when the flag says tied. A flag that disagrees with
    the module reloads a different ``lm_head`` (measured on transformers 5.24): a tied module with the flag False
    is saved without ``lm_head``, which the reload reports MISSING and initialises at random; an untied module
    with the flag True reloads with a warning about the mismatch."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sync_tie_flag(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def sync_tie_flag(model) -> bool | None:
    """Set ``model.config.tie_word_embeddings`` to whether the output embedding IS the input embedding matrix;
    returns the flag (None when the model has no such pair or config key). Changing it is logged."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    config = model.config
    if inputs is None or outputs is None or not hasattr(config, "tie_word_embeddings"):
        return None
    tied = outputs.weight is inputs.weight or (
        outputs.weight.data_ptr() == inputs.weight.data_ptr() and outputs.weight.shape == inputs.weight.shape
    )
    if bool(config.tie_word_embeddings) != tied:
        log.info(
            "export: tie_word_embeddings %s -> %s (what the model's lm_head does)", config.tie_word_embeddings, tied
        )
        config.tie_word_embeddings = tied
    return tied
