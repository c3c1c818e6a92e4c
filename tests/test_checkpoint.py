"""Checkpoints: found only when complete, pruned without losing the newest, never outranked by an older run,
and found in an attached previous Kaggle version's output."""

import contextlib
import json
import logging
import warnings

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


# ---- tied embeddings: saved once, reloaded bit for bit, without "Removed shared tensor" ---------------------
@contextlib.contextmanager
def _warnings_and_logs():
    """Every WARNING+ log record (root, and transformers' own non-propagating logger) and Python warning."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records, caught
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def _messages(records, caught) -> list[str]:
    return [r.getMessage() for r in records] + [str(w.message) for w in caught]


def _tied_student(vocab_size: int = 256):
    from transformers import AutoModelForCausalLM

    from kagglekd.models import tiny_dense_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_dense_config(vocab_size))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the demo student ties its embeddings
    return model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _bitwise_equal(model, snapshot) -> bool:
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in snapshot)


def test_checkpoint_of_a_tied_student_reloads_bitwise_without_the_shared_tensor_warning(tmp_path):
    from accelerate import Accelerator
    from safetensors import safe_open

    model = _tied_student()
    accelerator = Accelerator(cpu=True)
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    saved = _snapshot(model)
    with _warnings_and_logs() as (records, caught):
        path = checkpoint.save(accelerator, tmp_path / "checkpoints", 3, {"step": 3, "plan_steps": 6}, {}, keep=2)
    messages = _messages(records, caught)
    assert not [m for m in messages if "shared tensor" in m], messages
    with safe_open(path / "model.safetensors", "pt") as stored:  # the alias is stored once, under the kept name
        assert "model.embed_tokens.weight" in stored.keys() and "lm_head.weight" not in stored.keys()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert not _bitwise_equal(model, saved)
    with _warnings_and_logs() as (records, caught):
        checkpoint.load(accelerator, path, planned_steps=6)
    assert not _messages(records, caught)
    assert _bitwise_equal(model, saved)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor after the reload


def test_drop_tied_aliases_keeps_tensors_that_only_share_storage():
    base = torch.arange(12.0)
    weights = [
        {"a": base.view(3, 4), "alias": base.view(3, 4), "half": base[:6], "other": base[6:], "t": base.view(4, 3)}
    ]
    checkpoint.drop_tied_aliases([], weights, None)
    assert list(weights[0]) == ["a", "half", "other", "t"]  # only the exact view of "a" is an alias


@pytest.mark.parametrize("case", ["tied", "tied, flag says untied", "untied, flag says tied"])
def test_exported_student_reloads_bitwise_without_warnings(tmp_path, demo_tokenizer_dir, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kagglekd.rundir import export_student

    model = _tied_student()
    if case == "tied, flag says untied":
        model.config.tie_word_embeddings = False
    elif case == "untied, flag says tied":
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 0.5)
    saved = _snapshot(model)
    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    with _warnings_and_logs() as (records, caught):
        path = export_student(model, tokenizer, tmp_path / "student")
        reloaded = AutoModelForCausalLM.from_pretrained(path)
    messages = _messages(records, caught)
    about_ties = ("shared tensor", "tied weights", "tie_word_embeddings", "MISSING", "newly initialized")
    assert not [m for m in messages if any(words in m for words in about_ties)], messages
    assert _bitwise_equal(reloaded, saved)
    tied = case != "untied, flag says tied"
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    assert reloaded.config.tie_word_embeddings == tied
