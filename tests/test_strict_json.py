"""Every JSON file the kit writes is strictly valid JSON (no bare NaN), and `evaluate --run --teacher` reports a
CE-only run's top-1 agreement with a teacher its config never loads."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

from kagglekd import rundir
from kagglekd.__main__ import main
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller

pytestmark = pytest.mark.usefixtures("use_kit_cache")


def strict_load(text: str):
    """``json.loads`` that refuses NaN / Infinity / -Infinity, as RFC 8259 (and jq, JavaScript) do."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: bare {constant}")

    return json.loads(text, parse_constant=refuse)


def test_writer_turns_non_finite_values_into_null(tmp_path):
    payload = {
        "nan": math.nan,
        "inf": -math.inf,
        "numpy": np.float32("nan"),
        "nested": [(1.5, np.int64(3)), {"t": torch.tensor(float("inf")), "ok": torch.tensor([1.0, math.nan])}],
        7: tmp_path,
    }
    rundir.write_json(tmp_path / "x.json", payload)
    loaded = strict_load((tmp_path / "x.json").read_text())
    assert loaded == {
        "nan": None,
        "inf": None,
        "numpy": None,
        "nested": [[1.5, 3], {"t": None, "ok": [1.0, None]}],
        "7": str(tmp_path),
    }
    assert strict_load(DistillConfig().to_json())["batch_size"] == DistillConfig().batch_size


@pytest.fixture(scope="module")
def ce_only_run(tmp_path_factory, kagglekd_cache):
    run_dir = tmp_path_factory.mktemp("ce-only") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
        config = {**TINY_RUN, "output_dir": str(run_dir), "alpha_kd": 0.0, "alpha_ce": 1.0, "max_steps": 2}
        Distiller(DistillConfig.from_dict(config)).train()
    return run_dir


def test_every_json_of_a_ce_only_run_is_strict(ce_only_run, capsys):
    assert main(["evaluate", "--run", str(ce_only_run)]) == 0
    capsys.readouterr()
    files = sorted(ce_only_run.rglob("*.json"))
    assert {"config.json", "summary.json", "plan.json", "data.json", "eval.json"} <= {p.name for p in files}
    for path in files:
        strict_load(path.read_text())  # raises on a bare NaN
    summary = strict_load((ce_only_run / "summary.json").read_text())
    assert any(value is None for value in summary.values() if not isinstance(value, dict))  # the KD not measured


def test_evaluate_teacher_flag_reports_agreement_of_a_ce_only_run(ce_only_run, capsys):
    assert main(["evaluate", "--run", str(ce_only_run)]) == 0
    rows = strict_load((ce_only_run / "eval.json").read_text())
    assert [row["model"] for row in rows] == ["student"] and rows[0]["top1_agreement"] is None
    capsys.readouterr()

    assert main(["evaluate", "--run", str(ce_only_run), "--teacher"]) == 0
    out = capsys.readouterr().out
    rows = strict_load((ce_only_run / "eval.json").read_text())
    teacher, student = rows
    assert teacher["model"] == "teacher" and teacher["teacher_model"] == TINY_RUN["teacher_model"]
    assert 0.0 <= student["top1_agreement"] <= 1.0 and "teacher" in out
    # the config on disk is the run's, unchanged: only the evaluation loaded a teacher
    assert strict_load((ce_only_run / "config.json").read_text())["alpha_kd"] == 0.0
