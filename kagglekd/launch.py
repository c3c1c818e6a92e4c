"""Training from a notebook over both GPUs: ``accelerate.notebook_launcher`` with the planner's strategy.

``plan_launch(config)`` picks how ``02_train.ipynb`` trains: the planner's strategy (``memory.choose_strategy``)
for this session's GPUs, and a launch mode, ``notebook_launcher`` (one forked process per GPU: ddp) or
``in-process`` (one process: single, or split over two GPUs). ``train(plan)`` runs it and returns the summary.

notebook_launcher forks the workers, and a forked child cannot use CUDA once the parent has initialised it, so
nothing in the notebook kernel may touch CUDA before the launch (accelerate's rule; ../shared/KAGGLE.md). What
does what, in torch 2.x (``torch/cuda/__init__.py``):

* ``import torch``, importing ``kagglekd`` and its modules, building a ``DistillConfig``, the planner and
  ``plan_launch``: no CUDA call (``tests/test_launch.py`` runs them with torch.cuda's entry points replaced by
  tripwires).
* ``torch.cuda.device_count()`` asks NVML first; its docstring: "This API will NOT poison fork if NVML discovery
  succeeds" (only if NVML fails does it fall back to ``cudaGetDeviceCount``). It is how GPUs are counted here.
* ``torch.cuda.is_available()`` calls ``cudaGetDeviceCount``, which runs ``cuInit`` in the calling process and
  poisons fork unless ``PYTORCH_NVML_BASED_CUDA_CHECK=1``. Not called here before a launch; notebook_launcher
  calls it only on its one-process path, which does not fork.
* ``torch.cuda.get_device_properties`` and anything that allocates initialise CUDA
  (``torch.cuda.is_initialized()`` becomes True). GPU names and memory come from ``nvidia-smi`` instead (a
  subprocess, as accelerate's own ``get_gpu_info``), and ``plan_launch`` falls back to one process, saying why,
  when an earlier cell (the doctor, a dry run, a previous in-process run) has initialised CUDA.

notebook_launcher returns nothing: with one process it calls the training function in this process (the
summary is captured here); with several, rank 0 writes ``summary.json``, which is read back.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError, KaggleKDError
from kagglekd.memory import (
    GPU_PROFILES,
    GiB,
    GpuProfile,
    StrategyChoice,
    choose_strategy,
    gpu_profile,
    live_teacher,
)

MODES = ("in-process", "notebook_launcher")


class LaunchError(KaggleKDError):
    """A multi-process launch that cannot work in this kernel; the message says why and what to do."""


@dataclass
class LaunchPlan:
    """How a notebook trains ``config``: ``mode`` with ``processes``, the trainer told ``config.strategy``."""

    mode: str  # in-process | notebook_launcher
    processes: int
    config: DistillConfig  # the run's config, strategy resolved (ddp for several processes)
    gpu: str  # the GPU profile planned for
    reason: str
    choice: StrategyChoice | None = None

    @property
    def strategy(self) -> str:
        return self.config.strategy

    def describe(self) -> str:
        head = f"launch: {self.mode}, {self.processes} process(es), strategy {self.strategy} on {self.gpu}"
        return f"{head}: {self.reason}"


# ---- this session's GPUs, without initialising CUDA ------------------------------------------------------
def gpu_count() -> int:
    """Visible CUDA devices (honours CUDA_VISIBLE_DEVICES), counted through NVML: does not initialise CUDA."""
    import torch

    return torch.cuda.device_count()


def _nvidia_smi() -> list[tuple[str, int]]:
    """(name, total MiB) per GPU from nvidia-smi; [] when it is not there."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            rows.append((name.strip(), int(float(mib))))
        except ValueError:
            continue
    return rows


def session_profile() -> GpuProfile:
    """The memory-planner profile of this session (T4x2 on Kaggle's GPU sessions), read without touching CUDA."""
    count = gpu_count()
    if count == 0:
        return GPU_PROFILES["cpu"]
    gpus = _nvidia_smi()
    name = gpus[0][0] if gpus else ""
    for key in ("T4", "P100", "A100", "L4"):
        if key in name:
            if key == "T4" and count == 2:
                return GPU_PROFILES["T4x2"]
            base = GPU_PROFILES[key]
            return dataclasses.replace(base, name=key if count == 1 else f"{key}x{count}", devices=count)
    capacity = gpus[0][1] * 1024**2 if gpus else 15 * GiB
    label = name or "unknown GPU"
    return GpuProfile(label, capacity, count, None, False, True, 65e12, f"{label} x{count} (read by nvidia-smi)")


def _model_config(name: str):
    from kagglekd.memory import resolve_model_config

    model_cfg, _ = resolve_model_config(name)
    if model_cfg is None:  # a hub id without a card: its config.json (network when online; no CUDA)
        try:
            from transformers import AutoConfig

            model_cfg = AutoConfig.from_pretrained(name)
        except (OSError, ValueError):
            return None
    return model_cfg


