"""Data parallel on CPU (gloo): two processes equal one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN

from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller

ROOT = Path(__file__).resolve().parents[1]

GRAD_SCRIPT = """
import sys, torch
from kagglekd.config import DistillConfig
from kagglekd.launch import leave_worker
from kagglekd.trainer import Distiller
distiller = Distiller(DistillConfig.from_json(sys.argv[1])).setup()
distiller._train_step(next(distiller._windows(0)), apply=False)
if distiller.is_main:
    torch.save([p.grad.clone() for p in distiller.student.parameters()], sys.argv[2])
leave_worker(distiller)
"""


def _config(tmp_path, name, batch_size, **changes) -> DistillConfig:
    return DistillConfig.from_dict(
        {
            **TINY_RUN,
            "output_dir": str(tmp_path / name),
            "batch_size": batch_size,
            "max_steps": 4,
            "eval_steps": 2,
            "save_steps": 2,
            "weight_decay": 0.0,
            **changes,
        }
    )


def _launch(kagglekd_cache, *args):
    """Two CPU processes with gloo. torchrun is what `accelerate launch --multi_gpu` runs on GPUs; on CPU
    `accelerate launch --cpu` starts a single process, so the test calls torchrun directly."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "KAGGLEKD_CACHE": str(kagglekd_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


pytestmark = pytest.mark.usefixtures("use_kit_cache")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, kagglekd_cache):
    one = _config(tmp_path, "one", batch_size=4)
    two = _config(tmp_path, "two", batch_size=2)
    two.to_json(tmp_path / "two.json")

    # first-step gradients
    script = tmp_path / "grads.py"
    script.write_text(GRAD_SCRIPT)
    _launch(kagglekd_cache, str(script), str(tmp_path / "two.json"), str(tmp_path / "grads.pt"))
    reference = Distiller(one).setup()
    reference._train_step(next(reference._windows(0)), apply=False)
    expected = torch.cat([p.grad.flatten() for p in reference.student.parameters()])
    got = torch.cat([g.flatten() for g in torch.load(tmp_path / "grads.pt")])
    assert (expected - got).norm() / expected.norm() < 1e-5

    # whole run through the CLI: one history, one set of checkpoints, same numbers
    _launch(kagglekd_cache, "-m", "kagglekd", "-q", "train", "--config", str(tmp_path / "two.json"))
    Distiller(one).train()
    a = pd.read_csv(Path(one.output_dir) / "history.csv")
    b = pd.read_csv(Path(two.output_dir) / "history.csv")
    assert len(a) == len(b) == 4
    for column in ("lr", "loss", "kd", "ce", "grad_norm", "tokens"):
        assert (a[column] - b[column]).abs().max() < 1e-4 * max(1.0, a[column].abs().max()), column
    eval_a, eval_b = a["eval_ppl"].dropna(), b["eval_ppl"].dropna()
    assert ((eval_a - eval_b).abs() / eval_a).max() < 1e-5
    assert sorted(p.name for p in (Path(two.output_dir) / "checkpoints").iterdir()) == ["step-2"]
    assert not list(Path(two.output_dir).glob("history*.csv.*"))
    assert json.loads((Path(two.output_dir) / "summary.json").read_text())["optimizer_steps"] == 4
