"""The ordered checks of ``diagnose``. Each takes the shared ``Context`` and adds findings to it.

``CHECKS`` is the order they run in: GPU, models, tokenizers, the kit's rules (``kagglekd.rules``, the same
rules ``DistillConfig`` and ``Distiller.setup`` raise), memory, strategy, losses, the optional dry run, the
rules that need the training-block count, schedule, cadence, extras, time. Cross-field and model-dependent
validity is never re-implemented here: ``check_rules`` asks ``rules.check`` with the facts diagnose can learn
offline (model cards, tiny presets, local directories, tokenizer families).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kagglekd import rules
from kagglekd.diagnose.context import Context
from kagglekd.diagnose.parsing import tokenizer_family
from kagglekd.diagnose.plan import check_cadence, check_extras, check_schedule, check_time
from kagglekd.errors import KaggleKDError
from kagglekd.memory import TINY_PRESETS, choose_strategy, format_bytes, largest_fitting, resolve_model_config


# ---- GPU and models -------------------------------------------------------------------------------------
def check_gpu(ctx: Context) -> None:
    p = ctx.profile
    if not p.supported:
        ctx.add(
            "device",
            "error",
            "gpu",
            f"{p.name} (sm_{p.compute_capability[0]}{p.compute_capability[1]}): the current Kaggle image's PyTorch "
            "ships no sm_60 kernels, so torch.cuda.is_available() is True but the first CUDA op fails with "
            "'no kernel image is available'. Kaggle now runs NvidiaTeslaP100 requests on T4. No config change "
            "fixes this.",
            "run on 'GPU T4 x2' (kernel-metadata.json machine_shape: NvidiaTeslaT4) and re-diagnose with --gpu T4x2.",
        )
    cfg = ctx.config
    if p.name == "cpu":
        if cfg.use_amp:
            ctx.add("precision", "info", "use_amp", "on CPU autocast is off: the run is float32 end to end.")
        real = [m for m in (cfg.teacher_model, cfg.student_model) if m not in TINY_PRESETS]
        if real:
            ctx.add(
                "device",
                "warning",
                "gpu",
                f"real models ({', '.join(real)}) on CPU: expect hours per hundred steps; see the time plan.",
                "diagnose with --gpu T4x2 for a Kaggle run.",
            )
        return
    _check_precision(ctx)


def _check_precision(ctx: Context) -> None:
    p, cfg = ctx.profile, ctx.config
    capability = f"sm_{p.compute_capability[0]}{p.compute_capability[1]}" if p.compute_capability else "no sm"
    if ctx.parsed.extras.get("bf16") and not p.native_bf16:
        ctx.add(
            "precision",
            "warning",
            "bf16",
            f"bf16 on {p.name} ({capability}) is emulated: torch.cuda.is_bf16_supported() says True on a T4, but "
            "there are no bf16 tensor cores, so it is slow. The kit uses fp16 autocast + GradScaler with fp32 "
            "master weights below sm_80.",
            "remove 'bf16' and keep use_amp true.",
            {"bf16": rules.REMOVE},
        )
    if not cfg.use_amp:
        ctx.add(
            "precision",
            "warning",
            "use_amp",
            f"use_amp false on {p.name}: float32 matmuls skip the tensor cores (several times slower) and "
            "double activation memory.",
            "set use_amp true (fp16 + GradScaler below sm_80, bf16 from sm_80).",
            {"use_amp": True},
        )
    else:
        mode = "bf16 autocast" if p.native_bf16 else "fp16 autocast + GradScaler"
        ctx.add("precision", "info", "use_amp", f"{p.name}: {mode}, fp32 master weights; softmax/KD in float32.")


def check_models(ctx: Context) -> None:
    cfg = ctx.config
    configs = {}
    for field_name in ("teacher_model", "student_model"):
        name = getattr(cfg, field_name)
        model_cfg, source = resolve_model_config(name)
        if model_cfg is None:
            ctx.add(
                "model-unknown",
                "warning",
                field_name,
                f"{name}: {source}; memory and time cannot be planned offline.",
                f"download its config.json (and tokenizer files) into a directory and set {field_name} to that "
                f"directory, or add kagglekd/presets/card-<name>.json with its config.json facts.",
            )
        configs[field_name] = model_cfg
    ctx.teacher_cfg, ctx.student_cfg = configs["teacher_model"], configs["student_model"]
    for field_name, model_cfg in configs.items():
        limit = getattr(model_cfg, "max_position_embeddings", None) if model_cfg is not None else None
        if limit and cfg.max_length > limit:
            ctx.add(
                "max-length",
                "error",
                "max_length",
                f"max_length {cfg.max_length} exceeds {getattr(cfg, field_name)}'s max_position_embeddings {limit}.",
                f"set max_length to at most {limit}.",
                {"max_length": limit},
            )


def check_tokenizers(ctx: Context) -> None:
    """The vocabulary relation, from tokenizer families (the rule itself is ``rules``' tokenizer finding)."""
    cfg = ctx.config
    refs = {"teacher": cfg.teacher_tokenizer or cfg.teacher_model, "student": cfg.tokenizer or cfg.student_model}
    fams = {side: tokenizer_family(ref) for side, ref in refs.items()}
    for side, fam in fams.items():
        if fam is None:
            ctx.add(
                "tokenizer-unknown",
                "warning",
                f"{side}_model",
                f"the {side} tokenizer ({refs[side]}) cannot be identified offline; the vocabulary check is skipped.",
                "use a carded hub id or a local directory holding tokenizer.json.",
            )
    if None in fams.values():
        return
    ctx.relation = "identical" if fams["teacher"] == fams["student"] else "different"
    if ctx.relation == "different" and cfg.cross_tokenizer and cfg.live_teacher:
        vocab = ""
        if ctx.teacher_cfg is not None and ctx.student_cfg is not None:
            vocab = f" (vocab {ctx.teacher_cfg.vocab_size:,} vs {ctx.student_cfg.vocab_size:,})"
        ctx.add(
            "tokenizer",
            "info",
            "cross_tokenizer",
            f"different vocabularies{vocab}; cross_tokenizer is on, so KD runs on offset-aligned positions.",
        )


# ---- the kit's rules ------------------------------------------------------------------------------------
def _facts(ctx: Context, train_blocks: int | None = None) -> rules.Facts:
    """What diagnose knows offline. ``processes`` stays unknown: diagnose does not know how the run will be
    launched (the planner's strategy finding covers the GPU count), so the launch rules are the trainer's."""
    gpus = 0 if ctx.profile.name == "cpu" else ctx.profile.devices
    return rules.Facts(
        teacher=ctx.teacher_cfg,
        student=ctx.student_cfg,
        vocab_relation=ctx.relation,
        gpus=gpus,
        train_blocks=train_blocks,
    )


def check_rules(ctx: Context) -> None:
    ctx.facts = _facts(ctx)
    ctx.findings.extend(rules.check(ctx.config, ctx.facts))


def check_rules_with_data(ctx: Context) -> None:
    """The rules again once the training blocks are known (a dry run or the caller counted them): new ones only."""
    blocks = ctx.options.get("train_blocks") or (ctx.dry or {}).get("train_blocks")
    if not blocks:
        return
    ctx.facts = _facts(ctx, blocks)
    seen = {(f.id, f.field, f.message) for f in ctx.findings}
    ctx.findings.extend(f for f in rules.check(ctx.config, ctx.facts) if (f.id, f.field, f.message) not in seen)


# ---- memory and strategy --------------------------------------------------------------------------------
def check_memory(ctx: Context) -> None:
    if ctx.teacher_cfg is None or ctx.student_cfg is None:
        return
    cfg = ctx.config
    models = dict(
        gpu=ctx.profile,
        teacher_cfg=ctx.teacher_cfg,
        student_cfg=ctx.student_cfg,
        gradient_checkpointing=cfg.gradient_checkpointing,
        sar=cfg.sar,
    )
    ctx.strategy = choice = choose_strategy(cfg, **models)
    ctx.memory_plan = plan = choice.worst  # the fullest GPU of the chosen strategy
    best = largest_fitting(cfg, strategy=choice.strategy, **models)
    plan.notes.append(
        f"largest fitting (< 85 %): batch_size {best['batch_size']} at max_length {cfg.max_length}, "
        f"max_length {best['max_length']} at batch_size {cfg.batch_size}"
    )
    top = sorted(plan.parts.items(), key=lambda kv: -kv[1])[:3]
    biggest = ", ".join(f"{k} {format_bytes(v)}" for k, v in top)
    if choice.strategy == "split":
        student, teacher = choice.plans["student"], choice.plans["teacher"]
        per = f" (strategy split: student GPU {format_bytes(student.total)}, teacher GPU {format_bytes(teacher.total)})"
    else:
        per = " per GPU (ddp: each GPU holds both models)" if choice.strategy == "ddp" else ""
    message = f"predicted peak {plan.summary()}{per}; largest parts: {biggest}."
    if plan.verdict == "fits":
        ctx.add("memory", "info", "batch_size", message)
        return
    # the patch is computed by fix.py on the fixed config (other patches change memory too)
    fix = (
        f"batch_size {best['batch_size']} with gradient_accumulation_steps "
        f"{math.ceil(cfg.batch_size * cfg.gradient_accumulation_steps / max(1, best['batch_size']))} keeps the "
        "effective batch"
        if best["batch_size"]
        else "nothing fits at this max_length; lower max_length"
    )
    if cfg.alpha_kd > 0 and not cfg.kd_top_k:
        fix += "; kd_top_k 256 shrinks the KD intermediates"
    ctx.add("memory", "error" if plan.verdict == "OOM" else "warning", "batch_size", message, fix + ".")


def check_strategy(ctx: Context) -> None:
    choice = ctx.strategy
    if choice is None:
        return
    message = f"{choice.strategy} with {choice.processes} process(es): {choice.reason}."
    n = choice.processes
    if choice.strategy == "ddp":
        message += (
            f" batch_size is per process: an optimizer step takes {n} x batch_size x gradient_accumulation_steps "
            f"blocks, so an epoch has 1/{n} of one process's optimizer steps (the plan counts this). Launch: "
            f"`accelerate launch --multi_gpu --num_processes {n} -m kagglekd train --config ...`, or "
            "kagglekd.launch from a notebook."
        )
    severity, fix, patch = choice.severity, choice.fix, None
    if choice.problem and ctx.has("strategy", "error", "strategy"):
        severity, fix = "info", None  # a rule already reports this strategy as an error (one finding per problem)
    elif choice.problem:
        message = f"{choice.problem} {message}"
        if severity == "error" and choice.to_dict().get("best"):
            patch = {"strategy": choice.to_dict()["best"]}
    ctx.add("strategy", severity, "strategy", message, fix, patch)


# ---- losses ---------------------------------------------------------------------------------------------
def check_losses(ctx: Context) -> None:
    cfg = ctx.config
    if cfg.alpha_kd == 0:
        ctx.add("loss-weights", "info", "alpha_kd", "alpha_kd is 0: this trains on the data only (no distillation).")
    total = cfg.alpha_kd + cfg.alpha_ce + cfg.alpha_feature + cfg.alpha_attention
    if not math.isclose(total, 1.0, rel_tol=1e-6):
        ctx.add(
            "loss-weights",
            "info",
            "alpha_kd",
            f"the loss weights sum to {total:g}, not 1: the weights are relative, but their sum also scales "
            "the gradient (an effective LR change with AdamW's clipping).",
        )
    if cfg.alpha_attention > 0:
        maps = ctx.memory_plan.parts.get("attention_maps", 0) if ctx.memory_plan else 0
        extra = f" ({format_bytes(maps)} of [B,H,T,T] maps per GPU)" if maps else ""
        layers = f"{cfg.attention_layers} layer(s)" if cfg.attention_layers else "the last layer (attention_layers)"
        ctx.add(
            "attention-cost",
            "warning",
            "alpha_attention",
            f"attention transfer on {layers} needs the attention probabilities, which forces eager attention (no "
            f"SDPA/flash) in every layer of both models{extra}; memory and time grow with max_length^2.",
            "keep alpha_attention 0 unless the maps are the point of the experiment.",
        )
    elif cfg.attention_layers is not None:
        ctx.add(
            "unused-setting",
            "info",
            "attention_layers",
            "attention_layers is set but alpha_attention is 0.",
            "remove attention_layers.",
            {"attention_layers": rules.REMOVE},
        )
    _check_temperature(ctx)


def _check_temperature(ctx: Context) -> None:
    cfg = ctx.config
    t = cfg.temperature
    if t >= 2 or t < 1:
        effect = "flattens the teacher distribution" if t > 1 else "sharpens both distributions"
        severity = "warning" if t > 4 else "info"
        scale = f"; with kd_scale_t2 the KD term is multiplied by T^2 = {t * t:g}" if cfg.kd_scale_t2 else ""
        ctx.add(
            "temperature",
            severity,
            "temperature",
            f"temperature {t:g} {effect}. The usual fear (fp16 softmax overflow/underflow at high T) does not "
            "apply: the kit divides the logits by T and runs log-softmax in float32. The real risks: at high T "
            f"the KD signal is mostly the tail of the teacher distribution, and the loss scale changes{scale}.",
            "T in 1-2 is a good start for LM distillation; compare runs by eval perplexity, not KD loss.",
        )


# ---- dry run --------------------------------------------------------------------------------------------
def run_dry(ctx: Context) -> None:
    steps = ctx.options.get("dry_run", 0)
    if steps <= 0:
        return
    from kagglekd.diagnose.dryrun import run_dry_run

    try:
        ctx.dry = run_dry_run(ctx, steps, ctx.options.get("dry_run_dir"))
    except (KaggleKDError, ImportError, RuntimeError, OSError) as err:
        ctx.add(
            "dry-run-failed",
            "warning",
            None,
            f"the dry run did not run: {err}",
            "run `python -m kagglekd train --max-steps N` to see the full error.",
        )


def report_dry_run(ctx: Context) -> None:
    dry = ctx.dry
    if dry is None:
        return
    stand = f"stand-ins {dry['teacher']} -> {dry['student']}" if dry["stand_ins"] else "the configured models"
    projected = (
        f"; projected {ctx.time['tokens_per_s']:.0f} tokens/s on {ctx.profile.name} ({ctx.time['source']})"
        if ctx.time
        else ""
    )
    ctx.add(
        "dry-run",
        "info",
        None,
        f"{dry['steps']} optimizer steps on {stand} ({dry['device']}, {dry['dataset']}, max_length "
        f"{dry['max_length']}): {dry['tokens_per_s']:.0f} tokens/s measured{projected}.",
    )


# The order diagnose runs them in (each may use what the earlier ones set on the context).
CHECKS: tuple[Callable[[Context], None], ...] = (
    check_gpu,
    check_models,
    check_tokenizers,
    check_rules,
    check_memory,
    check_strategy,
    check_losses,
    run_dry,
    check_rules_with_data,
    check_schedule,
    check_cadence,
    check_extras,
    check_time,
    report_dry_run,
)
