"""GPU profiles (the one table) and the one resolver of a GPU name, Kaggle machine shape or device to a profile.

``resolve(hint)`` takes whatever names a GPU: a profile name (``t4x2``, ``A100``, case-insensitive; ``<name>xN``
for N of them), a Kaggle ``machine_shape`` (``NvidiaTeslaT4`` is T4 x2, the only T4 shape Kaggle offers), an
nvidia-smi / torch device name (``Tesla T4``, ``NVIDIA A100-SXM4-40GB``), a ``torch.device`` (read off the
device: name and memory) or ``"cpu"``. A GPU the kit has no profile for comes back with ``known=False`` and the
name ``unknown (<hint>)``; it is never planned as a T4. Callers that need a real profile pass ``strict=True``
and get an ``UnknownGpuError`` that lists the profiles.

Nothing here initialises CUDA unless a CUDA ``torch.device`` is passed (its properties are read).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from kagglekd.errors import ConfigError

GiB = 1024**3


@dataclass(frozen=True)
class GpuProfile:
    """What the planner and diagnostics know about one machine type."""

    name: str
    capacity_bytes: int  # usable memory per device (0: not known)
    devices: int
    compute_capability: tuple[int, int] | None
    native_bf16: bool
    supported: bool  # by the PyTorch of the current Kaggle image
    peak_flops: float  # per device, fp16/bf16 tensor cores (fp32 on CPU); for time estimates only (0: not known)
    description: str
    known: bool = True  # False: a GPU the kit has no profile for (reported as unknown, never treated as a T4)


class UnknownGpuError(ConfigError, KeyError):
    """A GPU name that matches no profile where a caller needs a real one (a ``KeyError`` too, for lookups)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _cpu_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 24 * GiB


PROFILES: dict[str, GpuProfile] = {
    "T4": GpuProfile("T4", 15 * GiB, 1, (7, 5), False, True, 65e12, "one NVIDIA T4 (sm_75, fp16 tensor cores)"),
    "T4x2": GpuProfile(
        "T4x2",
        15 * GiB,
        2,
        (7, 5),
        False,
        True,
        65e12,
        "Kaggle T4 x2 (per GPU 15 GiB; under DDP each GPU holds both models)",
    ),
    "P100": GpuProfile(
        "P100",
        16 * GiB,
        1,
        (6, 0),
        False,
        False,
        18.7e12,
        "NVIDIA P100 (sm_60): the current Kaggle PyTorch has no sm_60 kernels",
    ),
    "A100": GpuProfile("A100", 40 * GiB, 1, (8, 0), True, True, 312e12, "NVIDIA A100 40 GB (sm_80, bf16)"),
    "L4": GpuProfile("L4", int(22.5 * GiB), 1, (8, 9), True, True, 121e12, "NVIDIA L4 (sm_89, bf16)"),
    # H100 80GB HBM3 (SXM5, what Google Cloud's a3 machines carry): nvidia-smi reports 81,559 MiB; 989 TFLOPS dense
    # BF16/FP16 tensor (NVIDIA H100 datasheet; the PCIe card is 756). Kaggle's machine_shape NvidiaH100.
    "H100": GpuProfile("H100", 81559 * 1024**2, 1, (9, 0), True, True, 989e12, "NVIDIA H100 80GB (sm_90, bf16)"),
    # RTX PRO 6000 Blackwell (Server Edition on Kaggle): 96 GB GDDR7, nvidia-smi reports 97,887 MiB; sm_120;
    # 188 SMs at ~2.6 GHz, 4000 AI TOPS = FP4 with 2:4 sparsity, so ~500 TFLOPS dense FP16/BF16 tensor (NVIDIA RTX
    # PRO 6000 Blackwell datasheet / GTC 2025 announcement). Kaggle's machine_shape NvidiaRtxPro6000.
    "RTXPRO6000": GpuProfile(
        "RTXPRO6000", 97887 * 1024**2, 1, (12, 0), True, True, 500e12, "NVIDIA RTX PRO 6000 Blackwell (sm_120, bf16)"
    ),
    "cpu": GpuProfile("cpu", _cpu_ram_bytes(), 1, None, False, True, 1e11, "CPU only (system RAM)"),
}

