"""The memory planner against the measured peak of real training steps, on CPU: one fresh process per case.

Each case runs ``Distiller(config).train()`` for ``STEPS`` optimizer steps in a subprocess and measures its peak
resident set size (``VmHWM``) above the baseline read once torch, transformers, accelerate and the kit are
imported (``VmRSS``); the planner's ``plan_memory(config, gpu="cpu", ...)`` is computed for the same config and
models. Two pairs, each as fused KD, unfused KD, CE-only and cross-tokenizer:

- ``tiny``: the demo pair's shapes (tiny Qwen3-MoE teacher, 3-layer Llama student, vocab 4096), batch 16 x 128
  as in the ``tiny-cpu`` preset; random weights (memory does not depend on them);
- ``real``: the real-teacher pair's shapes: SmolLM2-135M's architecture from its model card
  (``presets/card-huggingfacetb--smollm2-135m.json``: a LlamaConfig, random init, nothing downloaded) and a
  small Llama student with the same 49,152-row vocabulary, batch 8 x 128.

Model weights live in local dirs (``--models``, built once): the demo tokenizer (4,096 tokens) reads the text on
both sides; cross-tokenizer cases give the teacher the 8,192-token digit-splitting demo tokenizer. A vocabulary
row count above the tokenizer's is what a real pair has too, so every tensor has its real shape.

    python bench/planner_vs_measured.py               # both pairs: a table, and bench/planner_vs_measured.json
    python bench/planner_vs_measured.py --pairs tiny  # the tiny pair (what tests/test_planner_measured.py runs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
TOLERANCE = 0.15

# (teacher, student) shapes per pair; a dict is a LlamaConfig / Qwen3MoeConfig field set, a str a model card.
REAL_STUDENT = dict(
    model_type="llama", hidden_size=192, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
    head_dim=64, intermediate_size=512, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
)  # fmt: skip
PAIRS = {
    "tiny": dict(teacher="tiny-moe", student="tiny-dense", batch_size=16, max_length=128),
    "real": dict(teacher="HuggingFaceTB/SmolLM2-135M", student=REAL_STUDENT, batch_size=8, max_length=128),
}
CASES = {
    "fused KD": dict(fused_kd=True),
    "unfused KD": dict(fused_kd=False),
    "CE-only": dict(alpha_kd=0.0, alpha_ce=1.0, fused_kd=False),
    "cross-tokenizer": dict(fused_kd=False, cross_tokenizer=True),
}
# (vocab, pre-tokenizer) of the demo tokenizers: the student's (and a same-tokenizer teacher's), a cross teacher's
STUDENT_TOKENIZER = (4096, "bytelevel")
CROSS_TOKENIZER = (8192, "bytelevel-digits")


def _model_config(spec, tokenizer_vocab: int):
    """A transformers config: a card's, the tiny presets' (at the tokenizer's vocab) or a field dict."""
    from transformers import AutoConfig

    from kagglekd import memory, models

    if spec == "tiny-moe":
        return models.tiny_moe_config(tokenizer_vocab)
    if spec == "tiny-dense":
        return models.tiny_dense_config(tokenizer_vocab)
    if isinstance(spec, str):
        return memory.config_from_card(memory.load_card(spec))
    fields = dict(spec)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_model_dir(spec, tokenizer_spec: tuple[int, str], root: Path) -> Path:
    """``root/<name>``: random float32 weights of ``spec`` and a demo tokenizer, built once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kagglekd import corpus

    name = spec if isinstance(spec, str) else f"llama-{spec['hidden_size']}x{spec['num_hidden_layers']}"
    out = root / f"{name.replace('/', '--')}-tok{tokenizer_spec[0]}"
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(tokenizer_spec[0], pre_tokenizer=tokenizer_spec[1]))
    config = _model_config(spec, len(tokenizer))
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def case_config(pair: str, case: str, root: Path, run_dir: Path) -> dict:
    """The DistillConfig dict of one case (a short run on the stdlib-docs corpus, nothing written but the run dir)."""
    spec, overrides = PAIRS[pair], CASES[case]
    cross = overrides.get("cross_tokenizer", False)
    teacher = build_model_dir(spec["teacher"], CROSS_TOKENIZER if cross else STUDENT_TOKENIZER, root)
    student = build_model_dir(spec["student"], STUDENT_TOKENIZER, root)
    return {
        "teacher_model": str(teacher), "student_model": str(student), "dataset": "stdlib-docs",
        "dataset_subset_size": 60, "batch_size": spec["batch_size"], "max_length": spec["max_length"],
        "max_steps": STEPS, "warmup_steps": 0, "eval_steps": None, "eval_max_blocks": 4, "save_steps": None,
        "resume": "never", "alpha_kd": 0.5, "alpha_ce": 0.5, "cpu_threads": 1, "output_dir": str(run_dir),
        **overrides,
    }  # fmt: skip


CHILD = r"""
import gc, json, sys
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import torch, transformers, accelerate
from kagglekd import data, models
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller
config = DistillConfig.from_dict(json.loads(sys.argv[1]))
# A first load of the text (dataset caches, tokenizer): not part of a training step, and not planned.
texts = data.load_texts(config.dataset, subset_size=config.dataset_subset_size)
data.build_blocks(texts, models.load_tokenizer(config.student_model), max_length=config.max_length)
del texts
gc.collect()
baseline = rss("VmRSS")
distiller = Distiller(config)
distiller.setup()
after_setup = rss("VmHWM") - baseline
distiller.train()
print(json.dumps({"measured": rss("VmHWM") - baseline, "after_setup": after_setup}))
"""


def measure(config: dict) -> dict:
    """``{"measured": peak RSS bytes above the baseline, "after_setup": ...}`` of ``config`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True, timeout=900, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"measuring subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def planned(config: dict):
    """The planner's ``MemoryPlan`` of ``config`` on the CPU profile (the teacher's config only when one runs)."""
    from transformers import AutoConfig

    from kagglekd.config import DistillConfig
    from kagglekd.memory import plan_memory

    cfg = DistillConfig.from_dict(config)
    teacher = AutoConfig.from_pretrained(cfg.teacher_model) if cfg.live_teacher else None
    student = AutoConfig.from_pretrained(cfg.student_model)
    return plan_memory(cfg, gpu="cpu", teacher_cfg=teacher, student_cfg=student, shared_tokens=shared_tokens(cfg))


def shared_tokens(cfg) -> int | None:
    """Tokens both tokenizers of a cross-tokenizer config spell (the mapped targets' width), else None."""
    if not cfg.cross_tokenizer:
        return None
    from kagglekd import alignment, models

    teacher, student = models.load_tokenizer(cfg.teacher_model), models.load_tokenizer(cfg.student_model)
    return int(alignment.build_vocab_map(teacher, student).shared.numel())


def compare(pair: str, case: str, root: Path) -> dict:
    """One row of the table: planned and measured GiB and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        config = case_config(pair, case, root, Path(tmp) / "run")
        plan = planned(config)
        result = measure(config)
    return {
        "pair": pair,
        "case": case,
        "planned_gib": plan.total / 2**30,
        "measured_gib": result["measured"] / 2**30,
        "ratio": plan.total / result["measured"],
        "after_setup_gib": result["after_setup"] / 2**30,
        "parts_mib": {name: round(value / 2**20, 1) for name, value in plan.parts.items() if value},
    }


def run_cases(cases: list[tuple[str, str]], root: Path, jobs: int = 1) -> list[dict]:
    """``compare`` of each (pair, case), ``jobs`` subprocesses at a time (peak RSS is per process, so running
    cases side by side changes their time, not their memory); the model dirs are built first, once."""
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory() as tmp:
        for pair, case in cases:
            case_config(pair, case, root, Path(tmp))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda item: compare(*item, root), cases))


def table(rows: list[dict]) -> str:
    lines = [
        "| pair | case | planned | measured peak | planned / measured |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['pair']} | {row['case']} | {row['planned_gib']:.3f} GiB | {row['measured_gib']:.3f} GiB "
            f"| {row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "kagglekd-planner-models"))
    parser.add_argument("--jobs", type=int, default=1, help="cases measured at once (each in its own process)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "planner_vs_measured.json"))
    args = parser.parse_args(argv)
    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    rows = run_cases([(pair, case) for pair in args.pairs for case in args.cases], root, jobs=args.jobs)
    for row in rows:
        print(table([row]).splitlines()[-1], json.dumps(row["parts_mib"]), flush=True)  # noqa: T201
    print(table(rows))  # noqa: T201
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    worst = max(abs(row["ratio"] - 1) for row in rows)
    print(f"worst |planned / measured - 1| = {worst:.1%} (tolerance {TOLERANCE:.0%})")  # noqa: T201
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
