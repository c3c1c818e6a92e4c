"""Cross-tokenizer KD tokens/s against same-tokenizer KD tokens/s on the demo's tiny pair, in one run.

The demo's ``tiny-cpu`` preset (16 x 128-token blocks, alpha_kd = alpha_ce = 0.5) with the demo teacher's shape
(``models.demo_teacher_config``: tiny Qwen3-MoE, 8 experts top-2) at random weights -- speed does not depend on
what the weights learned, and the pretrained ``tiny-moe-8k`` takes ~20 min to build -- read through:

* ``same``: the student's own 4,096-token tokenizer (plain logit KD, the demo's ``tiny-moe`` pair);
* ``cross``: ``tiny-moe-8k``'s 8,192-token tokenizer (digits split): offset alignment + vocabulary map;
* ``cross-4096``: a 4,096-token tokenizer with digits split (a different vocabulary of the student's width):
  what the cross-tokenizer machinery costs apart from ``cross``'s twice-as-wide teacher output layer and softmax.

Each case trains ``--steps`` optimizer steps, ``--repeats`` times. A repeat runs the cases in fresh processes
in lockstep: one step of ``same``, one of ``cross``, one of ``cross-4096``, one of ``same``, ... (each waits
while the others step, evaluate or save), so that whatever else slows the machine down in a stretch of time
slows all alike: on these shared 2-core machines a run's step time drifts by 40 % and more within a minute, and
cases timed one after the other caught different stretches (per-repeat ratios 0.64-0.90 for one build). Each
case has its own process, since a process that has already trained another case inherits its heap (CPU runs
keep freed memory), which moved the ratio of one run by up to 10 %. A step's time is ``tokens / tokens_per_s``
of its ``history.csv`` row (timed inside the step, not the wait); the first ``--warmup`` steps of each run are
dropped and the median over the rest is reported, with the teacher's part of each step (``TeacherSide.outputs``,
timed around the call) and the rest apart. The alignment of every block is precomputed in setup (outside the
timed steps); its one-off cost is timed apart, with a cold cache. Run:
``OMP_NUM_THREADS=1 python bench/crosstok_speed.py`` (prints one JSON object); to time another checkout of the
package, ``PYTHONPATH=<checkout>`` in front.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import statistics
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

CASES = {"same": (4096, "bytelevel"), "cross": (8192, "bytelevel-digits"), "cross-4096": (4096, "bytelevel-digits")}


def random_teacher(folder: Path, vocab: int, pre_tokenizer: str) -> str:
    """The demo teacher's shape at seeded random weights, saved with its tokenizer; returns the directory."""
    out = folder / f"teacher-{vocab}-{pre_tokenizer}"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(models.demo_teacher_config(vocab)).save_pretrained(out)
    AutoTokenizer.from_pretrained(corpus.demo_tokenizer(vocab, pre_tokenizer=pre_tokenizer)).save_pretrained(out)
    return str(out)


def step_seconds(teacher: str, cross: bool, steps: int, warmup: int, subset: int, turns=None) -> tuple:
    """Per-step seconds after warmup of one run, the teacher's share of each (``TeacherSide.outputs``: its
    forward, and for ``cross`` the alignment lookup), and the run's alignment.json (cross) or {}. ``turns``:
    ``take_turns``' arguments after the distiller and the step count (None: step freely)."""
    with tempfile.TemporaryDirectory() as out:
        config = DistillConfig.load("tiny-cpu").replace(
            teacher_model=teacher, tokenizer="tiny-random-dense", cross_tokenizer=cross, max_steps=steps,
            dataset_subset_size=subset, eval_steps=None, eval_max_blocks=16, save_steps=None, output_dir=out,
            resume="never",
        )  # fmt: skip
        distiller = Distiller(config).setup()
        teacher = time_teacher(distiller)
        hand_on_last = take_turns(distiller, *turns, steps) if turns is not None else None
        distiller.train()
        if hand_on_last is not None:  # only now: the run's end (summary, export) overlaps no other run's step
            hand_on_last()
        rows = pd.read_csv(Path(out) / "history.csv")
        report = json.loads((Path(out) / "alignment.json").read_text()) if cross else {}
    return (rows["tokens"] / rows["tokens_per_s"]).iloc[warmup:].tolist(), teacher[warmup:], report


