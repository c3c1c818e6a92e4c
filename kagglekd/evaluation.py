"""The one evaluator: held-out perplexity of the student (or any model, EMA included), KD loss and top-1
agreement with the teacher, the teacher's own perplexity and the cross-tokenizer alignment diagnostics.

The trainer's periodic evals, ``demo``, ``report`` / ``03_evaluate`` and ``evaluate --run`` all come here
(through ``Distiller.evaluate`` / ``Distiller.teacher_perplexity``). Perplexity is exp of the token-weighted
student CE; under DDP every rank evaluates its share of the blocks and the sums are reduced.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kagglekd import alignment, data, losses
from kagglekd.metrics import EvalTotals
from kagglekd.objective import Objective
from kagglekd.teacher import TeacherOutputs, TeacherSide, match_vocab

log = logging.getLogger(__name__)


class Evaluator:
    """Evaluates models on ``blocks`` (``[N, L + 1]`` held-out token blocks) with the run's teacher and KD."""

    def __init__(self, accelerator, blocks: torch.Tensor, *, batch_size: int, chunk_size: int,
                 teacher: TeacherSide | None, objective: Objective, student_vocab: int):  # fmt: skip
        self.accelerator, self.blocks = accelerator, blocks
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.teacher, self.objective, self.student_vocab = teacher, objective, student_vocab
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device

    def _batches(self, blocks: torch.Tensor | None = None):
        """This rank's share of the blocks, ``batch_size`` at a time."""
        rows = (self.blocks if blocks is None else blocks)[self.rank :: self.world]
        for start in range(0, len(rows), self.batch_size):
            yield rows[start : start + self.batch_size]

    def _reduce(self, totals: EvalTotals) -> EvalTotals:
        if self.world == 1:
            return totals
        fields = (totals.tokens, totals.ce_sum, totals.kd_sum, totals.agree, totals.compared)
        packed = torch.tensor(fields, device=self.device, dtype=torch.float64)
        tokens, ce_sum, kd_sum, agree, compared = self.accelerator.reduce(packed, reduction="sum").tolist()
        return EvalTotals(int(tokens), ce_sum, kd_sum, int(agree), int(compared))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, with_teacher: bool) -> EvalTotals:
        """CE (and, ``with_teacher``, KD and agreement) sums of ``model`` over the held-out blocks."""
        was_training = model.training
        model.eval()
        totals = EvalTotals()
        with_teacher = with_teacher and self.teacher is not None and self.teacher.live
        model_device = next(model.parameters()).device  # the teacher sits on its own GPU under split
        for batch in self._batches():
            input_ids, labels = data.next_token_batch(batch.to(self.device))
            with self.accelerator.autocast():
                logits = model(input_ids=input_ids.to(model_device)).logits.to(self.device)
            logits = match_vocab(logits, self.student_vocab)
            ce_sum = float(losses.ce_loss(logits, labels, num_items=1, chunk_size=self.chunk_size))
            kd_sum, agree, compared = 0.0, 0, 0
            if with_teacher:
                kd_sum, agree, compared = self._against_teacher(batch, input_ids, logits, labels)
            totals.add(losses.valid_count(labels), ce_sum, kd_sum, agree, compared)
        model.train(was_training)
        return self._reduce(totals)

    def _against_teacher(self, batch, input_ids, logits, labels) -> tuple[float, int, int]:
        """KD sum, agreeing positions and compared positions (0 = every valid one) of one batch."""
        if self.teacher.cross is not None:
            teacher_logits, aligned = self.teacher.aligned_logits(self.teacher.cross.align(batch))
            aligned = aligned.to(self.device)
            teacher = TeacherOutputs(logits=teacher_logits.to(self.device), aligned=aligned)
            kd_sum = float(self.objective.kd(logits, teacher, labels, 1)[0])
            vocab_map = self.teacher.cross.vocab_map
            agree, compared = alignment.top1_agreement(logits, teacher.logits, aligned, labels, vocab_map)
            return kd_sum, agree, compared
        teacher = TeacherOutputs(logits=self.teacher.logits(input_ids))
        kd_sum = float(self.objective.kd(logits, teacher, labels, 1)[0])
        valid = labels != losses.IGNORE_INDEX
        return kd_sum, int(((logits.argmax(-1) == teacher.logits.argmax(-1)) & valid).sum()), 0

    @torch.no_grad()
    def teacher_perplexity(self) -> float:
        """The teacher's held-out perplexity. Across vocabularies it is per TEACHER token (the teacher reads
        the eval blocks in its own tokens), so it is not comparable with the student's number."""
        if self.teacher is None or not self.teacher.live:
            return float("nan")
        if self.teacher.cross is None:
            return self.evaluate(self.teacher.model, with_teacher=False).ppl
        totals = EvalTotals()
        for batch in self._batches():
            aligned = self.teacher.cross.align(batch).to(self.device)
            logits = self.teacher.logits(aligned.teacher_ids)
            ce = losses.ce_loss(logits, aligned.teacher_labels, num_items=1, chunk_size=self.chunk_size)
            totals.add(losses.valid_count(aligned.teacher_labels), float(ce))
        return self._reduce(totals).ppl

    @torch.no_grad()
    def measure_alignment(self, max_blocks: int = 32) -> dict:
        """Alignment diagnostics on held-out blocks (this process's view, no reduction): the fraction of student
        positions aligned and the teacher probability mass that maps onto the student vocabulary."""
        cross, stats = self.teacher.cross, alignment.AlignmentStats()
        blocks = self.blocks[:max_blocks]
        for start in range(0, len(blocks), self.batch_size):
            batch = blocks[start : start + self.batch_size]
            _, labels = data.next_token_batch(batch.to(self.device))
            logits, aligned = self.teacher.aligned_logits(cross.align(batch))
            logits, aligned = logits.to(self.device), aligned.to(self.device)
            stats += alignment.alignment_stats(
                logits, aligned, labels, cross.vocab_map, self.objective.options.temperature, chunk_size=self.chunk_size
            )
        vocab_map, cfg = cross.vocab_map, self.objective.config
        return {
            "teacher_tokenizer": cfg.teacher_tokenizer or cfg.teacher_model,
            "student_tokenizer": cfg.tokenizer or cfg.student_model,
            "loss": cfg.cross_tokenizer_loss,
            "teacher_vocab": vocab_map.teacher_vocab,
            "student_vocab": vocab_map.student_vocab,
            "shared_tokens": int(vocab_map.shared.numel()),
            "student_vocab_shared": vocab_map.shared_fraction,
            "eval_blocks_measured": len(blocks),
            **stats.to_dict(),
        }

    def report_alignment(self, path: Path) -> dict:
        """Log the held-out alignment diagnostics and start ``alignment.json`` (at ``path``) with them."""
        from kagglekd.rundir import write_json

        report = self.measure_alignment()
        log.info(
            "cross-tokenizer alignment on %d held-out blocks: %.1f %% of student positions aligned, %.1f %% of "
            "the teacher's probability on tokens the student can spell (%d shared tokens, %.1f %% of its vocab)",
            report["eval_blocks_measured"], 100 * report["aligned_fraction"], 100 * report["teacher_mass_mapped"],
            report["shared_tokens"], 100 * report["student_vocab_shared"],
        )  # fmt: skip
        write_json(path, {"setup": report})
        return report


