"""Training from a notebook over both GPUs: the planner's strategy, launched from the notebook kernel.

``plan_launch(config)`` picks how ``02_train.ipynb`` trains: the planner's strategy (``memory.choose_strategy``)
for this session's GPUs, and a launch mode: ``notebook_launcher`` (one forked process per GPU: ddp),
``subprocess`` (torchrun in a child process group, one fresh process per GPU: ddp; its output and the live chart
streamed into the notebook) or ``in-process`` (one process: single, or split over two GPUs). ``train(plan)`` runs
it and returns the summary.

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
  subprocess, as accelerate's own ``get_gpu_info``). When an earlier cell (the doctor, a dry run, a previous
  in-process run; always so in the bundled kernel, which runs 00 and 01 first) has initialised CUDA,
  ``plan_launch`` picks ``subprocess`` instead: torchrun's workers are new processes (fork + exec), not forks of
  this kernel, so the kernel's CUDA state does not reach them.

notebook_launcher returns nothing: with one process it calls the training function in this process (the
summary is captured here); with several, rank 0 writes ``summary.json``, which is read back. ``subprocess``
writes the config to ``<output_dir>/launch_config.json``, runs ``python -m torch.distributed.run --standalone
--nproc_per_node N -m kagglekd train --config <that file>`` and reads rank 0's ``summary.json`` back; a failed
child raises ``TrainingProcessError`` with its exit code, last output lines, failure report and newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import re
import signal
import site
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from kagglekd import gpus, rundir
from kagglekd.config import DistillConfig
from kagglekd.env import progress_relay
from kagglekd.errors import ConfigError, KaggleKDError
from kagglekd.gpus import GpuProfile
from kagglekd.memory import TIGHT_FRACTION, GiB, MemoryPlan, StrategyChoice, choose_strategy

log = logging.getLogger(__name__)

MODES = ("in-process", "notebook_launcher", "subprocess")
LAUNCH_CONFIG = "launch_config.json"  # the config a subprocess launch hands to `kagglekd train`, in the run dir
CHILD_EXIT_MEANINGS = {
    2: "unusable config or data (the child's `error:` line says which field or file)",
    3: "the run stopped itself after too many non-finite steps (see failure_report.json)",
}


class LaunchError(KaggleKDError):
    """A multi-process launch that cannot work in this kernel; the message says why and what to do."""


class TrainingProcessError(LaunchError):
    """The training child of a ``subprocess`` launch exited non-zero. The attributes hold what the message shows:
    torchrun's ``exit_code``, the failed worker's (``worker_exit_code``, None when unknown), the child's
    ``last_lines``, the trainer's ``failure_report`` (None when it wrote none) and the newest ``checkpoint``."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int,
        worker_exit_code: int | None,
        last_lines: list[str],
        failure_report: dict | None,
        checkpoint: Path | None,
    ):
        super().__init__(message)
        self.exit_code = exit_code
        self.worker_exit_code = worker_exit_code
        self.last_lines = last_lines
        self.failure_report = failure_report
        self.checkpoint = checkpoint


