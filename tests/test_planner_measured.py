"""The memory planner within ±15 % of the measured peak RSS of real training steps of the tiny demo pair on CPU
(fused KD, unfused KD, CE-only, cross-tokenizer), each case a fresh process (bench/planner_vs_measured.py)."""

import importlib.util
import os
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
    rows = bench.run_cases([("tiny", case) for case in bench.CASES], tmp_path / "models", jobs=2)
    print("\n" + bench.table(rows))
    assert [row["case"] for row in rows] == list(bench.CASES)
    for row in rows:
        assert abs(row["ratio"] - 1) <= bench.TOLERANCE, row
