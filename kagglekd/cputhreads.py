"""How many threads torch uses on a CPU run, chosen from what the machine has free, and said in the log.

torch starts with one intra-op thread per core it sees. On a shared 2-core machine with another job holding a
core, its default of 2 threads made training steps ~3x slower than 1 thread (measured, issue 19). So a CPU run
takes, in this order:

1. ``cpu_threads`` from the config, when set;
2. ``OMP_NUM_THREADS`` from the environment, when set to a positive integer (the usual knob, honoured as given);
3. auto: the CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that does not
   exist) minus the CPUs already busy, read as the rounded 1-minute load average (``os.getloadavg``), at least 1.

The choice, why, and how to override it is one INFO line of the ``kagglekd.cputhreads`` logger. GPU runs are
left alone (their CPU threads only feed the device).

A CPU run also keeps freed memory for reuse (``keep_freed_memory``): glibc's malloc hands every allocation above
its mmap threshold (128 KiB to 32 MiB, adaptive) back to the OS when it is freed, so each training step's large
tensors (a 16 x 130 x 8,192 float32 teacher logits tensor is 68 MB) are page-faulted in afresh. Measured on the
2-core machine: a fresh 68 MB tensor filled in 51.7 ms against 9.0 ms for a reused one; with the threshold raised,
the demo's tiny-pair KD step went from 0.945 to 0.754 s and the cross-tokenizer step from 1.389 to 1.056 s. The
price is peak memory: a block freed while a larger one is needed stays in the heap, so the peak RSS of the tiny
pair's runs grew by about one copy of the step's largest transient tensor (unfused KD 0.29 -> 0.33 GiB,
cross-tokenizer 0.37 -> 0.42-0.44 GiB; fused KD and CE-only 0-0.02 GiB), which the memory planner counts on a CPU
(``cpu_heap_kept``). ``KAGGLEKD_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

OVERRIDE = "override: cpu_threads=N in the config (--set cpu_threads=N) or OMP_NUM_THREADS=N"


@dataclass(frozen=True)
class ThreadChoice:
    """``count`` intra-op threads and ``reason``, the sentence that says where the number comes from."""

    count: int
    reason: str

    def describe(self) -> str:
        return f"CPU threads: {self.count} ({self.reason}); {OVERRIDE}"


def choose_threads(
    requested: int | None, *, environ: Mapping[str, str], available_cpus: int, load_average: float | None
) -> ThreadChoice:
    """The thread count for a CPU run (see the module docstring for the order).

    ``requested``: the config's ``cpu_threads`` (None = auto); ``environ``: the process environment;
    ``available_cpus``: CPUs this process may run on; ``load_average``: the 1-minute load average (runnable
    processes, averaged), or None where the OS does not report one."""
    if requested is not None:
        return ThreadChoice(requested, f"cpu_threads = {requested} in the config")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), f"OMP_NUM_THREADS={omp} in the environment")
    available = max(1, available_cpus)
    if load_average is None:
        return ThreadChoice(available, f"auto: {available} CPUs available to this process, load not known")
    busy = min(available, round(load_average))
    count = max(1, available - busy)
    return ThreadChoice(
        count,
        f"auto: {available} CPUs available to this process, load average {load_average:.2f} (~{busy} busy)",
    )


def machine_facts() -> tuple[int, float | None]:
    """(CPUs this process may run on, 1-minute load average or None)."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        available = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        load = None
    return available, load


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30  # allocations up to 1 GiB come from (and go back to) the heap


def keeps_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a CPU run here keeps freed memory (``keep_freed_memory`` would take effect): the memory planner
    then counts the heap it keeps."""
    return environ.get("KAGGLEKD_KEEP_FREED_MEMORY", "1").strip() != "0" and ctypes.util.find_library("c") is not None


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Make glibc's malloc keep freed blocks up to 1 GiB for reuse instead of unmapping them (see the module
    docstring). Returns whether it took effect: False off glibc, or with ``KAGGLEKD_KEEP_FREED_MEMORY=0``."""
    if not keeps_freed_memory(environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    # newer glibc may cap the threshold (at half its 64 MiB heap size): then the largest it takes
    for threshold in (_KEEP_BYTES, 32 << 20):
        if mallopt(_M_MMAP_THRESHOLD, threshold):
            return bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    return False


def configure_cpu_threads(requested: int | None, device: str) -> ThreadChoice | None:
    """On a CPU ``device``: choose the thread count, ``torch.set_num_threads`` it and log why (one INFO line),
    and keep freed memory for reuse (``keep_freed_memory``, said in the same line). Returns the choice; None
    (nothing changed) on any other device."""
    if device != "cpu":
        return None
    import torch

    available, load = machine_facts()
    choice = choose_threads(requested, environ=os.environ, available_cpus=available, load_average=load)
    torch.set_num_threads(choice.count)
    kept = keep_freed_memory()
    log.info(choice.describe() + ("; freed memory kept for reuse" if kept else ""))
    return choice