@dataclass
class LaunchPlan:
    """How a notebook trains ``config``: ``mode`` with ``processes``, the trainer told ``config.strategy``."""

    mode: str  # in-process | notebook_launcher | subprocess
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
        text = f"{head}: {self.reason}"
        if self.mode == "subprocess":
            config_path = Path(self.config.output_dir) / LAUNCH_CONFIG
            text += f". Command: {' '.join(subprocess_command(config_path, self.processes, python='python'))}"
        return text


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
    """The GPU profile of this session (T4x2 on Kaggle's GPU sessions), read without touching CUDA: the GPUs
    counted through NVML, named by nvidia-smi, resolved by ``gpus.resolve``. A GPU the kit has no profile for
    comes back unknown (``known=False``) with nvidia-smi's memory (capacity 0 without nvidia-smi)."""
    count = gpu_count()
    if count == 0:
        return gpus.resolve("cpu")
    found = _nvidia_smi()
    profile = gpus.resolve(found[0][0] if found else "GPU without nvidia-smi", devices=count)
    if not profile.known and found:
        profile = dataclasses.replace(profile, capacity_bytes=found[0][1] * 1024**2)
    return profile


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
    """How to train ``config`` here. ``launch`` None lets the planner decide: when its strategy is ddp on several
    GPUs, notebook_launcher if CUDA is still untouched in this kernel, else subprocess (torchrun in fresh
    processes); in-process otherwise. ``num_processes`` None takes the planner's; ``gpu`` None reads this
    session's GPUs (``session_profile``)."""
    if launch is not None and launch not in MODES:
        raise ConfigError(f"LAUNCH = {launch!r}: one of {', '.join(MODES)} (or None: the planner decides).")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"num_processes = {num_processes}: must be >= 1 (or None: the planner decides).")
    profile = session_profile() if gpu is None else gpus.resolve(gpu, strict=not isinstance(gpu, GpuProfile))
    teacher_cfg, student_cfg = _model_config(config.teacher_model), _model_config(config.student_model)
    choice = None
    if not profile.known:
        log.warning("%s: no kagglekd GPU profile; %s", profile.name, profile.description)
    if profile.capacity_bytes <= 0:
        reason = f"{profile.name} has no kagglekd GPU profile and its memory is not known, so memory was not planned"
        planned = profile.devices if config.strategy == "ddp" else 1
    elif student_cfg is not None and (teacher_cfg is not None or not config.live_teacher):
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
        if not profile.known:
            reason = f"planned on {profile.name} with the memory nvidia-smi reports: {reason}"
        planned = choice.processes if choice.strategy == "ddp" else 1
    else:
        reason = "the models' configs cannot be read, so memory was not planned"
        planned = profile.devices if config.strategy == "ddp" else 1
    processes = 1 if launch == "in-process" else (num_processes or planned)
    mode = launch or ("notebook_launcher" if processes > 1 else "in-process")
    if processes > 1 and launch is None and _cuda_initialized():
        mode = "subprocess"
        reason += (
            ". CUDA is already initialised in this kernel (an earlier cell used the GPU: the doctor, a dry run or an "
            "in-process run), so notebook_launcher's forked workers could not use it: training through torchrun in "
            f"{processes} fresh processes started from here instead, their output and the live chart shown below"
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


def _kernel_gpu_bytes() -> tuple[int, int]:
    """(device, bytes in use) of this kernel's current CUDA device: its context and live tensors (and anything
    else on that GPU; nothing else in a Kaggle session before the launch). Called only once CUDA is initialised
    here, on the device it already uses, so it opens no new context."""
    import torch

    device = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    return device, total - free


def kernel_gpu_note(planned: MemoryPlan | None) -> str:
    """What this kernel keeps on its GPU while torchrun's workers train there, against the planned peak."""
    device, held = _kernel_gpu_bytes()
    text = (
        f"note: this kernel keeps {held / GiB:.2f} GiB of GPU {device} (its CUDA context and live tensors) while "
        "the workers train"
    )
    if planned is None:
        return text + "."
    together = (held + planned.total) / planned.capacity
    text += (
        f"; with the planned peak of {planned.total / GiB:.2f} GiB per GPU that is {together:.0%} of "
        f"{planned.capacity / GiB:.1f} GiB"
    )
    if together >= TIGHT_FRACTION:
        text += (
            ": tight. Restart the kernel and run only the install cell and 02_train (notebook_launcher: no CUDA in "
            "the kernel), free what earlier cells hold (del the models, then kagglekd.env.free_accelerator_memory()), "
            "or lower batch_size"
        )
    return text + "."


def _ddp_config(config: DistillConfig, num_processes: int, launcher: str) -> DistillConfig:
    """``config`` for a launch of several processes: they run ddp; a one-process strategy is refused."""
    if config.strategy not in ("auto", "ddp"):
        raise ConfigError(
            f"strategy {config.strategy} runs in one process; {launcher} with {num_processes} processes runs ddp. "
            "Set strategy ddp (or auto), or num_processes 1.",
            field="strategy",
        )
    return config.replace(strategy="ddp")


def _cuda_initialized() -> bool:
    import torch

    return torch.cuda.is_initialized()


# ---- running it --------------------------------------------------------------------------------------------
def train(
    plan: LaunchPlan,
    *,
    config: DistillConfig | None = None,
    max_steps: int | None = None,
    stop_after: int | None = None,
    chart_every_s: float = 30.0,
    chart: bool = True,
) -> dict:
    """Run ``plan`` (or ``config`` the same way, e.g. a CE-only twin) and return rank 0's summary; ``max_steps``
    and ``stop_after`` as in ``run_config``."""
    if config is None:
        config = plan.config
    else:  # a split needs a live teacher; a CE-only twin has none
        split_without_teacher = plan.strategy == "split" and not config.live_teacher
        config = config.replace(strategy="single" if split_without_teacher else plan.strategy)
    config = run_config(config, max_steps, stop_after)
    if plan.mode == "notebook_launcher":
        return notebook_launch(config, num_processes=plan.processes, chart_every_s=chart_every_s, chart=chart)
    if plan.mode == "subprocess":
        planned = plan.choice.worst if plan.choice is not None else None
        return subprocess_launch(config, plan.processes, chart_every_s=chart_every_s, chart=chart, planned=planned)
    results: list[dict] = []
    _train_worker(config.to_dict(), chart_every_s, chart, results)
    return results[0]


def run_config(config: DistillConfig, max_steps: int | None = None, stop_after: int | None = None) -> DistillConfig:
    """``config`` as a launch trains it: ``max_steps`` sets the plan (config max_steps: the LR schedule, warmup,
    last evaluation and export follow it), ``stop_after`` pauses the session there (``stopping``), and off Kaggle
    a /kaggle/working output dir maps to a local folder (``env.local_path``)."""
    from kagglekd.env import local_config

    changes = {key: value for key, value in (("max_steps", max_steps), ("stop_after", stop_after)) if value is not None}
    return local_config(config.replace(**changes) if changes else config)


def notebook_launch(
    config: DistillConfig,
    num_processes: int | None = None,
    *,
    max_steps: int | None = None,
    stop_after: int | None = None,
    chart_every_s: float = 30.0,
    chart: bool = True,
    port: int = 29500,
) -> dict:
    """Train ``config`` through ``accelerate.notebook_launcher`` and return rank 0's summary.

    ``num_processes`` None: the planner's (``plan_launch``). Several processes run ddp (one per GPU, forked:
    CUDA must be untouched in this kernel, else a ``LaunchError`` says what to do); one process runs in this
    process, as notebook_launcher does on one device. The live chart is drawn by rank 0 only. ``max_steps`` and
    ``stop_after``: ``run_config``.
    """
    from accelerate import notebook_launcher

    config = run_config(config, max_steps, stop_after)
    if num_processes is None:
        plan = plan_launch(config, launch="notebook_launcher")
        num_processes, config = plan.processes, plan.config
    if num_processes > 1:
        config = _ddp_config(config, num_processes, "notebook_launch")
        if _cuda_initialized():
            raise LaunchError(
                "CUDA is already initialised in this kernel (an earlier cell used the GPU), so the workers "
                "notebook_launcher forks could not use it. Use LAUNCH = 'subprocess' (or None: the planner picks "
                "it), which starts torchrun in fresh processes from here; or restart the kernel and run only the "
                "install cell and 02_train; or use one process (LAUNCH = 'in-process')."
            )
    results: list[dict] = []  # filled when the function runs in this process (one process)
    notebook_launcher(
        _train_worker,
        args=(config.to_dict(), chart_every_s, chart, results),
        num_processes=num_processes,
        use_port=str(port),
    )
    if results:
        return results[0]
    return json.loads((Path(config.output_dir) / rundir.SUMMARY_FILE).read_text())


def leave_worker(distiller, code: int = 0) -> None:
    """End a torchrun worker after a successful data-parallel run: every rank waits until all are here (rank 0
    has written the student and ``summary.json``), flushes its streams and logs, and leaves with ``os._exit``.

    Interpreter teardown is where gloo goes wrong: the process group dies with the DDP model (its last holder),
    its destructor joins the worker thread while holding the GIL, and that thread may still be freeing the last
    collective's tensors, which needs the GIL: a deadlock; or the group outlives the interpreter and a rank
    aborts ("terminate called without an active exception"). ``destroy_process_group`` has the same race (seen
    here in gdb). Skipping teardown is what Python's multiprocessing does for its own forked children (and so for
    notebook_launcher's workers). With one process this returns and nothing changes.
    """
    if distiller.world <= 1:
        return
    import logging

    distiller.accelerator.wait_for_everyone()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train_worker(config_dict: dict, chart_every_s: float, chart: bool, results: list) -> dict:
    """One process's job: build the Distiller (its Accelerator joins the launch's process group), train."""
    from kagglekd.plots import LiveChart
    from kagglekd.trainer import Distiller

    config = DistillConfig.from_dict(config_dict)
    rank_zero = int(os.environ.get("RANK", "0")) == 0
    callbacks = [LiveChart(config.output_dir, every_s=chart_every_s)] if chart and rank_zero else []
    distiller = Distiller(config, callbacks=callbacks)
    summary = distiller.train()
    if distiller.is_main:
        results.append(summary)
    return summary


# ---- subprocess: torchrun in a child process group, streamed into the notebook ---------------------------
def subprocess_command(config_path: str | Path, num_processes: int, *, python: str | None = None) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m kagglekd train --config <config_path>`` spelled as
    ``<python> -m torch.distributed.run`` (this interpreter by default): no reliance on PATH. ``--standalone``
    lets torchrun pick a free local rendezvous port."""
    command = [python or sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return command + ["--nproc_per_node", str(num_processes), "-m", "kagglekd", "train", "--config", str(config_path)]


def child_env(progress_every_s: float = 30.0, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This kernel's environment for the training child, plus what the child needs to match it.

    * ``kagglekd`` must import there as it does here: when the package is not in a site-packages folder (the
      bundle's install cell puts it in a temporary folder on ``sys.path``; the staged install cell may put an
      attached source folder there), that folder goes first on ``PYTHONPATH``.
    * unbuffered output, so lines arrive while they happen;
    * tqdm bars redrawn at most every ``progress_every_s`` seconds (``TQDM_MININTERVAL``): each redraw becomes a
      line of the notebook's output, which must stay readable over a 12 h run.
    """
    import kagglekd

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": str(max(progress_every_s, 0.1))}
    kit_root = Path(kagglekd.__file__).resolve().parents[1]
    site_dirs = {Path(d).resolve() for d in (*site.getsitepackages(), site.getusersitepackages())}
    python_path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if kit_root not in site_dirs and kit_root not in {Path(p).resolve() for p in python_path}:
        env["PYTHONPATH"] = os.pathsep.join([str(kit_root), *python_path])
    return {**env, **(extra or {})}


def subprocess_launch(
    config: DistillConfig,
    num_processes: int,
    *,
    max_steps: int | None = None,
    stop_after: int | None = None,
    chart_every_s: float = 30.0,
    chart: bool = True,
    tail_lines: int = 40,
    env: dict[str, str] | None = None,
    stop_grace_s: float = 30.0,
    planned: MemoryPlan | None = None,
) -> dict:
    """Train ``config`` with torchrun in a child process group and return rank 0's summary.

    The config goes to ``<output_dir>/launch_config.json``; ``subprocess_command`` runs it with ``num_processes``
    fresh processes (ddp when several: strategy set here), so CUDA initialised in this kernel does not matter.
    The child's output is written here line by line; every ``chart_every_s`` seconds (and at the end) the live
    chart is redrawn from the run's ``history.csv`` (rank 0 appends a row per optimizer step) through
    ``plots.LiveChart``: a PNG in the run dir and one display handle, which "Save & Run All" keeps. A non-zero
    exit raises ``TrainingProcessError``; an interrupt (KeyboardInterrupt) stops the child's process group before
    it propagates. ``env``: extra environment variables for the child (``child_env``). When CUDA is initialised
    here, this kernel's cached GPU memory is released first (``env.free_accelerator_memory``); its CUDA context
    (a few hundred MiB on the GPUs it used) stays, and a line says how much that is, added to ``planned`` (the
    memory plan of the fullest GPU), with what to do when the two together are tight. ``max_steps`` and
    ``stop_after``: ``run_config`` (they travel in the config file).
    """
    from kagglekd.plots import LiveChart

    config = run_config(config, max_steps, stop_after)
    if num_processes > 1:
        config = _ddp_config(config, num_processes, "a subprocess launch")
    if _cuda_initialized():  # what earlier cells left in this kernel's CUDA cache goes back to the child
        from kagglekd.env import free_accelerator_memory

        free_accelerator_memory()
        _echo(kernel_gpu_note(planned))
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / LAUNCH_CONFIG
    config.to_json(config_path)
    command = subprocess_command(config_path, num_processes)
    live = LiveChart(run_dir, every_s=chart_every_s) if chart else None
    last_lines: deque[str] = deque(maxlen=tail_lines)
    kit_errors: list[str] = []  # the kit's own one-line reasons (`error: ...`, `stopped: ...`), from any rank
    _echo(f"$ {' '.join(command)}")
    started = time.time()
    child = _start_child(command, child_env(chart_every_s, env))
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True)
    reader.start()
    chart_state: dict = {"mtime": None}
    try:
        _stream(
            lines,
            last_lines,
            kit_errors,
            live,
            chart_every_s,
            lambda: _refresh_chart(live, run_dir, started, chart_state),
        )
        exit_code = child.wait()
    except KeyboardInterrupt:
        _stop_process_group(child, stop_grace_s)
        newest = _newest_checkpoint(run_dir)
        _echo(
            f"interrupted: stopped the training processes; newest checkpoint: {newest or 'none yet'} "
            "(train again with resume='auto' to continue from it)"
        )
        raise
    finally:
        if child.poll() is None:  # an error here (not the child's): leave no orphaned training processes
            _stop_process_group(child, stop_grace_s)
        reader.join(timeout=10.0)  # the pipe has ended (or is about to, its writers gone)
        if child.stdout is not None:
            child.stdout.close()
    if live is not None:
        _refresh_chart(live, run_dir, started, chart_state)
    return _child_summary(exit_code, list(last_lines), kit_errors, run_dir, started)


