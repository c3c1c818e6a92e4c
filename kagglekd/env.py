"""Runtime doctor: which GPU this session has, whether this torch can run on it, real bf16, Kaggle paths.

``python -m kagglekd doctor [--json]`` and the first notebook call ``doctor()``. Everything is read at call
time through ``torch.cuda.*`` and ``os.environ``, so tests monkeypatch those and run on CPU.

Two facts carry the checks (see ../shared/KAGGLE.md):

* A P100 (sm_60) reports ``torch.cuda.is_available() == True`` on the current Kaggle image, but that torch
  ships no sm_60 kernels: the first CUDA op fails with "no kernel image is available". The doctor compares
  the device's sm_XY with ``torch.cuda.get_arch_list()`` instead of trusting ``is_available``.
* ``torch.cuda.is_bf16_supported()`` is True on a T4 (emulation). Real bf16 means compute capability >= 8.0.

Checkpoints of an attached previous kernel version are found by ``kagglekd.checkpoint.prepare_resume``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kagglekd import gpus as profiles

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_TEMP = Path("/kaggle/temp")
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


def progress_bar():
    """The tqdm class for the kit's own bars. tqdm.auto draws an ipywidget in notebooks, whose state a Kaggle
    commit run ("Save & Run All", run type Batch) does not keep (it shows "Loading widget..." later); there a text
    bar is what survives in the saved notebook."""
    if run_type() == "Batch":
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


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
    return run_type() is not None or KAGGLE_WORKING.is_dir()


def _path_info(path: Path) -> dict:
    exists = path.is_dir()
    return {"path": str(path), "exists": exists, "writable": exists and os.access(path, os.W_OK)}


def kaggle_paths() -> dict[str, dict]:
    """input (read-only mounts), working (saved output, 20 GB), temp (scratch); off Kaggle: the cwd."""
    if on_kaggle():
        return {
            "input": _path_info(KAGGLE_INPUT),
            "working": _path_info(KAGGLE_WORKING),
            "temp": _path_info(KAGGLE_TEMP),
        }
    return {"working": _path_info(Path.cwd())}


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
def notebook_config(preset: str | dict, run_dir: str | os.PathLike | None = None, smoke: bool = False):
    """The config a notebook runs: ``preset`` (name, JSON path or dict), in ``run_dir`` (None = the preset's
    ``output_dir``), with ``SMOKE_OVERRIDES`` under ``smoke``."""
    from kagglekd.config import DistillConfig

    config = DistillConfig.from_dict(dict(preset)) if isinstance(preset, dict) else DistillConfig.load(preset)
    changes: dict[str, Any] = dict(SMOKE_OVERRIDES) if smoke else {}
    if run_dir is not None:
        changes["output_dir"] = str(run_dir)
    return config.replace(**changes) if changes else config


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
    path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return path
