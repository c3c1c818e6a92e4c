"""Where an on-policy step's time goes on the tiny pair (CPU): generation, teacher, student.

``OMP_NUM_THREADS=1 python bench/onpolicy.py [lmbda ...]`` trains ``Distiller`` on the tiny pair of
``bench/trainer_step.py`` (tiny-random-moe -> tiny-random-dense, max_length 128, batch 8 x 2 micro-batches) at each
``lmbda`` (default 1 and 0) and prints one JSON line: per lmbda the median over steps 3..N of the seconds per
optimizer step, split into ``generation`` (inside ``generate``: the history's ``generation_share`` x step time),
``teacher`` (``TeacherSide.outputs``: the teacher's forward over the generated sequences) and ``student`` (the rest:
the student's forward, loss, backward and the optimizer step), with the mean generated length.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile

import pandas as pd
import torch
from trainer_step import BASE, time_teacher

from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller

STEPS = 12
SETTINGS = dict(alpha_ce=0.0, max_steps=STEPS)  # GKD: the teacher's distributions alone


def step_split(lmbda: float) -> dict:
    """Median seconds per optimizer step: total, generation, teacher, student (steps 3..STEPS)."""
    with tempfile.TemporaryDirectory() as out:
        config = DistillConfig.from_dict({**BASE, **SETTINGS, "lmbda": lmbda, "output_dir": out})
        distiller = Distiller(config).setup()
        teacher_seconds = time_teacher(distiller)
        distiller.train()
        rows = pd.read_csv(f"{out}/history.csv")
    total = rows["tokens"] / rows["tokens_per_s"]
    generation = total * rows["generation_share"] if "generation_share" in rows else total * 0.0
    teacher = pd.Series(teacher_seconds)
    student = total - generation - teacher
    keep = slice(3, None)
    median = lambda series: round(statistics.median(series.iloc[keep]), 4)  # noqa: E731
    result = {"step_s": median(total), "generation_s": median(generation), "teacher_s": median(teacher),
              "student_s": median(student)}  # fmt: skip
    if "generated_length" in rows:
        result["generated_length"] = round(float(rows["generated_length"].iloc[keep].mean()), 2)
    return result


def main() -> None:
    torch.set_num_threads(1)
    values = [float(v) for v in sys.argv[1:]] or [1.0, 0.0]
    print(json.dumps({f"lmbda={v:g}": step_split(v) for v in values}))


if __name__ == "__main__":
    main()