RUN_TEACHER = ""  # ``load_finished_run(teacher=RUN_TEACHER)``: the run's own ``teacher_model``


def load_finished_run(run_dir: str | Path, teacher: str | None = None):
    """A finished run's ``Distiller``, set up for evaluation: its teacher (with the SAR-adapted routers when the
    run trained them), tokenizer and held-out blocks. ``evaluate --run`` and ``report`` (03_evaluate) load runs
    here, so every evaluation after training uses the same teacher; ``distiller.teacher_side.describe()`` says
    which routers and routing that is.

    ``teacher``: None loads what the run's config loads (no teacher for a CE-only or teacher-cache run);
    ``RUN_TEACHER`` ("") loads the run's ``teacher_model`` even then, and any other string (hub id, local dir,
    preset) loads that teacher instead, so the student's top-1 agreement and KD can be reported
    (``with_eval_teacher``)."""
    from kagglekd.config import DistillConfig
    from kagglekd.errors import ConfigError
    from kagglekd.rundir import CONFIG_FILE
    from kagglekd.trainer import Distiller

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"{run_dir / CONFIG_FILE} not found: expected a run directory written by `train`.")
    config = DistillConfig.from_json(run_dir / CONFIG_FILE)
    if teacher is not None:
        config = with_eval_teacher(config, teacher)
    distiller = Distiller(config, output_dir=run_dir, write_run_dir=False).setup()
    distiller.teacher_side.use_adapted_routers(run_dir)
    return distiller


def with_eval_teacher(config, teacher: str = RUN_TEACHER):
    """``config`` changed so that ``Distiller.setup`` loads a live teacher to evaluate against: ``teacher``
    (``RUN_TEACHER``: the config's own ``teacher_model``), no teacher cache, and ``alpha_kd`` 1.0 where the run
    had none. Only the evaluation reads the result (``alpha_kd`` weights training; the eval's KD value and
    top-1 agreement do not depend on it). A different teacher than the run's uses its own tokenizer."""
    name = teacher or config.teacher_model
    tokenizer = config.teacher_tokenizer if name == config.teacher_model else None
    alpha_kd = config.alpha_kd if config.alpha_kd > 0 else 1.0
    return config.replace(teacher_model=name, teacher_tokenizer=tokenizer, teacher_cache=None, alpha_kd=alpha_kd)


def evaluate_run(run_dir: Path, teacher: str | None = None) -> list[dict]:
    """Evaluate ``run_dir/student`` (and the teacher, when one is loaded: see ``load_finished_run`` for
    ``teacher``) on the run's held-out blocks; write ``eval.json`` (strict JSON: a value not measured is null)."""
    from transformers import AutoModelForCausalLM

    from kagglekd.errors import ConfigError
    from kagglekd.rundir import CONFIG_FILE, STUDENT_DIR, write_json

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists() or not (run_dir / STUDENT_DIR / "config.json").exists():
        raise ConfigError(f"--run {run_dir}: expected a finished run directory with config.json and student/.")
    distiller = load_finished_run(run_dir, teacher=teacher)  # a SAR run's teacher gets its adapted routers here
    student = AutoModelForCausalLM.from_pretrained(run_dir / STUDENT_DIR).to(distiller.device)
    metrics = distiller.evaluate(model=student, with_ema=False)
    row = {"model": "student", "eval_ppl": metrics["ppl"], "top1_agreement": metrics.get("top1_agreement")}
    rows = [{**row, "eval_tokens": metrics["tokens"]}]
    if distiller.teacher is not None:
        teacher_row = {
            # across vocabularies the teacher's perplexity is per teacher token: not comparable
            "model": "teacher (ppl per teacher token)" if distiller.cross is not None else "teacher",
            "eval_ppl": distiller.teacher_perplexity(),
            "top1_agreement": 1.0,
            "eval_tokens": metrics["tokens"],
            "teacher_model": distiller.config.teacher_model,
        }
        rows.insert(0, {**teacher_row, **distiller.teacher_side.describe()})  # which routers and routing
    write_json(run_dir / "eval.json", rows)
    return rows
