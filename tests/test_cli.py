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
