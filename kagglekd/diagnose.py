"""Diagnostics before spending GPU quota: findings with fixes, the LR plan, the memory plan, the time plan.

``python -m kagglekd diagnose --config NAME_OR_PATH [--gpu T4|T4x2|P100|A100|L4|cpu] [--json]
[--fix --output PATH] [--dry-run N] [--plots DIR] [--batches-per-epoch N]``

Exit 0 when no finding is an error, 1 when one is, 2 on unusable input (one line naming it).

Configs are read leniently: the flat JSON of a hand-rolled distillation script works. Keys the kit knows
under another name are renamed (``ALIASES``), keys it cannot use become ``unknown-key`` findings, values
that fail validation become ``invalid-value`` findings and fall back to the default, a ``total_steps``-style
key is compared with the derived optimizer-step count, and ``device``/``gpu``/``machine_shape``-style keys
are read as a GPU hint when ``--gpu`` is not given. Models named by hub id are planned offline from the model
cards in ``kagglekd/presets/card-*.json``.

Every finding is ``{id, severity, field, message, fix}``; the ids are stable and listed in ``FINDINGS``.

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

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kagglekd.config import ALIASES, PRESETS_DIR, SCHEDULERS, DistillConfig, preset_names
from kagglekd.errors import ConfigError, KaggleKDError
from kagglekd.memory import (
    GPU_PROFILES,
    TINY_PRESETS,
    GpuProfile,
    MemoryPlan,
    StrategyChoice,
    choose_strategy,
    flops_per_token,
    format_bytes,
    gpu_profile,
    largest_fitting,
    load_card,
    resolve_model_config,
)

log = logging.getLogger(__name__)

# id -> one-line description (the README lists these; ids never change meaning).
FINDINGS: dict[str, str] = {
    "unknown-key": "A config key the kit does not know; the closest valid key is named. The key is ignored.",
    "alias": "A key renamed to the kit's name for it (e.g. lr -> learning_rate).",
    "pending-key": "A key diagnostics understand but DistillConfig does not accept yet (feature of a later issue).",
    "invalid-value": "A value that fails the type/range check of its field; the default is used instead.",
    "config-conflict": "A combination of values DistillConfig rejects.",
    "gpu-hint": "A device/gpu/machine key in the config read as the GPU profile (when --gpu is not given).",
    "batches-unknown": "Batches per epoch cannot be derived; schedule checks use an assumption or are skipped.",
    "optimizer-steps": "The derived optimizer-step count: ceil(batches per epoch / accumulation) x epochs.",
    "total-steps-mismatch": "A total_steps-style key disagrees with the derived optimizer-step count.",
    "warmup": "Warmup too long (> 20 % of the run), absent, or never ending.",
    "lr-zero": "The LR curve reaches 0 before the last optimizer step.",
    "scheduler": "A scheduler name (or its arguments) transformers.get_scheduler does not accept.",
    "loss-weights": "Loss weights that train no distillation or do not sum to 1 (informational).",
    "loss-prerequisite": "A loss weight > 0 whose prerequisite is missing or unsupported.",
    "attention-cost": "Attention transfer forces eager attention and keeps [B,H,T,T] maps (memory, time).",
    "unused-setting": "A setting that has no effect with the other values (e.g. attention_layers without alpha).",
    "temperature": "The KD temperature's real effect (softmax runs in float32; flattening, T^2 scaling).",
    "eval-cadence": "Evaluation cadence against the run length.",
    "early-stopping": "Early stopping that can never trigger with this cadence and run length.",
    "save-cadence": "Checkpoint cadence: missing, longer than the run, or more than 30 minutes of work at risk.",
    "ema": "EMA decay against run length: a slow EMA evaluated over a short run is mostly the initial weights.",
    "precision": "Precision against the GPU (bf16 emulated below sm_80, fp32 on a GPU, autocast off on CPU).",
    "device": "A GPU the current Kaggle image cannot use (P100: no sm_60 kernels), or a CPU run of real models.",
    "tokenizer": "Teacher and student tokenizers with different vocabularies while logit KD is on.",
    "tokenizer-unknown": "A tokenizer family that cannot be determined offline.",
    "model-unknown": "A model id with no model card and no local config.json; memory/time cannot be planned.",
    "max-length": "max_length beyond a model's max_position_embeddings.",
    "memory": "Predicted peak memory per GPU against capacity (fits < 85 % <= tight <= 100 % < OOM).",
    "strategy": "How the run uses the GPUs (single, ddp, split) and why, in memory numbers; a requested one checked.",
    "session-time": "Projected run time against Kaggle's 12 h session.",
    "teacher-cache": "Teacher top-k cache size against Kaggle's 20 GB output limit.",
    "incompatible": "A combination the kit cannot run (SAR or feature/attention transfer with a teacher cache).",
    "dry-run": "Result of the --dry-run optimizer steps (tokens/s, projected times).",
    "dry-run-failed": "The dry run could not run; the message says why.",
}
SEVERITIES = ("error", "warning", "info")

STEP_KEYS = (
    "total_steps",
    "num_training_steps",
    "total_training_steps",
    "training_steps",
    "num_steps",
    "total_optimizer_steps",
    "num_optimizer_steps",
)
GPU_KEYS = ("gpu", "device", "machine", "machine_shape", "accelerator", "gpu_type", "hardware")
# Keys of later issues: understood here, passed through when DistillConfig has them.
PENDING_KEYS = {
    "bf16": "precision is chosen by the kit from the GPU (use_amp); bf16 is never forced",
}
EXTRA_ALIASES = {
    "max_train_samples": "dataset_subset_size",
    "train_samples": "dataset_subset_size",
    "max_samples": "dataset_subset_size",
    "subset_size": "dataset_subset_size",
    "use_sar": "sar",
    "student_aware_router": "sar",
    "teacher_cache_dir": "teacher_cache",
    "use_cross_tokenizer": "cross_tokenizer",
}
KAGGLE_SESSION_H = 12.0
KAGGLE_OUTPUT_BYTES = 20e9
MFU = 0.20
AT_RISK_S = 30 * 60
DEMO_FAMILY = "kagglekd-demo"


@dataclass
class Finding:
    id: str
    severity: str
    field: str | None
    message: str
    fix: str | None = None

    def __post_init__(self) -> None:
        assert self.id in FINDINGS, self.id
        assert self.severity in SEVERITIES, self.severity

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Report:
    """Everything ``diagnose`` found. ``exit_code`` is what the CLI returns (0 no error, 1 an error)."""

    gpu: str
    findings: list[Finding]
    plan: dict
    memory: dict
    time: dict
    config: DistillConfig
    values: dict  # the usable keys in the kit's names (what --fix starts from)
    extras: dict  # recognised non-DistillConfig keys (pending keys, GPU hint, total_steps-style keys)
    schedule: Any = None  # SchedulePlan, for plots
    memory_plan: MemoryPlan | None = None
    history: list[dict] = field(default_factory=list)  # dry-run rows
    strategy: dict = field(default_factory=dict)  # StrategyChoice.to_dict() of the memory plan's profile

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def ids(self, severity: str | None = None) -> list[str]:
        return [f.id for f in self.findings if severity is None or f.severity == severity]

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu,
            "findings": [f.to_dict() for f in self.findings],
            "plan": self.plan,
            "memory": self.memory,
            "strategy": self.strategy,
            "time": self.time,
        }

    def format_text(self) -> str:
        lines = [f"kagglekd diagnose: {self.config.teacher_model} -> {self.config.student_model} on {self.gpu}"]
        if self.plan:
            p = self.plan
            lines.append(
                f"  plan: {p['optimizer_steps']} optimizer steps ({p['batches_per_epoch']} batches/epoch"
                + (f" per process x {p['processes']} ddp processes" if p.get("processes", 1) > 1 else "")
                + f", accumulation {p['gradient_accumulation_steps']}), warmup {p['warmup_steps']} "
                f"({p['warmup_fraction']:.1%}), {p['scheduler_type']}"
            )
        if self.memory_plan is not None:
            lines.append(f"  memory: {self.memory_plan.summary()}")
            parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.memory_plan.parts.items() if v)
            lines.append(f"          {parts}")
        if self.strategy:
            s = self.strategy
            lines.append(f"  strategy: {s['strategy']}, {s['processes']} process(es), ~{s['speedup']:.1f}x")
        if self.time:
            t = self.time
            lines.append(
                f"  time: ~{t['tokens_per_s']:.0f} tokens/s ({t['source']}), epoch {t['epoch_hours']:.2f} h, "
                f"run {t['run_hours']:.2f} h, fits 12 h: {t['fits_12h']}, "
                f"save_steps <= {t['recommended_save_steps']}"
            )
        order = {s: i for i, s in enumerate(SEVERITIES)}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            where = f" ({f.field})" if f.field else ""
            lines.append(f"[{f.severity.upper()}] {f.id}{where}: {f.message}")
            if f.fix:
                lines.append(f"    fix: {f.fix}")
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        lines.append(f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info")
        return "\n".join(lines)


# ---- lenient parsing ------------------------------------------------------------------------------------
@dataclass
class Parsed:
    config: DistillConfig
    values: dict
    extras: dict
    findings: list[Finding]


def _closest(key: str) -> str | None:
    known = list(DistillConfig.fields()) + list(ALIASES) + list(EXTRA_ALIASES) + list(PENDING_KEYS) + list(STEP_KEYS)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not close:
        return None
    return ALIASES.get(close[0], EXTRA_ALIASES.get(close[0], close[0]))


def _coerce_string(name: str, value: Any) -> Any:
    """'5e-5' -> 5e-05 for numeric fields, 'true' -> True; hand-rolled configs often quote numbers."""
    if not isinstance(value, str):
        return value
    tp = typing.get_type_hints(DistillConfig)[name]
    options = typing.get_args(tp) or (tp,)
    try:
        if int in options and value.strip().lstrip("-").isdigit():
            return int(value)
        if float in options:
            return float(value)
    except ValueError:
        return value
    return value


def parse_lenient(raw: dict) -> Parsed:
    """A DistillConfig from a raw dict that never raises on a key or value: problems become findings."""
    findings: list[Finding] = []
    fields = DistillConfig.fields()
    values: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key.startswith("_") or key in ("$schema", "description"):
            continue
        name = ALIASES.get(key, EXTRA_ALIASES.get(key, key))
        if name != key:
            findings.append(Finding("alias", "info", key, f"'{key}' is read as '{name}'.", f"rename it to '{name}'."))
        if name in fields:
            if name in values:
                findings.append(
                    Finding(
                        "config-conflict",
                        "warning",
                        name,
                        f"two keys set '{name}'; the later one ({value!r}) is used.",
                        f"keep one '{name}' key.",
                    )
                )
            values[name] = _coerce_string(name, value)
        elif name in STEP_KEYS:
            extras["steps_key"] = (key, value)
        elif name in GPU_KEYS:
            extras.setdefault("gpu_hint", (key, value))
        elif name in PENDING_KEYS:
            extras[name] = value
            findings.append(
                Finding(
                    "pending-key",
                    "info",
                    key,
                    f"'{key}' is understood by diagnostics ({PENDING_KEYS[name]}) but DistillConfig does not accept "
                    "it in this version, so `train` would reject the config.",
                    f"remove '{key}' until the feature lands, or keep it for re-diagnosis only.",
                )
            )
        else:
            close = _closest(key)
            hint = f" Did you mean '{close}'?" if close else ""
            findings.append(
                Finding(
                    "unknown-key",
                    "warning",
                    key,
                    f"unknown key '{key}' is ignored.{hint}",
                    f"rename it to '{close}'." if close else f"remove '{key}'.",
                )
            )
    config = None
    for _ in range(2 * len(fields) + 2):
        try:
            config = DistillConfig.without_combination_checks(**values)
            config.check_combinations()
            break
        except ConfigError as err:
            name = err.field if err.field in values else None
            if config is not None and (name is None or _valid_alone(name, values[name])):
                # the values are fine on their own: a combination is rejected. Report it; the checks below
                # (incompatible, loss-prerequisite, ...) say more about most of these.
                findings.append(Finding("config-conflict", "error", err.field, str(err), "change one of the values."))
                if err.field in ("alpha_kd", "alpha_ce"):
                    for culprit in ("alpha_kd", "alpha_ce"):
                        values.pop(culprit, None)
                    config = None
                    continue
                break
            bad = values.pop(name)
            default = _default(name)
            if name == "scheduler_type":
                close = difflib.get_close_matches(str(bad), SCHEDULERS, n=1, cutoff=0.3)
                findings.append(
                    Finding(
                        "scheduler",
                        "error",
                        name,
                        f"scheduler_type {bad!r} is not a transformers.get_scheduler name the kit accepts "
                        f"({', '.join(SCHEDULERS)}); a script that maps unknown names to a default silently runs "
                        "another schedule.",
                        f"set scheduler_type to '{close[0] if close else 'cosine'}'.",
                    )
                )
            else:
                findings.append(
                    Finding(
                        "invalid-value",
                        "error",
                        name,
                        f"{err} The default {default!r} is used.",
                        f"set a valid {name} (default {default!r}).",
                    )
                )
    if config is None:
        config = DistillConfig()
    return Parsed(config, values, extras, findings)


def _valid_alone(name: str, value: Any) -> bool:
    try:
        DistillConfig(**{name: value})
    except ConfigError as err:
        return err.field != name
    return True


def _default(name: str) -> Any:
    f = DistillConfig.fields()[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _setting(parsed: Parsed, name: str) -> Any:
    """A pending key's value: the config field once DistillConfig has it, else the raw extra."""
    if name in DistillConfig.fields():
        return getattr(parsed.config, name)
    return parsed.extras.get(name)


