"""Median optimizer-step time of ``Distiller`` on the tiny pair (CPU), for before/after comparisons of the engine.

Runs only the public API (``Distiller(config).train()`` and ``history.csv``), so the same script times any
checkout: ``PYTHONPATH=<checkout> OMP_NUM_THREADS=1 python bench/trainer_step.py``. Prints one JSON line:
per case the median seconds per optimizer step over steps 5..N (the first steps warm up).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import pandas as pd
import torch

from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller

BASE = dict(
    teacher_model="tiny-random-moe",
    student_model="tiny-random-dense",
    dataset="stdlib-docs",
    dataset_subset_size=40,
    max_length=128,
    batch_size=8,
    gradient_accumulation_steps=2,
    max_steps=25,
    warmup_steps=1,
    eval_steps=None,
    eval_max_blocks=4,
    save_steps=None,
    resume="never",
    seed=0,
)
CASES = {
    "kd": {},
    "kd_fused": {"fused_kd": True},
    "kd_topk_feature": {"kd_top_k": 64, "alpha_feature": 0.1, "alpha_kd": 0.5, "alpha_ce": 0.4},
    "ce_only": {"alpha_kd": 0.0, "alpha_ce": 1.0},
}


def time_teacher(distiller) -> list[float]:
    """Time the teacher's part of each optimizer step of a set-up ``Distiller``: wraps ``TeacherSide.outputs``
    (its forward, and across tokenizers the alignment lookup) and ``_train_step``; returns the list that
    ``train()`` then fills with one total per step."""
    seconds: list[float] = []
    outputs, step = distiller.teacher_side.outputs, distiller._train_step

    def timed_outputs(*args, **kwargs):
        started = time.perf_counter()
        result = outputs(*args, **kwargs)
        seconds[-1] += time.perf_counter() - started
        return result

    def timed_step(*args, **kwargs):
        seconds.append(0.0)
        return step(*args, **kwargs)

    distiller.teacher_side.outputs, distiller._train_step = timed_outputs, timed_step
    return seconds


def step_seconds(changes: dict) -> float:
    with tempfile.TemporaryDirectory() as out:
        config = DistillConfig.from_dict({**BASE, **changes, "output_dir": out})
        distiller = Distiller(config)
        distiller.train()
        rows = pd.read_csv(f"{out}/history.csv")
    seconds = (rows["tokens"] / rows["tokens_per_s"]).iloc[5:]
    return statistics.median(seconds)


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(CASES)
    print(json.dumps({name: round(step_seconds(CASES[name]), 5) for name in names}))


if __name__ == "__main__":
    main()
