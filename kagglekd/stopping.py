"""How a training session ends: the step it stops at, a pause (``stop_after``), ``summary.json``, the failure report.

A run follows its plan: ``SchedulePlan.optimizer_steps`` (``max_steps``, else the epochs) fixes the LR schedule,
the warmup, the last evaluation and the export of ``student/``. ``stop_after`` pauses one session earlier
(e.g. to split a long plan over Kaggle's 12 h sessions): the trainer saves a checkpoint at that step and exports
nothing, since the plan is unfinished (the LR has not decayed, the final evaluation has not run). A later
``train`` of the same config resumes from that checkpoint and finishes the plan with the history an
uninterrupted run writes. ``Distiller.train(max_steps=N)`` is another thing: it stops after N steps without a
checkpoint, as a killed session would (tests and the dry run use it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from kagglekd.objective import COMPONENTS

if TYPE_CHECKING:  # annotations only: the trainer imports this module
    from kagglekd.trainer import TrainState, Window


def stop_step(plan_steps: int, stop_after: int | None = None, max_steps: int | None = None) -> int:
    """The optimizer step (a count of steps done) this session stops at: the plan's end, or earlier at
    ``stop_after`` (a pause) or ``max_steps`` (``Distiller.train``'s argument), whichever comes first."""
    return min(steps for steps in (plan_steps, stop_after, max_steps) if steps is not None)


def paused(steps_done: int, plan_steps: int, stop_after: int | None, stopped_early: bool = False) -> bool:
    """Whether a session that ended after ``steps_done`` optimizer steps paused at ``stop_after`` with the
    plan unfinished (early stopping finishes a plan: it exports)."""
    return stop_after is not None and stop_after <= steps_done < plan_steps and not stopped_early


def resume_hint(run_dir: str | Path, steps_done: int, plan_steps: int, checkpoint: str | Path | None) -> str:
    """The one line a paused session prints: where it stopped, what is missing, and the command that resumes."""
    from kagglekd.rundir import CONFIG_FILE

    config = Path(run_dir) / CONFIG_FILE
    return (
        f"paused after optimizer step {steps_done} of {plan_steps} (stop_after): checkpoint {checkpoint}. The plan "
        "is unfinished, so student/ is not exported and the LR has not decayed yet. Resume and finish the plan: "
        f"python -m kagglekd train --config {config} --resume auto (add --stop-after M to pause again at step M; "
        "in a notebook, train the same config again with resume 'auto')."
    )


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    return finite[len(finite) // 2] if finite else float("nan")


def summarise(
    state: TrainState, planned_steps: int, rows: list[dict], wall_time: float, resume: str | None = None
) -> dict:
    """summary.json: steps, skips, speed (median tokens/s), the last eval, and whether the session paused
    (``resume``: the command that continues it, from ``resume_hint``)."""
    last = rows[-1] if rows else {}
    summary = {
        "optimizer_steps": state.step,
        "planned_steps": planned_steps,
        "skipped": state.skipped,
        "stopped_early": state.stopped_early,
        "paused": resume is not None,
        "wall_time_s": wall_time,
        "tokens_per_s": _median([r["tokens_per_s"] for r in rows]),
        "eval_ppl": last.get("eval_ppl", float("nan")),
        "eval_top1_agreement": last.get("eval_top1_agreement", float("nan")),
        "train_tokens": sum(r["tokens"] for r in rows),
    }
    if resume is not None:
        summary["resume"] = resume
    return summary


def failure_report(state: TrainState, row: dict, window: Window, newest: Path | None) -> dict:
    """What failure_report.json holds when the run stops itself after non-finite steps."""
    return {
        "reason": f"{state.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient",
        "step": window.step,
        "epoch": window.epoch,
        "components": {k: row.get(k) for k in ("loss", *COMPONENTS)},
        "grad_norm": row["grad_norm"],
        "batch_indices": window.block_indices,
        "skipped_total": state.skipped,
        "last_checkpoint": str(newest) if newest else None,
        "fix": "lower learning_rate, check the data around these blocks, or raise max_consecutive_skips.",
    }
