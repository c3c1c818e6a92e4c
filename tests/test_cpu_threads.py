"""CPU threads: the choice from config, environment, affinity and load (faked), and the log line that states it."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from kagglekd import cputhreads
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError


@pytest.mark.parametrize(
    "requested, environ, cpus, load, expected, because",
    [
        (3, {"OMP_NUM_THREADS": "2"}, 2, 1.0, 3, "cpu_threads = 3 in the config"),
        (None, {"OMP_NUM_THREADS": "4"}, 2, 1.9, 4, "OMP_NUM_THREADS=4"),
        (None, {}, 2, 1.1, 1, "load average 1.10 (~1 busy)"),  # another job holds one of two cores
        (None, {}, 2, 0.2, 2, "~0 busy"),
        (None, {}, 4, 9.0, 1, "~4 busy"),  # never below one
        (None, {"OMP_NUM_THREADS": "x"}, 8, 2.6, 5, "8 CPUs available"),  # unparsable: ignored
        (None, {}, 2, None, 2, "load not known"),
    ],
)
def test_thread_choice(requested, environ, cpus, load, expected, because):
    choice = cputhreads.choose_threads(requested, environ=environ, available_cpus=cpus, load_average=load)
    assert choice.count == expected and because in choice.reason


def test_configure_sets_torch_and_logs_the_count_reason_and_override(monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.setattr(cputhreads, "machine_facts", lambda: (2, 1.0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        with caplog.at_level(logging.INFO, logger="kagglekd.cputhreads"):
            choice = cputhreads.configure_cpu_threads(None, "cpu")
            assert torch.get_num_threads() == choice.count == 1
            assert cputhreads.configure_cpu_threads(None, "cuda") is None  # GPU runs: left alone
    finally:
        torch.set_num_threads(before)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "kagglekd.cputhreads"]
    assert line.startswith("CPU threads: 1 (auto: 2 CPUs available") and "cpu_threads=N" in line
    assert "OMP_NUM_THREADS" in line


def test_cpu_threads_key_is_a_positive_integer_or_auto():
    assert DistillConfig().cpu_threads is None
    assert DistillConfig(cpu_threads=2).cpu_threads == 2
    with pytest.raises(ConfigError, match="cpu_threads"):
        DistillConfig(cpu_threads=0)


_REUSE_PROBE = """
import resource, torch
from kagglekd import cputhreads
kept = cputhreads.keep_freed_memory()
faults = []
for _ in range(16):  # a training step's large tensor: 68 MB, freed at once, step after step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(17_000_000).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
@pytest.mark.parametrize("setting, kept", [("1", True), ("0", False)])
def test_a_cpu_run_reuses_freed_memory_instead_of_faulting_it_in_again(setting, kept):
    """Sixteen 68 MB tensors, each freed before the next: page faults are counted (a fresh 4 KiB page is one minor
    fault, so ~16,600 for 68 MB mapped afresh). Without keeping freed memory every one is mapped afresh; with
    it the heap settles within a few rounds (seen: faults in rounds 1-2, 1-4 and, in one clean-clone run, 1-5)
    and the last four take none."""
    env = {**os.environ, "KAGGLEKD_KEEP_FREED_MEMORY": setting, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], env=env, capture_output=True, text=True, check=True)
    took, *faults = out.stdout.split()
    faults = [int(count) for count in faults]
    assert took == str(kept)
    assert max(faults[-4:]) < 1_000 if kept else min(faults) > 10_000, out.stdout
