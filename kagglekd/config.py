"""DistillConfig: the one place every default lives.

A config is a flat JSON object. Its key names stay compatible with the flat configs of hand-rolled
distillation scripts (``teacher_model``, ``batch_size``, ``alpha_kd``, ...). Keys such scripts use under
other names are mapped through ``ALIASES``; anything else unknown is a ``ConfigError`` naming the key and
the closest valid name.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kagglekd.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"

# Names `transformers.get_scheduler` accepts that make sense for a distillation run. Kept here (not
# imported) so a config can be validated without importing transformers; a test checks they are a subset
# of transformers' own SchedulerType.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
FEATURE_LOSS_KINDS = ("mse", "cosine")
KA_MODES = ("average", "single")
LOSS_BALANCES = ("fixed", "normalized")
# The loss components, in the order the history, the charts and the objective use them.
COMPONENTS = ("kd", "ce", "feature", "attention", "router")


@dataclass(frozen=True)
class KDOptions:
    """What every KD call of a run shares (training, fused, cross-tokenizer and eval): one object instead of
    the same six keywords in every signature. ``DistillConfig.kd_options`` builds it from a config."""

    temperature: float = 1.0  # divides both sides' logits before the float32 (log-)softmax
    divergence: str = "forward_kl"  # one of DIVERGENCES
    beta: float = 0.5  # generalized JSD: 0 = forward KL, 1 = reverse KL
    skew_alpha: float = 0.1  # mixture weight of the skew KL divergences
    top_k: int | None = None  # KD against the teacher's top-k tokens plus a tail bucket; None = full vocabulary
    scale_t2: bool = True  # multiply by temperature ** 2 (gradient scale comparable across temperatures)

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.skew_alpha <= 1.0:
            raise ValueError(f"beta and skew_alpha must lie in [0, 1], got {self.beta}, {self.skew_alpha}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")

    def replace(self, **changes: Any) -> KDOptions:
        return dataclasses.replace(self, **changes)


# Keys hand-rolled scripts and `transformers.TrainingArguments` use for fields the kit has under another
# name. One table, documented in the README; a key here is renamed, never silently dropped.
ALIASES = {
    "teacher_model_name": "teacher_model",
    "teacher_name": "teacher_model",
    "student_model_name": "student_model",
    "student_name": "student_model",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "grad_accum_steps": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "lr": "learning_rate",
    "num_train_epochs": "num_epochs",
    "epochs": "num_epochs",
    "lr_scheduler_type": "scheduler_type",
    "scheduler": "scheduler_type",
    "max_seq_length": "max_length",
    "seq_len": "max_length",
    "kd_temperature": "temperature",
    "alpha": "alpha_kd",
    "top_k": "kd_top_k",
    "logging_steps": "log_steps",
    "fp16": "use_amp",
    "mixed_precision": "use_amp",
    "clip_grad_norm": "max_grad_norm",
    "dataset_name": "dataset",
    "output_path": "output_dir",
    "num_samples": "dataset_subset_size",
    "max_train_samples": "dataset_subset_size",
    "train_samples": "dataset_subset_size",
    "max_samples": "dataset_subset_size",
    "subset_size": "dataset_subset_size",
    "use_sar": "sar",
    "student_aware_router": "sar",
    "teacher_cache_dir": "teacher_cache",
    "use_cross_tokenizer": "cross_tokenizer",
}

_SKIP_COMBINATIONS = contextvars.ContextVar("kagglekd_skip_combinations", default=False)

# Arguments some schedules cannot run without, used when `scheduler_kwargs` does not give them.
SCHEDULER_DEFAULT_KWARGS = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"decay_fraction": 0.2},  # kit-level: decay over the last 20 % of steps
}


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation beside it (shown by `--help` and the README)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DistillConfig:
    # ---- models and data -------------------------------------------------------------------------------
    teacher_model: str = _f(
        "tiny-moe",
        "Teacher: hub id, local directory, or a tiny preset (tiny-moe = the pretrained tiny Qwen3-MoE of the "
        "embedded default; tiny-moe-8k = the same teacher trained with its own 8192-token tokenizer, for the "
        "cross-tokenizer demo; tiny-random-moe, tiny-random-dense = random init, for smoke tests).",
    )
    student_model: str = _f("tiny-random-dense", "Student: hub id, local directory or tiny preset (as above).")
    tokenizer: str | None = _f(None, "Tokenizer of the student (hub id or dir); None = the student's own.")
    teacher_tokenizer: str | None = _f(None, "Tokenizer of the teacher; None = the teacher's own.")
    dataset: str = _f(
        "stdlib-docs",
        "Text: hub dataset id, local file (.txt/.jsonl/.parquet/.csv), a directory, or stdlib-docs "
        "(the offline corpus built from the Python standard library's documentation).",
    )
    dataset_config: str | None = _f(None, "Hub dataset configuration name, if the dataset has several.")
    dataset_split: str = _f("train", "Split of the dataset to read.")
    text_column: str = _f("text", "Column holding the text.")
    document_separator: str = _f(
        "eos",
        "Token appended after each document when packing blocks: eos = the student tokenizer's eos token (with an "
        "Instruct tokenizer that is its chat end, e.g. <|im_end|>), none = no separator, or a token string that "
        "is ONE token of the tokenizer (e.g. <|endoftext|>). Part of the dataset fingerprint.",
    )
    dataset_subset_size: int | None = _f(None, "Use only the first N documents (None = all).", min=1)
    max_length: int = _f(128, "Tokens per packed training block.", min=8)
    eval_fraction: float = _f(0.05, "Fraction of documents held out for evaluation.", gt=0.0, lt=1.0)
    split_seed: int = _f(
        0,
        "Seed of the train/eval document split, kept apart from `seed` so changing the training seed never moves "
        "documents between the splits (tiny-moe was pretrained on the split of split_seed 0, eval_fraction 0.05).",
        min=0,
    )
    eval_max_blocks: int | None = _f(256, "Evaluate on at most this many held-out blocks (None = all).", min=1)
    output_dir: str = _f("runs/default", "Run directory: config, plan, history, checkpoints, student/.")

    # ---- optimisation ----------------------------------------------------------------------------------
    batch_size: int = _f(16, "Blocks per micro-batch (per process).", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", min=1)
    learning_rate: float = _f(3e-3, "Peak learning rate of the student.", gt=0.0, max=1.0)
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to norms and biases).", min=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", min=0.0, lt=1.0)
    adam_beta2: float = _f(0.95, "AdamW beta2.", min=0.0, lt=1.0)
    num_epochs: float = _f(1.0, "Epochs over the training blocks (fractional allowed).", gt=0.0)
    max_steps: int | None = _f(None, "Optimizer steps; overrides num_epochs when set.", min=1)
    stop_after: int | None = _f(
        None,
        "Pause this session after this many optimizer steps in total (None = run the whole plan): a checkpoint is "
        "saved and nothing exported; training the same config again resumes and finishes the plan.",
        min=1,
    )
    warmup_steps: int | None = _f(None, "Warmup in optimizer steps (wins over warmup_ratio).", min=0)
    warmup_ratio: float = _f(0.05, "Warmup as a fraction of the optimizer steps.", min=0.0, lt=1.0)
    scheduler_type: str = _f("cosine", "LR schedule, a transformers.get_scheduler name.", choices=SCHEDULERS)
    scheduler_kwargs: dict = _f(
        {}, 'Extra arguments of the schedule, e.g. {"min_lr_rate": 0.1} for cosine_with_min_lr.'
    )
    max_grad_norm: float | None = _f(1.0, "Clip the gradient norm to this (None = no clipping).", gt=0.0)
    use_amp: bool = _f(True, "Mixed precision on GPU: fp16+GradScaler below sm_80, bf16 from sm_80. Off on CPU.")
    cpu_threads: int | None = _f(
        None,
        "CPU runs only: torch intra-op threads. None = auto: OMP_NUM_THREADS or an explicit torch.set_num_threads "
        "when set, else the CPUs this process may use minus those busy (load average), at least 1. Logged.",
        min=1,
    )
    seed: int = _f(0, "Seed of data order, initialisation and sampling.", min=0)

    # ---- distillation loss -----------------------------------------------------------------------------
    alpha_kd: float = _f(0.5, "Weight of the KD (teacher distribution) loss.", min=0.0)
    alpha_ce: float = _f(0.5, "Weight of the next-token cross-entropy on the data.", min=0.0)
    temperature: float = _f(1.0, "KD temperature; divides both sides' logits (softmax runs in float32).", gt=0.0)
    divergence: str = _f("forward_kl", "KD divergence.", choices=DIVERGENCES)
    jsd_beta: float = _f(0.5, "Beta of the generalized JSD (0 = forward KL, 1 = reverse KL).", min=0.0, max=1.0)
    skew_alpha: float = _f(0.1, "Alpha of the skew KL divergences.", min=0.0, max=1.0)
    kd_top_k: int | None = _f(None, "KD against the teacher's top-k tokens plus a tail bucket (None = full).", min=1)
    kd_scale_t2: bool = _f(True, "Multiply the KD loss by T^2 (keeps gradient scale across temperatures).")
    cross_tokenizer: bool = _f(
        False,
        "Distil across different vocabularies: the teacher reads the same text in its own tokens, positions are "
        "aligned by character offsets and its distribution is mapped onto the student's vocabulary by exact token "
        "strings (the rest goes to a tail bucket). Needed when teacher and student tokenizers differ.",
    )
    cross_tokenizer_loss: str = _f(
        "exact",
        "Cross-tokenizer KD target: exact = the teacher's distribution mapped through exact token-string matches "
        "(plus a tail bucket); uld = Universal Logit Distillation, an L1 distance between both sides' sorted "
        "probability vectors (no token matching; for pairs that share few tokens); hybrid = exact where a teacher "
        "position has read exactly the student's text, ULD against the teacher's last position that has not read "
        "past it elsewhere (every position gets a teacher signal, like TRL's GOLD).",
        choices=("exact", "uld", "hybrid"),
    )
    alpha_feature: float = _f(
        0.0,
        "Weight of the hidden-state (feature) loss: student layers projected onto teacher hidden states (across "
        "tokenizers the teacher's states are averaged over each student token's character span); needs alpha_kd > 0.",
        min=0.0,
    )
    alpha_attention: float = _f(
        0.0,
        "Weight of the attention-map transfer loss (same tokenizer only; forces eager attention); needs alpha_kd > 0.",
        min=0.0,
    )
    attention_layers: int | None = _f(
        None,
        "Number of student layers (evenly spaced, ending at the last) whose attention maps are matched (None = the "
        "last layer only).",
        min=1,
    )
    feature_layers: int | None = _f(
        None,
        "Number of student layers (evenly spaced, ending at the last) matched to teacher hidden states (None = all).",
        min=1,
    )
    feature_loss: str = _f(
        "mse", "Feature loss: mse (divided by the teacher states' variance) or cosine.", choices=FEATURE_LOSS_KINDS
    )
    loss_balance: str = _f(
        "fixed",
        "fixed = total is sum(alpha * component); normalized = each component divided by a running mean of its own "
        "magnitude first, so the alphas become the realised shares of the total.",
        choices=LOSS_BALANCES,
    )
    balance_momentum: float = _f(
        0.9, "Momentum of the running magnitude used by loss_balance normalized.", min=0.0, lt=1.0
    )

    # ---- on-policy and sequence-level distillation (kagglekd.onpolicy) ---------------------------------
    lmbda: float = _f(
        0.0,
        "On-policy share (GKD's lambda): the fraction of micro-batches on which the student continues each block's "
        "prompt itself and learns from the teacher's distributions over its own samples. Each micro-batch's choice "
        "is seeded by (seed, step, micro-batch), so a resumed run makes the same ones. 0 = off-policy only.",
        min=0.0,
        max=1.0,
    )
    seq_kd: bool = _f(
        False,
        "Sequence-level KD (GKD's seq_kd): micro-batches not trained on-policy train on the teacher's sampled "
        "continuations of the same prompts instead of the data (same tokenizer only).",
    )
    prompt_length: int | None = _f(
        None,
        "Prompt tokens taken from the start of each training block to generate from (None = max_length // 2).",
        min=1,
    )
    max_new_tokens: int | None = _f(
        None,
        "Tokens generated per prompt (None = max_length + 1 - prompt_length: a generated sequence is as long as a "
        "block); a row ends early at the tokenizer's EOS.",
        min=1,
    )
    generation_temperature: float = _f(1.0, "Sampling temperature of the generated continuations.", gt=0.0)
    generation_top_p: float = _f(
        1.0, "Nucleus (top-p) sampling of the generated continuations (1 = off).", gt=0.0, max=1.0
    )

    # ---- MoE teacher: expert control, Student-Aware Router, Knowledge Augmentation ---------------------
    all_experts: bool = _f(False, "Run every expert of the MoE teacher for every token (teacher top-k = all).")
    expert_top_k_start: int | None = _f(None, "Teacher experts per token at the first step (linear schedule).", min=1)
    expert_top_k_end: int | None = _f(None, "Teacher experts per token at the last step.", min=1)
    sar: bool = _f(
        False, "Student-Aware Router: train only the teacher's routers through the distillation loss (experts frozen)."
    )
    router_lr: float = _f(1e-4, "Learning rate of the teacher's routers under SAR.", gt=0.0)
    sar_anchor_weight: float = _f(0.1, "SAR: weight of the L2 anchor of routers to their initial weights.", min=0.0)
    sar_balance_weight: float = _f(0.01, "SAR: weight of the load-balance regulariser.", min=0.0)
    sar_entropy_weight: float = _f(0.0, "SAR: weight of the router entropy (positive sharpens routing).")
    sar_teacher_ce_weight: float = _f(
        0.1, "SAR: weight of the teacher's own next-token CE, keeping the adapted teacher truthful.", min=0.0
    )
    teacher_gradient_checkpointing: bool = _f(False, "Checkpoint the teacher's layers under SAR (less memory).")
    ka_samples: int = _f(
        0, "Knowledge Augmentation: sample the teacher's experts (Gumbel top-k) this many times.", min=0
    )
    ka_mode: str = _f("average", "KA targets: average over the samples, or a single sample per step.", choices=KA_MODES)
    router_patterns: list[str] = _f([], "Regexes naming router modules of MoE families the kit does not know.")
    gradient_checkpointing: bool = _f(
        False, "Recompute the student's layer activations in backward instead of keeping them (less memory)."
    )
    fused_kd: bool = _f(
        False,
        "Compute lm_head + KD + CE in token chunks straight from the student's hidden states, never building its "
        "[B, T, V] logits (the big memory saver on a T4 with a 49k-152k vocabulary).",
    )
    teacher_cache: str | None = _f(
        None,
        "Directory of offline teacher top-k targets written by `python -m kagglekd cache-teacher`; training reads "
        "it instead of running the teacher (needs kd_top_k equal to the cache's k).",
    )
    strategy: str = _f(
        "auto",
        "Placement over GPUs: single (one device), ddp (data parallel, one process per GPU; launch with accelerate "
        "launch or from a notebook with kagglekd.launch.notebook_launch), split (one process, teacher on cuda:1 and "
        "student on cuda:0, for pairs that do not fit twice), or auto (ddp when launched over several processes, "
        "else split when 2 GPUs are visible and a teacher runs live, else single).",
        choices=("auto", "single", "ddp", "split"),
    )
    loss_chunk_size: int = _f(1024, "Token positions per chunk in the loss (bounds float32 vocab copies).", min=1)

    # ---- evaluation, EMA, stopping ---------------------------------------------------------------------
    eval_steps: int | None = _f(
        100, "Evaluate every N optimizer steps (and at the end; None = only at the end).", min=1
    )
    early_stopping_patience: int | None = _f(
        None, "Stop after this many evals without improving eval perplexity (None = never).", min=1
    )
    early_stopping_min_delta: float = _f(0.0, "Smallest perplexity drop that counts as improving.", min=0.0)
    ema_decay: float | None = _f(None, "EMA of the student's weights with this decay (None = off).", gt=0.0, lt=1.0)
    log_steps: int = _f(1, "Refresh the progress bar and callbacks every N optimizer steps.", min=1)

    # ---- checkpoints and faults ------------------------------------------------------------------------
    save_steps: int | None = _f(200, "Checkpoint every N optimizer steps (None = only the final student).", min=1)
    save_total_limit: int = _f(2, "Keep the newest N checkpoints.", min=1)
    resume: str = _f("auto", "auto = newest complete checkpoint in output_dir, never, or a checkpoint path.")
    max_consecutive_skips: int = _f(
        10, "Stop the run after this many optimizer steps in a row skipped for a non-finite loss or gradient.", min=1
    )

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    def __post_init__(self) -> None:
        for name, f in self.fields().items():
            value = getattr(self, name)
            setattr(self, name, _check_type(name, value, _resolved_types()[name]))
            _check_range(name, getattr(self, name), f.metadata)
        if not _SKIP_COMBINATIONS.get():
            self.check_combinations()

    @classmethod
    def without_combination_checks(cls, **values: Any) -> DistillConfig:
        """Types and ranges checked, cross-field rules not: for diagnostics, which report each conflict."""
        token = _SKIP_COMBINATIONS.set(True)
        try:
            return cls(**values)
        finally:
            _SKIP_COMBINATIONS.reset(token)

    def check_combinations(self) -> None:
        """The config-only rules of ``kagglekd.rules``; the first one broken raises a ConfigError naming its field."""
        from kagglekd import rules  # rules imports this module's types only for annotations

        rules.raise_errors(rules.check(self))

    @property
    def live_teacher(self) -> bool:
        """Whether the run loads and runs the teacher: a teacher cache or a CE-only run does not."""
        transfers = self.alpha_kd > 0 or self.alpha_feature > 0 or self.alpha_attention > 0
        return transfers and self.teacher_cache is None

    @property
    def kd_options(self) -> KDOptions:
        """The KD arguments of this run, as one frozen object."""
        return KDOptions(
            temperature=self.temperature,
            divergence=self.divergence,
            beta=self.jsd_beta,
            skew_alpha=self.skew_alpha,
            top_k=self.kd_top_k,
            scale_t2=self.kd_scale_t2,
        )

    # ---- JSON in/out -----------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, source: str | Path | dict) -> DistillConfig:
        """Build from a dict or a JSON file. Aliased keys are renamed; unknown keys are a ConfigError."""
        if isinstance(source, dict):
            raw, where = dict(source), "config"
        else:
            path = Path(source)
            raw, where = _read_json(path), str(path)
        return cls.from_dict(raw, where=where)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> DistillConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object of key: value pairs, got {type(raw).__name__}.")
        known = cls.fields()
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: key {key!r} is not a string.")
            if key.startswith("_") or key in ("$schema", "description"):
                continue  # comments in JSON configs
            name = ALIASES.get(key, key)
            if name not in known:
                raise ConfigError(f"{where}: unknown key '{key}'. {_suggest(key, known)}", field=key)
            if name in values:
                raise ConfigError(f"{where}: '{key}' and another key both set '{name}'; keep one.", field=name)
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        from kagglekd.rundir import to_json_text

        text = to_json_text(self.to_dict())
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def load(cls, name_or_path: str | Path) -> DistillConfig:
        """A preset name from ``kagglekd/presets/`` or a path to a JSON file."""
        path = Path(name_or_path)
        if path.suffix == ".json" or path.exists():
            if not path.exists():
                raise ConfigError(f"config file {path} does not exist. Presets: {', '.join(preset_names())}.")
            return cls.from_json(path)
        preset = PRESETS_DIR / f"{name_or_path}.json"
        if not preset.exists():
            close = difflib.get_close_matches(str(name_or_path), preset_names(), n=1)
            hint = f"Did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"'{name_or_path}' is neither a config file nor a preset. {hint}Presets: {', '.join(preset_names())}."
            )
        return cls.from_json(preset)

    def replace(self, **changes: Any) -> DistillConfig:
        """A copy with some fields changed, validated like a fresh config."""
        data = self.to_dict()
        data.update(changes)
        return DistillConfig.from_dict(data)

    def with_overrides(self, assignments: list[str]) -> DistillConfig:
        """Apply ``key=value`` strings from the command line; values parse as JSON when they can."""
        changes: dict[str, Any] = {}
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set learning_rate=1e-3.")
            key, text = item.split("=", 1)
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            changes[ALIASES.get(key.strip(), key.strip())] = value
        unknown = [k for k in changes if k not in self.fields()]
        if unknown:
            raise ConfigError(f"--set: unknown key '{unknown[0]}'. {_suggest(unknown[0], self.fields())}", unknown[0])
        return self.replace(**changes)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json") if not p.stem.startswith("card-"))


def describe_fields() -> list[tuple[str, str, Any]]:
    """(name, help, default) for every field, in declaration order (used by the README and --help)."""
    out = []
    for f in dataclasses.fields(DistillConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, f.metadata["help"], default))
    return out


# ---- validation helpers ----------------------------------------------------------------------------------
_TYPES_CACHE: dict[str, Any] = {}


def _resolved_types() -> dict[str, Any]:
    if not _TYPES_CACHE:
        _TYPES_CACHE.update(typing.get_type_hints(DistillConfig))
    return _TYPES_CACHE


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read ({err}); save it as UTF-8 JSON.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"config file {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}."
        ) from None


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    candidates = list(known) + list(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if close:
        name = ALIASES.get(close[0], close[0])
        return f"Did you mean '{name}'?"
    return "See `python -m kagglekd train --help-config` for the valid keys."


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in args)
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "an object"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Return ``value`` coerced to ``tp`` where that loses nothing (3 -> 3.0, 2.0 -> 2), else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{name} = {value!r}: expected {_type_name(tp)}.", field=name)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_check_type(f"{name}[{i}]", item, item_type) for i, item in enumerate(value)]
        raise ConfigError(f"{name} = {value!r}: expected a list of {_type_name(item_type)}s.", field=name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{name} = {value!r}: must be a finite number.", field=name)
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
    raise ConfigError(f"{name} = {value!r}: expected {_type_name(tp)}, got {type(value).__name__}.", field=name)


def _check_range(name: str, value: Any, meta: typing.Mapping) -> None:
    if value is None or isinstance(value, (bool, dict)):
        return
    if "choices" in meta and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{name} = {value!r} is not one of: {', '.join(meta['choices'])}.{hint}", field=name)
    bounds = [
        ("min", ">=", lambda v, b: v >= b),
        ("max", "<=", lambda v, b: v <= b),
        ("gt", ">", lambda v, b: v > b),
        ("lt", "<", lambda v, b: v < b),
    ]
    for key, sign, ok in bounds:
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{name} = {value!r}: must be {sign} {meta[key]}.", field=name)
