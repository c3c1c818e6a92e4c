"""Lenient parsing: a DistillConfig from the flat JSON of a hand-rolled script, every problem a finding.

Keys the kit knows under another name are renamed through ``config.ALIASES`` (the one alias table), keys it
cannot use become ``unknown-key`` findings, values that fail their field's check become ``invalid-value``
findings and fall back to the default; a ``total_steps``-style key and a ``device``/``gpu``-style key are kept
as extras (compared with the plan, read as a GPU hint). Cross-field rules are not checked here: ``kagglekd.rules``
reports them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kagglekd.config import ALIASES, SCHEDULERS, DistillConfig
from kagglekd.errors import ConfigError
from kagglekd.memory import TINY_PRESETS, load_card
from kagglekd.rules import REMOVE, Finding

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
# Keys diagnostics read but DistillConfig does not accept (train rejects them): what each means to the kit.
PENDING_KEYS = {
    "bf16": "the kit chooses precision from the GPU (use_amp: bf16 from sm_80, fp16 + GradScaler below)",
}
DEMO_FAMILY = "kagglekd-demo"


@dataclass
class Parsed:
    config: DistillConfig
    values: dict
    extras: dict
    findings: list[Finding]


def parse_lenient(raw: dict) -> Parsed:
    """A DistillConfig from a raw dict that never raises on a key or value: problems become findings. The
    config is built without the cross-field rules (``rules.check`` reports those)."""
    findings: list[Finding] = []
    values: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key.startswith("_") or key in ("$schema", "description"):
            continue
        _read_key(key, value, values, extras, findings)
    config = None
    for _ in range(2 * len(DistillConfig.fields()) + 2):
        try:
            config = DistillConfig.without_combination_checks(**values)
            break
        except ConfigError as err:
            name = (err.field or "").split("[")[0]  # router_patterns[0] -> router_patterns
            if name not in values:  # every type/range error names its field; stop rather than loop
                break
            findings.append(_invalid(name, values.pop(name), err))
    return Parsed(config or DistillConfig.without_combination_checks(), values, extras, findings)


def _read_key(key: str, value: Any, values: dict, extras: dict, findings: list[Finding]) -> None:
    fields = DistillConfig.fields()
    name = ALIASES.get(key, key)
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
                f"'{key}' is read by diagnostics ({PENDING_KEYS[name]}), but DistillConfig has no such key, so "
                "`train` rejects a config holding it.",
                f"remove '{key}'.",
                {key: REMOVE},
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
                {key: REMOVE},
            )
        )


def _invalid(name: str, bad: Any, err: ConfigError) -> Finding:
    if name == "scheduler_type":
        close = difflib.get_close_matches(str(bad), SCHEDULERS, n=1, cutoff=0.3)
        choice = close[0] if close else "cosine"
        return Finding(
            "scheduler",
            "error",
            name,
            f"scheduler_type {bad!r} is not a transformers.get_scheduler name the kit accepts "
            f"({', '.join(SCHEDULERS)}); a script that maps unknown names to a default silently runs another "
            "schedule.",
            f"set scheduler_type to '{choice}'.",
            {"scheduler_type": choice},
        )
    default = default_of(name)
    return Finding(
        "invalid-value",
        "error",
        name,
        f"{err} The default {default!r} is used.",
        f"set a valid {name} (default {default!r}).",
        {name: REMOVE},
    )


def _closest(key: str) -> str | None:
    known = list(DistillConfig.fields()) + list(ALIASES) + list(PENDING_KEYS) + list(STEP_KEYS)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not close:
        return None
    return ALIASES.get(close[0], close[0])


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


def default_of(name: str) -> Any:
    f = DistillConfig.fields()[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


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


def planner_profile(hint: Any):
    """The GPU profile (``gpus.resolve``) of a profile name, Kaggle machine shape or device name, or None when
    no profile matches (an unknown GPU has no capacity to plan with)."""
    from kagglekd import gpus

    profile = gpus.resolve(str(hint))
    return profile if profile.known else None


def resolve_gpu(gpu: str | None, parsed: Parsed) -> tuple[Any, tuple | None]:
    """(GPU profile, ``gpu-unknown`` finding arguments or None). ``gpu=None`` reads the config's GPU hint; an
    unknown name is planned on T4x2 and said so, never silently."""
    hint = parsed.extras.get("gpu_hint")
    if gpu is None and hint is None:
        return planner_profile("T4x2"), None
    key, value = ("gpu", gpu) if gpu is not None else hint
    profile = planner_profile(value)
    if gpu is None:
        parsed.extras["_gpu_from_hint"] = profile is not None
    if profile is not None:
        return profile, None
    return planner_profile("T4x2"), (
        "gpu-unknown",
        "warning",
        key,
        f"'{key}': {value!r} names no known GPU profile; memory and time are planned on T4x2.",
        "pass --gpu with a profile name (T4, T4x2, P100, A100, L4, cpu) or a Kaggle machine_shape.",
    )