def _start_child(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,  # universal newlines: a tqdm redraw (\r) ends a line too
        encoding="utf-8",
        errors="replace",
        env=env,
        start_new_session=True,  # its own process group: stopped as one, and a notebook interrupt is ours to handle
    )


def _stream(lines: queue.Queue, last_lines: deque, kit_errors: list[str], live, chart_every_s: float, redraw) -> None:
    """Echo the child's output lines until it ends, keeping the last lines and the kit's own one-line reasons,
    and call ``redraw`` every ``chart_every_s`` seconds when there is a live chart. The child's progress bars'
    lines are thinned (``env.progress_relay``): a few per bar in a commit run, a handful more interactively."""
    next_chart = time.monotonic() + chart_every_s
    relay = progress_relay()
    while True:
        try:
            line = lines.get(timeout=min(1.0, max(chart_every_s, 0.05)))
        except queue.Empty:
            line = ""
        if line is None:  # end of output: every process holding the pipe is gone
            for held in relay.finish() if relay else []:
                _echo(held)
            return
        if line.strip():
            last_lines.append(line)
            for shown in relay.lines(line) if relay else [line]:
                _echo(shown)
            if line.startswith(("error: ", "stopped: ")) and line not in kit_errors:
                kit_errors.append(line)
        if live is not None and time.monotonic() >= next_chart:
            redraw()
            next_chart = time.monotonic() + chart_every_s


