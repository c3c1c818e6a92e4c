"""Faults: nothing lost, every error clear (OOM, full disk, kill -9, model mismatch)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN

from kagglekd.checkpoint import latest_checkpoint
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError, KaggleKDError
from kagglekd.teacher import TeacherSide
from kagglekd.trainer import Distiller, OutOfMemory

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("use_kit_cache")


def tiny(tmp_path, **changes) -> DistillConfig:
    return DistillConfig.from_dict(
        {**TINY_RUN, "output_dir": str(tmp_path / "run"), "resume": "auto", "save_steps": 2, **changes}
    )


def test_cuda_oom_is_explained_with_the_planner_estimate(tmp_path, monkeypatch):
    distiller = Distiller(tiny(tmp_path)).setup()
    calls = {"n": 0}
    original = distiller._train_step

    def oom_on_third(window):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return original(window)

    monkeypatch.setattr(distiller, "_train_step", oom_on_third)
    with pytest.raises(OutOfMemory) as err:
        distiller.train()
    message = str(err.value)
    assert "out of memory at step 2" in message and "planner estimates" in message and "batch_size" in message
    assert "step-2" in message  # says which checkpoint survived
    assert latest_checkpoint(distiller.checkpoint_dir).name == "step-2"


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    distiller = Distiller(tiny(tmp_path)).setup()
    original = distiller.accelerator.save_state
    calls = {"n": 0}

    def enospc_on_second(path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path)

    monkeypatch.setattr(distiller.accelerator, "save_state", enospc_on_second)
    with pytest.raises(KaggleKDError) as err:
        distiller.train()
    assert "No space left" in str(err.value) and "step-2" in str(err.value) and "intact" in str(err.value)
    checkpoints = sorted(p.name for p in distiller.checkpoint_dir.iterdir())
    assert checkpoints == ["step-2"]  # no half-written temp dir left behind
    # and it resumes from there
    resumed = Distiller(tiny(tmp_path)).setup()
    resumed._maybe_resume()
    assert resumed.state.step == 2


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    # A path below a regular file cannot be created, even by root.
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError) as err:
        Distiller(tiny(tmp_path, output_dir=str(tmp_path / "afile" / "run"))).setup()
    assert err.value.field == "output_dir" and "afile" in str(err.value)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"alpha_attention": 0.2, "attention_layers": 40}, "attention_layers"),
        ({"alpha_feature": 0.2, "feature_layers": 40}, "feature_layers"),
        ({"teacher_model": "tiny-random-dense", "sar": True}, "sar"),
        ({"alpha_kd": 0.0, "alpha_ce": 1.0, "alpha_feature": 0.2}, "alpha_feature"),
    ],
)
def test_model_mismatch_is_caught_at_setup(tmp_path, changes, field):
    # a config-only rule (alpha_feature without KD) is caught when the config is built, the others at setup
    with pytest.raises(ConfigError) as err:
        Distiller(tiny(tmp_path, **changes)).setup()
    assert err.value.field == field
    assert not (tmp_path / "run" / "history.csv").exists()  # before any step


TRAIN_SCRIPT = """
import sys
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller
config = DistillConfig.from_json(sys.argv[1])
Distiller(config).train()
"""


def _train_in_subprocess(config_path: Path, env: dict, kill_after_checkpoints: int | None):
    process = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(config_path)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if kill_after_checkpoints is None:
        assert process.wait(timeout=600) == 0
        return
    run = Path(json.loads(config_path.read_text())["output_dir"])
    deadline = time.time() + 600
    while time.time() < deadline:
        temps = list((run / "checkpoints").glob(".tmp-*")) if (run / "checkpoints").exists() else []
        done = list((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else []
        # kill in the middle of a checkpoint write once enough complete ones exist
        if len(done) >= kill_after_checkpoints and temps:
            break
        if process.poll() is not None:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_then_resume_matches_uninterrupted(tmp_path, kagglekd_cache):
    env = {**os.environ, "KAGGLEKD_CACHE": str(kagglekd_cache), "HF_HUB_OFFLINE": "1"}
    full_cfg = tiny(tmp_path / "full", max_steps=10, save_steps=2, eval_steps=5)
    cut_cfg = tiny(tmp_path / "cut", max_steps=10, save_steps=2, eval_steps=5)
    for cfg, name in ((full_cfg, "full.json"), (cut_cfg, "cut.json")):
        cfg.to_json(tmp_path / name)
    _train_in_subprocess(tmp_path / "full.json", env, None)
    _train_in_subprocess(tmp_path / "cut.json", env, kill_after_checkpoints=1)
    cut_run = Path(cut_cfg.output_dir)
    assert not (cut_run / "student").exists(), "the kill came too late to interrupt the run"
    newest = latest_checkpoint(cut_run / "checkpoints")
    assert newest is not None
    _train_in_subprocess(tmp_path / "cut.json", env, None)  # resume auto
    a = pd.read_csv(Path(full_cfg.output_dir) / "history.csv")
    b = pd.read_csv(cut_run / "history.csv")
    assert list(a["step"]) == list(b["step"]) == list(range(10))
    for column in ("loss", "lr", "kd", "ce"):
        assert (a[column] - b[column]).abs().max() < 1e-6, column
    assert (a["eval_ppl"].dropna() - b["eval_ppl"].dropna()).abs().max() < 1e-6


def test_grad_scaler_skip_is_counted_not_hidden(tmp_path, monkeypatch):
    """Under fp16 the GradScaler skips an overflowing step itself; the trainer must count it (CPU has no scaler,
    so accelerate's two signals are stood in for: a scaler exists, and it reports the step as skipped)."""
    from accelerate import Accelerator

    distiller = Distiller(tiny(tmp_path, max_steps=4, save_steps=None, ema_decay=0.5)).setup()
    monkeypatch.setattr(distiller.accelerator, "scaler", torch.amp.GradScaler("cpu", enabled=False), raising=False)
    overflow_steps = {1, 2}
    monkeypatch.setattr(
        Accelerator, "optimizer_step_was_skipped", property(lambda self: distiller.state.step in overflow_steps)
    )
    ema_before = [p.detach().clone() for p in distiller.ema.module.parameters()]
    distiller.train()
    rows = pd.read_csv(distiller.output_dir / "history.csv")
    assert list(rows["skipped"]) == [0, 1, 2, 2]
    assert distiller.state.consecutive_skips == 0
    # the EMA was updated on the two real steps only (it moved, so it was updated at least once)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(ema_before, distiller.ema.module.parameters()))


def test_cli_exits_3_after_a_non_finite_storm(tmp_path, monkeypatch, capsys):
    from kagglekd.__main__ import main

    original = TeacherSide.logits
    monkeypatch.setattr(TeacherSide, "logits", lambda self, ids: original(self, ids) * float("nan"))
    config = tiny(tmp_path, max_consecutive_skips=2, save_steps=None)
    config.to_json(tmp_path / "storm.json")
    assert main(["train", "--config", str(tmp_path / "storm.json")]) == 3
    assert "failure_report.json" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "failure_report.json").read_text())["skipped_total"] == 2
