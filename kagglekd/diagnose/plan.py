"""The checks on the run's plan: optimizer steps and LR curve, eval/save/EMA cadence, teacher-cache size,
projected time. Time estimates are estimates; see ``plan_time`` and the package docstring."""

from __future__ import annotations

import math

from kagglekd.diagnose.context import AT_RISK_S, KAGGLE_OUTPUT_BYTES, KAGGLE_SESSION_H, MFU, Context
from kagglekd.errors import ConfigError
from kagglekd.memory import flops_per_token
from kagglekd.rules import REMOVE


def ddp_processes(ctx: Context) -> int:
    """Processes that share each epoch's blocks: N under the chosen ddp strategy, else 1."""
    choice = ctx.strategy
    return choice.processes if choice is not None and choice.strategy == "ddp" else 1


def _derive_batches(ctx: Context):
    """Micro-batches per epoch of ONE process of the planned run, and where the number came from. Under ddp
    the N processes share the blocks (``schedule.batches_per_epoch``, as the trainer counts them), so the run
    has about 1/N of one process's optimizer steps."""
    from kagglekd.schedule import batches_per_epoch as per_process

    cfg, n = ctx.config, ddp_processes(ctx)
    share = f" / {n} ddp processes" if n > 1 else ""
    given = ctx.options.get("batches_per_epoch")
    if given:
        return given // n, f"--batches-per-epoch{share}"
    train_blocks = ctx.options.get("train_blocks") or (ctx.dry or {}).get("train_blocks")
    blocks, source = (
        (train_blocks, f"{train_blocks} blocks") if train_blocks else (cfg.dataset_subset_size, "dataset_subset_size")
    )
    if blocks:
        return per_process(blocks, cfg.batch_size, n), f"{source} / batch_size{share}"
    if cfg.max_steps:
        return cfg.max_steps * cfg.gradient_accumulation_steps, "max_steps x accumulation (assumes one epoch)"
    return None, ""


def check_schedule(ctx: Context) -> None:
    from kagglekd.schedule import plan_schedule

    cfg = ctx.config
    bpe, source = _derive_batches(ctx)
    if bpe is None:
        ctx.add(
            "batches-unknown",
            "warning",
            "dataset_subset_size",
            f"batches per epoch of {cfg.dataset} cannot be derived offline, so the optimizer-step count, warmup "
            "and LR-curve checks are skipped.",
            "pass --batches-per-epoch N, set dataset_subset_size, or run --dry-run (reads the dataset).",
        )
        return
    if bpe < 1 and ctx.has("data-size", "error"):
        return  # the rule already says the data does not fill a batch
    try:
        ctx.plan = plan_schedule(cfg, bpe)
    except ConfigError as err:
        warmup = err.field in ("warmup_steps", "warmup_ratio")
        ctx.add(
            "warmup" if warmup else "scheduler",
            "error",
            err.field,
            str(err),
            "lower the warmup (e.g. warmup_ratio 0.05) or train longer."
            if warmup
            else "lower batch_size or max_length, or add data."
            if err.field == "batch_size"
            else "fix scheduler_kwargs.",
            {"warmup_steps": REMOVE, "warmup_ratio": 0.05} if warmup else None,
        )
        return
    ga, processes = cfg.gradient_accumulation_steps, ddp_processes(ctx)
    ctx.add(
        "optimizer-steps",
        "info",
        "gradient_accumulation_steps",
        f"{ctx.plan.optimizer_steps} optimizer steps = ceil({bpe} batches/epoch [{source}] / accumulation {ga}) = "
        f"{ctx.plan.steps_per_epoch} per epoch x {cfg.num_epochs:g} epochs"
        + (f" (max_steps {cfg.max_steps})" if cfg.max_steps else "")
        + (f"; per process of the {processes}-process ddp run" if processes > 1 else "")
        + ".",
    )
    _check_steps_key(ctx, bpe)
    _check_warmup_and_lr(ctx)


