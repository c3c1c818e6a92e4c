"""Runtime doctor: which GPU this session has, whether this torch can run on it, real bf16, Kaggle paths.

``python -m kagglekd doctor [--json]`` and the first notebook call ``doctor()``. Everything is read at call
time through ``torch.cuda.*`` and ``os.environ``, so tests monkeypatch those and run on CPU.

Two facts carry the checks (see ../shared/KAGGLE.md):

* A P100 (sm_60) reports ``torch.cuda.is_available() == True`` on the current Kaggle image, but that torch
  ships no sm_60 kernels: the first CUDA op fails with "no kernel image is available". The doctor compares
  the device's sm_XY with ``torch.cuda.get_arch_list()`` instead of trusting ``is_available``.
* ``torch.cuda.is_bf16_supported()`` is True on a T4 (emulation). Real bf16 means compute capability >= 8.0.

Where the session runs is read from the variables the Kaggle kernel image sets, never from folders: any directory
named /kaggle/working may exist on another machine (a preset's output_dir creates it). Off Kaggle, a preset's
/kaggle/working output dir maps to a local folder (``local_path``), so nothing is written under /kaggle.

In a commit run ("Save & Run All", run type Batch) every refresh of a progress bar is saved as its own line of
output; the kit's bars (``progress_bar``) and the relay of a training child's output (``ProgressRelay``) write a
line per tenth of the bar or per minute, whichever is rarer, plus the final line.

Checkpoints of an attached previous kernel version are found by ``kagglekd.checkpoint.prepare_resume``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.std import tqdm as _TextBar

from kagglekd import gpus as profiles
from kagglekd.rundir import write_json

log = logging.getLogger(__name__)

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_TEMP = Path("/kaggle/temp")
# Variables the Kaggle kernel image sets in every session, interactive or commit: KAGGLE_KERNEL_RUN_TYPE (what
# Kaggle's own kagglehub checks, src/kagglehub/env.py is_in_kaggle_notebook), KAGGLE_URL_BASE and
# KAGGLE_USER_SECRETS_TOKEN (read by Kaggle/docker-python patches/kaggle_web_client.py), KAGGLE_DATA_PROXY_TOKEN
# (patches/sitecustomize.py). docker-python's tests set these same variables to simulate a kernel. The Kaggle CLI's
# credentials (KAGGLE_USERNAME, KAGGLE_KEY) are set on laptops too and are not markers.
KAGGLE_MARKERS = ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_TOKEN", "KAGGLE_USER_SECRETS_TOKEN")
LOCAL_WORKING_VAR = "KAGGLEKD_WORKING"  # off Kaggle: the folder /kaggle/working maps to (default: the cwd)
# A commit run's bars write a line when both a tenth of the bar and a minute have passed since their last line.
COMMIT_BAR_FRACTION = 0.1
COMMIT_BAR_INTERVAL_S = 60.0
# A training child's bars relayed into a watched (interactive) cell: a line per 5 % or 10 s, whichever is rarer.
INTERACTIVE_BAR_FRACTION = 0.05
INTERACTIVE_BAR_INTERVAL_S = 10.0
LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "pandas", "matplotlib")
T4X2_FIX = "choose 'GPU T4 x2' (notebook Settings > Accelerator; kernel-metadata.json machine_shape NvidiaTeslaT4)"

# What a notebook run under SMOKE changes: tiny random models on the offline corpus, a few steps. Seconds on CPU.
SMOKE_OVERRIDES = {
    "teacher_model": "tiny-random-moe",
    "student_model": "tiny-random-dense",
    "tokenizer": None,
    "teacher_tokenizer": None,
    "dataset": "stdlib-docs",
    "dataset_config": None,
    "dataset_split": "train",
    "text_column": "text",
    "dataset_subset_size": 6,
    "max_length": 32,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-3,
    "max_steps": 4,
    "warmup_steps": 1,
    "eval_steps": 2,
    "eval_max_blocks": 8,
    "save_steps": 2,
    "kd_top_k": None,
    "early_stopping_patience": None,
    "ema_decay": None,
}


@dataclass
class GpuInfo:
    index: int
    name: str
    capability: tuple[int, int]
    memory_gib: float | None
    has_kernels: bool  # the installed torch carries kernels (or PTX) this device can run
    native_bf16: bool  # compute capability >= 8.0, not torch.cuda.is_bf16_supported()

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclass
class Check:
    severity: str  # "error" | "warning" | "info"
    message: str
    fix: str | None = None


@dataclass
class EnvReport:
    """What ``doctor()`` found. ``exit_code`` is 1 when a check is an error (the CLI's exit status)."""

    python: str
    torch_version: str | None
    torch_cuda: str | None
    arch_list: list[str]
    cuda_available: bool
    gpus: list[GpuInfo]
    profile: str  # the kagglekd.gpus profile this session matches (T4x2, T4, P100, A100, L4, cpu, "unknown (...)")
    run_type: str | None  # KAGGLE_KERNEL_RUN_TYPE: Interactive, Batch, or None off Kaggle
    on_kaggle: bool
    paths: dict[str, dict]
    internet: str  # "reachable", "unreachable" or "unknown (not checked)"
    versions: dict[str, str | None]
    checks: list[Check] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if any(c.severity == "error" for c in self.checks) else 0

    def to_dict(self) -> dict:
        out = asdict(self)
        for gpu, raw in zip(self.gpus, out["gpus"]):
            raw["arch"] = gpu.arch
        out["exit_code"] = self.exit_code
        return out

    def rows(self) -> list[dict]:
        """(item, value) rows for a notebook table."""
        rows = [
            {"item": "python", "value": self.python},
            {"item": "torch build", "value": f"{self.torch_version} (CUDA {self.torch_cuda or '-'})"},
            {"item": "torch arch list", "value": " ".join(self.arch_list) or "-"},
        ]
        if not self.gpus:
            rows.append({"item": "GPU", "value": "none (CPU only)"})
        for gpu in self.gpus:
            memory = f", {gpu.memory_gib:.1f} GiB" if gpu.memory_gib else ""
            rows.append(
                {
                    "item": f"GPU {gpu.index}",
                    "value": f"{gpu.name} ({gpu.arch}{memory}); "
                    f"kernels in this torch: {'yes' if gpu.has_kernels else 'NO'}; "
                    f"native bf16: {'yes' if gpu.native_bf16 else 'no (fp16 + GradScaler)'}",
                }
            )
        rows += [
            {"item": "GPU profile", "value": self.profile},
            {"item": "Kaggle run type", "value": self.run_type or "not on Kaggle"},
            {"item": "internet", "value": self.internet},
        ]
        for name, info in self.paths.items():
            state = "writable" if info["writable"] else ("read-only" if info["exists"] else "missing")
            rows.append({"item": f"{name} dir", "value": f"{info['path']} ({state})"})
        for name, version in self.versions.items():
            rows.append({"item": name, "value": version or "not installed"})
        return rows

    def format_text(self) -> str:
        width = max(len(r["item"]) for r in self.rows())
        lines = ["kagglekd doctor"] + [f"  {r['item']:<{width}}  {r['value']}" for r in self.rows()]
        for check in self.checks:
            lines.append(f"[{check.severity.upper()}] {check.message}")
            if check.fix:
                lines.append(f"    fix: {check.fix}")
        errors = sum(c.severity == "error" for c in self.checks)
        lines.append(f"{errors} error(s)" if errors else "ok: this session can run kagglekd")
        return "\n".join(lines)


# ---- GPU -------------------------------------------------------------------------------------------------
def _parse_arch(entry: str) -> tuple[str, int, int] | None:
    match = re.fullmatch(r"(sm|compute)_(\d)(\d+)a?", entry)
    return (match.group(1), int(match.group(2)), int(match.group(3))) if match else None


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Can a torch built for ``arch_list`` run on a device of ``capability``?

    A cubin for sm_XY runs on devices of the same major X and minor >= Y; PTX (compute_XY) is JIT-compiled
    for any device >= XY. An empty list (torch without CUDA, or a build that does not say) is "no".
    """
    major, minor = capability
    for entry in arch_list:
        parsed = _parse_arch(entry)
        if parsed is None:
            continue
        kind, x, y = parsed
        if kind == "sm" and x == major and y <= minor:
            return True
        if kind == "compute" and (x, y) <= (major, minor):
            return True
    return False


def gpus() -> tuple[list[GpuInfo], list[str], bool]:
    """(GPUs, torch's arch list, torch.cuda.is_available()) read through torch.cuda at call time."""
    import torch

    if not torch.cuda.is_available():
        return [], [], False
    arch_list = list(torch.cuda.get_arch_list())
    found = []
    for index in range(torch.cuda.device_count()):
        capability = tuple(int(v) for v in torch.cuda.get_device_capability(index))
        try:
            memory_gib = torch.cuda.get_device_properties(index).total_memory / 1024**3
        except (RuntimeError, AttributeError, AssertionError):
            memory_gib = None
        found.append(
            GpuInfo(
                index=index,
                name=str(torch.cuda.get_device_name(index)),
                capability=capability,
                memory_gib=memory_gib,
                has_kernels=arch_supported(capability, arch_list),
                native_bf16=capability >= (8, 0),
            )
        )
    return found, arch_list, True


def profile_name(found: list[GpuInfo]) -> str:
    """The GPU profile of these GPUs (``gpus.resolve`` of the first one's name, for as many as there are), used as
    ``diagnose(gpu=...)``: T4x2, T4, P100, A100, L4, cpu, ..., or ``unknown (<name>)`` for a GPU the kit has no
    profile for (the doctor says so; it is never taken for a T4)."""
    return profiles.resolve(found[0].name, devices=len(found)).name if found else "cpu"


def gpu_profile_name() -> str:
    """The GPU profile of this session: T4x2, T4, P100, A100, L4, cpu, or ``unknown (<name>)``."""
    return profile_name(gpus()[0])


# ---- Kaggle session --------------------------------------------------------------------------------------
def run_type() -> str | None:
    """``Interactive`` (editing), ``Batch`` (Save & Run All) or None when not on Kaggle."""
    return os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or None


def commit_run() -> bool:
    """A Kaggle commit run ("Save & Run All"): run type Batch."""
    return run_type() == "Batch"


def progress_line_due(
    done: float,
    total: float | None,
    last_done: float,
    seconds_since: float,
    fraction: float = COMMIT_BAR_FRACTION,
    interval_s: float = COMMIT_BAR_INTERVAL_S,
) -> bool:
    """Whether a bar writes a line now, ``seconds_since`` its last line at ``last_done`` of ``total``: when
    ``fraction`` of the bar AND ``interval_s`` have both passed. A commit run's defaults: every 10 % or every
    minute, whichever is rarer, so a bar writes at most 12 lines (its first, ten, its final) however long it runs,
    and a minute-long bar no more than one a minute. Without a total: every ``interval_s``."""
    if seconds_since < interval_s:
        return False
    return not total or done - last_done >= fraction * total


class CommitProgressBar(_TextBar):
    """The kit's text bar in a commit run. Saved, every refresh of a bar there becomes its own output line (a
    step's ``set_postfix`` refreshes too), so this bar writes its first line, then a line only when
    ``progress_line_due`` says so, then its final line on ``close``. Each line ends with a newline: no carriage
    returns or cursor moves, which a saved log cannot replay."""

    _last_line: tuple[float, float] | None = None  # (n, time) of the last line written; None before the first

    def display(self, msg=None, pos=None):
        if msg is not None:  # tqdm clears a bar with msg='': a log line, once written, stays
            return False
        now, last = self._time(), self._last_line
        if last is not None and not progress_line_due(self.n, self.total, last[0], now - last[1]):
            return False
        return self._write_line(now)

    def clear(self, nolock=False):  # tqdm.write clears bars first: a log line, once written, stays
        pass

    def close(self):
        if getattr(self, "disable", True):
            return
        self.disable = True  # as tqdm's close: no refresh after this
        self._decr_instances(self)
        if self._last_line is None or self._last_line[0] != self.n:  # the final state, unless just written
            self._write_line(self._time())

    def _write_line(self, now: float) -> bool:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._last_line = (self.n, now)
        return True


def progress_bar():
    """The tqdm class for the kit's own bars. tqdm.auto draws an ipywidget in notebooks, whose state a Kaggle
    commit run ("Save & Run All", run type Batch) does not keep (it shows "Loading widget..." later); there a text
    bar that writes a few lines per bar (``CommitProgressBar``) is what the saved notebook keeps. Elsewhere
    tqdm.auto, unchanged."""
    if commit_run():
        return CommitProgressBar
    from tqdm.auto import tqdm

    return tqdm


# A tqdm line: "<desc>: <pct>%|<bar>| <n>/<total> [<elapsed><<remaining>, ...]", elapsed as M:SS or H:MM:SS.
_BAR_LINE = re.compile(r"^(?P<desc>.*?):?\s*(?P<pct>\d{1,3})%\|[^|]*\|\s*\S+\s*\[(?P<elapsed>(?:\d+:)?\d+:\d{2})\b")


class ProgressRelay:
    """Thins the progress-bar lines of a training child's output relayed into a commit run's notebook.

    Each tqdm line is told apart by its bar's description; a bar's line is passed on when it is the bar's first,
    its first at 100 %, or ``progress_line_due`` by the bar's own percentage and elapsed time (read from the line,
    so pipe delays do not matter); the others are held back, and ``finish`` returns each bar's last held-back
    line (its final state). Every other line passes unchanged. ``fraction`` / ``interval_s``: as in
    ``progress_line_due`` (``progress_relay`` picks them for the session)."""

    def __init__(self, fraction: float = COMMIT_BAR_FRACTION, interval_s: float = COMMIT_BAR_INTERVAL_S):
        self.fraction, self.interval_s = fraction, interval_s
        self.bars: dict[str, dict] = {}  # description -> {"pct", "elapsed" of the last passed line, "held"}

    def lines(self, line: str) -> list[str]:
        """The lines to show for one line of the child's output (none, this one, or a new bar's predecessor too)."""
        match = _BAR_LINE.match(line)
        if match is None:
            return [line]
        pct, elapsed = int(match["pct"]), _seconds(match["elapsed"])
        bar, out = self.bars.get(match["desc"]), []
        if bar is not None and pct < bar["pct"]:  # the same description again: a new bar; the old one's last line
            out, bar = [bar["held"]] if bar["held"] else [], None
        if (
            bar is None
            or (pct >= 100 > bar["pct"])
            or progress_line_due(pct, 100, bar["pct"], elapsed - bar["elapsed"], self.fraction, self.interval_s)
        ):
            self.bars[match["desc"]] = {"pct": pct, "elapsed": elapsed, "held": None}
            return [*out, line]
        bar["held"] = line
        return out

    def finish(self) -> list[str]:
        """Each bar's last held-back line, once the child's output has ended."""
        held = [bar["held"] for bar in self.bars.values() if bar["held"]]
        self.bars.clear()
        return held


def progress_relay() -> ProgressRelay:
    """The relay of a training child's output for this session. The child's stdout is a pipe, so its tqdm bar
    redraws on every step (``set_postfix`` refreshes bypass ``mininterval``) and each redraw relayed would be a
    line of the cell: a commit run's saved notebook keeps a line per 10 % or minute, a watched cell one per 5 %
    or 10 s (``INTERACTIVE_BAR_*``)."""
    if commit_run():
        return ProgressRelay()
    return ProgressRelay(INTERACTIVE_BAR_FRACTION, INTERACTIVE_BAR_INTERVAL_S)


def _seconds(clock: str) -> int:
    """tqdm's elapsed "M:SS" or "H:MM:SS" in seconds."""
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def quiet_library_bars() -> bool:
    """In a Kaggle commit run, switch off the widget progress bars of datasets (map, load), transformers
    ("Loading weights") and huggingface_hub (downloads): saved, each would be a "Loading widget..." line. The
    kit's own bars stay (as text, ``progress_bar``). Returns whether it did; elsewhere nothing changes."""
    if run_type() != "Batch":
        return False
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    return True


def on_kaggle() -> bool:
    """Whether this process runs in a Kaggle session: one of ``KAGGLE_MARKERS`` is set (never: a folder exists)."""
    return any(os.environ.get(name) for name in KAGGLE_MARKERS)


def local_working() -> Path:
    """Off Kaggle, the folder that stands in for /kaggle/working: ``$KAGGLEKD_WORKING``, else the current
    directory (a Kaggle notebook's cwd is /kaggle/working, so paths relative to it land alike)."""
    chosen = os.environ.get(LOCAL_WORKING_VAR)
    return Path(chosen).expanduser() if chosen else Path.cwd()


_MAPPED: set[tuple[str, str]] = set()  # (path, local path) pairs already logged


def local_path(path: str | os.PathLike) -> str:
    """``path`` as this machine uses it. On Kaggle, unchanged. Off Kaggle, a path under /kaggle/working maps to
    the same relative path under ``local_working()`` and one under /kaggle/temp to ``<tmp>/kaggle-temp``, so
    nothing is created under /kaggle; the mapping is logged once. Other paths are unchanged."""
    text = os.fspath(path)
    if on_kaggle():
        return text
    for kaggle_dir, local in ((KAGGLE_WORKING, local_working), (KAGGLE_TEMP, _local_temp)):
        pure = Path(text)
        if pure == kaggle_dir or kaggle_dir in pure.parents:
            mapped = str(local() / pure.relative_to(kaggle_dir))
            if (text, mapped) not in _MAPPED:
                _MAPPED.add((text, mapped))
                log.warning(
                    "not a Kaggle session (none of %s is set): %s maps to %s (%s chooses the folder "
                    "for /kaggle/working; default the current directory)",
                    ", ".join(KAGGLE_MARKERS), text, mapped, LOCAL_WORKING_VAR,
                )  # fmt: skip
            return mapped
    return text


def _local_temp() -> Path:
    return Path(tempfile.gettempdir()) / "kaggle-temp"


LOCAL_PATH_FIELDS = ("output_dir", "teacher_cache")  # config paths a run writes or reads under /kaggle/working


def local_config(config):
    """``config`` with each path of ``LOCAL_PATH_FIELDS`` through ``local_path`` (the same object when nothing
    changes): off Kaggle a /kaggle/working teacher cache is read where ``cache-teacher`` wrote it."""
    changes = {}
    for name in LOCAL_PATH_FIELDS:
        value = getattr(config, name)
        if value is not None and local_path(value) != value:
            changes[name] = local_path(value)
    return config.replace(**changes) if changes else config


def _path_info(path: Path) -> dict:
    exists = path.is_dir()
    return {"path": str(path), "exists": exists, "writable": exists and os.access(path, os.W_OK)}


def kaggle_paths() -> dict[str, dict]:
    """input (read-only mounts), working (saved output, 20 GB), temp (scratch); off Kaggle: ``local_working()``."""
    if on_kaggle():
        return {
            "input": _path_info(KAGGLE_INPUT),
            "working": _path_info(KAGGLE_WORKING),
            "temp": _path_info(KAGGLE_TEMP),
        }
    return {"working": _path_info(local_working())}


def internet_reachable(host: str = "pypi.org", port: int = 443, timeout_s: float = 3.0) -> bool:
    """One TCP connect. A kernel's ``enable_internet`` is not visible from inside, so this is the test."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def versions() -> dict[str, str | None]:
    import kagglekd

    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["kagglekd"] = kagglekd.__version__
    return out


# ---- the doctor ------------------------------------------------------------------------------------------
def doctor(check_internet: bool = False) -> EnvReport:
    """Inspect this session. ``check_internet`` opens one TCP connection (off by default, never in tests)."""
    import torch

    found, arch_list, available = gpus()
    rtype = run_type()
    kaggle = on_kaggle()
    internet = "unknown (not checked)"
    if check_internet:
        internet = "reachable" if internet_reachable() else "unreachable"
    report = EnvReport(
        python=platform.python_version(),
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        arch_list=arch_list,
        cuda_available=available,
        gpus=found,
        profile=profile_name(found),
        run_type=rtype,
        on_kaggle=kaggle,
        paths=kaggle_paths(),
        internet=internet,
        versions=versions(),
    )
    report.checks = _checks(report)
    return report


def _checks(report: EnvReport) -> list[Check]:
    checks = []
    for gpu in report.gpus:
        if not gpu.has_kernels:
            checks.append(
                Check(
                    "error",
                    f"GPU {gpu.index} {gpu.name} is {gpu.arch}, but this torch {report.torch_version} has kernels for "
                    f"{' '.join(report.arch_list) or 'no CUDA arch'}: torch.cuda.is_available() is True, yet the first "
                    "CUDA op will fail with 'no kernel image is available'.",
                    T4X2_FIX if gpu.capability < (7, 0) else "install a torch build that lists this arch.",
                )
            )
    if report.gpus and not report.gpus[0].native_bf16:
        checks.append(
            Check(
                "info",
                f"{report.gpus[0].name} ({report.gpus[0].arch}) has no native bf16 (torch.cuda.is_bf16_supported() may "
                "still say True: emulation). kagglekd trains with fp16 autocast + GradScaler and fp32 master weights.",
            )
        )
    if not profiles.resolve(report.profile).known:
        checks.append(
            Check(
                "warning",
                f"{report.gpus[0].name} has no kagglekd GPU profile ({', '.join(profiles.names())}): the memory "
                "planner and diagnose cannot plan for it by name.",
                "pass diagnose(gpu=...) the closest profile; the trainer plans on the device's own memory.",
            )
        )
    if report.profile == "T4":
        checks.append(
            Check(
                "info",
                "one T4: Kaggle sessions offer T4 x2; the notebooks train on one GPU either way.",
            )
        )
    if report.on_kaggle and not report.gpus:
        checks.append(
            Check(
                "warning",
                "Kaggle session without a GPU: real models train hours per hundred steps on CPU.",
                T4X2_FIX,
            )
        )
    working = report.paths.get("working")
    if working and not working["writable"]:
        checks.append(
            Check(
                "error",
                f"output dir {working['path']} is not writable.",
                "run where the run directory can be written (Kaggle: /kaggle/working).",
            )
        )
    missing = [name for name in ("torch", "transformers", "accelerate", "datasets") if not report.versions.get(name)]
    if missing:
        checks.append(
            Check(
                "error",
                f"missing libraries: {', '.join(missing)}.",
                "pip install -r requirements.txt (the Kaggle image has them all).",
            )
        )
    if report.internet == "unreachable":
        checks.append(
            Check(
                "info",
                "internet is off: hub models and datasets must be attached as inputs (Add Input) and the "
                "config must name their /kaggle/input directories.",
            )
        )
    return checks


# ---- notebooks: the config, and resuming across kernel versions ------------------------------------------
def smoke_run_dir(run_dir: str | os.PathLike) -> str:
    """The run dir of a SMOKE run of ``run_dir``: its sibling ``<run dir>-smoke``."""
    path = Path(run_dir)
    return str(path.with_name(f"{path.name}-smoke"))


def notebook_config(
    preset: str | dict, run_dir: str | os.PathLike | None = None, smoke: bool = False, max_steps: int | None = None
):
    """The config a notebook runs: ``preset`` (name, JSON path or dict), in ``run_dir`` (None = the preset's
    ``output_dir``), with ``SMOKE_OVERRIDES`` under ``smoke`` and then ``max_steps`` (a notebook's ``MAX_STEPS``,
    the plan's length: 01 diagnoses the plan 02 trains) when given.

    A SMOKE run writes to ``smoke_run_dir(run dir)``, never to the run dir itself: its checkpoints belong to a
    4-step plan, and a real run of the same preset in that dir would resume them (and refuse: 4 vs N planned
    steps). Off Kaggle a /kaggle/working run dir and teacher cache map to a local folder (``local_config``)."""
    from kagglekd.config import DistillConfig

    config = DistillConfig.from_dict(dict(preset)) if isinstance(preset, dict) else DistillConfig.load(preset)
    changes: dict[str, Any] = dict(SMOKE_OVERRIDES) if smoke else {}
    if max_steps is not None:
        changes["max_steps"] = max_steps
    output_dir = str(run_dir) if run_dir is not None else config.output_dir
    output_dir = smoke_run_dir(output_dir) if smoke else output_dir
    if output_dir != config.output_dir:
        changes["output_dir"] = output_dir
    return local_config(config.replace(**changes) if changes else config)


def free_accelerator_memory() -> None:
    """Release cached GPU memory after ``del``-ing a trainer (the next stage loads its own models)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_report(report: EnvReport, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report.to_dict())
    return path
