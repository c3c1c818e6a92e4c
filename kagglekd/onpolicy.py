"""On-policy and sequence-level distillation: micro-batches of generated continuations instead of data blocks.

GKD (Agarwal et al. 2024; TRL's ``GKDTrainer``) trains the student on its own samples, scored by the teacher, which
removes the mismatch between training on data prefixes and generating from its own outputs. Per micro-batch:

* with probability ``lmbda`` the student (its current weights, eval mode, no grad, the step's autocast) continues
  the first ``prompt_length`` tokens of each block for ``max_new_tokens`` tokens through transformers'
  ``generate`` (KV cache), sampling at ``generation_temperature`` / ``generation_top_p``;
* otherwise, under ``seq_kd``, the teacher writes the continuation (sequence-level KD, Kim & Rush 2016);
* otherwise the block trains as it is (off-policy).

A generated micro-batch is ``[b, P + G']`` token ids (``G' <= max_new_tokens``: ``generate`` stops when every row
ended) with its own labels ``[b, P + G' - 1]``: ``-100`` at prompt targets and after a row's first generated EOS
(the EOS itself is a target: the student learns to stop). Every loss component reads those labels, so the KD
target positions are exactly the generated tokens; the teacher reads the whole generated sequence (across
tokenizers: its text in the teacher's own tokens, through the same ``CrossTokenizer.align`` as data blocks).
Under SAR the teacher's regularisers read ``sar_scope`` instead (its CE only the prompt: the real data), weighted
like a data block's per counted target (``TeacherSide.outputs``).

Determinism: which micro-batches are generated, and the sampling itself, are seeded from ``(seed, step, micro-batch
index[, rank])``, never from a running generator: a resumed run (or another process count's rank 0) makes the same
choices and draws the same samples without any generator state in the checkpoint, and the global RNGs are left as
they were (``torch.random.fork_rng``), so ``lmbda = 0`` without ``seq_kd`` is the off-policy run exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from kagglekd.config import DistillConfig
from kagglekd.losses import IGNORE_INDEX

__all__ = [
    "GENERATION_COLUMNS",
    "GenerationPlan",
    "OnPolicy",
    "continuation_labels",
    "generation_plan",
    "sar_scope",
    "teacher_scope",
]

# history.csv columns of a run that generates: the share of the step's wall time spent in ``generate`` and the
# mean generated length (tokens up to and including EOS) of the step's generated rows (NaN: none this step).
GENERATION_COLUMNS = ("generation_share", "generated_length")
_CHOICE, _SAMPLE = 0, 1  # purposes mixed into the seeds


def active(config: DistillConfig) -> bool:
    """Whether the run trains on generated continuations at all."""
    return config.lmbda > 0 or config.seq_kd


def prompt_length(config: DistillConfig) -> int:
    """Prompt tokens taken from the start of each ``[L + 1]`` block: ``prompt_length`` or ``max_length // 2``."""
    return config.prompt_length if config.prompt_length is not None else config.max_length // 2


def new_tokens(config: DistillConfig) -> int:
    """Tokens generated per prompt: ``max_new_tokens`` or what makes a generated sequence as long as a block."""
    return config.max_new_tokens if config.max_new_tokens is not None else config.max_length + 1 - prompt_length(config)


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy's SeedSequence): no two (seed, step, index, ...) collide in
    practice, unlike ``seed * K + step`` schemes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]) >> 1


def continuation_labels(sequences: torch.Tensor, prompt: int, eos_id: int | None) -> torch.Tensor:
    """Labels of generated sequences: ``[b, S]`` ids -> ``[b, S - 1]`` next-token targets (``labels[:, t]`` is the
    target of position ``t``, as ``data.next_token_batch``), ``-100`` for the prompt's own tokens (targets
    ``0 .. prompt - 2``) and for every position after a row's first generated ``eos_id`` (padding included; the EOS
    itself stays a target)."""
    labels = sequences[:, 1:].clone()
    labels[:, : prompt - 1] = IGNORE_INDEX
    if eos_id is not None:
        is_eos = sequences[:, prompt:] == eos_id
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly before this token
        labels[:, prompt - 1 :][after_eos] = IGNORE_INDEX
    return labels