# ---- GPU ------------------------------------------------------------------------------------------------
def gpu_from_hint(value: Any) -> str | None:
    """'P100', 'NvidiaTeslaP100', 'T4 x2', 'NvidiaTeslaT4' (Kaggle's T4 x2), 'a100' -> a profile name."""
    text = str(value).lower().replace(" ", "").replace("_", "").replace("-", "")
    if text in ("cpu",):
        return "cpu"
    if "p100" in text:
        return "P100"
    if "t4" in text:
        return "T4x2" if ("x2" in text or "nvidiateslat4" in text or "2" in text.replace("t4", "")) else "T4"
    for name in ("A100", "L4"):
        if name.lower() in text:
            return name
    return None


# ---- tokenizer families ---------------------------------------------------------------------------------
def tokenizer_family(name: str) -> str | None:
    """Which vocabulary a model/tokenizer reference uses, offline: a card's family, the demo tokenizer of the
    tiny presets, or a hash of a local tokenizer.json vocabulary. None when unknown."""
    if name in TINY_PRESETS:
        from kagglekd.models import OWN_TOKENIZERS

        return f"{DEMO_FAMILY}-{name}" if name in OWN_TOKENIZERS else DEMO_FAMILY
    card = load_card(name)
    if card is not None:
        return card["tokenizer_family"]
    path = Path(name).expanduser() / "tokenizer.json"
    if path.exists():
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
        except (KeyError, ValueError, OSError):
            return None
        digest = hashlib.sha1(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:12]
        return f"local:{digest}"
    return None


