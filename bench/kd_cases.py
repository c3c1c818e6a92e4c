"""KD-loss benchmark cases: one forward + backward of a distillation loss, timed and memory-measured.

Run as a script it measures ONE case in this (fresh) process and prints one JSON line:

    python bench/kd_cases.py '{"case": "naive_full", "B": 4, "T": 256, "V": 49152, "H": 576, "k": 256,
                               "repeats": 5}'

Method. Inputs (student logits or hidden states + lm_head weight, teacher logits or precomputed top-k,
labels) are built first. Then the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``)
and the baseline RSS is read; one warm-up call and ``repeats`` timed calls follow, each a forward and a
backward with gradients set to None between calls. Time = median of the timed calls (perf_counter).
Extra peak memory = VmHWM - baseline VmRSS over the whole sequence: the memory a case needs beyond its
inputs, including the gradients it produces (the [B, T, V] logits gradient for logits-level losses, the
[V, H] + [B, T, H] gradients for the fused path). One process per case, so no case inherits another's
allocator state.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from kagglekd.config import KDOptions
from kagglekd.fused import fused_lm_head_kd
from kagglekd.losses import IGNORE_INDEX, kd_loss, teacher_topk

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _trl_loss():
    """TRL's static GKD loss, or None when TRL is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gkd import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer  # older TRL lines export it at the top level
        except ImportError:
            return None
    return GKDTrainer.generalized_jsd_loss


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def build_case(spec: dict):
    """Returns (step function doing forward + backward, tensors whose .grad is reset between calls)."""
    gen = torch.Generator().manual_seed(0)
    batch, seq, vocab, hidden_size, k = spec["B"], spec["T"], spec["V"], spec.get("H", 576), spec.get("k", 256)
    case = spec["case"]
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, :2] = IGNORE_INDEX  # a few ignored positions, like a packed batch's document starts
    teacher = torch.randn(batch, seq, vocab, generator=gen) * 2
    fused = case.startswith("fused") or case.endswith("_head")
    if fused:
        hidden = torch.randn(batch, seq, hidden_size, generator=gen).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).requires_grad_()
        leaves = [hidden, weight]
    else:
        student = (torch.randn(batch, seq, vocab, generator=gen) * 2).requires_grad_()
        leaves = [student]
    if "cached" in case:
        targets = teacher_topk(teacher, k)
        del teacher

    def naive(logits):
        return F.kl_div(F.log_softmax(logits, -1), F.softmax(teacher, -1), reduction="batchmean")

    fused_options = {"alpha_kd": 1.0, "alpha_ce": 0.0, "chunk_size": spec.get("chunk", 1024)}
    trl_loss = _trl_loss() if case.startswith("trl") else None
    if case.startswith("trl") and trl_loss is None:
        raise SystemExit(json.dumps({**spec, "skipped": "trl not installed"}))
    step = {
        "naive_full": lambda: naive(student),
        "trl_fkl": lambda: trl_loss(student, teacher, labels, beta=0.0),
        "trl_jsd": lambda: trl_loss(student, teacher, labels, beta=0.5),
        "kit_full": lambda: kd_loss(student, teacher, labels),
        "kit_jsd": lambda: kd_loss(student, teacher, labels, KDOptions(divergence="jsd", beta=0.5)),
        "kit_topk": lambda: kd_loss(student, teacher, labels, KDOptions(top_k=k)),
        "kit_topk_cached": lambda: kd_loss(student, targets, labels),
        "naive_full_head": lambda: naive(hidden @ weight.T),
        "kit_full_head": lambda: kd_loss(hidden @ weight.T, teacher, labels),
        "fused_full": lambda: fused_lm_head_kd(hidden, weight, teacher, labels, **fused_options)[0],
        "fused_topk_cached": lambda: fused_lm_head_kd(hidden, weight, targets, labels, **fused_options)[0],
    }[case]
    return step, leaves


def measure(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    step, leaves = build_case(spec)
    _reset_peak_rss()
    baseline_kb = _status_kb("VmRSS")
    times = []
    for call in range(spec["repeats"] + 1):
        for leaf in leaves:
            leaf.grad = None
        started = time.perf_counter()
        step().backward()
        elapsed = time.perf_counter() - started
        if call > 0:  # call 0 is the warm-up
            times.append(elapsed)
    peak_kb = _status_kb("VmHWM")
    return {
        **spec,
        "median_s": statistics.median(times),
        "times_s": [round(t, 4) for t in times],
        "extra_peak_mb": (peak_kb - baseline_kb) / 1024,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