def take_turns(distiller, name: str, messages, mine, theirs, steps: int):
    """Say ``(name, "ready")`` on ``messages``, then let ``distiller`` step only in its turn: ``mine`` is taken
    before each step and ``theirs`` released after the step's bookkeeping (``_after_step``: history,
    evaluation, checkpoint), so the waiting is timed in no run. After the last of ``steps`` the turn is not
    handed on: the caller does that with the returned callable once the run has finished."""
    step, after = distiller._train_step, distiller._after_step
    done = 0

    def in_turn(*args, **kwargs):
        mine.acquire()
        return step(*args, **kwargs)

    def hand_on(*args, **kwargs):
        nonlocal done
        try:
            return after(*args, **kwargs)
        finally:
            done += 1
            if done < steps:
                theirs.release()

    distiller._train_step, distiller._after_step = in_turn, hand_on
    messages.put((name, "ready", None))
    return theirs.release


def _run_case(name: str, teacher: str, args, turns) -> None:
    torch.set_num_threads(1)
    messages = turns[0]
    try:
        found = step_seconds(teacher, name != "same", args.steps, args.warmup, args.subset, (name, *turns))
    except BaseException as err:  # reported by the parent, which stops the other runs (they would wait forever)
        messages.put((name, "failed", repr(err)))
        raise
    messages.put((name, "done", found))


def paired_run(teachers: dict, args) -> dict:
    """One repeat: every case in a fresh process, the processes stepping in turn (in ``CASES``' order) once all
    are set up. Returns ``step_seconds``' result per case. A run that fails or dies stops the others."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    order = list(CASES)
    turns = {name: context.Semaphore(0) for name in order}
    turns_of = {name: (messages, turns[name], turns[order[(i + 1) % len(order)]]) for i, name in enumerate(order)}
    workers = [context.Process(target=_run_case, args=(name, teachers[name], args, turns_of[name])) for name in CASES]
    for worker in workers:
        worker.start()
    ready, found = 0, {}
    try:
        while len(found) < len(CASES):
            try:
                name, kind, value = messages.get(timeout=5.0)
            except queue.Empty:  # a run killed without a word (out of memory, a crash) would leave us waiting
                dead = {w.name: w.exitcode for w in workers if w.exitcode not in (None, 0)}
                if dead:
                    raise RuntimeError(f"a run died: exit codes {dead}") from None
                continue
            if kind == "failed":
                raise RuntimeError(f"the {name} run failed: {value}")
            if kind == "ready":
                ready += 1
                if ready == len(CASES):
                    turns[order[0]].release()
            else:
                found[name] = value
    finally:
        for worker in workers:
            if worker.is_alive() and len(found) < len(CASES):
                worker.terminate()
            worker.join()
    return found


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--subset", type=int, default=60, help="stdlib-docs documents (60: ~2,800 blocks)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        teachers = {name: random_teacher(Path(folder), *spec) for name, spec in CASES.items()}
        seconds: dict[str, list[float]] = {name: [] for name in CASES}
        teacher: dict[str, list[float]] = {name: [] for name in CASES}
        report: dict = {}
        per_repeat: list[float] = []  # same / cross of each repeat's medians: the spread the overall figure hides
        for _ in range(args.repeats):
            medians = {}
            for name, (run, forward, found) in paired_run(teachers, args).items():
                medians[name] = statistics.median(run)
                seconds[name] += run
                teacher[name] += forward
                report = found if name == "cross" else report
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
        "cross_4096_over_same": round(median["same"] / median["cross-4096"], 3),
        "steps_timed": {name: len(values) for name, values in seconds.items()},
        "alignment_precompute": precompute,
        "coverage": report.get("blocks"),
        "training": report.get("training"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