def _transfer_supported(kind: str) -> bool:
    """Whether this version's losses implement feature/attention transfer (the trainer rejects them otherwise)."""
    try:
        from kagglekd import losses
    except ImportError:
        return False
    return hasattr(losses, {"feature": "feature_loss", "attention": "attention_loss"}[kind])


# ---- the checks -----------------------------------------------------------------------------------------
class _Context:
    def __init__(self, parsed: Parsed, profile: GpuProfile):
        self.parsed = parsed
        self.config = parsed.config
        self.profile = profile
        self.findings: list[Finding] = []
        self.plan = None
        self.teacher_cfg = self.student_cfg = None
        self.memory_plan: MemoryPlan | None = None
        self.strategy: StrategyChoice | None = None
        self.time: dict = {}
        self.cross = bool(_setting(parsed, "cross_tokenizer"))
        self.tokenizers_differ = False

    def add(self, id: str, severity: str, field: str | None, message: str, fix: str | None = None) -> None:
        self.findings.append(Finding(id, severity, field, message, fix))


def _check_gpu(ctx: _Context) -> None:
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
    raw_bf16 = ctx.parsed.extras.get("bf16")
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
    if raw_bf16 and not p.native_bf16:
        ctx.add(
            "precision",
            "warning",
            "bf16",
            f"bf16 on {p.name} (sm_{p.compute_capability[0]}{p.compute_capability[1]}) is emulated: "
            "torch.cuda.is_bf16_supported() says True on a T4, but there are no bf16 tensor cores, so it is "
            "slow. The kit uses fp16 autocast + GradScaler with fp32 master weights below sm_80.",
            "remove 'bf16' and keep use_amp true.",
        )
    if not cfg.use_amp:
        ctx.add(
            "precision",
            "warning",
            "use_amp",
            f"use_amp false on {p.name}: float32 matmuls skip the tensor cores (several times slower) and "
            "double activation memory.",
            "set use_amp true (fp16 + GradScaler below sm_80, bf16 from sm_80).",
        )
    else:
        mode = "bf16 autocast" if p.native_bf16 else "fp16 autocast + GradScaler"
        ctx.add("precision", "info", "use_amp", f"{p.name}: {mode}, fp32 master weights; softmax/KD in float32.")


