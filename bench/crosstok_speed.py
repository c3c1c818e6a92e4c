"""Cross-tokenizer KD tokens/s against same-tokenizer KD tokens/s on the demo's tiny pair, in one run.

The demo's ``tiny-cpu`` preset (16 x 128-token blocks, alpha_kd = alpha_ce = 0.5) with the demo teacher's shape
(``models.demo_teacher_config``: tiny Qwen3-MoE, 8 experts top-2) at random weights -- speed does not depend on
what the weights learned, and the pretrained ``tiny-moe-8k`` takes ~20 min to build -- read through:

* ``same``: the student's own 4,096-token tokenizer (plain logit KD, the demo's ``tiny-moe`` pair);
* ``cross``: ``tiny-moe-8k``'s 8,192-token tokenizer (digits split): offset alignment + vocabulary map.

Each case trains ``--steps`` optimizer steps, ``--repeats`` times, interleaved (same, cross, same, cross, ...) so
that load on a shared machine hits both alike, each run in a fresh process (``--one``): a run in a process that
has already trained the other case inherits its heap (CPU runs keep freed memory), which moved the ratio of one
run by up to 10 % (0.74-0.84 on the idle machine). A step's time is ``tokens / tokens_per_s`` of its ``history.csv``
row; the first ``--warmup`` steps of each run are dropped and the median over the rest is reported, with the
teacher's part of each step (``TeacherSide.outputs``, timed around the call) and the rest apart. The
alignment of every block is precomputed in setup (outside the timed steps); its one-off cost is timed apart,
with a cold cache. Run: ``OMP_NUM_THREADS=1 python bench/crosstok_speed.py`` (prints one JSON object); to time
another checkout of the package, ``PYTHONPATH=<checkout>`` in front.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from trainer_step import time_teacher
from transformers import AutoModelForCausalLM, AutoTokenizer

from kagglekd import alignment, corpus, data, models
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller

CASES = {"same": (4096, "bytelevel"), "cross": (8192, "bytelevel-digits")}


def random_teacher(folder: Path, vocab: int, pre_tokenizer: str) -> str:
    """The demo teacher's shape at seeded random weights, saved with its tokenizer; returns the directory."""
    out = folder / f"teacher-{vocab}"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(models.demo_teacher_config(vocab)).save_pretrained(out)
    AutoTokenizer.from_pretrained(corpus.demo_tokenizer(vocab, pre_tokenizer=pre_tokenizer)).save_pretrained(out)
    return str(out)


def step_seconds(teacher: str, cross: bool, steps: int, warmup: int, subset: int) -> tuple[list, list, dict]:
    """Per-step seconds after warmup of one run, the teacher's share of each (``TeacherSide.outputs``: its
    forward, and for ``cross`` the alignment lookup), and the run's alignment.json (cross) or {}."""
    with tempfile.TemporaryDirectory() as out:
        config = DistillConfig.load("tiny-cpu").replace(
            teacher_model=teacher, tokenizer="tiny-random-dense", cross_tokenizer=cross, max_steps=steps,
            dataset_subset_size=subset, eval_steps=None, eval_max_blocks=16, save_steps=None, output_dir=out,
            resume="never",
        )  # fmt: skip
        distiller = Distiller(config).setup()
        teacher = time_teacher(distiller)
        distiller.train()
        rows = pd.read_csv(Path(out) / "history.csv")
        report = json.loads((Path(out) / "alignment.json").read_text()) if cross else {}
    return (rows["tokens"] / rows["tokens_per_s"]).iloc[warmup:].tolist(), teacher[warmup:], report


def precompute_seconds(teacher: str, subset: int) -> dict:
    """One-off cost of aligning every block of the run's data, with a cold cache (and then a warm one)."""
    student = models.load_tokenizer("tiny-random-dense")
    cross = alignment.CrossTokenizer(models.load_tokenizer(teacher), student)
    texts = data.load_texts(data.STDLIB_DATASET, subset_size=subset)
    blocks = data.build_blocks(texts, student, max_length=128, eval_fraction=0.05, seed=0)
    every = torch.cat([blocks.train, blocks.eval])
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        alignment.precompute_alignment(cross, every, cache_dir=cache)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        alignment.precompute_alignment(cross, every, cache_dir=cache)
        warm = time.perf_counter() - started
    return {"blocks": len(every), "cold_s": round(cold, 2), "warm_s": round(warm, 2)}


def fresh_process(teacher: str, cross: bool, args) -> tuple[list, list, dict]:
    """``step_seconds`` in a new process of this script (``--one``), so no run starts on another run's heap."""
    command = [sys.executable, __file__, "--one", teacher, *(["--cross"] if cross else []), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--subset", str(args.subset)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(command)}):\n{out.stderr[-3000:]}")
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--subset", type=int, default=60, help="stdlib-docs documents (60: ~2,800 blocks)")
    parser.add_argument("--one", metavar="TEACHER_DIR", help=argparse.SUPPRESS)  # one run, JSON on stdout
    parser.add_argument("--cross", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(step_seconds(args.one, args.cross, args.steps, args.warmup, args.subset)))
        return
    with tempfile.TemporaryDirectory() as folder:
        teachers = {name: random_teacher(Path(folder), *spec) for name, spec in CASES.items()}
        seconds: dict[str, list[float]] = {name: [] for name in CASES}
        teacher: dict[str, list[float]] = {name: [] for name in CASES}
        report: dict = {}
        per_repeat: list[float] = []  # same / cross of each repeat's medians: the spread the overall figure hides
        for _ in range(args.repeats):
            medians = {}
            for name in CASES:
                run, forward, found = fresh_process(teachers[name], name == "cross", args)
                medians[name] = statistics.median(run)
                seconds[name] += run
                teacher[name] += forward
                report = found or report
            per_repeat.append(round(medians["same"] / medians["cross"], 3))
        # (a checkout from before the precompute has none to time: the bench then runs there for the step times)
        has_precompute = hasattr(alignment, "precompute_alignment")
        precompute = precompute_seconds(teachers["cross"], args.subset) if has_precompute else None
    tokens = 16 * 128
    median = {name: statistics.median(values) for name, values in seconds.items()}
    rest = {name: statistics.median(s - t for s, t in zip(seconds[name], teacher[name])) for name in CASES}
    result = {
        "step_s": {name: round(value, 4) for name, value in median.items()},
        # the teacher's forward (its own vocabulary's output layer included) and the rest of the step (student
        # forward, the KD mapping and loss, backward, optimizer): the rest is what the cross-tokenizer path adds
        "teacher_s": {name: round(statistics.median(values), 4) for name, values in teacher.items()},
        "rest_s": {name: round(value, 4) for name, value in rest.items()},
        "rest_cross_over_same": round(rest["same"] / rest["cross"], 3),
        "tokens_per_s": {name: round(tokens / value) for name, value in median.items()},
        "cross_over_same": round(median["same"] / median["cross"], 3),
        "cross_over_same_per_repeat": per_repeat,
        "steps_timed": {name: len(values) for name, values in seconds.items()},
        "alignment_precompute": precompute,
        "coverage": report.get("blocks"),
        "training": report.get("training"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