def _child_summary(exit_code: int, last_lines: list[str], kit_errors: list[str], run_dir: Path, started: float) -> dict:
    """Rank 0's summary when this launch's child wrote one, else ``TrainingProcessError``."""
    summary_path = run_dir / rundir.SUMMARY_FILE
    if not _written_since(summary_path, started):  # rank 0 writes summary.json after everything else
        raise _training_process_error(exit_code, last_lines, kit_errors, run_dir, started)
    if exit_code != 0:
        # A worker failed after rank 0 had written everything (leave_worker skips the interpreter teardown where
        # gloo used to abort a rank now and then); the files are complete.
        worker = _worker_exit_code(last_lines)
        _echo(
            f"note: torchrun exited with code {exit_code}"
            + (f" (a worker exited with code {worker})" if worker is not None else "")
            + f" after rank 0 had finished and written {summary_path}: the run is complete"
        )
    return json.loads(summary_path.read_text())


def _echo(line: str) -> None:
    """One line of the child's output into this cell's output (the notebook's stdout)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _pump(stream, lines: queue.Queue) -> None:
    """Reader thread: the child's output lines into ``lines``, then None at its end."""
    try:
        for line in stream:
            lines.put(line.rstrip("\n"))
    except (OSError, ValueError):  # the pipe closed under us (the child was stopped)
        pass
    finally:
        lines.put(None)