def _check_steps_key(ctx: Context, bpe: int) -> None:
    steps_key = ctx.parsed.extras.get("steps_key")
    if steps_key is None:
        return
    plan, cfg = ctx.plan, ctx.config
    key, value = steps_key
    try:
        declared = int(value)
    except (TypeError, ValueError):
        declared = None
    if declared == plan.optimizer_steps:
        return
    why = ""
    if declared == math.ceil(bpe * cfg.num_epochs):
        why = (
            f" {declared} is the number of micro-batches (batches x epochs), not optimizer steps: a "
            f"scheduler sized with it and stepped once per optimizer step would end at "
            f"{plan.optimizer_steps / declared:.1%} of its curve (warmup and decay "
            f"{cfg.gradient_accumulation_steps}x too slow)."
        )
    elif declared is not None and declared < plan.optimizer_steps:
        why = (
            f" A scheduler sized with {declared} reaches LR 0 at step {declared} and trains the remaining "
            f"{plan.optimizer_steps - declared} steps at LR 0."
        )
    ctx.add(
        "total-steps-mismatch",
        "warning",
        key,
        f"{key} = {value!r}, but the run takes {plan.optimizer_steps} optimizer steps.{why}",
        f"remove '{key}': the kit derives the step count (use max_steps to cap a run).",
        {key: REMOVE},
    )


def _check_warmup_and_lr(ctx: Context) -> None:
    plan, cfg = ctx.plan, ctx.config
    fraction = plan.warmup_fraction
    warmup_field = "warmup_steps" if cfg.warmup_steps is not None else "warmup_ratio"
    if fraction > 0.2:
        ctx.add(
            "warmup",
            "warning",
            warmup_field,
            f"warmup is {plan.warmup_steps} of {plan.optimizer_steps} optimizer steps ({fraction:.1%}): a fifth of "
            "the run or more is spent below the peak LR.",
            "use warmup_ratio 0.03-0.05 (and drop warmup_steps).",
            {"warmup_steps": REMOVE, "warmup_ratio": 0.05},
        )
    elif plan.warmup_steps == 0 and cfg.scheduler_type not in ("constant",):
        ctx.add(
            "warmup",
            "info",
            warmup_field,
            "no warmup: Adam's first steps at the peak LR can be unstable.",
            "warmup_ratio 0.03-0.05.",
        )
    zero = _first_near_zero_step(plan)
    if zero is not None:
        exact = plan.first_zero_lr_step() == zero
        ctx.add(
            "lr-zero",
            "warning",
            "scheduler_type",
            f"the LR reaches {'0' if exact else 'about 0 (< 0.1 % of the peak)'} at optimizer step {zero} of "
            f"{plan.optimizer_steps}, before the last 5 % of the run: those steps train (almost) nothing.",
            "check scheduler_kwargs (num_cycles, num_decay_steps) or use cosine_with_min_lr.",
        )


def _first_near_zero_step(plan) -> int | None:
    """First step after warmup with LR <= 0.1 % of the peak, if it comes before the last 5 % of the run
    (a cosine reaches that level only in its final ~2 %)."""
    floor = 1e-3 * plan.learning_rate
    for step in range(max(1, plan.warmup_steps), plan.optimizer_steps):
        if plan.lrs[step] <= floor:
            return step if step < 0.95 * plan.optimizer_steps else None
    return None


