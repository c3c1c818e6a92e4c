"""Checkpoints: found only when complete, pruned without losing the newest, never outranked by an older run,
and found in an attached previous Kaggle version's output."""

import json

import pytest
import torch
from conftest import TINY_RUN

from kagglekd import checkpoint
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller

pytestmark = pytest.mark.usefixtures("use_kit_cache")


def _checkpoint(root, step, complete=True):
    path = root / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * step)
    if complete:
        (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_find_previous_checkpoint_takes_the_newest_complete(tmp_path):
    inputs = tmp_path / "input"
    _checkpoint(inputs / "my-kernel" / "runs" / "a", 200)
    newest = _checkpoint(inputs / "datasets" / "me" / "other" / "run", 1000)  # mount layouts differ
    _checkpoint(inputs / "my-kernel" / "runs" / "a", 1200, complete=False)  # killed mid-write: ignored
    assert checkpoint.find_previous_checkpoint([inputs]) == newest
    assert checkpoint.find_previous_checkpoint([tmp_path / "missing"]) is None


def test_prepare_resume_copies_a_newer_attached_checkpoint(tmp_path):
    previous = _checkpoint(tmp_path / "input" / "prev-version", 400)
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 200)
    target = checkpoint.prepare_resume(run_dir, [tmp_path / "input"])
    assert target == run_dir / "checkpoints" / "step-400"
    state_file = checkpoint.STATE_FILE
    assert (target / state_file).read_text() == (previous / state_file).read_text()
    assert not list((run_dir / "checkpoints").glob(".copy-*"))
    # the local one is as new or newer: nothing copied
    _checkpoint(run_dir, 600)
    assert checkpoint.prepare_resume(run_dir, [tmp_path / "input"]) == run_dir / "checkpoints" / "step-600"
    assert checkpoint.prepare_resume(tmp_path / "fresh", [tmp_path / "nothing"]) is None
    # and the trainer's own lookup now finds it
    assert checkpoint.latest_checkpoint(run_dir / "checkpoints") == run_dir / "checkpoints" / "step-600"


def test_prune_never_removes_the_checkpoint_just_written(tmp_path):
    for step in (2, 8, 10):
        _checkpoint(tmp_path, step)
    written = _checkpoint(tmp_path, 4)
    checkpoint.prune(tmp_path / "checkpoints", keep=2, protect=written)
    kept = sorted(p.name for p in checkpoint.complete_checkpoints(tmp_path / "checkpoints"))
    assert kept == ["step-10", "step-4"]


def _config(tmp_path, **changes) -> DistillConfig:
    return DistillConfig.from_dict({**TINY_RUN, "output_dir": str(tmp_path / "run"), "save_total_limit": 2, **changes})


def test_resume_never_sets_an_older_runs_checkpoints_aside(tmp_path):
    """An older run left step-4 and step-6; a fresh run (resume never) into the same dir writes step-2. Its
    checkpoint survives pruning, and a later resume auto continues THIS run, not the old one."""
    Distiller(_config(tmp_path, save_steps=2, max_steps=8)).train(max_steps=7)
    old = sorted(p.name for p in checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints"))
    assert old == ["step-4", "step-6"]
    fresh = Distiller(_config(tmp_path, save_steps=2, max_steps=8, seed=1))
    fresh.train(max_steps=3)
    assert checkpoint.latest_checkpoint(fresh.checkpoint_dir).name == "step-2"
    moved = tmp_path / "run" / "checkpoints-previous"
    assert sorted(p.name for p in checkpoint.complete_checkpoints(moved)) == old  # nothing deleted
    resumed = Distiller(_config(tmp_path, save_steps=2, max_steps=8, seed=1, resume="auto")).setup()
    resumed._maybe_resume()
    assert resumed.state.step == 2 and len(resumed.history.rows) == 2


def test_non_finite_loss_with_finite_gradients_is_not_applied(tmp_path):
    """With closed-form gradients a non-finite loss can come with finite gradients: the update must be skipped
    before optimizer.step(), not applied and then counted as skipped."""
    distiller = Distiller(_config(tmp_path, max_steps=3, warmup_steps=0)).setup()  # LR > 0 at step 0
    original = distiller.objective.total
    distiller.objective.total = lambda parts, fused=None: original(parts, fused) + torch.tensor(float("inf"))
    before = [p.detach().clone() for p in distiller.student.parameters()]
    summary = distiller.train(max_steps=1)
    assert summary["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, distiller.student.parameters()))