def _written_since(path: Path, started: float) -> bool:
    """``path`` exists and was written by this launch (not a file of an earlier run in the same dir)."""
    try:
        return path.stat().st_mtime >= started - 1.0  # 1 s of slack for coarse file-system clocks
    except OSError:
        return False


def _refresh_chart(live, run_dir: Path, started: float, state: dict) -> bool:
    """Redraw ``live`` (a ``plots.LiveChart``) from ``run_dir/history.csv`` when the file changed since the last
    redraw and belongs to this launch. False when there was nothing (new) to draw."""
    import pandas as pd

    from kagglekd.metrics import read_history

    path = run_dir / rundir.HISTORY_FILE
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return False
    if mtime == state.get("mtime") or not _written_since(path, started):
        return False
    try:
        history = read_history(run_dir)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):  # caught mid-write: next time
        return False
    if history.empty:
        return False
    state["mtime"] = mtime
    live.rows = history.to_dict("records")
    live.render()
    return True


def _stop_process_group(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the child's process group (torchrun forwards it to its workers), SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _newest_checkpoint(run_dir: Path) -> Path | None:
    from kagglekd.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / rundir.CHECKPOINTS_DIR)


def _worker_exit_code(lines: list[str]) -> int | None:
    """The failed worker's exit code from torchrun's ChildFailedError report (its "Root Cause" entry)."""
    text = "\n".join(lines)
    text = text[text.find("Root Cause") :] if "Root Cause" in text else text
    found = re.search(r"exitcode\s*:\s*(-?\d+)", text)
    return int(found.group(1)) if found else None


