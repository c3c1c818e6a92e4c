"""kagglekd.launch: the plan a notebook trains with, CUDA left untouched before a launch, and training through
accelerate.notebook_launcher with one process (in this process) and with two (forked, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_RUN

from kagglekd import launch
from kagglekd.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]

# torch.cuda entry points that initialise CUDA (or run cuInit, which poisons fork) replaced by recorders, then
# everything 02_train does before its launch cell: imports, the config, the resume check, the launch plan.
NO_CUDA_SCRIPT = """
import json, sys
import torch

calls = []
def recorder(name):
    def record(*args, **kwargs):
        calls.append(name)
        return False if name in ("is_available", "is_bf16_supported") else None
    return record
for name in ("is_available", "init", "_lazy_init", "current_device", "get_device_properties", "get_device_name",
             "get_device_capability", "is_bf16_supported", "mem_get_info", "set_device", "synchronize",
             "empty_cache", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats"):
    setattr(torch.cuda, name, recorder(name))

import kagglekd
from kagglekd import diagnose, env, launch, memory, metrics, models, plots, trainer
from kagglekd.config import DistillConfig

config = env.notebook_config("smollm2-360m-to-135m-t4x2", sys.argv[1], False)
env.prepare_resume(sys.argv[1], search_roots=[sys.argv[1]])
forced = launch.plan_launch(config, gpu="T4x2")
session = launch.plan_launch(config)
print(json.dumps({"calls": calls, "initialized": torch.cuda.is_initialized(), "forced": [forced.mode, forced.processes,
                  forced.strategy], "session": [session.mode, session.gpu]}))
"""


def test_importing_the_kit_and_planning_the_launch_touch_no_cuda(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", NO_CUDA_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["calls"] == [] and out["initialized"] is False
    assert out["forced"] == ["notebook_launcher", 2, "ddp"]  # the planner's ddp on T4x2, no CUDA needed to say so
    assert out["session"] == ["in-process", "cpu"]


def test_plan_launch_modes_and_the_strategy_the_trainer_gets(monkeypatch):
    config = DistillConfig.load("tiny-cpu")
    plan = launch.plan_launch(config, gpu="T4x2")
    assert (plan.mode, plan.processes, plan.strategy) == ("notebook_launcher", 2, "ddp")
    assert plan.choice.strategy == "ddp" and "fit there" in plan.describe()
    one = launch.plan_launch(config, launch="in-process", gpu="T4x2")  # one process: both GPUs through split
    assert (one.mode, one.processes, one.strategy) == ("in-process", 1, "split")
    cpu = launch.plan_launch(config, gpu="cpu")
    assert (cpu.mode, cpu.processes, cpu.strategy) == ("in-process", 1, "single")
    assert launch.plan_launch(config, launch="notebook_launcher", gpu="cpu").processes == 1
    assert launch.plan_launch(config.replace(strategy="split"), gpu="T4x2").strategy == "split"  # honoured
    # an earlier cell used the GPU: notebook_launcher cannot fork usable workers, so one process, and why
    monkeypatch.setattr(launch, "_cuda_initialized", lambda: True)
    fallback = launch.plan_launch(config, gpu="T4x2")
    assert (fallback.mode, fallback.processes, fallback.strategy) == ("in-process", 1, "split")
    assert "already initialised" in fallback.reason and "accelerate launch --multi_gpu" in fallback.reason
    with pytest.raises(launch.LaunchError, match="Restart the kernel"):
        launch.notebook_launch(config, num_processes=2)
    with pytest.raises(launch.ConfigError, match="LAUNCH"):
        launch.plan_launch(config, launch="torchrun")


def test_notebook_launch_with_one_process_trains_here(tmp_path, use_kit_cache, capsys):
    config = DistillConfig.from_dict({**TINY_RUN, "max_steps": 2, "output_dir": str(tmp_path / "run")})
    summary = launch.notebook_launch(config, num_processes=1, chart_every_s=0)
    assert "Launching training on CPU" in capsys.readouterr().out  # accelerate's one-process path
    assert summary["optimizer_steps"] == 2
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 2
    assert (tmp_path / "run" / "live_chart.png").stat().st_size > 5000


TWO_PROCESS_SCRIPT = """
import json, sys
from kagglekd import launch
from kagglekd.config import DistillConfig
summary = launch.notebook_launch(DistillConfig.from_json(sys.argv[1]), num_processes=2, chart_every_s=0,
                                 port=int(sys.argv[2]))
print("SUMMARY " + json.dumps(summary))
"""


@pytest.mark.slow
def test_notebook_launch_with_two_processes_forks_ddp_workers(tmp_path, kagglekd_cache):
    """notebook_launcher's multi-process path on CPU: two forked workers (gloo), one run dir written by rank 0."""
    config = DistillConfig.from_dict({**TINY_RUN, "batch_size": 2, "max_steps": 2, "output_dir": str(tmp_path / "run")})
    config.to_json(tmp_path / "config.json")
    env = {**os.environ, "KAGGLEKD_CACHE": str(kagglekd_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = str(29500 + (os.getpid() + 500) % 1000)
    done = subprocess.run(
        [sys.executable, "-c", TWO_PROCESS_SCRIPT, str(tmp_path / "config.json"), port],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["optimizer_steps"] == 2
    # both ranks trained: each step holds 2 processes x batch 2 x 32 tokens
    assert summary["train_tokens"] == 2 * 2 * 2 * TINY_RUN["max_length"]
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == 2 and not list((tmp_path / "run").glob("history*.csv.*"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["strategy"] == "ddp"
