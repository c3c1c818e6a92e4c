"""``diagnose --fix``: a corrected config from the findings' structured patches (never from their prose).

Patches apply in finding order (the first finding of an id and field wins); the patched config is then
checked against the rules again with the same facts, since one fix can expose another rule (turning
cross_tokenizer on makes alpha_attention an error), and those patches apply too. Memory and checkpoint
cadence are re-planned last, on the fixed config.
"""

from __future__ import annotations

import math
from typing import Any

from kagglekd import rules
from kagglekd.config import DistillConfig
from kagglekd.diagnose.findings import Finding, Report
from kagglekd.errors import ConfigError
from kagglekd.memory import largest_fitting, resolve_model_config
from kagglekd.rules import REMOVE

_RECHECKS = 8  # rounds of re-checking the patched config (each round fixes at least one more finding)


class _Fixer:
    def __init__(self, report: Report):
        self.report = report
        self.out: dict[str, Any] = dict(report.values)
        self.fixes: list[str] = []
        self.unfixable: list[str] = []
        self.seen: set[tuple[str, str | None]] = set()

    def change(self, key: str, value: Any, why: str) -> None:
        old = self.out.get(key, getattr(self.report.config, key, None))
        if value is REMOVE:
            present = key in self.out or key not in DistillConfig.fields()  # raw keys are never in out
            self.out.pop(key, None)
            if present:
                self.fixes.append(f"removed '{key}': {why}")
            return
        self.out[key] = value
        self.fixes.append(f"{key}: {old!r} -> {value!r}: {why}")

    def apply(self, finding: Finding) -> bool:
        """Apply a finding's patch once per (id, field); False when it has none."""
        if (finding.id, finding.field) in self.seen:
            return True
        self.seen.add((finding.id, finding.field))
        if not finding.patch:
            return False
        for key, value in finding.patch.items():
            self.change(key, value, finding.message)
        return True

    def config(self) -> DistillConfig | None:
        try:
            return DistillConfig.without_combination_checks(
                **{k: v for k, v in self.out.items() if k in DistillConfig.fields()}
            )
        except ConfigError:
            return None


def fix_config(report: Report) -> dict:
    """A corrected config: the usable keys in the kit's names plus one change per fixable finding, each
    explained in ``_fixes``; errors no config change can fix are listed in ``_unfixable``."""
    fixer = _Fixer(report)
    for finding in report.findings:
        if not fixer.apply(finding) and finding.severity == "error":
            fixer.unfixable.append(_unfixable(report, finding))
        elif finding.id == "model-unknown":
            fixer.unfixable.append(f"{finding.field}: {finding.message} ({finding.fix})")
    for _ in range(_RECHECKS):
        fixed = fixer.config()
        if fixed is None:
            break
        new = [f for f in rules.check(fixed, report.facts) if f.severity == "error" and f.patch]
        new = [f for f in new if (f.id, f.field) not in fixer.seen]
        if not new:
            break
        for finding in new:
            fixer.apply(finding)
    _fix_memory_and_saves(report, fixer)
    return {"_fixes": fixer.fixes, "_unfixable": fixer.unfixable, **fixer.out}


def _unfixable(report: Report, finding: Finding) -> str:
    if finding.id == "device":
        return (
            f"device: {report.gpu} cannot run the current Kaggle PyTorch; choose GPU T4 x2 "
            "(machine_shape NvidiaTeslaT4) -- not a config setting"
        )
    return f"{finding.id} ({finding.field}): {finding.message} {finding.fix or ''}".strip()


def _fix_memory_and_saves(report: Report, fixer: _Fixer) -> None:
    """Batch size (and kd_top_k) from the memory planner, and save_steps from the time plan, on the fixed config."""
    fixed = fixer.config()
    if fixed is None:
        return
    if report.memory_plan is not None and report.memory_plan.verdict != "fits":
        _fix_memory(report, fixer, fixed)
        fixed = fixer.config() or fixed
    steps = report.plan.get("optimizer_steps")
    save = report.time.get("recommended_save_steps") if report.time else None
    if steps and save and (fixed.save_steps is None or fixed.save_steps > min(save, steps)):
        fixer.change("save_steps", min(save, steps), "keeps at most 30 minutes of work at risk (time plan)")


def _fix_memory(report: Report, fixer: _Fixer, fixed: DistillConfig) -> None:
    from kagglekd.diagnose.parsing import planner_profile

    t_cfg, _ = resolve_model_config(fixed.teacher_model)
    s_cfg, _ = resolve_model_config(fixed.student_model)
    if t_cfg is None or s_cfg is None:
        return
    profile = planner_profile(report.gpu)
    if profile is None or not profile.supported:
        profile = planner_profile("T4x2")  # the device finding's fix: run on T4 x2
    if fixed.alpha_kd > 0 and not fixed.kd_top_k:
        fixer.change("kd_top_k", 256, "top-256 teacher targets shrink the KD intermediates and speed up KD")
        fixed = fixer.config() or fixed
    strategy = report.strategy.get("strategy", "single") if profile.name == report.gpu else "single"
    best = largest_fitting(fixed, gpu=profile, teacher_cfg=t_cfg, student_cfg=s_cfg, strategy=strategy)
    if 0 < best["batch_size"] < fixed.batch_size:
        effective = fixed.batch_size * fixed.gradient_accumulation_steps
        fixer.change("batch_size", best["batch_size"], f"largest batch under 85 % of {profile.name} memory")
        fixer.change(
            "gradient_accumulation_steps",
            math.ceil(effective / best["batch_size"]),
            f"keeps the effective batch of {effective} blocks per optimizer step",
        )
