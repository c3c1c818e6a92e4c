"""Command line: ``python -m kagglekd {demo,train,evaluate,diagnose} ...``.

Bad flags or a bad config exit with code 2 and one line naming the problem; a run that stops itself
(non-finite storm) exits 3 with the path of its failure report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from kagglekd.errors import KaggleKDError

EXIT_USAGE = 2
EXIT_STOPPED = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints usage too)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny-cpu", help="preset name or path to a JSON config (default tiny-cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set learning_rate=1e-3")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m kagglekd", description=__doc__.split("\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="the embedded default: KD vs CE-only student on the offline corpus")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--max-steps", type=int, default=None, help="optimizer steps of each run (default: preset)")

    train = sub.add_parser("train", help="distil a student (resumes from the newest checkpoint by default)")
    _add_config_args(train)
    train.add_argument("--output-dir", help="run directory (default: the config's output_dir)")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    train.add_argument("--resume", help="auto (newest checkpoint in the output dir), never, or a checkpoint path")
    train.add_argument("--help-config", action="store_true", help="list every config key with its default")

    evaluate = sub.add_parser("evaluate", help="evaluate a finished run's student/ (prints and writes eval.json)")
    evaluate.add_argument("--run", required=True, help="run directory written by `train`")

    diagnose = sub.add_parser("diagnose", help="findings, fixes, LR plan and memory plan before spending GPU time",
                              add_help=False)
    diagnose.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _load_config(args):
    from kagglekd.config import DistillConfig

    config = DistillConfig.load(args.config).with_overrides(args.overrides)
    changes = {}
    if getattr(args, "output_dir", None):
        changes["output_dir"] = args.output_dir
    if getattr(args, "resume", None):
        changes["resume"] = args.resume
    return config.replace(**changes) if changes else config


def cmd_train(args) -> int:
    from kagglekd.config import describe_fields

    if args.help_config:
        for name, help_text, default in describe_fields():
            print(f"{name:30} {json.dumps(default):>22}  {help_text}")
        return 0
    from kagglekd.trainer import Distiller, TrainingStopped

    config = _load_config(args)
    distiller = Distiller(config)
    try:
        summary = distiller.train(max_steps=args.max_steps)
    except TrainingStopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_evaluate(args) -> int:
    from kagglekd.demo import evaluate_run
    from kagglekd.metrics import format_table

    rows = evaluate_run(Path(args.run))
    print(format_table(rows, ["model", "eval_ppl", "top1_agreement", "eval_tokens"]))
    print(f"written: {Path(args.run) / 'eval.json'}")
    return 0


def cmd_demo(args) -> int:
    from kagglekd.demo import run_demo

    run_demo(output_dir=args.output_dir, max_steps=args.max_steps, echo=print)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "diagnose":
        from kagglekd.diagnose import main as diagnose_main

        return diagnose_main(args.rest)
    handler = {"train": cmd_train, "evaluate": cmd_evaluate, "demo": cmd_demo}[args.command]
    try:
        return handler(args)
    except KaggleKDError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
