"""The ``diagnose`` command: argument parsing, reading the config, printing the report, --fix and --plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kagglekd import gpus, rundir
from kagglekd.config import PRESETS_DIR, preset_names
from kagglekd.diagnose.findings import Report
from kagglekd.diagnose.fix import fix_config
from kagglekd.diagnose.parsing import planner_profile
from kagglekd.errors import ConfigError

USAGE = "Diagnostics before spending GPU quota: findings with fixes, the LR plan, the memory plan, the time plan."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"diagnose: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m kagglekd diagnose", description=USAGE)
    p.add_argument("--config", required=True, help="preset name or path to a JSON config (kit or hand-rolled)")
    p.add_argument(
        "--gpu",
        type=str,
        default=None,
        help=f"one of {', '.join(gpus.names())}, or a Kaggle machine_shape (default: the config's GPU key, else T4x2)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--fix", action="store_true", help="write a corrected config to --output")
    p.add_argument("--output", help="where --fix writes the corrected config")
    p.add_argument("--dry-run", type=int, default=0, metavar="N", help="run N real optimizer steps first")
    p.add_argument("--plots", metavar="DIR", help="write lr_plan.png, memory.png (and dry-run plots) here")
    p.add_argument(
        "--batches-per-epoch",
        type=int,
        default=None,
        metavar="N",
        help="micro-batches per epoch of one process when the config cannot tell (ddp divides them)",
    )
    return p


def read_raw(name_or_path: str) -> dict:
    """The raw JSON object of a preset name or a config file; unusable input is a one-line ConfigError."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" or path.exists()):
        preset = PRESETS_DIR / f"{name_or_path}.json"
        if not preset.exists():
            raise ConfigError(
                f"'{name_or_path}' is neither a config file nor a preset (presets: {', '.join(preset_names())})."
            )
        path = preset
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err.msg} at line {err.lineno}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} holds a JSON {type(raw).__name__}, not an object of key: value pairs.")
    return raw


def write_plots(report: Report, directory: str | Path) -> list[Path]:
    from kagglekd import plots

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if report.schedule is not None:
        written.append(directory / "lr_plan.png")
        plots.plot_lr_plan(report.schedule, written[-1])
    if report.memory_plan is not None:
        written.append(directory / "memory.png")
        plots.plot_memory(report.memory_plan, written[-1])
    if report.history:
        import pandas as pd

        frame = pd.DataFrame(report.history)
        written.append(directory / "component_shares.png")
        plots.plot_component_shares(frame, written[-1])
        written.append(directory / "dry_run_history.png")
        plots.plot_history(frame, written[-1])
    return written


def _check_arguments(args: argparse.Namespace) -> None:
    if args.gpu is not None and planner_profile(args.gpu) is None:
        raise ConfigError(f"--gpu {args.gpu}: one of {', '.join(gpus.names())} (or a Kaggle machine_shape).")
    if args.fix and not args.output:
        raise ConfigError("--fix needs --output PATH (where the corrected config goes).")
    if args.dry_run < 0 or (args.batches_per_epoch is not None and args.batches_per_epoch < 1):
        raise ConfigError("--dry-run and --batches-per-epoch must be positive.")


def main(argv: list[str] | None = None) -> int:
    """The ``diagnose`` command. Prints the report (text or --json); returns the exit code."""
    from kagglekd.diagnose import diagnose

    args = build_parser().parse_args(argv)
    try:
        _check_arguments(args)
        raw = read_raw(args.config)
        report = diagnose(raw, gpu=args.gpu, batches_per_epoch=args.batches_per_epoch, dry_run=args.dry_run)
    except (ConfigError, KeyError) as err:
        print(f"diagnose: {str(err).strip(chr(39))}", file=sys.stderr)  # noqa: T201 - CLI output
        return 2
    extra: dict[str, Any] = {}
    if args.fix:
        fixed = fix_config(report)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(rundir.to_json_text(fixed), encoding="utf-8")
        extra["fixed_config"] = str(args.output)
        extra["fixes"] = fixed["_fixes"]
    if args.plots:
        extra["plots"] = [str(p) for p in write_plots(report, args.plots)]
    if args.json:
        print(json.dumps({**report.to_dict(), **extra}, indent=2, default=str))  # noqa: T201 - CLI output
        return report.exit_code
    print(report.format_text())  # noqa: T201 - CLI output
    if args.fix:
        print(f"wrote {args.output}:")  # noqa: T201 - CLI output
        for line in extra["fixes"]:
            print(f"  - {line}")  # noqa: T201 - CLI output
    for path in extra.get("plots", []):
        print(f"plot: {path}")  # noqa: T201 - CLI output
    return report.exit_code
