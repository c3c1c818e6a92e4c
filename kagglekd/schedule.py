"""Optimizer-step arithmetic and the learning-rate plan.

The one place that turns batches into optimizer steps. The trainer builds its scheduler through
``build_scheduler`` from the same plan, so the LR it logs is the LR plotted before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import get_scheduler

from kagglekd.config import SCHEDULER_DEFAULT_KWARGS, DistillConfig
from kagglekd.errors import ConfigError


@dataclass(frozen=True)
class SchedulePlan:
    """How many optimizer steps a run takes and the LR each one uses.

    ``lrs[k]`` is the learning rate the k-th optimizer step (0-based) is taken with.
    """

    batches_per_epoch: int
    gradient_accumulation_steps: int
    steps_per_epoch: int
    optimizer_steps: int
    warmup_steps: int
    scheduler_type: str
    scheduler_kwargs: dict
    learning_rate: float
    lrs: tuple[float, ...]

    @property
    def warmup_fraction(self) -> float:
        return self.warmup_steps / self.optimizer_steps

    @property
    def epochs(self) -> float:
        return self.optimizer_steps / self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        if not 0 <= step < self.optimizer_steps:
            raise IndexError(f"step {step} outside the plan's 0..{self.optimizer_steps - 1}")
        return self.lrs[step]

    def curve(self) -> list[float]:
        return list(self.lrs)

    def first_zero_lr_step(self) -> int | None:
        """The first step that would train at LR 0, or None (used by diagnostics)."""
        for step, lr in enumerate(self.lrs):
            if lr <= 0.0 and step > 0:
                return step
        return None

    def to_dict(self, with_curve: bool = True) -> dict:
        out = {
            "optimizer_steps": self.optimizer_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_fraction": self.warmup_fraction,
            "batches_per_epoch": self.batches_per_epoch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "scheduler_type": self.scheduler_type,
            "scheduler_kwargs": self.scheduler_kwargs,
            "learning_rate": self.learning_rate,
        }
        if with_curve:
            out["lr"] = list(self.lrs)
        return out


def batches_per_epoch(blocks: int, batch_size: int, processes: int = 1) -> int:
    """Micro-batches per epoch of each process. One process takes a ragged last batch; several drop a ragged
    last global batch, since every rank must run the same number of micro-batches (DDP syncs on each window's
    last one) and none may be left without data."""
    if processes == 1:
        return math.ceil(blocks / batch_size)
    return blocks // (batch_size * processes)


def count_noun(number: int, singular: str, plural: str | None = None) -> str:
    """``1 step`` / ``3 steps``: the number and its noun in agreement (``plural`` default: ``singular + "s"``)."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def optimizer_steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one epoch: the final partial accumulation window steps too."""
    return math.ceil(batches_per_epoch / gradient_accumulation_steps)


def plan_schedule(config: DistillConfig, batches_per_epoch: int) -> SchedulePlan:
    """Optimizer steps, warmup and the LR curve of a run with ``batches_per_epoch`` micro-batches per epoch."""
    if batches_per_epoch < 1:
        raise ConfigError(
            f"the data gives {batches_per_epoch} batches per epoch; need at least 1. Lower batch_size "
            "or max_length, or add data.",
            field="batch_size",
        )
    ga = config.gradient_accumulation_steps
    steps_per_epoch = optimizer_steps_per_epoch(batches_per_epoch, ga)
    if config.max_steps is not None:
        total = config.max_steps
    else:
        total = max(1, math.ceil(steps_per_epoch * config.num_epochs))
    if config.warmup_steps is not None:
        warmup, field = config.warmup_steps, "warmup_steps"
    else:
        warmup, field = math.ceil(config.warmup_ratio * total), "warmup_ratio"
    if warmup >= total and warmup > 0:
        raise ConfigError(
            f"{field} gives {count_noun(warmup, 'warmup step')} but the run has only "
            f"{count_noun(total, 'optimizer step')} ({count_noun(batches_per_epoch, 'batch', 'batches')}/epoch / "
            f"accumulation {ga} = {count_noun(steps_per_epoch, 'step')}/epoch): the LR would never leave warmup. "
            "Lower the warmup (e.g. warmup_ratio 0.05) or train longer.",
            field=field,
        )
    kwargs = scheduler_kwargs(config, total)
    lrs = _lr_curve(config.scheduler_type, config.learning_rate, warmup, total, kwargs)
    return SchedulePlan(
        batches_per_epoch=batches_per_epoch,
        gradient_accumulation_steps=ga,
        steps_per_epoch=steps_per_epoch,
        optimizer_steps=total,
        warmup_steps=warmup,
        scheduler_type=config.scheduler_type,
        scheduler_kwargs=kwargs,
        learning_rate=config.learning_rate,
        lrs=tuple(lrs),
    )


def scheduler_kwargs(config: DistillConfig, total_steps: int) -> dict:
    """The schedule-specific arguments, with the kit's defaults for those a schedule cannot run without."""
    kwargs = {**SCHEDULER_DEFAULT_KWARGS.get(config.scheduler_type, {}), **config.scheduler_kwargs}
    if config.scheduler_type == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        fraction = kwargs.pop("decay_fraction")
        kwargs["num_decay_steps"] = max(1, math.ceil(fraction * total_steps))
    kwargs.pop("decay_fraction", None)
    return kwargs


def build_scheduler(optimizer: torch.optim.Optimizer, plan: SchedulePlan) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler the trainer steps once per optimizer step; its LRs are exactly ``plan.lrs``."""
    try:
        return get_scheduler(
            plan.scheduler_type,
            optimizer,
            num_warmup_steps=plan.warmup_steps,
            num_training_steps=plan.optimizer_steps,
            scheduler_specific_kwargs=dict(plan.scheduler_kwargs),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"scheduler '{plan.scheduler_type}' rejected scheduler_kwargs {plan.scheduler_kwargs}: {err}",
            field="scheduler_kwargs",
        ) from None


def _lr_curve(name: str, lr: float, warmup: int, total: int, kwargs: dict) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    probe = SchedulePlan(0, 1, 0, total, warmup, name, kwargs, lr, ())
    scheduler = build_scheduler(optimizer, probe)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs
