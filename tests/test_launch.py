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

from kagglekd import env as kit_env
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
from kagglekd import checkpoint, diagnose, env, launch, memory, metrics, models, plots, trainer
from kagglekd.config import DistillConfig

config = env.notebook_config("smollm2-360m-to-135m-t4x2", sys.argv[1], False)
checkpoint.prepare_resume(sys.argv[1], search_roots=[sys.argv[1]])
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
    # an earlier cell used the GPU: notebook_launcher cannot fork usable workers, so torchrun in fresh processes
    monkeypatch.setattr(launch, "_cuda_initialized", lambda: True)
    fallback = launch.plan_launch(config, gpu="T4x2")
    assert (fallback.mode, fallback.processes, fallback.strategy) == ("subprocess", 2, "ddp")
    assert "already initialised" in fallback.reason
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m kagglekd train --config" in fallback.describe()
    assert launch.plan_launch(config, launch="in-process", gpu="T4x2").mode == "in-process"  # asked for: honoured
    with pytest.raises(launch.LaunchError, match="LAUNCH = 'subprocess'"):
        launch.notebook_launch(config, num_processes=2)
    with pytest.raises(launch.ConfigError, match="LAUNCH"):
        launch.plan_launch(config, launch="torchrun")


def test_the_session_planner_picks_subprocess_on_two_t4s_once_cuda_is_initialised(monkeypatch):
    """What the bundled kernel meets in 02: a T4 x2 session whose kernel ran the doctor and the dry run."""
    config = DistillConfig.load("tiny-cpu")
    monkeypatch.setattr(launch, "gpu_count", lambda: 2)
    monkeypatch.setattr(launch, "_nvidia_smi", lambda: [("Tesla T4", 15360), ("Tesla T4", 15360)])
    monkeypatch.setattr(launch, "_cuda_initialized", lambda: False)
    fresh = launch.plan_launch(config)
    assert (fresh.mode, fresh.processes, fresh.strategy, fresh.gpu) == ("notebook_launcher", 2, "ddp", "T4x2")
    monkeypatch.setattr(launch, "_cuda_initialized", lambda: True)
    used = launch.plan_launch(config)
    assert (used.mode, used.processes, used.strategy, used.gpu) == ("subprocess", 2, "ddp", "T4x2")
    explicit = launch.plan_launch(config, launch="subprocess", num_processes=2, gpu="cpu")
    assert (explicit.mode, explicit.processes, explicit.strategy) == ("subprocess", 2, "ddp")


def test_a_session_gpu_without_a_profile_is_said_unknown_not_planned_as_a_t4(monkeypatch, caplog):
    config = DistillConfig.load("tiny-cpu")
    monkeypatch.setattr(launch, "gpu_count", lambda: 2)
    monkeypatch.setattr(launch, "_cuda_initialized", lambda: False)
    monkeypatch.setattr(launch, "_nvidia_smi", lambda: [("Tesla V100-SXM2-32GB", 32510)] * 2)
    profile = launch.session_profile()
    assert (profile.name, profile.known, profile.devices) == ("unknown (Tesla V100-SXM2-32GB)", False, 2)
    assert profile.capacity_bytes == 32510 * 1024**2  # nvidia-smi's memory, not a T4's 15 GiB
    with caplog.at_level("WARNING", logger="kagglekd.launch"):
        plan = launch.plan_launch(config)
    assert plan.gpu == profile.name and "planned on unknown (Tesla V100-SXM2-32GB)" in plan.reason
    assert "no kagglekd GPU profile" in caplog.text
    assert plan.choice.worst.capacity == 32510 * 1024**2
    monkeypatch.setattr(launch, "_nvidia_smi", lambda: [])  # no names, no memory: nothing to plan with
    blind = launch.plan_launch(config)
    assert blind.choice is None and "memory was not planned" in blind.reason and "unknown (" in blind.gpu
    with pytest.raises(launch.ConfigError, match="matches no GPU profile"):
        launch.plan_launch(config, gpu="V100")


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