# The accelerators ``kaggle kernels push`` documents for kernel-metadata ``machine_shape`` / ``--accelerator``,
# spelled as the server expects them: Kaggle/kaggle-api docs/kernels.md, section `kaggle kernels push`,
# "Accelerators available as of Feb 2026" (commit 1744cda, 2026-01-30). "Some of these are only available to
# participants of specific competitions, and some are only available to Kaggle admins."
KAGGLE_ACCELERATORS = (
    "NvidiaTeslaP100",
    "TpuV38",
    "NvidiaTeslaT4",
    "NvidiaTeslaT4Highmem",
    "Tpu1VmV38",
    "NvidiaTeslaA100",
    "NvidiaL4",
    "TpuV5E8",
    "NvidiaL4X1",
    "TpuV6E8",
    "NvidiaH100",
    "NvidiaRtxPro6000",
)
# Shapes the CLI warns are retired and silently replaced (kaggle 2.2.5, kaggle_api_extended._RETIRED_ACCELERATORS).
RETIRED_ACCELERATORS = {
    "NvidiaTeslaP100": "Kaggle runs it on the default GPU (NvidiaTeslaT4); this PyTorch has no sm_60 kernels anyway",
    "TpuV38": "Kaggle runs it on the default TPU (TpuV5E8)",
    "Tpu1VmV38": "Kaggle runs it on the default TPU (TpuV5E8)",
    "TpuV232": "Kaggle runs it on CPU, with no accelerator at all",
    "TpuV2256": "Kaggle runs it on CPU, with no accelerator at all",
}

# Kaggle kernel-metadata ``machine_shape`` values (lower case) -> profile name (../shared/KAGGLE.md).
MACHINE_SHAPES = {
    "nvidiateslat4": "T4x2",  # the only T4 shape: two of them
    "nvidiateslat4highmem": "T4x2",  # admin-only (../shared/KAGGLE.md)
    "nvidiateslap100": "P100",  # retired: Kaggle now runs these requests on T4
    "nvidiateslaa100": "A100",
    "nvidial4": "L4x4",  # Kaggle's "GPU L4 x4" (NvidiaL4X1 is the one-GPU shape)
    "nvidial4x1": "L4",
    "nvidiah100": "H100",
    "nvidiartxpro6000": "RTXPRO6000",
}

# What ``bundle --accelerator`` offers: the current GPU shapes (the kit trains on GPUs, not TPUs), each planned with
# its profile. NvidiaTeslaT4Highmem is left out: admin-only, and the same T4 x2 as NvidiaTeslaT4.
BUNDLE_ACCELERATORS = ("NvidiaTeslaT4", "NvidiaL4X1", "NvidiaL4", "NvidiaTeslaA100", "NvidiaH100", "NvidiaRtxPro6000")

# A profile's GPU model inside a device name ("Tesla T4", "Tesla P100-PCIE-16GB", "NVIDIA A100-SXM4-40GB",
# "NVIDIA L4"), as a whole token: "L4" must not match an L40S, nor "T4" a T40.
_MODEL_IN_NAME = {key: re.compile(rf"(?<![A-Z0-9]){key}(?![0-9])") for key in ("T4", "P100", "A100", "L4", "H100")}
_MODEL_IN_NAME["RTXPRO6000"] = re.compile(r"RTX\s*PRO\s*6000(?![0-9])")  # "NVIDIA RTX PRO 6000 Blackwell ..."


def names() -> list[str]:
    """The profile names, in table order."""
    return list(PROFILES)