def _check_models(ctx: _Context) -> None:
    cfg = ctx.config
    configs = {}
    for field_name in ("teacher_model", "student_model"):
        name = getattr(cfg, field_name)
        if field_name == "teacher_model" and cfg.alpha_kd == 0 and cfg.alpha_feature == 0 and cfg.alpha_attention == 0:
            pass  # the teacher is still planned: the kit loads it for eval comparison
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
        if model_cfg is None:
            continue
        limit = getattr(model_cfg, "max_position_embeddings", None)
        if limit and cfg.max_length > limit:
            ctx.add(
                "max-length",
                "error",
                "max_length",
                f"max_length {cfg.max_length} exceeds {getattr(cfg, field_name)}'s max_position_embeddings {limit}.",
                f"set max_length to at most {limit}.",
            )


def _check_tokenizers(ctx: _Context) -> None:
    cfg = ctx.config
    teacher_ref = cfg.teacher_tokenizer or cfg.teacher_model
    student_ref = cfg.tokenizer or cfg.student_model
    fams = {"teacher": tokenizer_family(teacher_ref), "student": tokenizer_family(student_ref)}
    for side, fam in fams.items():
        if fam is None:
            ctx.add(
                "tokenizer-unknown",
                "warning",
                f"{side}_model" if side == "teacher" else "student_model",
                f"the {side} tokenizer ({teacher_ref if side == 'teacher' else student_ref}) cannot be identified "
                "offline; the vocabulary check is skipped.",
                "use a carded hub id or a local directory holding tokenizer.json.",
            )
    if None in fams.values() or fams["teacher"] == fams["student"]:
        return
    ctx.tokenizers_differ = True
    vocab = ""
    if ctx.teacher_cfg is not None and ctx.student_cfg is not None:
        vocab = f" (vocab {ctx.teacher_cfg.vocab_size:,} vs {ctx.student_cfg.vocab_size:,})"
    if cfg.alpha_kd > 0 and not ctx.cross:
        ctx.add(
            "tokenizer",
            "error",
            "teacher_model",
            f"teacher {cfg.teacher_model} ({fams['teacher']} tokenizer) and student {cfg.student_model} "
            f"({fams['student']} tokenizer) use different vocabularies{vocab}: token id i is a different token "
            "on each side, so logit KD (or truncating the wider logits) trains the student on noise.",
            "set cross_tokenizer: true (offset-aligned cross-tokenizer distillation), or pick a "
            "teacher/student pair sharing a tokenizer "
            "(e.g. HuggingFaceTB/SmolLM2-360M -> SmolLM2-135M).",
        )
    elif cfg.alpha_kd > 0:
        ctx.add(
            "tokenizer",
            "info",
            "cross_tokenizer",
            f"different vocabularies{vocab}; cross_tokenizer is on, so KD runs on offset-aligned positions.",
        )


def _check_losses(ctx: _Context) -> None:
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
    for kind, name in (("feature", "alpha_feature"), ("attention", "alpha_attention")):
        value = getattr(cfg, name)
        if value <= 0:
            continue
        reasons = []
        if not _transfer_supported(kind):
            reasons.append(f"this version of the trainer has no {kind} transfer and rejects {name} > 0")
        if ctx.tokenizers_differ:
            reasons.append(
                "teacher and student tokenize differently, so position t is not the same text on both "
                f"sides and {kind} maps cannot be compared position by position"
            )
        if kind == "attention" and cfg.attention_layers is None:
            reasons.append("attention_layers is not set")
        if reasons:
            ctx.add(
                "loss-prerequisite",
                "error",
                name,
                f"{name} = {value:g}, but " + "; ".join(reasons) + ".",
                f"set {name} to 0 (its weight goes nowhere useful).",
            )
    if cfg.alpha_attention > 0:
        maps = ctx.memory_plan.parts.get("attention_maps", 0) if ctx.memory_plan else 0
        extra = f" ({format_bytes(maps)} of [B,H,T,T] maps per GPU)" if maps else ""
        ctx.add(
            "attention-cost",
            "warning",
            "alpha_attention",
            "attention transfer needs the attention probabilities, which forces eager attention (no SDPA/flash) "
            f"in every layer of both models{extra}; memory and time grow with max_length^2.",
            "keep alpha_attention 0 unless the maps are the point of the experiment.",
        )
    elif cfg.attention_layers is not None:
        ctx.add("unused-setting", "info", "attention_layers", "attention_layers is set but alpha_attention is 0.")
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


def _ddp_processes(ctx: _Context) -> int:
    """Processes that share each epoch's blocks: N under the chosen ddp strategy, else 1."""
    choice = ctx.strategy
    return choice.processes if choice is not None and choice.strategy == "ddp" else 1


def _derive_batches(ctx: _Context, batches_per_epoch: int | None, train_blocks: int | None = None):
    """Micro-batches per epoch of ONE process of the planned run, and where the number came from. Under ddp
    the N processes share the blocks (``schedule.batches_per_epoch``, as the trainer counts them), so the run
    has about 1/N of one process's optimizer steps."""
    from kagglekd.schedule import batches_per_epoch as per_process

    cfg, n = ctx.config, _ddp_processes(ctx)
    share = f" / {n} ddp processes" if n > 1 else ""
    if batches_per_epoch:
        return batches_per_epoch // n, f"--batches-per-epoch{share}"
    blocks, source = (
        (train_blocks, f"{train_blocks} blocks") if train_blocks else (cfg.dataset_subset_size, "dataset_subset_size")
    )
    if blocks:
        return per_process(blocks, cfg.batch_size, n), f"{source} / batch_size{share}"
    if cfg.max_steps:
        return cfg.max_steps * cfg.gradient_accumulation_steps, "max_steps x accumulation (assumes one epoch)"
    return None, ""