def check_cadence(ctx: Context) -> None:
    if ctx.plan is None:
        return
    evals = _check_evals(ctx)
    _check_saves_and_ema(ctx)
    _check_stop_after(ctx)
    cfg, steps = ctx.config, ctx.plan.optimizer_steps
    if cfg.early_stopping_patience is None:
        return
    needed = cfg.early_stopping_patience + 1  # a best eval, then `patience` evals without improvement
    if evals < needed:
        # when the eval cadence is fixed too, the patience fits the fixed cadence (10 evaluations)
        after_fix = steps // max(1, steps // 10) if ctx.has("eval-cadence", "warning") else evals
        ctx.add(
            "early-stopping",
            "warning",
            "early_stopping_patience",
            f"early_stopping_patience {cfg.early_stopping_patience} needs {needed} evaluations, the run has "
            f"{evals}: early stopping can never trigger.",
            f"lower the patience to {max(1, evals // 3)} or evaluate more often.",
            {"early_stopping_patience": max(1, after_fix // 3)},
        )
    else:
        ctx.add(
            "early-stopping",
            "info",
            "early_stopping_patience",
            f"early stopping can trigger from step {needed * (cfg.eval_steps or steps)} of {steps} "
            f"({evals} evaluations).",
        )


def _check_evals(ctx: Context) -> int:
    """Eval cadence findings; returns the number of evaluations of the run."""
    cfg, steps = ctx.config, ctx.plan.optimizer_steps
    if cfg.eval_steps is None:
        ctx.add("eval-cadence", "info", "eval_steps", "eval_steps is null: one evaluation, at the end.")
        return 1
    if cfg.eval_steps >= steps:
        ctx.add(
            "eval-cadence",
            "warning",
            "eval_steps",
            f"eval_steps {cfg.eval_steps} >= the run's {steps} optimizer steps: no evaluation before the end.",
            f"set eval_steps to about {max(1, steps // 10)} (10 evaluations).",
            {"eval_steps": max(1, steps // 10)},
        )
        return 1
    evals = steps // cfg.eval_steps
    if evals > 200:
        ctx.add(
            "eval-cadence",
            "info",
            "eval_steps",
            f"{evals} evaluations: evaluation time adds up.",
            f"eval_steps {max(1, steps // 50)} gives 50.",
        )
    return evals


def _check_stop_after(ctx: Context) -> None:
    """A ``stop_after`` inside the plan pauses the run there: it ends unfinished (no patch: a planned pause, e.g.
    to split a long plan over sessions, is legitimate; --fix must not undo it)."""
    cfg, plan = ctx.config, ctx.plan
    if cfg.stop_after is None or cfg.stop_after >= plan.optimizer_steps:
        return
    ctx.add(
        "stop-after",
        "warning",
        "stop_after",
        f"stop_after {cfg.stop_after} pauses the run after optimizer step {cfg.stop_after} of the plan's "
        f"{plan.optimizer_steps}: the LR is still {plan.lrs[cfg.stop_after]:.3g} (the schedule ends at "
        f"{plan.lrs[-1]:.3g}), the final evaluation does not run and student/ is not exported. Only a checkpoint "
        "is saved.",
        "remove stop_after to train the whole plan in one run; or keep it and finish later: train the same config "
        "without stop_after (python -m kagglekd train --config <run dir>/config.json) and it resumes from that "
        "checkpoint.",
    )


def _check_saves_and_ema(ctx: Context) -> None:
    cfg, steps = ctx.config, ctx.plan.optimizer_steps
    if cfg.save_steps is None or cfg.save_steps > steps:
        what = (
            "save_steps is null: no checkpoint until the end; a crash or the 12 h limit loses the whole run."
            if cfg.save_steps is None
            else f"save_steps {cfg.save_steps} > the run's {steps} steps: only the final student is saved."
        )
        ctx.add("save-cadence", "warning", "save_steps", what, "set save_steps (see the time plan's recommendation).")
    if cfg.ema_decay is not None:
        initial_share = cfg.ema_decay**steps
        horizon = 1 / (1 - cfg.ema_decay)
        if initial_share > 0.01 or horizon > steps / 5:
            better = min(0.9999, max(0.9, 1 - 10 / steps))
            ctx.add(
                "ema",
                "warning",
                "ema_decay",
                f"ema_decay {cfg.ema_decay} averages over ~{horizon:.0f} steps, and the run has {steps}: at the "
                f"end the initial weights still make up {initial_share:.1%} of the EMA, so EMA evaluations "
                "mostly measure the starting point.",
                f"set ema_decay to about {better:.4f}.",
                {"ema_decay": round(better, 4)},
            )


def check_extras(ctx: Context) -> None:
    cfg, extras = ctx.config, ctx.parsed.extras
    if cfg.teacher_cache and ctx.plan is not None:
        k = cfg.kd_top_k or 256
        tokens = epoch_tokens(ctx)
        size = tokens * (k * (2 + 4) + 4)  # fp16 log-prob + int32 id per entry, fp32 tail
        severity = (
            "error" if size > KAGGLE_OUTPUT_BYTES else ("warning" if size > 0.75 * KAGGLE_OUTPUT_BYTES else "info")
        )
        ctx.add(
            "teacher-cache",
            severity,
            "teacher_cache",
            f"a top-{k} teacher cache of one epoch ({tokens:,} tokens) takes ~{size / 1e9:.1f} GB; "
            "/kaggle/working keeps at most 20 GB of output.",
            None if severity == "info" else "lower kd_top_k, dataset_subset_size, or keep the cache in /kaggle/temp.",
        )
    hint = extras.get("gpu_hint")
    if hint and extras.get("_gpu_from_hint"):
        ctx.add("gpu-hint", "info", hint[0], f"'{hint[0]}': {hint[1]!r} read as GPU profile {ctx.profile.name}.")


def epoch_tokens(ctx: Context) -> int:
    """Tokens one epoch trains on, over all processes."""
    cfg = ctx.config
    return ctx.plan.batches_per_epoch * cfg.batch_size * cfg.max_length * ddp_processes(ctx)


# ---- time -----------------------------------------------------------------------------------------------
def plan_time(ctx: Context, dry: dict | None = None) -> dict:
    """Projected throughput and run time (see the package docstring for how honest each source is)."""
    cfg, plan, p = ctx.config, ctx.plan, ctx.profile
    if plan is None or ctx.teacher_cfg is None or ctx.student_cfg is None:
        return {}
    target_flops = flops_per_token(ctx.teacher_cfg, ctx.student_cfg, cfg.max_length)
    choice = ctx.strategy
    scaling = choice.speedup if choice is not None else 1.0
    processes = choice.processes if choice is not None else 1
    tokens_per_s = p.peak_flops * (MFU if p.name != "cpu" else 0.3) * scaling / target_flops
    source = f"FLOP estimate ({MFU:.0%} MFU of {p.peak_flops / 1e12:g} TFLOPS" + (
        f" x {scaling:g} for {choice.strategy} on {processes} GPUs)" if processes > 1 else ")"
    )
    measured = None
    if dry and dry.get("tokens_per_s"):
        measured = dry["tokens_per_s"]
        same_device = (dry["device"] == "cpu") == (p.name == "cpu")
        if same_device and dry["stand_ins"]:
            tokens_per_s = measured * dry["flops_per_token"] / target_flops * scaling
            source = "dry run on stand-ins, scaled by FLOPs/token"
        elif same_device:
            tokens_per_s, source = measured * scaling, "dry run on the configured models"
        else:
            source += f"; the dry run ran on {dry['device']} and cannot time {p.name}"
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.max_length * processes
    run_tokens = min(plan.optimizer_steps * tokens_per_step, math.ceil(epoch_tokens(ctx) * plan.epochs))
    step_s = tokens_per_step / tokens_per_s
    out = {
        "tokens_per_s": tokens_per_s,
        "source": source,
        "measured_tokens_per_s": measured,
        "flops_per_token": target_flops,
        "epoch_tokens": epoch_tokens(ctx),
        "run_tokens": run_tokens,
        "step_seconds": step_s,
        "epoch_hours": epoch_tokens(ctx) / tokens_per_s / 3600,
        "run_hours": run_tokens / tokens_per_s / 3600,
        "recommended_save_steps": max(1, min(plan.optimizer_steps, int(AT_RISK_S // step_s))),
    }
    out["fits_12h"] = out["run_hours"] <= KAGGLE_SESSION_H
    return out


def check_time(ctx: Context) -> None:
    ctx.time = t = plan_time(ctx, ctx.dry)
    if not t:
        return
    cfg = ctx.config
    if not t["fits_12h"]:
        ctx.add(
            "session-time",
            "warning",
            "num_epochs",
            f"projected run {t['run_hours']:.1f} h ({t['source']}) exceeds Kaggle's 12 h session.",
            "checkpoint (save_steps) and resume in a new session (attach this version's output), or lower "
            "num_epochs / dataset_subset_size; kd_top_k and a teacher cache cut the teacher's cost.",
        )
    else:
        ctx.add(
            "session-time",
            "info",
            "num_epochs",
            f"projected run {t['run_hours']:.1f} h ({t['source']}); an epoch {t['epoch_hours']:.2f} h.",
        )
    if cfg.save_steps is not None and cfg.save_steps <= ctx.plan.optimizer_steps:
        at_risk = cfg.save_steps * t["step_seconds"]
        if at_risk > AT_RISK_S:
            ctx.add(
                "save-cadence",
                "warning",
                "save_steps",
                f"save_steps {cfg.save_steps} puts ~{at_risk / 60:.0f} minutes of work at risk between checkpoints.",
                f"set save_steps to {t['recommended_save_steps']} (<= 30 minutes).",
            )
