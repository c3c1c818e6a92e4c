"""The memory planner within ±15 % of the measured peak RSS of real training steps of the tiny demo pair on CPU
(fused KD, unfused KD, CE-only, cross-tokenizer), each case a fresh process (bench/planner_vs_measured.py)."""

import importlib.util
import os
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("planner_vs_measured", ROOT / "bench" / "planner_vs_measured.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["planner_vs_measured"] = bench
_spec.loader.exec_module(bench)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to read VmRSS/VmHWM")
def test_planner_is_within_15_percent_of_measured_peak_for_the_tiny_pair(tmp_path, use_kit_cache):
    # A single measurement of a 0.2-0.5 GiB peak moves by up to ~50 MiB from run to run on a loaded machine (one
    # fresh-clone run gave 1.19 / 1.16 / 0.96 / 0.86 where the run before gave 1.03 / 1.01 / 1.03 / 0.90): each case
    # is measured three times and the median ratio is compared.
    runs = [bench.run_cases([("tiny", case) for case in bench.CASES], tmp_path / "models", jobs=2) for _ in range(3)]
    for rows in runs:
        print("\n" + bench.table(rows))
        assert [row["case"] for row in rows] == list(bench.CASES)
    for case, rows in zip(bench.CASES, zip(*runs)):
        ratio = statistics.median(row["ratio"] for row in rows)
        assert abs(ratio - 1) <= bench.TOLERANCE, (case, [round(row["ratio"], 3) for row in rows])