def _check_schedule(ctx: _Context, batches_per_epoch: int | None, train_blocks: int | None = None) -> None:
    from kagglekd.schedule import plan_schedule

    cfg = ctx.config
    bpe, source = _derive_batches(ctx, batches_per_epoch, train_blocks)
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
    try:
        ctx.plan = plan_schedule(cfg, bpe)
    except ConfigError as err:
        ctx.add(
            "warmup" if err.field in ("warmup_steps", "warmup_ratio") else "scheduler",
            "error",
            err.field,
            str(err),
            "lower the warmup (e.g. warmup_ratio 0.05) or train longer."
            if err.field in ("warmup_steps", "warmup_ratio")
            else "lower batch_size or max_length, or add data."
            if err.field == "batch_size"
            else "fix scheduler_kwargs.",
        )
        return
    plan = ctx.plan
    ga, processes = cfg.gradient_accumulation_steps, _ddp_processes(ctx)
    ctx.add(
        "optimizer-steps",
        "info",
        "gradient_accumulation_steps",
        f"{plan.optimizer_steps} optimizer steps = ceil({bpe} batches/epoch [{source}] / accumulation {ga}) = "
        f"{plan.steps_per_epoch} per epoch x {cfg.num_epochs:g} epochs"
        + (f" (max_steps {cfg.max_steps})" if cfg.max_steps else "")
        + (f"; per process of the {processes}-process ddp run" if processes > 1 else "")
        + ".",
    )
    steps_key = ctx.parsed.extras.get("steps_key")
    if steps_key is not None:
        key, value = steps_key
        try:
            declared = int(value)
        except (TypeError, ValueError):
            declared = None
        if declared != plan.optimizer_steps:
            batches_total = math.ceil(bpe * cfg.num_epochs)
            why = ""
            if declared == batches_total:
                why = (
                    f" {declared} is the number of micro-batches (batches x epochs), not optimizer steps: a "
                    f"scheduler sized with it and stepped once per optimizer step would end at "
                    f"{plan.optimizer_steps / declared:.1%} of its curve (warmup and decay {ga}x too slow)."
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
            )
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


def _check_cadence(ctx: _Context) -> None:
    cfg, plan = ctx.config, ctx.plan
    if plan is None:
        return
    steps = plan.optimizer_steps
    if cfg.eval_steps is None:
        ctx.add("eval-cadence", "info", "eval_steps", "eval_steps is null: one evaluation, at the end.")
        evals = 1
    elif cfg.eval_steps >= steps:
        ctx.add(
            "eval-cadence",
            "warning",
            "eval_steps",
            f"eval_steps {cfg.eval_steps} >= the run's {steps} optimizer steps: no evaluation before the end.",
            f"set eval_steps to about {max(1, steps // 10)} (10 evaluations).",
        )
        evals = 1
    else:
        evals = steps // cfg.eval_steps
        if evals > 200:
            ctx.add(
                "eval-cadence",
                "info",
                "eval_steps",
                f"{evals} evaluations: evaluation time adds up.",
                f"eval_steps {max(1, steps // 50)} gives 50.",
            )
    if cfg.early_stopping_patience is not None:
        needed = cfg.early_stopping_patience + 1  # a best eval, then `patience` evals without improvement
        if evals < needed:
            ctx.add(
                "early-stopping",
                "warning",
                "early_stopping_patience",
                f"early_stopping_patience {cfg.early_stopping_patience} needs {needed} evaluations, the run has "
                f"{evals}: early stopping can never trigger.",
                f"lower the patience to {max(1, evals // 3)} or evaluate more often.",
            )
        else:
            ctx.add(
                "early-stopping",
                "info",
                "early_stopping_patience",
                f"early stopping can trigger from step {needed * (cfg.eval_steps or steps)} of {steps} "
                f"({evals} evaluations).",
            )
    if cfg.save_steps is None:
        ctx.add(
            "save-cadence",
            "warning",
            "save_steps",
            "save_steps is null: no checkpoint until the end; a crash or the 12 h limit loses the whole run.",
            "set save_steps (see the time plan's recommendation).",
        )
    elif cfg.save_steps > steps:
        ctx.add(
            "save-cadence",
            "warning",
            "save_steps",
            f"save_steps {cfg.save_steps} > the run's {steps} steps: only the final student is saved.",
            "set save_steps (see the time plan's recommendation).",
        )
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
            )


def _check_memory(ctx: _Context) -> None:
    if ctx.teacher_cfg is None or ctx.student_cfg is None:
        return
    cfg = ctx.config
    sar = bool(_setting(ctx.parsed, "sar"))
    checkpointing = bool(_setting(ctx.parsed, "gradient_checkpointing"))
    models = dict(
        gpu=ctx.profile,
        teacher_cfg=ctx.teacher_cfg,
        student_cfg=ctx.student_cfg,
        gradient_checkpointing=checkpointing,
        sar=sar,
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


def _check_strategy(ctx: _Context) -> None:
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
    if choice.problem:
        message = f"{choice.problem} {message}"
    ctx.add("strategy", choice.severity, "strategy", message, choice.fix)


def _check_extras(ctx: _Context) -> None:
    cfg, extras = ctx.config, ctx.parsed.extras
    cache = _setting(ctx.parsed, "teacher_cache")
    sar = bool(_setting(ctx.parsed, "sar"))
    if cache:
        if sar:
            ctx.add(
                "incompatible",
                "error",
                "sar",
                "the Student-Aware Router adapts the teacher's routing during training, but a teacher cache holds "
                "targets computed once with the original router.",
                "turn off either sar or teacher_cache.",
            )
        for name in ("alpha_feature", "alpha_attention"):
            if getattr(cfg, name) > 0:
                ctx.add(
                    "incompatible",
                    "error",
                    name,
                    f"a teacher cache stores top-k logits only; {name} needs the "
                    "teacher's hidden states/attention at training time.",
                    f"set {name} to 0 or drop the cache.",
                )
        if ctx.plan is not None:
            k = cfg.kd_top_k or 256
            tokens = _epoch_tokens(ctx)
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
                None
                if severity == "info"
                else "lower kd_top_k, dataset_subset_size, or keep the cache in /kaggle/temp (not saved).",
            )
    hint = extras.get("gpu_hint")
    if hint and ctx.parsed.extras.get("_gpu_from_hint"):
        ctx.add("gpu-hint", "info", hint[0], f"'{hint[0]}': {hint[1]!r} read as GPU profile {ctx.profile.name}.")


