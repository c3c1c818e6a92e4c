"""Checkpoints: save, load, prune and find — in this run dir or an attached previous Kaggle version's output.

``checkpoints/step-N/`` is written to a temp dir and renamed, and ``STATE_FILE`` is its last file, so only
complete checkpoints are ever found. What goes into one (model/optimizer state through accelerate, the extra
state of the parts, the train state and history) is decided by the trainer; this module only stores it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from kagglekd.errors import ConfigError, KaggleKDError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
EXTRA_FILE = "kagglekd_extra.pt"  # scheduler, RNGs, EMA, projections, routers, KA generator
_NAME = re.compile(r"step-(\d+)")


def step_of(path: str | os.PathLike) -> int:
    return int(Path(path).name.split("-")[-1])


def complete_checkpoints(directory: str | os.PathLike) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [p for p in directory.glob("step-*") if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(directory)
    return max(done, key=step_of) if done else None


def save(accelerator, directory: Path, step: int, state: dict, extra: dict, keep: int) -> Path:
    """Write ``directory/step-{step}`` (all ranks take part) and prune to the newest ``keep``; returns its path.

    A failed write removes its temp dir and names the previous checkpoint, which stays intact."""
    final = directory / f"step-{step}"
    tmp = directory / f".tmp-step-{step}"  # one name for all ranks: they write into it together
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        handle = accelerator.register_save_state_pre_hook(drop_tied_aliases)
        try:
            accelerator.save_state(str(tmp))
        finally:
            handle.remove()
        if accelerator.is_main_process:
            torch.save(extra, tmp / EXTRA_FILE)
            from kagglekd.rundir import write_json

            write_json(tmp / STATE_FILE, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune(directory, keep, protect=final)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(directory)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
        raise KaggleKDError(
            f"could not write checkpoint {final} ({err.strerror or err}); {kept}. Free space in the output dir "
            "(Kaggle keeps 20 GB in /kaggle/working) or lower save_total_limit."
        ) from err
    accelerator.wait_for_everyone()
    log.info("checkpoint %s", final)
    return final


def drop_tied_aliases(models: list, weights: list[dict], output_dir) -> None:
    """``accelerator.save_state`` pre-hook: drop from each state dict the names that alias an earlier entry
    (same storage, offset, shape, stride and dtype: a tied ``lm_head.weight`` is the embedding matrix itself).

    Why: safetensors cannot store two names for one tensor, so accelerate's writer drops such names itself and
    logs "Removed shared tensor {'lm_head.weight'} while saving" for every checkpoint of a student with tied
    embeddings. Dropping exact aliases here is lossless: ``load_state`` (``safetensors.torch.load_model``)
    treats the names that alias in the live model as one, and loading the kept name fills the shared tensor
    (``tests/test_checkpoint.py`` reloads bit for bit, without the warning). Tensors that only share part of a
    storage are left alone, so accelerate still warns about those."""
    for state in weights:
        kept: set[tuple] = set()
        for name in list(state):
            tensor = state[name]
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0 or tensor.device.type == "meta":
                continue
            view = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if view in kept:
                del state[name]
            else:
                kept.add(view)


def prune(directory: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints; ``protect`` (the one just written) is never removed."""
    done = sorted(complete_checkpoints(directory), key=step_of)
    others = [p for p in done if protect is None or p != protect]
    surplus = len(others) - (keep - 1 if protect is not None else keep)
    for old in others[: max(surplus, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load(accelerator, path: str | os.PathLike, planned_steps: int) -> tuple[dict, dict]:
    """Restore accelerate's state from ``path``; returns ``(train state with history, extra state)``."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"resume: {path} is not a complete kagglekd checkpoint (no {STATE_FILE}).", "resume")
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("plan_steps") != planned_steps:
        raise ConfigError(
            f"resume: checkpoint {path} belongs to a run of {state.get('plan_steps')} optimizer steps, this "
            f"config plans {planned_steps}. Resume with the same config or start a new output_dir.",
            "resume",
        )
    accelerator.load_state(str(path))
    extra = torch.load(path / EXTRA_FILE, weights_only=False)
    log.info("resumed from %s at step %d", path, state["step"])
    return state, extra


def set_aside(directory: Path) -> Path | None:
    """A fresh run (``resume: never``) into a run dir holding an older run's checkpoints: move them to
    ``checkpoints-previous`` so pruning cannot delete the new run's checkpoints in their favour and a later
    ``resume: auto`` cannot pick the old run up. One earlier run is kept there (the one before it is removed,
    so repeated fresh runs do not fill Kaggle's 20 GB). Returns where they went."""
    if not complete_checkpoints(directory):
        return None
    target = directory.with_name(f"{directory.name}-previous")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(directory, target)
    log.warning("resume never: the earlier run's checkpoints were moved to %s", target)
    return target


def find_previous_checkpoint(search_roots=("/kaggle/input",)) -> Path | None:
    """The newest complete ``checkpoints/step-N/`` under ``search_roots`` (e.g. an attached previous version's
    output). Found by glob, never by a hard-coded mount path: Kaggle has moved them before."""
    found = []
    for root in map(Path, search_roots):
        if root.is_dir():
            found += [
                s.parent for s in root.glob(f"**/checkpoints/step-*/{STATE_FILE}") if _NAME.fullmatch(s.parent.name)
            ]
    if not found:
        return None
    return max(found, key=lambda p: (step_of(p), p.stat().st_mtime, str(p)))


def prepare_resume(run_dir: str | os.PathLike, search_roots=("/kaggle/input",)) -> Path | None:
    """Make ``resume="auto"`` continue from the newest checkpoint, local or attached.

    When an attached previous output has a newer checkpoint than ``run_dir/checkpoints`` it is copied there
    (``/kaggle/input`` is read-only). Returns the checkpoint ``resume="auto"`` will load, or None.
    """
    from kagglekd.rundir import CHECKPOINTS_DIR

    local_dir = Path(run_dir) / CHECKPOINTS_DIR
    newest_local = latest_checkpoint(local_dir)
    previous = find_previous_checkpoint(search_roots)
    if previous is None or (newest_local is not None and step_of(newest_local) >= step_of(previous)):
        return newest_local
    target = local_dir / previous.name
    staging = local_dir / f".copy-{previous.name}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(previous, staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target
