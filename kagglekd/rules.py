"""Every cross-field and model-dependent rule of a run, written once.

``check(config, facts)`` returns the broken rules as ``Finding`` objects, in a fixed order; ``DistillConfig``
raises the first error of the config-only rules, ``Distiller.setup`` raises the first error at each stage
(before loading: processes and GPUs; after loading: the models' configs and the vocabulary relation; after the
data: the training blocks) and ``diagnose`` reports them all. A rule whose facts are unknown (``None``) is
skipped, so the same rules serve an offline diagnosis and a loaded run.

A finding's ``patch`` is the config change that fixes it (``{field: new value}``; ``REMOVE`` drops the key,
so the default applies); ``diagnose --fix`` applies patches and never reads the prose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kagglekd.errors import ConfigError

if TYPE_CHECKING:
    from kagglekd.config import DistillConfig

SEVERITIES = ("error", "warning", "info")


class _Remove:
    """Patch value: drop the key (its default applies)."""

    _instance: _Remove | None = None

    def __new__(cls) -> _Remove:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REMOVE"


REMOVE = _Remove()

# id -> one-line description of the findings these rules return (diagnose's FINDINGS includes them).
RULE_FINDINGS: dict[str, str] = {
    "config-conflict": "A combination of values the kit rejects (DistillConfig or the trainer's setup).",
    "incompatible": "An option that needs the live teacher combined with teacher_cache (stored targets only).",
    "loss-prerequisite": "A transfer-loss weight > 0 whose prerequisite is missing (KD off, or other tokens).",
    "tokenizer": "Teacher and student tokenizers with different vocabularies while logit KD is on.",
    "strategy": "How the run uses the GPUs (single, ddp, split) and why; a requested one that cannot run.",
    "moe-option": "An MoE option (all_experts, expert top-k, sar, ka_samples) the teacher or run cannot honour.",
    "layer-count": "feature_layers / attention_layers beyond what the student's and teacher's layers allow.",
    "attention-family": "Attention transfer on a model family whose attention the kit does not know.",
    "divergence": "A divergence that is infinite against a teacher narrower than the student (padded vocab).",
    "data-size": "Fewer training blocks than one (global) batch: no optimizer step can run.",
    "on-policy": "lmbda / seq_kd settings generation cannot honour (prompt length, teacher, cache, tokenizers).",
}


@dataclass(frozen=True)
class Finding:
    """One broken rule or one diagnosis. ``fix`` says what to change; ``patch`` is that change as data."""

    id: str
    severity: str
    field: str | None
    message: str
    fix: str | None = None
    patch: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict:
        """The JSON form: id, severity, field, message, fix (the patch is applied by ``diagnose --fix``)."""
        out = asdict(self)
        out.pop("patch")
        return out


@dataclass(frozen=True)
class Facts:
    """What model- and run-dependent rules need, from configs only (no weights); ``None`` = unknown."""

    teacher: Any | None = None  # transformers PretrainedConfig of the teacher
    student: Any | None = None  # the student's PretrainedConfig
    vocab_relation: str | None = None  # "identical" | "padded" | "different" (alignment.classify_vocab_pair)
    teacher_vocab: int | None = None  # output widths, when known
    student_vocab: int | None = None
    processes: int | None = None  # world size the run is launched with
    gpus: int | None = None  # CUDA devices visible
    train_blocks: int | None = None  # packed training blocks


Rule = Callable[["DistillConfig", Facts], Iterator[Finding]]


def check(config: DistillConfig, facts: Facts | None = None) -> list[Finding]:
    """The findings of every rule, in ``RULES`` order (deterministic). Rules needing unknown facts are skipped."""
    facts = facts or Facts()
    return [finding for rule in RULES for finding in rule(config, facts)]


def raise_errors(findings: Iterable[Finding]) -> None:
    """Raise the first error finding as a ConfigError (message + fix) naming its field."""
    for finding in findings:
        if finding.severity == "error":
            text = finding.message if not finding.fix else f"{finding.message} {finding.fix}"
            raise ConfigError(text, field=finding.field)


# ---- helpers ---------------------------------------------------------------------------------------------
def moe_shape(model_config: Any) -> tuple[int, int]:
    """(experts per layer, experts per token) from a model config; (0, 0) for a dense model."""
    experts = getattr(model_config, "num_experts", None) or getattr(model_config, "num_local_experts", None) or 0
    top_k = getattr(model_config, "num_experts_per_tok", None) or 0
    return int(experts), int(top_k)


def _error(id: str, field: str, message: str, fix: str, patch: Mapping[str, Any] | None = None) -> Finding:
    return Finding(id, "error", field, message, fix, dict(patch) if patch is not None else None)


# Options that need the teacher's modules at training time, and the value that turns each off.
LIVE_TEACHER_OPTIONS: dict[str, Mapping[str, Any]] = {
    "sar": {"sar": False},
    "ka_samples": {"ka_samples": 0},
    "alpha_feature": {"alpha_feature": 0.0},
    "alpha_attention": {"alpha_attention": 0.0, "attention_layers": REMOVE},
    "all_experts": {"all_experts": False},
    "expert_top_k_start": {"expert_top_k_start": REMOVE, "expert_top_k_end": REMOVE},
}
# MoE options in the trainer's order, and whether each is on.
MOE_OPTIONS: dict[str, Callable[[DistillConfig], bool]] = {
    "all_experts": lambda c: c.all_experts,
    "expert_top_k_start": lambda c: c.expert_top_k_start is not None,
    "sar": lambda c: c.sar,
    "ka_samples": lambda c: c.ka_samples > 0,
}


# ---- config-only rules -----------------------------------------------------------------------------------
def _alphas(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if config.alpha_kd == 0 and config.alpha_ce == 0:
        yield _error(
            "config-conflict",
            "alpha_kd",
            "alpha_kd and alpha_ce are both 0: the student would learn nothing.",
            "Set alpha_kd > 0 (distil) and/or alpha_ce > 0 (learn from the data).",
            {"alpha_kd": REMOVE, "alpha_ce": REMOVE},
        )


def _expert_pair(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    start, end = config.expert_top_k_start, config.expert_top_k_end
    if (start is None) != (end is None):
        missing, given = ("expert_top_k_end", start) if end is None else ("expert_top_k_start", end)
        yield _error(
            "config-conflict",
            missing,
            "expert_top_k_start and expert_top_k_end go together (a linear schedule between them).",
            f"Set {missing} too (e.g. {given}, a constant top-k).",
            {missing: given},
        )


def _sar_needs_kd(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if config.sar and config.alpha_kd == 0:
        yield _error(
            "config-conflict",
            "sar",
            "sar trains the teacher's routers through the KD loss, and alpha_kd is 0.",
            "Set alpha_kd > 0, or sar false.",
            {"sar": False},
        )


def _teacher_cache(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if config.teacher_cache is None:
        return
    if config.kd_top_k is None:
        yield _error(
            "config-conflict",
            "kd_top_k",
            "teacher_cache holds top-k targets, and kd_top_k is not set.",
            "Set kd_top_k to the cache's k (its manifest.json says which).",
        )
    for name, patch in LIVE_TEACHER_OPTIONS.items():
        if getattr(config, name):
            yield _error(
                "incompatible",
                name,
                f"{name} needs the live teacher (its routers, experts, hidden states or attention), but "
                "teacher_cache replaces the teacher with targets stored once.",
                f"Drop one of them: turn {name} off, or remove teacher_cache.",
                patch,
            )
    if config.cross_tokenizer:
        yield _error(
            "config-conflict",
            "teacher_cache",
            "teacher_cache stores top-k targets per student position of one tokenizer; cross-tokenizer runs align "
            "the live teacher's own tokens.",
            "Drop teacher_cache (or cross_tokenizer).",
            {"teacher_cache": REMOVE},
        )


def _resume(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if config.resume not in ("auto", "never") and not config.resume:
        yield _error(
            "config-conflict",
            "resume",
            "resume is empty.",
            "Set resume to 'auto', 'never' or a checkpoint path.",
            {"resume": "auto"},
        )


def _cross_tokenizer_losses(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if config.cross_tokenizer and config.alpha_attention > 0:
        yield _error(
            "loss-prerequisite",
            "alpha_attention",
            "alpha_attention compares attention maps position by position, which a teacher reading other tokens "
            "(cross_tokenizer) does not have. The feature loss works across tokenizers: it uses span-averaged "
            "teacher states.",
            "With cross_tokenizer set alpha_attention 0.",
            LIVE_TEACHER_OPTIONS["alpha_attention"],
        )
    if config.cross_tokenizer and config.fused_kd and config.cross_tokenizer_loss == "uld":
        yield _error(
            "config-conflict",
            "cross_tokenizer_loss",
            "cross_tokenizer_loss uld sorts the student's full probability vector at every position, which "
            "fused_kd never builds (hybrid does it at the few positions without an exact target, chunk by chunk).",
            "Set fused_kd false, or cross_tokenizer_loss exact or hybrid.",
            {"cross_tokenizer_loss": "hybrid"},
        )


def _transfer_needs_kd(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    for name in ("alpha_feature", "alpha_attention"):
        if getattr(config, name) > 0 and config.alpha_kd == 0:
            yield _error(
                "loss-prerequisite",
                name,
                f"{name} > 0 transfers from the teacher, which a CE-only run (alpha_kd 0) does not load.",
                f"Set alpha_kd > 0 or {name} to 0.",
                LIVE_TEACHER_OPTIONS[name],
            )


def _split_needs_teacher(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if config.strategy == "split" and not config.live_teacher:
        yield _error(
            "strategy",
            "strategy",
            "strategy split puts the teacher on its own GPU, but this run loads no teacher (CE-only or a teacher "
            "cache).",
            "Set strategy single.",
            {"strategy": "single"},
        )


def _moe_without_teacher(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    # sar with alpha_kd 0 and every option under teacher_cache have their own finding above
    if config.teacher_cache is not None or config.live_teacher:
        return
    for name, on in MOE_OPTIONS.items():
        if name != "sar" and on(config):
            yield _error(
                "moe-option",
                name,
                f"{name} acts on the teacher, which a CE-only run (alpha_kd 0) does not load.",
                f"Set alpha_kd > 0, or turn {name} off.",
                LIVE_TEACHER_OPTIONS[name],
            )


# ---- rules on the launch ---------------------------------------------------------------------------------
def _processes(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    world = facts.processes
    if world is None:
        return
    if config.strategy == "ddp" and world == 1:
        yield _error(
            "strategy",
            "strategy",
            "strategy ddp needs one process per GPU, but this is a single process.",
            "Launch with `accelerate launch --multi_gpu --num_processes 2 -m kagglekd train ...` (or "
            "kagglekd.launch.notebook_launch from a notebook), or set strategy auto.",
            {"strategy": "auto"},
        )
    if config.strategy in ("single", "split") and world > 1:
        yield _error(
            "strategy",
            "strategy",
            f"strategy {config.strategy} runs in one process, but {world} were launched.",
            "Set strategy ddp (or auto), or launch one process.",
            {"strategy": "ddp"},
        )


def _split_needs_two_gpus(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if config.strategy == "split" and facts.gpus is not None and facts.gpus < 2 and facts.processes in (None, 1):
        yield _error(
            "strategy",
            "strategy",
            f"strategy split puts the teacher on a second GPU, but {facts.gpus} GPU(s) are visible.",
            "On Kaggle choose GPU T4 x2, or set strategy single (or auto).",
            {"strategy": "single"},
        )


# ---- rules on the models ---------------------------------------------------------------------------------
def _vocabularies(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if facts.vocab_relation == "different" and not config.cross_tokenizer and config.live_teacher:
        yield _error(
            "tokenizer",
            "cross_tokenizer",
            f"teacher {config.teacher_model} and student {config.student_model} have different vocabularies: "
            "token id i means a different token on each side, so comparing their logits (or truncating the wider "
            "one) trains the student on noise.",
            "Set cross_tokenizer: true (the teacher reads the same text in its own tokens; positions are aligned "
            "by character offsets and its distribution is mapped onto the student's vocabulary), or use a pair "
            "that shares a tokenizer (e.g. HuggingFaceTB/SmolLM2-360M -> SmolLM2-135M).",
            {"cross_tokenizer": True},
        )


def _widths(facts: Facts) -> tuple[int | None, int | None]:
    teacher = facts.teacher_vocab or getattr(facts.teacher, "vocab_size", None)
    student = facts.student_vocab or getattr(facts.student, "vocab_size", None)
    return teacher, student


def _divergence(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    reverse = config.divergence == "reverse_kl" or (config.divergence == "jsd" and config.jsd_beta == 1.0)
    if not reverse or config.alpha_kd == 0 or facts.vocab_relation not in ("identical", "padded"):
        return
    teacher, student = _widths(facts)
    if teacher is not None and student is not None and teacher < student:
        what = "reverse_kl" if config.divergence == "reverse_kl" else "jsd with jsd_beta 1 (= reverse KL)"
        yield _error(
            "divergence",
            "divergence",
            f"{what} weighs log(student / teacher) by the student's probabilities, but the teacher's {teacher:,} "
            f"outputs are narrower than the student's {student:,}: the student's padding columns get teacher "
            "probability 0, so the reverse KL is infinite.",
            "Set divergence forward_kl (or skew_reverse_kl, which mixes the student into the target).",
            {"divergence": "forward_kl"},
        )


def _data_size(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if facts.train_blocks is None:
        return
    from kagglekd.schedule import batches_per_epoch

    world = facts.processes or 1
    if batches_per_epoch(facts.train_blocks, config.batch_size, world) < 1:
        yield _error(
            "data-size",
            "batch_size",
            f"{facts.train_blocks} training blocks of {config.max_length + 1} tokens do not fill one batch of "
            f"{config.batch_size * world} ({config.batch_size} per process x {world}).",
            "Lower batch_size or max_length, or add data.",
            {"batch_size": max(1, facts.train_blocks // world)} if facts.train_blocks >= world else None,
        )


def _moe_teacher(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if facts.teacher is None or not config.live_teacher or config.router_patterns:
        return  # router_patterns: the routers are found in the loaded modules, not the config
    experts = moe_shape(facts.teacher)[0]
    on = [name for name, is_on in MOE_OPTIONS.items() if is_on(config)]
    if not experts:
        model_type = getattr(facts.teacher, "model_type", "?")
        for name in on:
            yield _error(
                "moe-option",
                name,
                f"{name} needs a Mixture-of-Experts teacher, but the teacher {config.teacher_model} is "
                f"{model_type!r} (its config has no num_experts / num_local_experts).",
                f"Use an MoE teacher, set router_patterns to regexes matching its router module names, or turn "
                f"{name} off.",
                LIVE_TEACHER_OPTIONS[name],
            )
        return
    if config.expert_top_k_start is None or config.expert_top_k_end is None:
        return
    for name in ("expert_top_k_start", "expert_top_k_end"):
        if getattr(config, name) > experts:
            yield _error(
                "moe-option",
                name,
                f"{name} = {getattr(config, name)}: the teacher has {experts} experts per layer.",
                f"Set {name} to at most {experts}.",
                {name: experts},
            )


def _layer_counts(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if facts.teacher is None or facts.student is None or not config.live_teacher:
        return
    student_layers, teacher_layers = facts.student.num_hidden_layers, facts.teacher.num_hidden_layers
    for weight, name, count in (
        ("alpha_feature", "feature_layers", config.feature_layers),
        ("alpha_attention", "attention_layers", config.attention_layers or 1),
    ):
        if getattr(config, weight) <= 0:
            continue
        from kagglekd.transfer import layer_map  # torch: imported only when models are known

        try:
            layer_map(student_layers, teacher_layers, "uniform", count=count)
        except ValueError as err:
            yield _error(
                "layer-count",
                name,
                f"{name} = {count}: {err} (student has {student_layers} layers, teacher {teacher_layers}).",
                f"Set {name} to at most {student_layers}.",
                {name: student_layers},
            )


def _attention_families_rule(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if config.alpha_attention <= 0 or not config.live_teacher:
        return
    from kagglekd.attention import ATTENTION_FAMILIES as families

    for model_config, side in ((facts.student, "student_model"), (facts.teacher, "teacher_model")):
        model_type = getattr(model_config, "model_type", None)
        if model_config is not None and model_type not in families:
            yield _error(
                "attention-family",
                "alpha_attention",
                f"attention transfer does not know the attention of {model_type} models ({side}); supported: "
                f"{', '.join(sorted(families))}.",
                "Set alpha_attention 0.",
                LIVE_TEACHER_OPTIONS["alpha_attention"],
            )
            return


# ---- on-policy and sequence-level distillation -----------------------------------------------------------
def _onpolicy(config: DistillConfig, facts: Facts) -> Iterator[Finding]:
    if not (config.lmbda > 0 or config.seq_kd):
        return
    which = "lmbda" if config.lmbda > 0 else "seq_kd"
    if config.prompt_length is not None and config.prompt_length > config.max_length:
        yield _error("on-policy", "prompt_length", f"prompt_length {config.prompt_length} is longer than a training "
                     f"block ({config.max_length} tokens): the prompts are taken from the blocks.",
                     "Set prompt_length <= max_length (or leave it unset: max_length // 2).",
                     {"prompt_length": REMOVE})  # fmt: skip
    if config.teacher_cache is not None:
        yield _error("incompatible", which, f"{which} trains on generated continuations, which the teacher_cache's "
                     "stored targets (one set per data block) do not cover.", f"Remove teacher_cache or turn {which} "
                     "off.", {"teacher_cache": REMOVE})  # fmt: skip
    elif config.alpha_kd == 0:
        yield _error("loss-prerequisite", which, f"{which} needs the live teacher (its distributions over generated "
                     "tokens, or its own continuations), which a run with alpha_kd 0 does not load.",
                     f"Set alpha_kd > 0 or turn {which} off.", {"alpha_kd": REMOVE})  # fmt: skip
    if config.seq_kd and (
        facts.vocab_relation == "different" or (facts.vocab_relation is None and config.cross_tokenizer)
    ):
        yield _error("on-policy", "seq_kd", "seq_kd with a teacher of another tokenizer would need its continuations "
                     "re-tokenised into the student's tokens, which the kit does not do.", "Turn seq_kd off (lmbda "
                     "works across tokenizers: the teacher reads the student's samples as text).",
                     {"seq_kd": False})  # fmt: skip
    student_positions = getattr(facts.student, "max_position_embeddings", None)
    if student_positions is not None:
        from kagglekd import onpolicy

        length = onpolicy.prompt_length(config) + onpolicy.new_tokens(config)
        if length > student_positions:
            yield _error("on-policy", "max_new_tokens", f"prompt_length + max_new_tokens = {length} is past the "
                         f"student's {student_positions} positions.", f"Lower max_new_tokens to at most "
                         f"{student_positions - onpolicy.prompt_length(config)}.")  # fmt: skip
    if config.lmbda > 0 and config.alpha_ce > 0:
        yield Finding("on-policy", "warning", "alpha_ce", f"alpha_ce {config.alpha_ce} > 0 with lmbda {config.lmbda}: "
                      "on the on-policy micro-batches the CE term trains the student on its own samples (no signal "
                      "in expectation, only noise).", "GKD uses the teacher's distributions alone: set alpha_ce 0.",
                      {"alpha_ce": 0.0})  # fmt: skip


# The order is the order errors are raised in: config-only rules first, then launch, models, data, transfer.
RULES: tuple[Rule, ...] = (
    _alphas,
    _expert_pair,
    _sar_needs_kd,
    _teacher_cache,
    _resume,
    _cross_tokenizer_losses,
    _transfer_needs_kd,
    _split_needs_teacher,
    _moe_without_teacher,
    _processes,
    _split_needs_two_gpus,
    _vocabularies,
    _divergence,
    _data_size,
    _moe_teacher,
    _layer_counts,
    _attention_families_rule,
    _onpolicy,
)