def _epoch_tokens(ctx: _Context) -> int:
    """Tokens one epoch trains on, over all processes."""
    cfg = ctx.config
    return ctx.plan.batches_per_epoch * cfg.batch_size * cfg.max_length * _ddp_processes(ctx)


# ---- time -----------------------------------------------------------------------------------------------
def plan_time(ctx: _Context, dry: dict | None = None) -> dict:
    """Projected throughput and run time (see the module docstring for how honest each source is)."""
    cfg, plan, p = ctx.config, ctx.plan, ctx.profile
    if plan is None or ctx.teacher_cfg is None or ctx.student_cfg is None:
        return {}
    target_flops = flops_per_token(ctx.teacher_cfg, ctx.student_cfg, cfg.max_length)
    choice = ctx.strategy
    scaling = choice.speedup if choice is not None else 1.0
    processes = choice.processes if choice is not None else 1
    estimate = p.peak_flops * (MFU if p.name != "cpu" else 0.3) * scaling / target_flops
    tokens_per_s, source = (
        estimate,
        f"FLOP estimate ({MFU:.0%} MFU of {p.peak_flops / 1e12:g} TFLOPS"
        + (f" x {scaling:g} for {choice.strategy} on {processes} GPUs)" if processes > 1 else ")"),
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
    epoch_tokens = _epoch_tokens(ctx)
    run_tokens = min(plan.optimizer_steps * tokens_per_step, math.ceil(epoch_tokens * plan.epochs))
    step_s = tokens_per_step / tokens_per_s
    save_steps = max(1, min(plan.optimizer_steps, int(AT_RISK_S // step_s)))
    out = {
        "tokens_per_s": tokens_per_s,
        "source": source,
        "measured_tokens_per_s": measured,
        "flops_per_token": target_flops,
        "epoch_tokens": epoch_tokens,
        "run_tokens": run_tokens,
        "step_seconds": step_s,
        "epoch_hours": epoch_tokens / tokens_per_s / 3600,
        "run_hours": run_tokens / tokens_per_s / 3600,
        "recommended_save_steps": save_steps,
    }
    out["fits_12h"] = out["run_hours"] <= KAGGLE_SESSION_H
    return out


def _check_time(ctx: _Context) -> None:
    t, cfg = ctx.time, ctx.config
    if not t:
        return
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


# ---- dry run --------------------------------------------------------------------------------------------
def _is_moe(model_cfg) -> bool:
    return model_cfg is not None and bool(getattr(model_cfg, "num_experts", None))


def _local_or_tiny(name: str) -> bool:
    return name in TINY_PRESETS or (Path(name).expanduser() / "config.json").exists()


def run_dry_run(ctx: _Context, steps: int, workdir: str | Path | None = None) -> dict:
    """``steps`` real optimizer steps of ``Distiller`` (configured models if tiny/local, else stand-ins)."""
    import torch

    from kagglekd.trainer import Distiller

    cfg = ctx.config
    teacher = (
        cfg.teacher_model
        if _local_or_tiny(cfg.teacher_model)
        else ("tiny-random-moe" if _is_moe(ctx.teacher_cfg) or ctx.teacher_cfg is None else "tiny-random-dense")
    )
    student = cfg.student_model if _local_or_tiny(cfg.student_model) else "tiny-random-dense"
    stand_ins = (teacher, student) != (cfg.teacher_model, cfg.student_model)
    dataset = (
        cfg.dataset if (cfg.dataset == "stdlib-docs" or Path(cfg.dataset).expanduser().exists()) else "stdlib-docs"
    )
    max_length = min(cfg.max_length, 256) if stand_ins else cfg.max_length
    workdir = Path(workdir or tempfile.mkdtemp(prefix="kagglekd-dry-run-"))
    changes = dict(
        teacher_model=teacher,
        student_model=student,
        dataset=dataset,
        max_length=max_length,
        max_steps=steps,
        warmup_steps=None,
        warmup_ratio=0.0,
        eval_steps=None,
        eval_max_blocks=2,
        save_steps=None,
        early_stopping_patience=None,
        alpha_feature=0.0,
        alpha_attention=0.0,
        attention_layers=None,
        output_dir=str(workdir),
        resume="never",
    )
    if stand_ins:
        changes.update(tokenizer=None, teacher_tokenizer=None, dataset_config=None)
    if dataset != cfg.dataset:
        changes.update(dataset_subset_size=None, text_column="text", dataset_split="train")
    dry_cfg = cfg.replace(**changes)
    distiller = Distiller(dry_cfg, output_dir=workdir)
    summary = distiller.train(max_steps=steps)
    rows = list(getattr(distiller.history, "rows", distiller.history))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_cfg = distiller.teacher.config if getattr(distiller, "teacher", None) is not None else ctx.teacher_cfg
    s_cfg = distiller.student.config
    dry_flops = flops_per_token(t_cfg, s_cfg, max_length) if t_cfg is not None else None
    return {
        "steps": summary.get("optimizer_steps", steps),
        "tokens_per_s": summary.get("tokens_per_s"),
        "wall_time_s": summary.get("wall_time_s"),
        "device": device,
        "stand_ins": stand_ins,
        "teacher": teacher,
        "student": student,
        "dataset": dataset,
        "max_length": max_length,
        "flops_per_token": dry_flops,
        "train_blocks": len(distiller.blocks.train)
        if not stand_ins and dataset == cfg.dataset and max_length == cfg.max_length
        else None,
        "run_dir": str(workdir),
        "history": rows,
    }


# ---- the entry points ------------------------------------------------------------------------------------
def diagnose(
    raw_config: dict,
    *,
    gpu: str | None = "T4x2",
    batches_per_epoch: int | None = None,
    dry_run: int = 0,
    dry_run_dir: str | Path | None = None,
) -> Report:
    """All checks on a raw (possibly hand-rolled) config dict. ``gpu=None`` reads a GPU hint from the config,
    falling back to T4x2. ``dry_run`` > 0 runs that many real optimizer steps first."""
    if not isinstance(raw_config, dict):
        raise ConfigError(f"expected a JSON object of key: value pairs, got {type(raw_config).__name__}.")
    parsed = parse_lenient(raw_config)
    hint = parsed.extras.get("gpu_hint")
    name = gpu
    if name is None and hint is not None:
        name = gpu_from_hint(hint[1])
        parsed.extras["_gpu_from_hint"] = name is not None
    ctx = _Context(parsed, gpu_profile(name or "T4x2"))
    ctx.findings.extend(parsed.findings)
    _check_gpu(ctx)
    _check_models(ctx)
    _check_tokenizers(ctx)
    _check_memory(ctx)
    _check_strategy(ctx)
    _check_losses(ctx)
    dry: dict | None = None
    if dry_run > 0:
        try:
            dry = run_dry_run(ctx, dry_run, dry_run_dir)
        except (KaggleKDError, ImportError, RuntimeError, OSError) as err:
            ctx.add(
                "dry-run-failed",
                "warning",
                None,
                f"the dry run did not run: {err}",
                "run `python -m kagglekd train --max-steps N` to see the full error.",
            )
    train_blocks = dry.get("train_blocks") if dry else None
    _check_schedule(ctx, batches_per_epoch, train_blocks)
    _check_cadence(ctx)
    _check_extras(ctx)
    ctx.time = plan_time(ctx, dry)
    _check_time(ctx)
    if dry is not None:
        stand = f"stand-ins {dry['teacher']} -> {dry['student']}" if dry["stand_ins"] else "the configured models"
        ctx.add(
            "dry-run",
            "info",
            None,
            f"{dry['steps']} optimizer steps on {stand} ({dry['device']}, {dry['dataset']}, max_length "
            f"{dry['max_length']}): {dry['tokens_per_s']:.0f} tokens/s measured"
            + (
                f"; projected {ctx.time['tokens_per_s']:.0f} tokens/s on {ctx.profile.name} ({ctx.time['source']})"
                if ctx.time
                else ""
            )
            + ".",
        )
    plan_dict = {**ctx.plan.to_dict(with_curve=False), "processes": _ddp_processes(ctx)} if ctx.plan is not None else {}
    memory = ctx.memory_plan.to_dict() if ctx.memory_plan is not None else {}
    time_dict = dict(ctx.time)
    if dry is not None:
        time_dict["dry_run"] = {k: v for k, v in dry.items() if k != "history"}
    return Report(
        ctx.profile.name,
        ctx.findings,
        plan_dict,
        memory,
        time_dict,
        ctx.config,
        parsed.values,
        parsed.extras,
        ctx.plan,
        ctx.memory_plan,
        dry["history"] if dry else [],
        ctx.strategy.to_dict() if ctx.strategy is not None else {},
    )


def fix_config(report: Report) -> dict:
    """A corrected config: the usable keys in the kit's names plus one change per fixable finding, each
    explained in ``_fixes``; findings no config change can fix are listed in ``_unfixable``."""
    cfg = report.config
    out: dict[str, Any] = dict(report.values)
    fixes: list[str] = []
    unfixable: list[str] = []

    def change(key: str, value: Any, why: str) -> None:
        old = out.get(key, getattr(cfg, key, None))
        out[key] = value
        fixes.append(f"{key}: {old!r} -> {value!r}: {why}")

    seen: set[tuple[str, str | None]] = set()
    for f in report.findings:
        if (f.id, f.field) in seen:
            continue
        seen.add((f.id, f.field))
        if f.id == "unknown-key":
            fixes.append(f"removed '{f.field}': not a kit key ({f.message})")
        elif f.id == "total-steps-mismatch":
            fixes.append(
                f"removed '{f.field}': the kit derives {report.plan.get('optimizer_steps')} optimizer steps "
                "itself; use max_steps to cap a run"
            )
        elif f.id == "device":
            if f.severity == "error":
                unfixable.append(
                    f"device: {report.gpu} cannot run the current Kaggle PyTorch; choose GPU T4 x2 "
                    "(machine_shape NvidiaTeslaT4) -- not a config setting"
                )
        elif f.id == "tokenizer" and f.severity == "error":
            change(
                "cross_tokenizer",
                True,
                "teacher and student vocabularies differ; logit KD needs offset-aligned cross-tokenizer distillation",
            )
        elif f.id == "loss-prerequisite":
            change(f.field, 0.0, f.message)
            if f.field == "alpha_attention":
                out.pop("attention_layers", None)
                fixes.append("removed 'attention_layers': no attention transfer")
        elif f.id == "invalid-value" or f.id == "scheduler" and f.field == "scheduler_type":
            if f.id == "scheduler":
                name = f.fix.split("'")[1]
                change("scheduler_type", name, f.message)
            else:
                fixes.append(f"dropped invalid {f.field}; the default is used ({f.message})")
        elif f.id == "warmup" and f.severity != "info":
            if out.pop("warmup_steps", None) is not None:
                fixes.append("removed 'warmup_steps' (warmup_ratio decides): " + f.message)
            change("warmup_ratio", 0.05, "warmup over the first 5 % of the optimizer steps")
        elif f.id == "eval-cadence" and f.severity == "warning" and report.plan:
            change("eval_steps", max(1, report.plan["optimizer_steps"] // 10), f.message)
        elif f.id == "precision" and f.field == "use_amp" and f.severity == "warning":
            change("use_amp", True, f.message)
        elif f.id == "precision" and f.field == "bf16":
            fixes.append(f"removed 'bf16': {f.message}")
        elif f.id == "ema" and report.plan:
            steps = report.plan["optimizer_steps"]
            change("ema_decay", round(min(0.9999, max(0.9, 1 - 10 / steps)), 4), f.message)
        elif f.id == "max-length":
            limit = int(f.fix.rsplit(" ", 1)[-1].rstrip("."))
            change("max_length", limit, f.message)
        elif f.id == "strategy" and f.severity == "error" and report.strategy.get("best"):
            change("strategy", report.strategy["best"], f.message)
        elif f.id == "incompatible" and f.field == "sar":
            change("sar", False, f.message)
        elif f.id == "config-conflict" and f.severity == "error":
            fixes.append(f"reset {f.field or 'alpha_kd/alpha_ce'} to the defaults: {f.message}")
        elif f.id == "model-unknown":
            unfixable.append(f"{f.field}: {f.message} ({f.fix})")
    for f in report.findings:  # these depend on the values fixed above
        if f.id == "early-stopping" and f.severity == "warning":
            evals = max(1, report.plan["optimizer_steps"] // (out.get("eval_steps") or report.plan["optimizer_steps"]))
            change("early_stopping_patience", max(1, evals // 3), f.message)
    _fix_memory_and_saves(report, out, change)
    if report.gpu != "T4x2" and any(f.id == "device" and f.severity == "error" for f in report.findings):
        pass  # the GPU is not a config key; see _unfixable
    out = {k: v for k, v in out.items() if not (k in PENDING_KEYS and not v)}
    return {"_fixes": fixes, "_unfixable": unfixable, **out}


def _fix_memory_and_saves(report: Report, out: dict, change) -> None:
    try:
        fixed = DistillConfig(**{k: v for k, v in out.items() if k in DistillConfig.fields()})
    except ConfigError:
        return
    if report.memory_plan is not None and report.memory_plan.verdict != "fits":
        t_cfg, _ = resolve_model_config(fixed.teacher_model)
        s_cfg, _ = resolve_model_config(fixed.student_model)
        profile = gpu_profile("T4x2" if not gpu_profile(report.gpu).supported else report.gpu)
        if t_cfg is not None and s_cfg is not None:
            if fixed.alpha_kd > 0 and not fixed.kd_top_k:
                change("kd_top_k", 256, "top-256 teacher targets shrink the KD intermediates and speed up KD")
                fixed = fixed.replace(kd_top_k=256)
            strategy = report.strategy.get("strategy", "single") if profile.name == report.gpu else "single"
            best = largest_fitting(fixed, gpu=profile, teacher_cfg=t_cfg, student_cfg=s_cfg, strategy=strategy)
            if 0 < best["batch_size"] < fixed.batch_size:
                effective = fixed.batch_size * fixed.gradient_accumulation_steps
                change("batch_size", best["batch_size"], f"largest batch under 85 % of {profile.name} memory")
                change(
                    "gradient_accumulation_steps",
                    math.ceil(effective / best["batch_size"]),
                    f"keeps the effective batch of {effective} blocks per optimizer step",
                )
    steps = report.plan.get("optimizer_steps")
    save = report.time.get("recommended_save_steps") if report.time else None
    if steps and save and (fixed.save_steps is None or fixed.save_steps > min(save, steps)):
        change("save_steps", min(save, steps), "keeps at most 30 minutes of work at risk (time plan)")


# ---- CLI ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"diagnose: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m kagglekd diagnose", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="preset name or path to a JSON config (kit or hand-rolled)")
    p.add_argument(
        "--gpu",
        type=str,
        default=None,
        help=f"one of {', '.join(GPU_PROFILES)} (default: a GPU key in the config, else T4x2)",
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


def _read_raw(name_or_path: str) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    """The ``diagnose`` command. Prints the report (text or --json); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.gpu is not None and args.gpu.lower() not in {g.lower() for g in GPU_PROFILES}:
            raise ConfigError(f"--gpu {args.gpu}: one of {', '.join(GPU_PROFILES)}.")
        if args.fix and not args.output:
            raise ConfigError("--fix needs --output PATH (where the corrected config goes).")
        if args.dry_run < 0 or (args.batches_per_epoch is not None and args.batches_per_epoch < 1):
            raise ConfigError("--dry-run and --batches-per-epoch must be positive.")
        raw = _read_raw(args.config)
        report = diagnose(raw, gpu=args.gpu, batches_per_epoch=args.batches_per_epoch, dry_run=args.dry_run)
    except (ConfigError, KeyError) as err:
        print(f"diagnose: {str(err).strip(chr(39))}", file=sys.stderr)  # noqa: T201 - CLI output
        return 2
    extra: dict[str, Any] = {}
    if args.fix:
        fixed = fix_config(report)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(fixed, indent=2) + "\n", encoding="utf-8")
        extra["fixed_config"] = str(args.output)
        extra["fixes"] = fixed["_fixes"]
    if args.plots:
        extra["plots"] = [str(p) for p in write_plots(report, args.plots)]
    if args.json:
        print(json.dumps({**report.to_dict(), **extra}, indent=2, default=str))  # noqa: T201 - CLI output
    else:
        print(report.format_text())  # noqa: T201 - CLI output
        if args.fix:
            print(f"wrote {args.output}:")  # noqa: T201 - CLI output
            for line in extra["fixes"]:
                print(f"  - {line}")  # noqa: T201 - CLI output
        for path in extra.get("plots", []):
            print(f"plot: {path}")  # noqa: T201 - CLI output
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