def sar_scope(sequences: torch.Tensor, generated: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What SAR's regularisers read on a generated micro-batch, in its own positions: ``sequences`` ``[b, S]``
    ids and their ``generated`` ``[b, S - 1]`` labels (``continuation_labels``) -> ``(teacher_labels, positions)``.

    ``teacher_labels`` ``[b, S - 1]``: the targets of the teacher's CE, the prompt's own next tokens (targets
    ``0 .. prompt - 2``), -100 elsewhere. The prompt is the only real data in the micro-batch: the continuation
    was sampled (by the student, or under seq_kd by the teacher itself), and a CE on it would train the teacher
    to predict those samples instead of keeping it good on the data. The data block's own labels past the prompt
    are real tokens, but the teacher never read their real context there (its inputs are generated tokens), so
    they are no target either. Causal attention makes the prompt's logits the ones a forward on the data block
    gives, so this regulariser costs no second forward.

    ``positions`` ``[b, S - 1]`` bool: the positions whose routing the load balance and the router entropy
    average over: every position that reads real text, the prompt and the generated tokens up to each row's
    end (the position whose target is its EOS), never the padding after it (a data block: every position).
    """
    teacher_labels = sequences[:, 1:].clone()
    teacher_labels[:, prompt - 1 :] = IGNORE_INDEX
    in_prompt = torch.arange(generated.shape[1], device=generated.device) < prompt
    return teacher_labels, in_prompt[None, :] | (generated != IGNORE_INDEX)


def teacher_scope(aligned, prompt: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sar_scope`` in the teacher's own tokens (cross-tokenizer): ``aligned`` (``AlignedBatch`` of the generated
    sequences), ``positions`` ``[b, S - 1]`` from ``sar_scope`` -> ``(teacher_labels, positions)``, ``[b, T_t]``.

    A teacher position counts as having read only the prompt when it has read no more text than student position
    ``prompt - 1`` (``aligned.context``, the last teacher position that has read no more than each student
    position; its running maximum stands in where one is unset). The CE keeps the teacher's targets that are
    tokens wholly inside the prompt's text; the balance reads the teacher positions that have read no more than
    the last of ``positions`` (a token straddling the prompt's end, or the row's end, is left out)."""
    context = aligned.context if aligned.context is not None else aligned.target
    read = context.cummax(1).values  # [b, S - 1] last teacher position that has read no more than t (-1: none)
    teacher_positions = torch.arange(aligned.teacher_ids.shape[1], device=read.device)[None, :]
    prompt_read = read[:, prompt - 1 : prompt]  # [b, 1]: teacher tokens 0 .. this one lie inside the prompt
    labels = aligned.teacher_labels.masked_fill(teacher_positions >= prompt_read, IGNORE_INDEX)
    steps = torch.arange(positions.shape[1], device=positions.device)
    last = torch.where(positions, steps, -1).max(1, keepdim=True).values.to(read.device)  # [b, 1]
    ends = read.gather(1, last.clamp(min=0)).masked_fill(last < 0, -1)
    return labels, teacher_positions <= ends


class _VocabLimit:
    """Logits processor: probability 0 for ids at or past ``width`` (a padded teacher's unused rows, which the
    student's vocabulary does not have)."""

    def __init__(self, width: int):
        self.width = width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.width:
            scores[:, self.width :] = -math.inf
        return scores


def sample(model, prompts: torch.Tensor, config: DistillConfig, *, seed: int, eos_id, pad_id, autocast, vocab=None):
    """``generate`` continuations of ``prompts`` ``[b, P]`` -> ``[b, P + G']`` ids (on ``prompts``' device).

    Sampled (``do_sample``, ``top_k`` off) at the generation temperature / top-p, with the KV cache, without grad,
    under ``autocast``, in eval mode (dropout off; the mode is restored), from the global RNG seeded with ``seed``
    inside ``fork_rng`` so the caller's RNG streams do not move."""
    from transformers import LogitsProcessorList

    devices = [prompts.device.index or 0] if prompts.device.type == "cuda" else []
    processors = LogitsProcessorList([_VocabLimit(vocab)] if vocab is not None else [])
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast():
            torch.manual_seed(seed)
            return model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                temperature=config.generation_temperature, top_p=config.generation_top_p, top_k=0,
                max_new_tokens=new_tokens(config), min_new_tokens=1, eos_token_id=eos_id, pad_token_id=pad_id,
                use_cache=True, logits_processor=processors,
            )  # fmt: skip
    finally:
        model.train(was_training)


