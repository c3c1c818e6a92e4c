"""What the checks of ``diagnose`` share: the parsed config, the GPU profile, the options, what earlier checks found."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kagglekd import rules
from kagglekd.config import DistillConfig
from kagglekd.diagnose.findings import FINDINGS, Finding
from kagglekd.diagnose.parsing import Parsed
from kagglekd.gpus import GpuProfile
from kagglekd.memory import MemoryPlan, StrategyChoice

KAGGLE_SESSION_H = 12.0
KAGGLE_OUTPUT_BYTES = 20e9
MFU = 0.20
AT_RISK_S = 30 * 60


class Context:
    """Shared by the checks; each reads what the earlier ones set."""

    def __init__(self, parsed: Parsed, profile: GpuProfile, **options: Any):
        self.parsed = parsed
        self.config: DistillConfig = parsed.config
        self.profile = profile
        self.options = options  # batches_per_epoch, train_blocks, dry_run, dry_run_dir
        self.findings: list[Finding] = list(parsed.findings)
        self.plan = None
        self.teacher_cfg = self.student_cfg = None
        self.relation: str | None = None  # vocab relation from the tokenizer families
        self.memory_plan: MemoryPlan | None = None
        self.strategy: StrategyChoice | None = None
        self.time: dict = {}
        self.dry: dict | None = None
        self.facts: rules.Facts | None = None

    def add(
        self,
        id: str,
        severity: str,
        field: str | None,
        message: str,
        fix: str | None = None,
        patch: Mapping[str, Any] | None = None,
    ) -> None:
        assert id in FINDINGS, id
        self.findings.append(Finding(id, severity, field, message, fix, patch))

    def has(self, id: str, severity: str | None = None, field: str | None = None) -> bool:
        return any(
            f.id == id and (severity is None or f.severity == severity) and (field is None or f.field == field)
            for f in self.findings
        )
