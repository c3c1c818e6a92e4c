"""Diagnostics before spending GPU quota: findings with fixes, the LR plan, the memory plan, the time plan.

``python -m kagglekd diagnose --config NAME_OR_PATH [--gpu T4|T4x2|P100|A100|L4|cpu] [--json]
[--fix --output PATH] [--dry-run N] [--plots DIR] [--batches-per-epoch N]``

Exit 0 when no finding is an error, 1 when one is, 2 on unusable input (one line naming it).

Configs are read leniently (``parsing``): the flat JSON of a hand-rolled distillation script works. Keys the
kit knows under another name are renamed (``config.ALIASES``), keys it cannot use become ``unknown-key``
findings, values that fail validation become ``invalid-value`` findings and fall back to the default, a
``total_steps``-style key is compared with the derived optimizer-step count, and ``device``/``gpu``/
``machine_shape``-style keys are read as a GPU hint when ``--gpu`` is not given. Models named by hub id are
planned offline from the model cards in ``kagglekd/presets/card-*.json``.

The checks run in the order of ``checks.CHECKS``. Every cross-field and model-dependent rule is
``kagglekd.rules``' (the rules ``DistillConfig`` and ``Distiller.setup`` raise), asked with the facts diagnose
learns offline; diagnose adds what only a plan can tell (memory, strategy, schedule, cadence, time).
Every finding is ``{id, severity, field, message, fix}``; the ids are stable and listed in ``FINDINGS``.
``fix_config`` applies the findings' structured patches (``fix``).

Time estimates are estimates. Without a dry run: training FLOPs per token (6 x active student params +
2 x active teacher params + attention, see ``memory.flops_per_token``) over the GPU's fp16/bf16 peak times an
assumed model-FLOPs utilisation of 20 % (small models on T4s rarely do better), times the strategy's speed-up
(``memory.choose_strategy``: ddp 1 + 0.9 per extra GPU, split and single 1). Under ddp an optimizer step holds
every process's micro-batches, so its tokens (and seconds) are multiplied by the process count.
With ``--dry-run N``: N real optimizer steps of ``Distiller`` run on the configured models when they are tiny
presets or local directories, else on tiny stand-ins of the same family. Tokens/s measured on the configured
models on the target device are used as they are; on stand-ins they are scaled by the FLOPs-per-token
ratio (stand-in / target), which ignores that tiny models use hardware worse; a dry run on CPU cannot time a
GPU, so for a GPU target the FLOP estimate is kept and the measurement is reported beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kagglekd.config import ALIASES, DistillConfig
from kagglekd.diagnose.checks import CHECKS
from kagglekd.diagnose.cli import build_parser, main, read_raw, write_plots
from kagglekd.diagnose.context import Context
from kagglekd.diagnose.findings import FINDINGS, SEVERITIES, Finding, Report
from kagglekd.diagnose.fix import fix_config
from kagglekd.diagnose.parsing import (
    GPU_KEYS,
    PENDING_KEYS,
    STEP_KEYS,
    Parsed,
    parse_lenient,
    planner_profile,
    resolve_gpu,
    tokenizer_family,
)
from kagglekd.diagnose.plan import ddp_processes, plan_time
from kagglekd.errors import ConfigError

__all__ = [
    "ALIASES",
    "CHECKS",
    "FINDINGS",
    "GPU_KEYS",
    "PENDING_KEYS",
    "SEVERITIES",
    "STEP_KEYS",
    "Context",
    "DistillConfig",
    "Finding",
    "Parsed",
    "Report",
    "build_parser",
    "diagnose",
    "fix_config",
    "main",
    "parse_lenient",
    "planner_profile",
    "plan_time",
    "read_raw",
    "tokenizer_family",
    "write_plots",
]


def diagnose(
    raw_config: dict,
    *,
    gpu: str | None = "T4x2",
    batches_per_epoch: int | None = None,
    dry_run: int = 0,
    dry_run_dir: str | Path | None = None,
    train_blocks: int | None = None,
) -> Report:
    """All checks on a raw (possibly hand-rolled) config dict. ``gpu=None`` reads a GPU hint from the config,
    falling back to T4x2. ``dry_run`` > 0 runs that many real optimizer steps first. ``train_blocks``: the
    packed training blocks when the caller has counted them (a dry run counts them too); the data-size rule
    and the plan use it."""
    if not isinstance(raw_config, dict):
        raise ConfigError(f"expected a JSON object of key: value pairs, got {type(raw_config).__name__}.")
    parsed = parse_lenient(raw_config)
    profile, unknown = resolve_gpu(gpu, parsed)
    ctx = Context(
        parsed,
        profile,
        batches_per_epoch=batches_per_epoch,
        train_blocks=train_blocks,
        dry_run=dry_run,
        dry_run_dir=dry_run_dir,
    )
    if unknown is not None:
        ctx.add(*unknown)
    for check in CHECKS:
        check(ctx)
    plan_dict = {**ctx.plan.to_dict(with_curve=False), "processes": ddp_processes(ctx)} if ctx.plan is not None else {}
    time_dict = dict(ctx.time)
    if ctx.dry is not None:
        time_dict["dry_run"] = {k: v for k, v in ctx.dry.items() if k != "history"}
    return Report(
        gpu=ctx.profile.name,
        findings=ctx.findings,
        plan=plan_dict,
        memory=ctx.memory_plan.to_dict() if ctx.memory_plan is not None else {},
        time=time_dict,
        config=ctx.config,
        values=parsed.values,
        extras=parsed.extras,
        schedule=ctx.plan,
        memory_plan=ctx.memory_plan,
        history=ctx.dry["history"] if ctx.dry else [],
        strategy=ctx.strategy.to_dict() if ctx.strategy is not None else {},
        facts=ctx.facts,
    )


if __name__ == "__main__":
    sys.exit(main())