class OnPolicy:
    """Decides each micro-batch's source and replaces the generated ones; keeps the step's generation figures.

    ``prepare(window, student)`` -> the window with generated micro-batches and a labels tensor for each
    (``micro_labels``; None for a data block); ``columns(elapsed)`` -> the history values of that step.
    """

    def __init__(self, config: DistillConfig, *, tokenizer, teacher_side, student_vocab: int, rank: int = 0):
        self.config, self.teacher_side, self.student_vocab, self.rank = config, teacher_side, student_vocab, rank
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.active = active(config)
        self.history_columns = list(GENERATION_COLUMNS) if self.active else []
        self.generation_seconds = 0.0  # in generate during the last prepared window
        self.generated_lengths: list[int] = []  # per generated row of the last prepared window

    def source(self, step: int, index: int) -> str:
        """``student``, ``teacher`` or ``data`` for micro-batch ``index`` of optimizer step ``step``: the same on
        every rank and on every resume (a pure function of seed, step and index)."""
        cfg = self.config
        if cfg.lmbda > 0:
            draw = torch.rand((), generator=torch.Generator().manual_seed(seed_of(cfg.seed, step, index, _CHOICE)))
            if float(draw) < cfg.lmbda:
                return "student"
        return "teacher" if cfg.seq_kd else "data"

    def prepare(self, window, student, autocast):
        """The window with each micro-batch chosen for generation replaced by its generated sequences."""
        self.generation_seconds, self.generated_lengths = 0.0, []
        if not self.active:
            return window
        batches, labels = list(window.micro_batches), [None] * len(window.micro_batches)
        for index, block in enumerate(window.micro_batches):
            source = self.source(window.step, index)
            if source != "data":
                batches[index], labels[index] = self.generate(source, block, window.step, index, student, autocast)
        return dataclasses.replace(window, micro_batches=batches, micro_labels=labels)

    def generate(self, source: str, block: torch.Tensor, step: int, index: int, student, autocast):
        """``(sequences [b, S] on the CPU like data blocks, labels [b, S - 1])`` of one micro-batch."""
        prompt = prompt_length(self.config)
        if source == "student":
            model, device, vocab = student, next(student.parameters()).device, None
        else:
            side = self.teacher_side
            model, device, autocast, vocab = side.model, side.device, side.autocast, self.student_vocab
        started = time.perf_counter()
        sequences = sample(model, block[:, :prompt].to(device), self.config, autocast=autocast, vocab=vocab,
                           seed=seed_of(self.config.seed, step, index, self.rank, _SAMPLE),
                           eos_id=self.eos_id, pad_id=self.pad_id).cpu()  # fmt: skip
        self.generation_seconds += time.perf_counter() - started  # .cpu() waited for the device
        labels = continuation_labels(sequences, prompt, self.eos_id)
        self.generated_lengths += (labels != IGNORE_INDEX).sum(1).tolist()
        return sequences, labels

    def columns(self, elapsed: float) -> dict:
        """The history values of the last prepared window (nothing when the run never generates)."""
        if not self.active:
            return {}
        lengths = self.generated_lengths
        return {
            "generation_share": self.generation_seconds / elapsed if elapsed > 0 else float("nan"),
            "generated_length": sum(lengths) / len(lengths) if lengths else float("nan"),
        }


# ---- planning --------------------------------------------------------------------------------------------
# Memory bandwidth per device in bytes/s (vendor figures): a decode step reads every weight once, so generation is
# bandwidth-bound on these GPUs at Kaggle batch sizes. GPUs not listed count as a T4 (``bandwidth_key``).
BANDWIDTH = {"cpu": 20e9, "T4": 320e9, "P100": 732e9, "L4": 300e9, "A10G": 600e9, "A100": 1.55e12,
             "H100": 3.35e12, "H200": 4.8e12}  # fmt: skip
