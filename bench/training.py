"""Training-step benchmarks on the tiny models (CPU): (b) the kit's KD step over its floor, (c) cached vs live teacher.

Prints one JSON line. Models: ``tiny_random_moe`` teacher and ``tiny_random_dense`` student (vocab 4096), random
blocks of 128 + 1 tokens, batch 8, AdamW. Each "epoch" is a pass over the same 8 batches; epoch 1 is the warm-up
(and, for the cache, the cache was written before it), the median over the following epochs is reported.

* floor:  teacher forward (no grad) + student forward/backward with plain CE (``F.cross_entropy`` on the logits) + step
* kit:    teacher forward + student hidden states + ``fused_lm_head_kd`` (full vocab, alpha 0.5/0.5) + step
* live:   teacher forward + ``teacher_topk`` + student forward + fused top-k KD + CE + step
* cached: ``TeacherCache.get`` + student forward + fused top-k KD + CE + step
* kit_kd: teacher forward + ``fused_lm_head_kd`` forward KL only (alpha_kd 1, alpha_ce 0) + step: the kit's side of
          the comparison with TRL
* trl:    TRL's ``GKDTrainer.training_step`` (lmbda=0, beta=0: forward KL on the teacher's full distribution, no
          generation) on the same models, batches and AdamW + step. TRL shifts inside ``compute_loss``, so it gets
          the 129-token blocks and predicts the same 128 positions per row.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch

from kagglekd.data import next_token_batch
from kagglekd.fused import fused_lm_head_kd
from kagglekd.losses import teacher_topk
from kagglekd.models import tiny_random_dense, tiny_random_moe
from kagglekd.teacher_cache import open_cache, write_cache

VOCAB, LENGTH, BATCH, BATCHES, K = 4096, 128, 8, 8, 32


def student_hidden(student, input_ids):
    return student.model(input_ids=input_ids).last_hidden_state


def main(epochs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher, student = tiny_random_moe(VOCAB, 0).eval().requires_grad_(False), tiny_random_dense(VOCAB, 1)
    blocks = torch.randint(0, VOCAB, (BATCH * BATCHES, LENGTH + 1))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    head = student.get_output_embeddings().weight
    manifest = {"teacher_model": "tiny-random-moe", "teacher_revision": "0", "tokenizer_hash": "-",
                "max_length": LENGTH, "dataset_fingerprint": "random"}  # fmt: skip
    cache_dir = tempfile.mkdtemp(prefix="kagglekd-bench-cache-")
    started = time.perf_counter()
    write_cache(teacher, blocks, cache_dir, k=K, temperature=1.0, batch_size=BATCH, manifest=manifest)
    cache_write_s = time.perf_counter() - started
    cache = open_cache(cache_dir, {**manifest, "k": K})

    def batch(i):
        index = torch.arange(i * BATCH, (i + 1) * BATCH)
        return index, *next_token_batch(blocks[index])

    def floor_step(index, input_ids, labels):
        with torch.no_grad():
            teacher(input_ids=input_ids)
        logits = student(input_ids=input_ids).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def kit_step(index, input_ids, labels):
        with torch.no_grad():
            logits = teacher(input_ids=input_ids).logits
        return fused_lm_head_kd(student_hidden(student, input_ids), head, logits, labels)[0]

    def live_step(index, input_ids, labels):
        with torch.no_grad():
            targets = teacher_topk(teacher(input_ids=input_ids).logits, K)
        return fused_lm_head_kd(student_hidden(student, input_ids), head, targets, labels)[0]

    def cached_step(index, input_ids, labels):
        return fused_lm_head_kd(student_hidden(student, input_ids), head, cache.get(index), labels)[0]

    def kit_kd_step(index, input_ids, labels):
        with torch.no_grad():
            logits = teacher(input_ids=input_ids).logits
        return fused_lm_head_kd(student_hidden(student, input_ids), head, logits, labels, alpha_kd=1.0, alpha_ce=0.0)[0]

    def epoch_seconds(step):
        started = time.perf_counter()
        for i in range(BATCHES):
            loss = step(*batch(i))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - started

    def forward_seconds(model):
        input_ids = batch(0)[1]
        times = []
        with torch.no_grad():
            for _ in range(epochs + 1):
                started = time.perf_counter()
                model(input_ids=input_ids)
                times.append(time.perf_counter() - started)
        return statistics.median(times[1:])

    results = {"threads": threads, "epochs_timed": epochs, "tokens_per_epoch": BATCH * BATCHES * LENGTH}
    results["cache_write_s"] = cache_write_s
    steps = (("floor", floor_step), ("kit", kit_step), ("live", live_step), ("cached", cached_step),
             ("kit_kd", kit_kd_step))  # fmt: skip
    for name, step in steps:
        times = [epoch_seconds(step) for _ in range(epochs + 1)][1:]
        results[f"{name}_epoch_s"] = statistics.median(times)
        results[f"{name}_tokens_per_s"] = results["tokens_per_epoch"] / statistics.median(times)
    try:
        times = trl_epoch_seconds(teacher, blocks, epochs)
        results["trl_epoch_s"] = statistics.median(times)
        results["trl_tokens_per_s"] = results["tokens_per_epoch"] / statistics.median(times)
    except Exception as error:  # report why TRL could not run instead of failing the whole benchmark
        results["trl_error"] = f"{type(error).__name__}: {error}"
    results["teacher_forward_s"] = forward_seconds(teacher)
    results["student_forward_s"] = forward_seconds(student)
    return results


def trl_epoch_seconds(teacher, blocks, epochs: int) -> list[float]:
    """Epoch times of TRL's GKDTrainer.training_step + AdamW step on a fresh copy of the same student."""
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kagglekd.corpus import demo_tokenizer

    student = tiny_random_dense(VOCAB, 1)
    output_dir = tempfile.mkdtemp(prefix="kagglekd-bench-trl-")
    args = GKDConfig(output_dir=output_dir, lmbda=0.0, beta=0.0, temperature=1.0, learning_rate=1e-4,
                     per_device_train_batch_size=BATCH, report_to=[], use_cpu=True, max_length=LENGTH + 1,
                     disable_dropout=True, logging_strategy="no", save_strategy="no")  # fmt: skip
    rows = Dataset.from_dict({"input_ids": blocks.tolist()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                             processing_class=AutoTokenizer.from_pretrained(demo_tokenizer(VOCAB)),
                             data_collator=lambda batch: batch)  # fmt: skip
    trainer.create_optimizer()
    optimizer = trainer.optimizer
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop replaces
    trainer.model.train()

    def epoch():
        started = time.perf_counter()
        for i in range(BATCHES):
            input_ids = blocks[i * BATCH : (i + 1) * BATCH]
            inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
            trainer.training_step(trainer.model, inputs, num_items_in_batch=None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return [epoch() for _ in range(epochs + 1)][1:]


if __name__ == "__main__":
    arguments = [int(value) for value in sys.argv[1:]]
    print(json.dumps(main(*(arguments + [5, 1][len(arguments) :]))))