# ---- the plan ----------------------------------------------------------------------------------------------
def plan_launch(
    config: DistillConfig,
    launch: str | None = None,
    num_processes: int | None = None,
    gpu: str | GpuProfile | None = None,
) -> LaunchPlan:
    """How to train ``config`` here. ``launch`` None lets the planner decide (notebook_launcher when its strategy
    is ddp on several GPUs and CUDA is still untouched in this kernel, else in-process); ``num_processes`` None
    takes the planner's; ``gpu`` None reads this session's GPUs (``session_profile``)."""
    if launch is not None and launch not in MODES:
        raise ConfigError(f"LAUNCH = {launch!r}: one of {', '.join(MODES)} (or None: the planner decides).")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"num_processes = {num_processes}: must be >= 1 (or None: the planner decides).")
    profile = gpu if isinstance(gpu, GpuProfile) else (gpu_profile(gpu) if gpu else session_profile())
    teacher_cfg, student_cfg = _model_config(config.teacher_model), _model_config(config.student_model)
    choice = None
    if teacher_cfg is not None and student_cfg is not None:
        choice = choose_strategy(
            config,
            gpu=profile,
            teacher_cfg=teacher_cfg,
            student_cfg=student_cfg,
            gradient_checkpointing=config.gradient_checkpointing,
            sar=config.sar,
        )
        reason = choice.reason
        if choice.problem:
            reason = f"{choice.problem} {reason} (fix: {choice.fix})"
        planned = choice.processes if choice.strategy == "ddp" else 1
    else:
        reason = "the models' configs cannot be read, so memory was not planned"
        planned = profile.devices if config.strategy == "ddp" else 1
    processes = 1 if launch == "in-process" else (num_processes or planned)
    mode = launch or ("notebook_launcher" if processes > 1 else "in-process")
    if processes > 1 and launch is None and _cuda_initialized():
        mode, processes = "in-process", 1
        reason += (
            ". But CUDA is already initialised in this kernel (an earlier cell used the GPU: the doctor, a dry run "
            "or an in-process run), and notebook_launcher's forked workers could not use it: training in one "
            "process. For both GPUs restart the kernel and run only the install cell and this notebook, or run "
            "`!accelerate launch --multi_gpu --num_processes 2 -m kagglekd train --config <run dir>/train_config.json`"
        )
    if processes > 1:
        strategy = "ddp"
    elif config.strategy not in ("auto", "ddp"):
        strategy = config.strategy  # honoured (single, split); the planner checked it above
    else:
        strategy = choice.fallback if choice is not None else config.strategy
        if choice is not None and choice.strategy == "ddp":
            reason += f"; in one process: {strategy}"
    return LaunchPlan(mode, processes, config.replace(strategy=strategy), profile.name, reason, choice)


def _cuda_initialized() -> bool:
    import torch

    return torch.cuda.is_initialized()


# ---- running it --------------------------------------------------------------------------------------------
def train(
    plan: LaunchPlan,
    *,
    config: DistillConfig | None = None,
    max_steps: int | None = None,
    chart_every_s: float = 30.0,
    chart: bool = True,
) -> dict:
    """Run ``plan`` (or ``config`` the same way, e.g. a CE-only twin) and return rank 0's summary."""
    if config is None:
        config = plan.config
    else:  # a split needs a live teacher; a CE-only twin has none
        split_without_teacher = plan.strategy == "split" and not live_teacher(config)
        config = config.replace(strategy="single" if split_without_teacher else plan.strategy)
    if plan.mode == "notebook_launcher":
        return notebook_launch(
            config, num_processes=plan.processes, max_steps=max_steps, chart_every_s=chart_every_s, chart=chart
        )
    results: list[dict] = []
    _train_worker(config.to_dict(), max_steps, chart_every_s, chart, results)
    return results[0]


def notebook_launch(
    config: DistillConfig,
    num_processes: int | None = None,
    *,
    max_steps: int | None = None,
    chart_every_s: float = 30.0,
    chart: bool = True,
    port: int = 29500,
) -> dict:
    """Train ``config`` through ``accelerate.notebook_launcher`` and return rank 0's summary.

    ``num_processes`` None: the planner's (``plan_launch``). Several processes run ddp (one per GPU, forked:
    CUDA must be untouched in this kernel, else a ``LaunchError`` says what to do); one process runs in this
    process, as notebook_launcher does on one device. The live chart is drawn by rank 0 only.
    """
    from accelerate import notebook_launcher

    if num_processes is None:
        plan = plan_launch(config, launch="notebook_launcher")
        num_processes, config = plan.processes, plan.config
    if num_processes > 1:
        if config.strategy not in ("auto", "ddp"):
            raise ConfigError(
                f"strategy {config.strategy} runs in one process; notebook_launch with {num_processes} processes "
                "runs ddp. Set strategy ddp (or auto), or num_processes 1.",
                field="strategy",
            )
        if _cuda_initialized():
            raise LaunchError(
                "CUDA is already initialised in this kernel (an earlier cell used the GPU), so the workers "
                "notebook_launcher forks could not use it. Restart the kernel and run only the install cell and "
                "02_train, or use one process (LAUNCH = 'in-process'), or run `!accelerate launch --multi_gpu "
                f"--num_processes {num_processes} -m kagglekd train --config <run dir>/train_config.json`."
            )
        config = config.replace(strategy="ddp")
    results: list[dict] = []  # filled when the function runs in this process (one process)
    notebook_launcher(
        _train_worker,
        args=(config.to_dict(), max_steps, chart_every_s, chart, results),
        num_processes=num_processes,
        use_port=str(port),
    )
    if results:
        return results[0]
    import json

    return json.loads((Path(config.output_dir) / "summary.json").read_text())


def _train_worker(config_dict: dict, max_steps, chart_every_s: float, chart: bool, results: list) -> dict:
    """One process's job: build the Distiller (its Accelerator joins the launch's process group), train."""
    from kagglekd.plots import LiveChart
    from kagglekd.trainer import Distiller

    config = DistillConfig.from_dict(config_dict)
    rank_zero = int(os.environ.get("RANK", "0")) == 0
    callbacks = [LiveChart(config.output_dir, every_s=chart_every_s)] if chart and rank_zero else []
    distiller = Distiller(config, callbacks=callbacks)
    summary = distiller.train(max_steps=max_steps)
    if distiller.is_main:
        results.append(summary)
    return summary