# Per generated token, on top of the weights' traffic: (fixed, per decoder layer) seconds of generate's Python loop,
# sampling and kernel launches. CPU: fitted to bench/onpolicy.py (tiny pair, one thread: ~26 ms per token over 3
# layers); GPU: eager-mode launch costs (~15 kernels of ~20 us per layer) plus ~2 ms of sampling per token, not yet
# measured on a GPU.
DECODE_OVERHEAD_S = {"cpu": (2e-3, 8e-3), "gpu": (2e-3, 3e-4)}


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """What generation adds to one optimizer step: the KV cache (bytes, alive during generate only, before the
    student's forward, so it adds to the peak only where it exceeds the step's activations) and an estimate of
    the time in ``generate`` (seconds per optimizer step, averaged over the ``lmbda`` / ``seq_kd`` mix)."""

    kv_cache_bytes: int
    seconds_per_step: float
    generated_micro_batches: float  # expected per optimizer step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def bandwidth_key(gpu_name: str) -> str | None:
    """The ``BANDWIDTH`` entry a profile name reads: its own (``T4x2`` -> ``T4``), or a listed GPU inside an unknown
    profile's name (``unknown (NVIDIA H200)`` -> ``H200``); None for anything else (planned as a T4, the slowest)."""
    base = gpu_name.split("x")[0]
    if base in BANDWIDTH:
        return base
    return next((key for key in BANDWIDTH if key != "cpu" and key in gpu_name), None)


def _kv_and_time(model_cfg, batch: int, length: int, new: int, dtype_bytes: int, gpu_name: str, peak_flops: float):
    from kagglekd.memory import Shape, count_parameters

    shape = Shape.of(model_cfg)
    kv_bytes = 2 * shape.layers * shape.kv_heads * shape.head_dim * batch * length * dtype_bytes
    params = count_parameters(model_cfg)
    bandwidth = BANDWIDTH[bandwidth_key(gpu_name) or "T4"]
    per_token = params.total * dtype_bytes / bandwidth
    if peak_flops > 0:  # an unknown GPU has no peak figure: the weights' traffic alone
        per_token = max(per_token, 2 * params.active * batch / peak_flops)
    fixed, per_layer = DECODE_OVERHEAD_S["cpu" if gpu_name == "cpu" else "gpu"]
    return kv_bytes, new * (per_token + fixed + shape.layers * per_layer)


def generation_plan(config: DistillConfig, *, gpu, teacher_cfg, student_cfg) -> GenerationPlan:
    """The KV cache and generation time of ``config`` on ``gpu`` (a ``gpus.GpuProfile`` or name) per optimizer step.

    KV cache: ``2 x layers x kv_heads x head_dim x batch x (prompt + new tokens) x bytes`` of the generating model
    (the larger of student and teacher when both generate). Time: each generated token reads the generating
    model's weights once (``bytes / bandwidth``) or computes ``2 N_active`` FLOPs per row, whichever is slower, plus
    ``DECODE_OVERHEAD_S``; times the expected generated micro-batches per step (``lmbda`` of them, and
    under ``seq_kd`` the rest, on the teacher)."""
    from kagglekd import gpus

    profile = gpus.resolve(gpu) if isinstance(gpu, str) else gpu
    if not active(config):
        return GenerationPlan(0, 0.0, 0.0)
    on_cpu = profile.name.lower() == "cpu"
    dtype_bytes = 4 if on_cpu else 2
    length, new = prompt_length(config) + new_tokens(config), new_tokens(config)
    name = "cpu" if on_cpu else profile.name
    micro = config.gradient_accumulation_steps
    shares = {"student": config.lmbda, "teacher": (1 - config.lmbda) if config.seq_kd else 0.0}
    models = {"student": student_cfg, "teacher": teacher_cfg}
    kv, seconds = 0, 0.0
    for who, share in shares.items():
        if share > 0 and models[who] is not None:
            kv_who, t_who = _kv_and_time(models[who], config.batch_size, length, new, dtype_bytes, name,
                                         profile.peak_flops)  # fmt: skip
            kv, seconds = max(kv, kv_who), seconds + share * micro * t_who
    expected = micro * (config.lmbda + (1 - config.lmbda) * config.seq_kd)
    return GenerationPlan(kv_cache_bytes=int(kv), seconds_per_step=seconds, generated_micro_batches=expected)