def test_kernel_gpu_note_adds_what_the_kernel_keeps_to_the_planned_peak(monkeypatch):
    """In the bundled kernel CUDA is initialised before the subprocess launch: its context stays on GPU 0 next to
    a worker. The note adds it to the plan and says what to do when the two together are tight."""
    from kagglekd.memory import GiB, MemoryPlan

    planned = MemoryPlan("T4x2", {"student_weights": 10 * GiB}, 15 * GiB, 8, 384, False, "full", [])
    monkeypatch.setattr(launch, "_kernel_gpu_bytes", lambda: (0, GiB // 2))
    note = launch.kernel_gpu_note(planned)
    assert "keeps 0.50 GiB of GPU 0" in note and "planned peak of 10.00 GiB" in note
    assert "70% of 15.0 GiB" in note and "tight" not in note  # (0.5 + 10) / 15
    monkeypatch.setattr(launch, "_kernel_gpu_bytes", lambda: (0, 3 * GiB))
    tight = launch.kernel_gpu_note(planned)
    assert "87% of 15.0 GiB: tight" in tight and "02_train" in tight and "batch_size" in tight  # 13 / 15
    assert launch.kernel_gpu_note(None).endswith("while the workers train.")


@pytest.mark.slow
def test_subprocess_launch_trains_two_ddp_processes_and_redraws_the_chart(tmp_path, use_kit_cache, monkeypatch, capsys):
    """torchrun with two gloo processes on CPU, started from this process: one run dir written by rank 0, the
    summary read back, the child's output streamed here and the live chart redrawn from history.csv."""
    from kagglekd import plots

    drawn: list[int] = []
    render = plots.LiveChart.render

    def recording_render(self):
        drawn.append(len(self.rows))
        return render(self)

    monkeypatch.setattr(plots.LiveChart, "render", recording_render)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    config = DistillConfig.from_dict({**TINY_RUN, "batch_size": 2, "max_steps": 2, "output_dir": str(run)})
    plan = launch.plan_launch(config, launch="subprocess", num_processes=2, gpu="cpu")
    # as in the bundled kernel, where earlier cells initialised CUDA: its cache is freed, what it keeps is said
    freed: list[bool] = []
    monkeypatch.setattr(launch, "_cuda_initialized", lambda: True)
    monkeypatch.setattr(kit_env, "free_accelerator_memory", lambda: freed.append(True))
    monkeypatch.setattr(launch, "_kernel_gpu_bytes", lambda: (0, 300 * 2**20))
    summary = launch.train(plan, chart_every_s=0)
    assert freed == [True]
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2
    # both ranks trained (as in the notebook_launcher test): each step holds 2 processes x batch 2 x 32 tokens
    assert summary["train_tokens"] == 2 * 2 * 2 * TINY_RUN["max_length"]
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 2 and not list(run.glob("history*.csv.*"))
    assert json.loads((run / launch.LAUNCH_CONFIG).read_text())["strategy"] == "ddp"
    assert drawn and drawn[-1] == 2 and min(drawn) >= 1  # only ever drawn with rows of this run
    assert (run / "live_chart.png").stat().st_size > 5000
    out = capsys.readouterr().out
    assert "-m torch.distributed.run --standalone --nproc_per_node 2" in out and '"optimizer_steps": 2' in out
    assert "note: this kernel keeps 0.29 GiB of GPU 0" in out and "with the planned peak of" in out


def test_a_training_child_rejected_at_setup_raises_with_the_exit_codes_and_its_lines(tmp_path, use_kit_cache):
    """A real torchrun child whose trainer refuses the config (split needs a second GPU): torchrun exits 1, the
    worker 2; the kit's own `error:` line is named even when torchrun's traceback fills the last lines."""
    config = DistillConfig.from_dict(
        {**TINY_RUN, "max_steps": 2, "strategy": "split", "output_dir": str(tmp_path / "run")}
    )
    with pytest.raises(launch.TrainingProcessError) as caught:
        launch.subprocess_launch(config, num_processes=1, chart_every_s=0)
    err = caught.value
    assert (err.exit_code, err.worker_exit_code) == (1, 2)
    assert "exited with code 1 (a worker exited with code 2): unusable config" in str(err)
    assert "error: strategy split puts the teacher on a second GPU" in str(err)
    assert err.last_lines and err.last_lines[-1] in str(err) and err.checkpoint is None


FAILING_CHILD = """
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
(run / "checkpoints" / "step-4").mkdir(parents=True)
(run / "checkpoints" / "step-4" / "trainer_state.json").write_text("{}")
(run / "failure_report.json").write_text(json.dumps({"reason": "3 optimizer steps in a row were non-finite"}))
for i in range(60):
    print(f"line {i}")
print("stopped: training stopped at step 7", file=sys.stderr)
sys.exit(3)
"""


def test_a_failing_child_raises_with_the_failure_report_and_the_newest_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(
        launch, "subprocess_command", lambda *args, **kwargs: [sys.executable, "-c", FAILING_CHILD, str(run)]
    )
    config = DistillConfig.from_dict({**TINY_RUN, "output_dir": str(run)})
    with pytest.raises(launch.TrainingProcessError) as caught:
        launch.subprocess_launch(config, num_processes=2, chart_every_s=0, tail_lines=10)
    err = caught.value
    message = str(err)
    assert err.exit_code == 3 and err.worker_exit_code is None
    assert "exited with code 3: the run stopped itself" in message
    assert err.failure_report == {"reason": "3 optimizer steps in a row were non-finite"} and "in a row" in message
    assert err.checkpoint == run / "checkpoints" / "step-4" and f"newest checkpoint: {err.checkpoint}" in message
    assert err.last_lines == [f"line {i}" for i in range(51, 60)] + ["stopped: training stopped at step 7"]
    assert "line 51" in message and "line 50" not in message
    assert "line 0" in capsys.readouterr().out  # every line was streamed while it ran


def test_the_child_finds_the_kit_where_this_kernel_found_it(tmp_path, monkeypatch):
    """The bundle's install cell puts the kit in a temporary folder on sys.path: the child gets it on PYTHONPATH
    (once), while a kit in site-packages adds nothing."""
    import kagglekd

    kit = tmp_path / "kagglekd-kit-x" / "site"
    monkeypatch.setattr(kagglekd, "__file__", str(kit / "kagglekd" / "__init__.py"))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = launch.child_env(30, {"KAGGLEKD_CACHE": "/cache"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(kit.resolve()), "/elsewhere"]
    assert (env["KAGGLEKD_CACHE"], env["PYTHONUNBUFFERED"], env["TQDM_MININTERVAL"]) == ("/cache", "1", "30")
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    assert launch.child_env()["PYTHONPATH"] == env["PYTHONPATH"]
    site_packages = Path(__import__("site").getsitepackages()[0])
    monkeypatch.setattr(kagglekd, "__file__", str(site_packages / "kagglekd" / "__init__.py"))
    monkeypatch.delenv("PYTHONPATH")
    assert "PYTHONPATH" not in launch.child_env()


def test_a_worker_crash_after_rank_zero_wrote_its_summary_still_returns_the_summary(tmp_path, monkeypatch, capsys):
    """A gloo worker may abort at interpreter exit after training: the run's files are complete, so no error."""
    run = tmp_path / "run"
    child = f"import pathlib, sys; pathlib.Path({str(run / 'summary.json')!r}).write_text('{{\"optimizer_steps\": 2}}')"
    child += "; print('terminate called without an active exception'); sys.exit(1)"
    monkeypatch.setattr(launch, "subprocess_command", lambda *args, **kwargs: [sys.executable, "-c", child])
    summary = launch.subprocess_launch(DistillConfig.from_dict({**TINY_RUN, "output_dir": str(run)}), 2, chart=False)
    assert summary == {"optimizer_steps": 2}
    assert "torchrun exited with code 1 after rank 0 had finished" in capsys.readouterr().out


# A training child whose bar redraws every step (as a tqdm bar through a pipe does), 1 s of its clock per step.
BAR_CHILD = """
import pathlib, sys
from tqdm.std import tqdm
for n in range(301):
    print(tqdm.format_meter(n, 300, n * 1.0, prefix="distil", unit="step"), end="\\r", flush=True)
print()
print("INFO kagglekd.trainer: done")
pathlib.Path(sys.argv[1], "summary.json").write_text('{"optimizer_steps": 300}')
"""


@pytest.mark.parametrize("run_type", ["Batch", "Interactive"])
def test_the_relay_of_a_childs_bars_is_thinned_in_commit_runs_only(tmp_path, monkeypatch, capsys, run_type):
    """Mend: in a commit run every redraw of the child's bar became a line of the saved notebook. There the relay
    shows a line per tenth or minute of the bar, whichever is rarer, and the final state; interactive runs relay
    every line, as before."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", run_type)
    monkeypatch.setattr(launch, "subprocess_command", lambda *a, **k: [sys.executable, "-c", BAR_CHILD, str(run)])
    summary = launch.subprocess_launch(DistillConfig.from_dict({**TINY_RUN, "output_dir": str(run)}), 1, chart=False)
    assert summary == {"optimizer_steps": 300}
    out = capsys.readouterr().out
    bars = [line for line in out.splitlines() if line.startswith("distil:")]
    assert "INFO kagglekd.trainer: done" in out and "300/300" in bars[-1]
    if run_type == "Batch":
        assert len(bars) <= 12 and bars[0].startswith("distil:   0%")
    else:
        assert 12 < len(bars) <= 22


def test_launch_max_steps_sets_the_plan_and_stop_after_pauses(tmp_path, use_kit_cache):
    """MAX_STEPS of 02_train is the plan (config max_steps), as `train --max-steps`: the run ends there with its
    export; STOP_AFTER pauses with a checkpoint and no export."""
    config = DistillConfig.from_dict({**TINY_RUN, "max_steps": 40, "output_dir": str(tmp_path / "run")})
    plan = launch.plan_launch(config, launch="in-process", gpu="cpu")
    paused = launch.train(plan, max_steps=3, stop_after=2, chart=False)
    assert paused["paused"] and paused["planned_steps"] == 3 and paused["optimizer_steps"] == 2
    assert not (tmp_path / "run" / "student").exists()
    summary = launch.train(plan, config=plan.config.replace(resume="auto"), max_steps=3, chart=False)
    assert summary["optimizer_steps"] == summary["planned_steps"] == 3 and not summary["paused"]
    assert (tmp_path / "run" / "student" / "config.json").is_file()
