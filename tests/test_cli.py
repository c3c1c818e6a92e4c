"""The command line: exit codes and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kagglekd.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse exits on its own errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--set", "learning_rat=1"], "learning_rate"),
        (["train", "--set", "batch_size=zero"], "batch_size"),
        (["train", "--config", "no-such-preset"], "no-such-preset"),
        (["train", "--bogus-flag"], "--bogus-flag"),
        (["train", "--max-steps", "many"], "--max-steps"),
        (["evaluate", "--run", "/nonexistent/run"], "/nonexistent/run"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_exit_2_with_one_line(capsys, argv, fragment):
    code, _out, err = _run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0]


def test_bad_config_file_names_the_file(capsys, tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"teacher_model": "x", "temperature": -2}))
    code, _out, err = _run(capsys, "train", "--config", str(path))
    assert code == 2 and "temperature" in err and "-2" in err


def test_help_config_lists_every_field(capsys):
    from kagglekd.config import DistillConfig

    code, out, _err = _run(capsys, "train", "--help-config")
    assert code == 0
    assert all(name in out for name in DistillConfig.fields())


def test_help_of_each_command_runs():
    for command in ("demo", "train", "evaluate"):
        done = subprocess.run(
            [sys.executable, "-m", "kagglekd", command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert done.returncode == 0 and "usage" in done.stdout


def test_module_docstring_and_top_level_help_name_every_command():
    import argparse
    import re

    import kagglekd.__main__ as cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    named = re.search(r"python -m kagglekd \{([^}]*)\}", cli.__doc__).group(1).split(",")
    assert named == list(commands)  # the order of --help
    assert parser.description == cli.__doc__.split("\n")[0]


def _tiny_config_file(tmp_path, **changes) -> Path:
    from conftest import TINY_RUN

    config = {**TINY_RUN, "output_dir": str(tmp_path / "run"), "eval_steps": 2, **changes}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    return path


def test_train_max_steps_sets_the_plan(capsys, tmp_path, use_kit_cache):
    """Mend: --max-steps N stopped after N steps of a longer plan (LR never decayed, no student/, NaN final eval).
    Now it is the plan (config max_steps): a linear schedule with warmup w over N steps ends at lr / (N - w)."""
    import pandas as pd

    config = _tiny_config_file(tmp_path, max_steps=50, scheduler_type="linear", warmup_steps=1, learning_rate=3e-3)
    code, out, _err = _run(capsys, "train", "--config", str(config), "--max-steps", "5")
    assert code == 0
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["optimizer_steps"] == summary["planned_steps"] == 5 and not summary["paused"]
    assert summary["eval_ppl"] == summary["eval_ppl"] and 1 < summary["eval_ppl"] < float("inf")  # finite
    run = tmp_path / "run"
    history = pd.read_csv(run / "history.csv")
    # transformers' linear schedule: lr * (N - k) / (N - w) at step k >= w; the last step k = N - 1
    assert list(history["step"]) == [0, 1, 2, 3, 4]
    assert history["lr"].iloc[-1] == pytest.approx(3e-3 * (5 - 4) / (5 - 1), rel=1e-9)
    assert json.loads((run / "plan.json").read_text())["optimizer_steps"] == 5
    assert (run / "student" / "config.json").is_file()


def test_train_stop_after_pauses_and_the_printed_command_resumes(capsys, tmp_path, use_kit_cache):
    config = _tiny_config_file(tmp_path, max_steps=4)
    code, out, _err = _run(capsys, "train", "--config", str(config), "--stop-after", "2")
    assert code == 0 and json.loads(out[: out.rindex("}") + 1])["paused"]
    hint = out.strip().splitlines()[-1]
    assert hint.startswith("paused after optimizer step 2 of 4") and "student/ is not exported" in hint
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-2").is_dir() and not (run / "student").exists()
    command = hint[hint.index("python -m kagglekd ") : hint.index(" (add")].split()[3:]  # as printed
    code, out, _err = _run(capsys, *command)
    summary = json.loads(out[: out.rindex("}") + 1])
    assert code == 0 and summary["optimizer_steps"] == 4 and not summary["paused"]
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 4 and (run / "student" / "config.json").is_file()  # header + the plan's 4 steps


def test_train_off_kaggle_writes_a_kaggle_working_output_dir_locally(capsys, tmp_path, monkeypatch, use_kit_cache):
    from kagglekd import env

    for name in env.KAGGLE_MARKERS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(env.LOCAL_WORKING_VAR, str(tmp_path / "local"))
    kaggle_existed = Path("/kaggle").exists()
    config = _tiny_config_file(tmp_path, max_steps=2, output_dir="/kaggle/working/runs/tiny")
    code, out, _err = _run(capsys, "train", "--config", str(config))
    assert code == 0
    assert (tmp_path / "local" / "runs" / "tiny" / "student" / "config.json").is_file()
    assert Path("/kaggle").exists() == kaggle_existed
