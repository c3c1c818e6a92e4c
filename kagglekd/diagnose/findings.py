"""The findings table (ids never change meaning) and the Report that ``diagnose`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kagglekd.config import DistillConfig
from kagglekd.memory import MemoryPlan, format_bytes
from kagglekd.rules import RULE_FINDINGS, SEVERITIES, Facts, Finding

__all__ = ["FINDINGS", "SEVERITIES", "Finding", "Report"]

# id -> one-line description (the README lists these). The rules' own ids come from kagglekd.rules.
FINDINGS: dict[str, str] = {
    "unknown-key": "A config key the kit does not know; the closest valid key is named. The key is ignored.",
    "alias": "A key renamed to the kit's name for it (e.g. lr -> learning_rate).",
    "pending-key": "A key diagnostics read but DistillConfig does not accept (bf16: precision follows the GPU).",
    "invalid-value": "A value that fails the type/range check of its field; the default is used instead.",
    "gpu-hint": "A device/gpu/machine key in the config read as the GPU profile (when --gpu is not given).",
    "batches-unknown": "Batches per epoch cannot be derived; schedule checks use an assumption or are skipped.",
    "optimizer-steps": "The derived optimizer-step count: ceil(batches per epoch / accumulation) x epochs.",
    "total-steps-mismatch": "A total_steps-style key disagrees with the derived optimizer-step count.",
    "warmup": "Warmup too long (> 20 % of the run), absent, or never ending.",
    "lr-zero": "The LR curve reaches 0 before the last optimizer step.",
    "scheduler": "A scheduler name (or its arguments) transformers.get_scheduler does not accept.",
    "loss-weights": "Loss weights that train no distillation or do not sum to 1 (informational).",
    "attention-cost": "Attention transfer forces eager attention and keeps [B,H,T,T] maps (memory, time).",
    "unused-setting": "A setting that has no effect with the other values (e.g. attention_layers without alpha).",
    "temperature": "The KD temperature's real effect (softmax runs in float32; flattening, T^2 scaling).",
    "eval-cadence": "Evaluation cadence against the run length.",
    "early-stopping": "Early stopping that can never trigger with this cadence and run length.",
    "save-cadence": "Checkpoint cadence: missing, longer than the run, or more than 30 minutes of work at risk.",
    "stop-after": "stop_after inside the plan: the session pauses there unfinished (no decayed LR, no export).",
    "ema": "EMA decay against run length: a slow EMA evaluated over a short run is mostly the initial weights.",
    "precision": "Precision against the GPU (bf16 emulated below sm_80, fp32 on a GPU, autocast off on CPU).",
    "device": "A GPU the current Kaggle image cannot use (P100: no sm_60 kernels), or a CPU run of real models.",
    "gpu-unknown": "A GPU name no profile matches; memory and time are planned on T4x2 instead.",
    "tokenizer-unknown": "A tokenizer family that cannot be determined offline.",
    "model-unknown": "A model id with no model card and no local config.json; memory/time cannot be planned.",
    "max-length": "max_length beyond a model's max_position_embeddings.",
    "memory": "Predicted peak memory per GPU against capacity (fits < 85 % <= tight <= 100 % < OOM).",
    "session-time": "Projected run time against Kaggle's 12 h session.",
    "teacher-cache": "Teacher top-k cache size against Kaggle's 20 GB output limit.",
    "dry-run": "Result of the --dry-run optimizer steps (tokens/s, projected times).",
    "dry-run-failed": "The dry run could not run; the message says why.",
    **RULE_FINDINGS,
}


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
    facts: Facts | None = None  # what the rules were checked with (--fix re-checks its patched config with them)

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
        lines += self._plan_lines()
        order = {s: i for i, s in enumerate(SEVERITIES)}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            where = f" ({f.field})" if f.field else ""
            lines.append(f"[{f.severity.upper()}] {f.id}{where}: {f.message}")
            if f.fix:
                lines.append(f"    fix: {f.fix}")
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        lines.append(f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info")
        return "\n".join(lines)

    def _plan_lines(self) -> list[str]:
        lines = []
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
        return lines
