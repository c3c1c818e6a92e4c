"""Training-step benchmarks on the tiny models (CPU): (b) the kit's KD step over its floor, (c) cached vs live teacher.

Prints one JSON line. Models: ``tiny_random_moe`` teacher and ``tiny_random_dense`` student (vocab 4096), random
blocks of 128 + 1 tokens, batch 8, AdamW. Each "epoch" is a pass over the same 8 batches; epoch 1 is the warm-up
(and, for the cache, the cache was written before it), the median over the following epochs is reported.

* floor:  teacher forward (no grad) + student forward/backward with plain CE (``F.cross_entropy`` on the logits) + step
* kit:    teacher forward + student hidden states + ``fused_lm_head_kd`` (full vocab, alpha 0.5/0.5) + step
* live:   teacher forward + ``teacher_topk`` + student forward + fused top-k KD + CE + step
* cached: ``TeacherCache.get`` + student forward + fused top-k KD + CE + step
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import torch

from kagglekd.data import next_token_batch
from kagglekd.losses import fused_lm_head_kd, teacher_topk
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
    for name, step in (("floor", floor_step), ("kit", kit_step), ("live", live_step), ("cached", cached_step)):
        times = [epoch_seconds(step) for _ in range(epochs + 1)][1:]
        results[f"{name}_epoch_s"] = statistics.median(times)
        results[f"{name}_tokens_per_s"] = results["tokens_per_epoch"] / statistics.median(times)
    results["teacher_forward_s"] = forward_seconds(teacher)
    results["student_forward_s"] = forward_seconds(student)
    return results


if __name__ == "__main__":
    arguments = [int(value) for value in sys.argv[1:]]
    print(json.dumps(main(*(arguments + [5, 1][len(arguments) :]))))