def _with_devices(profile: GpuProfile, devices: int | None) -> GpuProfile:
    """``profile`` for ``devices`` GPUs: a table entry when there is one (T4 x 2 is ``T4x2``), else ``<name>xN``."""
    if devices is None or devices == profile.devices or profile.name == "cpu":
        return profile
    base = profile.name.split("x")[0] if profile.known else profile.name
    for candidate in PROFILES.values():
        if candidate.name.split("x")[0] == base and candidate.devices == devices:
            return candidate
    name = base if devices == 1 else f"{base}x{devices}"
    return dataclasses.replace(profile, name=name if profile.known else profile.name, devices=max(devices, 1))


def _unknown(label: str, devices: int | None, capacity: int = 0, capability=None) -> GpuProfile:
    bf16 = capability is not None and tuple(capability) >= (8, 0)
    return GpuProfile(
        f"unknown ({label})",
        capacity,
        max(devices or 1, 1),
        tuple(capability) if capability is not None else None,
        bf16,
        True,
        0.0,
        f"{label}: no kagglekd profile (memory {'read off the device' if capacity else 'not known'})",
        known=False,
    )


def _from_name(text: str) -> GpuProfile | None:
    """A table profile for a profile name, ``<name>xN``, machine shape or device name; None when none matches."""
    key = re.sub(r"[\s_\-]", "", text).lower()
    for name, profile in PROFILES.items():
        if name.lower() == key:
            return profile
    if text.lower() in MACHINE_SHAPES:  # as written (one word): the device name "NVIDIA L4" is no shape
        return _from_name(MACHINE_SHAPES[text.lower()])
    counted = re.fullmatch(r"(.+?)\s*x\s*(\d+)", text, re.I) or re.fullmatch(r"(\d+)\s*x\s*(.+)", text, re.I)
    if counted:  # "<name> x N" or "N x <name>"
        name, count = counted.groups() if counted.group(2).isdigit() else counted.groups()[::-1]
        base = _from_name(name)
        if base is not None and base.name != "cpu":
            return _with_devices(PROFILES[base.name.split("x")[0]], int(count))
    upper = text.upper()
    for name, pattern in _MODEL_IN_NAME.items():
        if pattern.search(upper):
            return PROFILES[name]
    return None


def _from_device(device) -> GpuProfile:
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return PROFILES["cpu"]
    if device.type != "cuda":
        return _unknown(str(device), None)
    props = torch.cuda.get_device_properties(device)
    profile = _from_name(props.name)
    if profile is not None:
        return _with_devices(profile, 1)
    return _unknown(props.name, 1, int(props.total_memory), (props.major, props.minor))


def resolve(hint, devices: int | None = None, *, strict: bool = False) -> GpuProfile:
    """The profile ``hint`` names (see the module docstring); ``devices`` sets how many GPUs (T4 + 2 -> T4x2).

    Unknown: ``GpuProfile(known=False, name="unknown (<hint>)")`` with the device's memory and compute capability
    when a CUDA ``torch.device`` is given, else capacity 0 (nothing to plan with). ``strict=True`` raises
    ``UnknownGpuError`` instead: the memory planner and ``--gpu`` choices need a real profile. A plain string is
    never read off hardware ("cuda" is an unknown name), so resolving a name never initialises CUDA.
    """
    if isinstance(hint, GpuProfile):
        profile = hint
    elif type(hint).__name__ == "device" and type(hint).__module__.startswith("torch"):
        profile = _from_device(hint)
    else:
        profile = _from_name(str(hint).strip()) or _unknown(str(hint).strip(), devices)
    if strict and not profile.known:
        raise UnknownGpuError(
            f"GPU {hint!r} matches no GPU profile; one of {', '.join(PROFILES)} "
            "(or a Kaggle machine_shape such as NvidiaTeslaT4, or a device name such as 'Tesla T4').",
            field="gpu",
        )
    return _with_devices(profile, devices)