def _training_process_error(
    exit_code: int, last_lines: list[str], kit_errors: list[str], run_dir: Path, started: float
) -> TrainingProcessError:
    worker_code = _worker_exit_code(last_lines)
    report_path = run_dir / rundir.FAILURE_FILE
    report = None
    if _written_since(report_path, started):
        try:
            report = json.loads(report_path.read_text())
        except (OSError, json.JSONDecodeError):
            report = None
    checkpoint = _newest_checkpoint(run_dir)
    if exit_code == 0:
        head = f"the training child exited 0 but wrote no {run_dir / 'summary.json'}"
    else:
        head = f"the training child exited with code {exit_code}"
        if worker_code is not None and worker_code != exit_code:
            head += f" (a worker exited with code {worker_code})"
        meaning = CHILD_EXIT_MEANINGS.get(worker_code if worker_code is not None else exit_code)
        if meaning:
            head += f": {meaning}"
    parts = [head + "."]
    if kit_errors:
        parts.append("kagglekd said:\n  " + "\n  ".join(kit_errors))
    if report is not None:
        parts.append(f"failure report {report_path}:\n  {json.dumps(report, default=str)}")
    parts.append(
        f"newest checkpoint: {checkpoint} (nothing is lost: train again with resume='auto' to continue from it)"
        if checkpoint
        else "no checkpoint was written yet."
    )
    parts.append(f"last {len(last_lines)} lines of its output:\n  " + "\n  ".join(last_lines))
    return TrainingProcessError(
        "\n".join(parts),
        exit_code=exit_code,
        worker_exit_code=worker_code,
        last_lines=last_lines,
        failure_report=report,
        checkpoint=checkpoint,
    )
