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
"""

from __future__ import annotations

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


def configure_cpu_threads(requested: int | None, device: str) -> ThreadChoice | None:
    """On a CPU ``device``: choose the thread count, ``torch.set_num_threads`` it and log why (one INFO line).
    Returns the choice; None (nothing changed) on any other device."""
    if device != "cpu":
        return None
    import torch

    available, load = machine_facts()
    choice = choose_threads(requested, environ=os.environ, available_cpus=available, load_average=load)
    torch.set_num_threads(choice.count)
    log.info(choice.describe())
    return choice
