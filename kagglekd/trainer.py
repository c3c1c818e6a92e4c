"""Distiller: setup and the loop (window -> step -> after-step) over the parts.

One optimizer step = one accumulation window of micro-batches. For each micro-batch the teacher side gives its
outputs (``teacher.py``), the student runs, the objective turns both into components and a total
(``objective.py``), and the total is backpropagated. Every component is a sum over valid target tokens divided by
the window's valid-target count (summed over ranks), so bs 4 x GA 1 and bs 1 x GA 4 give the same gradients.
A non-finite loss or gradient skips the update (checked before ``optimizer.step()``) but still counts as a step:
the data position and the LR plan advance, so the LR logged is always ``plan.lr_at(step)``. Evaluation is
``evaluation.py``, checkpoints ``checkpoint.py``, the run dir's files ``rundir.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kagglekd import alignment, checkpoint, cputhreads, data, losses, models, rules, rundir, stopping
from kagglekd import env as kit_env
from kagglekd import teacher as teacher_side
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError, KaggleKDError
from kagglekd.evaluation import Evaluator
from kagglekd.metrics import HistoryWriter, progress_postfix
from kagglekd.objective import COMPONENTS, Objective
from kagglekd.onpolicy import OnPolicy
from kagglekd.schedule import SchedulePlan, batches_per_epoch, build_scheduler, plan_schedule
from kagglekd.teacher import TeacherOutputs, TeacherSide

log = logging.getLogger(__name__)


class OutOfMemory(KaggleKDError):
    """CUDA ran out of memory; the message carries the planner's estimate and changes that would fit."""


class TrainingStopped(KaggleKDError):
    """The run stopped itself (too many non-finite steps); ``report`` is what failure_report.json holds."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint and restored on resume."""

    step: int = 0  # optimizer steps done
    best_ppl: float = math.inf
    evals_without_improvement: int = 0
    skipped: int = 0  # steps whose update was skipped (non-finite loss or gradient), in total
    consecutive_skips: int = 0
    stopped_early: bool = False
    last_eval: float | None = None  # the previous eval perplexity (frozen-eval detector)
    # cross-tokenizer: training positions seen, aligned, and teacher mass mapped (kept across resumes)
    alignment: alignment.AlignmentStats = field(default_factory=alignment.AlignmentStats)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # the alignment stats become a dict too

    def finish_step(self, step: int, skipped: bool) -> int:
        """Count ``step`` as done (skipped or not); returns the total of skipped steps."""
        self.skipped += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        self.step = step + 1
        return self.skipped

    def record_eval(self, ppl: float, min_delta: float, patience: int | None, judge: bool) -> bool:
        """Track the best perplexity; True when early stopping triggers now. ``judge`` False (still warming
        up) never counts an eval against the run."""
        if ppl < self.best_ppl - min_delta:
            self.best_ppl, self.evals_without_improvement = ppl, 0
            return False
        if not judge:
            return False
        self.evals_without_improvement += 1
        self.stopped_early = patience is not None and self.evals_without_improvement >= patience
        return self.stopped_early

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in values.items() if k in known and k != "alignment"})
        state.alignment = alignment.AlignmentStats(**values.get("alignment", {}))
        if state.best_ppl is None:  # strict JSON writes a not-yet-evaluated run's inf as null
            state.best_ppl = math.inf
        return state


@dataclass
class Window:
    """The micro-batches of one optimizer step and where they came from."""

    step: int
    epoch: int
    micro_batches: list[torch.Tensor]  # each [b, max_length + 1] token blocks
    block_indices: list[int]
    micro_rows: list[torch.Tensor]  # the train-block index of each micro-batch row
    # on-policy / seq_kd (``onpolicy``): the labels of each generated micro-batch, None for a data block
    micro_labels: list[torch.Tensor | None] | None = None

    def targets(self, index: int) -> torch.Tensor:
        """``[b, S - 1]`` labels of micro-batch ``index``: a generated one's own, else its block's next tokens."""
        labels = self.micro_labels[index] if self.micro_labels is not None else None
        return labels if labels is not None else data.next_token_batch(self.micro_batches[index])[1]


class Distiller:
    """Distils ``config.teacher_model`` into ``config.student_model``.

    ``Distiller(config).train()`` is the whole job; ``setup()`` runs on first use. Callbacks are objects with
    any of ``on_log(metrics)``, ``on_eval(metrics)``, ``on_end(summary)``. The parts: ``teacher_side``
    (``TeacherSide``), ``objective`` (``Objective``), ``evaluator`` (``Evaluator``), ``state`` (``TrainState``).
    """

    def __init__(
        self, config: DistillConfig, callbacks=(), output_dir: str | Path | None = None, write_run_dir: bool = True
    ):
        self.config = config
        self.write_run_dir = write_run_dir
        self.callbacks = list(callbacks)
        self.output_dir = Path(output_dir or kit_env.local_path(config.output_dir))  # off Kaggle: not /kaggle
        self.state = TrainState()
        self._ready = False

    # ---- setup -----------------------------------------------------------------------------------------
    def setup(self) -> Distiller:
        if self._ready:
            return self
        kit_env.quiet_library_bars()
        self._setup_accelerator()
        # Rank 0 builds caches (tiny models, corpus, tokenised data) first; the others then read them.
        with self.accelerator.main_process_first():
            self._setup_models()
            self._setup_data()
        self.plan: SchedulePlan = plan_schedule(self.config, self.batches_per_epoch)
        self._setup_parts()
        self._setup_optimizer()
        self._setup_run_dir()
        self._ready = True
        if self.cross is not None and self.is_main and self.write_run_dir:  # held-out measure + block coverage
            alignment.report_alignment(self.evaluator, self.output_dir / rundir.ALIGNMENT_FILE, self.alignment_coverage)
        return self

    def _setup_accelerator(self) -> None:
        self.accelerator, self.precision = make_accelerator(self.config)
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        # every rule the config and the launch decide, before anything loads
        rules.raise_errors(rules.check(self.config, rules.Facts(processes=self.world)))
        self.strategy = resolve_strategy(self.config, self.world)
        self.teacher_device = self.device
        if self.strategy == "split":
            self.teacher_device = split_devices(self.device)
            log.info("strategy split: student on %s, teacher on %s", self.device, self.teacher_device)

    def _setup_models(self) -> None:
        cfg = self.config
        self.tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.student_model)
        self.teacher, self.cross, self.vocab_relation = teacher_side.load(
            cfg, self.tokenizer, device=self.teacher_device, dtype=self.precision["teacher_dtype"],
            student_device=self.device,
        )  # fmt: skip
        torch.manual_seed(cfg.seed)
        self.student = models.load_model(
            cfg.student_model, role="student", device=self.device, dtype=torch.float32,
            vocab_size=len(self.tokenizer), seed=cfg.seed,
        )  # fmt: skip
        if cfg.gradient_checkpointing:
            models.enable_gradient_checkpointing(self.student)
        self.student.train()
        self.student_vocab = self.student.get_output_embeddings().weight.shape[0]
        rules.raise_errors(rules.check(cfg, model_facts(self.teacher, self.student, self.vocab_relation, self.world)))

    def _setup_data(self) -> None:
        cfg = self.config
        texts = data.load_texts(cfg.dataset, text_column=cfg.text_column, dataset_config=cfg.dataset_config,
                                split=cfg.dataset_split, subset_size=cfg.dataset_subset_size)  # fmt: skip
        self.blocks = data.build_blocks(texts, self.tokenizer, max_length=cfg.max_length, text_column=cfg.text_column,
                                        eval_fraction=cfg.eval_fraction, seed=cfg.split_seed,
                                        document_separator=cfg.document_separator)  # fmt: skip
        rules.raise_errors(rules.check(cfg, rules.Facts(processes=self.world, train_blocks=len(self.blocks.train))))
        self.batches_per_epoch = batches_per_epoch(len(self.blocks.train), cfg.batch_size, self.world)
        self.alignment_coverage = alignment.align_run_blocks(self.cross, self.blocks)  # steps look blocks up
        cache = None
        if cfg.teacher_cache is not None:
            from kagglekd.teacher_cache import open_cache

            cache = open_cache(kit_env.local_path(cfg.teacher_cache), self.cache_manifest())
        self.teacher_cache = cache
        self.eval_blocks = self.blocks.eval if cfg.eval_max_blocks is None else self.blocks.eval[: cfg.eval_max_blocks]

    def cache_manifest(self) -> dict:
        """What a teacher cache must have been built for to serve this run."""
        from kagglekd.teacher_cache import cache_manifest

        return cache_manifest(self.config, self.tokenizer)

    def _setup_parts(self) -> None:
        """The teacher side (MoE options, SAR), the objective (transfer layers, projections) and the evaluator."""
        cfg = self.config
        self.teacher_side = TeacherSide(
            cfg, self.teacher, cross=self.cross, cache=self.teacher_cache, device=self.teacher_device,
            student_device=self.device, student_vocab=self.student_vocab, autocast=self.accelerator.autocast,
        )  # fmt: skip
        self.teacher_side.prepare_moe()
        self.onpolicy = OnPolicy(cfg, tokenizer=self.tokenizer, teacher_side=self.teacher_side,
                                 student_vocab=self.student_vocab, rank=self.rank)  # fmt: skip
        self.objective = Objective(cfg, vocab_map=self.cross.vocab_map if self.cross is not None else None)
        teacher_config = self.teacher.config if self.teacher is not None else None
        self.objective.setup_transfer(self.student.config, teacher_config, self.device)
        self.teacher_side.hidden_wanted = bool(self.objective.feature_pairs)
        self.teacher_side.attention_layers = [t for _, t in self.objective.attention_pairs]
        self.evaluator = Evaluator(
            self.accelerator, self.eval_blocks, batch_size=cfg.batch_size, chunk_size=cfg.loss_chunk_size,
            teacher=self.teacher_side, objective=self.objective, student_vocab=self.student_vocab,
        )  # fmt: skip

    @property
    def projections(self) -> torch.nn.ModuleList | None:
        return self.objective.projections

    def _extra_params(self) -> list[torch.nn.Parameter]:
        """Trained parameters outside the (DDP-wrapped) student: projections and SAR routers."""
        extra = list(self.projections.parameters()) if self.projections is not None else []
        return extra + list(self.teacher_side.router_params)

    def _setup_optimizer(self) -> None:
        optimizer = build_optimizer(self.config, self.student, self.projections, self.teacher_side.router_params)
        self.student, self.optimizer = self.accelerator.prepare(self.student, optimizer)
        # Not prepared: accelerate would step a prepared scheduler once per process, bending the plan.
        self.scheduler = build_scheduler(self.optimizer.optimizer, self.plan)
        self.ema = build_ema(self.config, self.accelerator.unwrap_model(self.student), self.plan.optimizer_steps)

    def _setup_run_dir(self) -> None:
        extra = ["teacher_top_k"] if self.config.expert_top_k_start is not None else []
        self.history = HistoryWriter(self.output_dir / rundir.HISTORY_FILE, extra + self.onpolicy.history_columns)
        if not self.is_main or not self.write_run_dir:
            return
        rundir.prepare(self.output_dir)
        self.config.replace(stop_after=None).to_json(self.output_dir / rundir.CONFIG_FILE)  # the plan, to resume
        rundir.write_json(self.output_dir / rundir.PLAN_FILE, self.plan.to_dict())
        rundir.write_json(self.output_dir / rundir.DATA_FILE, self.blocks.info)

    # ---- the step --------------------------------------------------------------------------------------
    def _train_step(self, window: Window, apply: bool = True) -> dict:
        """One optimizer step over one accumulation window. ``apply=False`` stops after backward (gradients left
        in ``.grad``; no optimizer or scheduler step, no history row) and returns the window's sums."""
        started = time.perf_counter()
        lr = self.optimizer.optimizer.param_groups[0]["lr"]
        teacher_top_k = self.teacher_side.expert_schedule(window.step, self.plan.optimizer_steps)
        window = self.onpolicy.prepare(window, self.accelerator.unwrap_model(self.student), self.accelerator.autocast)
        num_items = self._window_targets(window)
        # Sums stay on the device until the window ends: no host sync between micro-batches, so under split the
        # teacher's prefetched forward (its own GPU) runs while the student's backward runs on the other.
        sums = torch.zeros(1 + len(COMPONENTS), dtype=torch.float64, device=self.device)  # loss, *COMPONENTS
        batches, prefetch = window.micro_batches, self.strategy == "split"
        upcoming = self.teacher_side.window_outputs(window, 0, num_items) if prefetch else None
        for index, micro_batch in enumerate(batches):
            last = index == len(batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.student):
                teacher = upcoming if prefetch else self.teacher_side.window_outputs(window, index, num_items)
                if prefetch and not last:  # queued on the teacher's GPU before the student's backward
                    upcoming = self.teacher_side.window_outputs(window, index + 1, num_items)
                loss, parts = self._loss_step(micro_batch, teacher, num_items, window.targets(index))
                # DDP averages gradients over ranks; the loss is already a global mean, so undo that average.
                self.accelerator.backward(loss * self.world)
            zero = sums.new_zeros(())
            sums += torch.stack([loss.detach().double(), *(parts.get(n, zero).double() for n in COMPONENTS)])
        sums = window_sums(self, sums, num_items)
        if not apply:
            return sums
        grad_norm, skipped = self._optimizer_step(sums["loss"])
        with warnings.catch_warnings():
            # a skipped first update means no optimizer.step() before this; the plan still advances by design
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        return self._record_step(window, lr, sums, grad_norm, skipped, time.perf_counter() - started, teacher_top_k)

    def _window_targets(self, window: Window) -> int:
        """Valid targets of the whole window, summed over ranks: the one count every loss divides by."""
        local = sum(losses.valid_count(window.targets(index)) for index in range(len(window.micro_batches)))
        if self.world == 1:
            return local
        counts = torch.tensor([local], device=self.device, dtype=torch.long)
        return int(self.accelerator.reduce(counts, reduction="sum").item())

    def _loss_step(self, micro_batch: torch.Tensor, teacher: TeacherOutputs | None, num_items: int, labels=None):
        """``(total, detached components)`` of one micro-batch, already divided by the window's target count;
        ``labels`` (a generated micro-batch's) replace the block's next tokens."""
        from kagglekd.attention import capture_attention

        cfg, objective = self.config, self.objective
        input_ids, block_labels = data.next_token_batch(micro_batch.to(self.device))
        labels = block_labels if labels is None else labels.to(self.device)
        layers = [s for s, _ in objective.attention_pairs]
        forward = {"output_hidden_states": bool(objective.feature_pairs) or cfg.fused_kd}
        if cfg.fused_kd:
            forward["logits_to_keep"] = 1  # the fused loss computes the logits chunk by chunk itself
        student = self.accelerator.unwrap_model(self.student)
        with self.accelerator.autocast(), capture_attention(student, layers) if layers else nullcontext() as capture:
            result = self.student(input_ids=input_ids, **forward)
        parts, fused_total, stats = {}, None, None
        if cfg.fused_kd:
            head = student.get_output_embeddings()
            fused_total, fused, stats = objective.fused(result.hidden_states[-1], head, teacher, labels, num_items)
            parts.update({name: value for name, value in fused.items() if objective.alpha(name) > 0})
        elif cfg.alpha_ce > 0:
            parts["ce"] = losses.ce_loss(result.logits, labels, num_items=num_items, chunk_size=cfg.loss_chunk_size)
        if teacher is not None:
            if cfg.alpha_kd > 0 and not cfg.fused_kd:
                parts["kd"], stats = objective.kd(result.logits, teacher, labels, num_items)
            maps = capture.maps() if layers else None
            parts.update(objective.transfer_terms(result.hidden_states, maps, teacher, labels, num_items))
            if teacher.router is not None:
                parts["router"] = teacher.router
        if stats is not None:
            self.state.alignment += stats
        return objective.total(parts, fused_total), {name: value.detach() for name, value in parts.items()}

    def _optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Clip, check, step; returns ``(grad_norm, skipped)``. The check comes BEFORE the step: closed-form
        gradients can be finite while the loss is not, and such an update must not be applied."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        params = list(self.student.parameters()) + self._extra_params()
        grad_norm = float(self.accelerator.clip_grad_norm_(params, max_norm))
        scaler = self.accelerator.scaler
        if not math.isfinite(loss) or (not math.isfinite(grad_norm) and scaler is None):
            if scaler is not None:
                scaler.update()  # closes the unscale_ done by clipping; an inf gradient also lowers the scale
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, True
        # Under fp16 the GradScaler skips an update with non-finite gradients itself (and lowers its scale).
        self.optimizer.step()
        skipped = scaler is not None and self.accelerator.optimizer_step_was_skipped
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped and self.ema is not None:
            self.ema.update_parameters(self.accelerator.unwrap_model(self.student))
        return grad_norm, bool(skipped)

    def _record_step(self, window, lr, sums, grad_norm, skipped, elapsed, teacher_top_k) -> dict:
        """The step's history row; counts skips and moves the state to the next step."""
        row = {
            "step": window.step,
            "epoch": window.step / self.plan.steps_per_epoch,
            "lr": lr,
            "loss": sums["loss"],
            "grad_norm": grad_norm,
            "tokens": sums["tokens"],
            "tokens_per_s": sums["tokens"] / elapsed if elapsed > 0 else float("nan"),
            **self.objective.columns(sums),
            **self.onpolicy.columns(elapsed),
        }
        if skipped:
            log.warning("step %d skipped: non-finite loss %.4g or grad norm %.4g", window.step, sums["loss"], grad_norm)
        else:
            self.objective.update_balance(sums)
        row["skipped"] = self.state.finish_step(window.step, skipped)
        if teacher_top_k is not None:
            row["teacher_top_k"] = teacher_top_k
        return row

    # ---- data order ------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.blocks.train), generator=generator)

    def _windows(self, start_step: int):
        """Windows from ``start_step`` on; the position in the data is a pure function of the step."""
        ga, global_batch = self.config.gradient_accumulation_steps, self.config.batch_size * self.world
        for step in range(start_step, self.plan.optimizer_steps):
            epoch, step_in_epoch = divmod(step, self.plan.steps_per_epoch)
            order = self._epoch_order(epoch)
            batches, indices, micro_rows = [], [], []
            for batch_index in range(step_in_epoch * ga, min((step_in_epoch + 1) * ga, self.batches_per_epoch)):
                rows = order[batch_index * global_batch : (batch_index + 1) * global_batch][self.rank :: self.world]
                if len(rows):
                    batches.append(self.blocks.train[rows])
                    micro_rows.append(rows)
                    indices.extend(int(r) for r in rows)
            yield Window(step=step, epoch=epoch, micro_batches=batches, block_indices=indices, micro_rows=micro_rows)

    # ---- train -----------------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> dict:
        """Run (or continue) the plan; ``config.stop_after`` pauses it, ``max_steps`` cuts it (``stopping``)."""
        self.setup()
        self._maybe_resume()
        stop_at = stopping.stop_step(self.plan.optimizer_steps, self.config.stop_after, max_steps)
        start = time.perf_counter()
        bar = kit_env.progress_bar()(total=stop_at, initial=self.state.step, desc="distil", unit="step",
                                     disable=not self.is_main, dynamic_ncols=True)  # fmt: skip
        for window in self._windows(self.state.step):
            if window.step >= stop_at or self.state.stopped_early:
                break
            try:
                row = self._train_step(window)
            except torch.cuda.OutOfMemoryError as err:
                raise explain_oom(self, err) from err
            bar.update(1)
            bar.set_postfix(progress_postfix(row))
            self._after_step(row, window)
        bar.close()
        return self._finish(time.perf_counter() - start)

    def _after_step(self, row: dict, window: Window) -> None:
        cfg, state = self.config, self.state
        if self.is_main:
            self.history.append(row)
            if state.step % cfg.log_steps == 0:
                self._emit("on_log", row)
        if state.consecutive_skips >= cfg.max_consecutive_skips:
            self._stop_non_finite(row, window)
        last = state.step == self.plan.optimizer_steps
        if (cfg.eval_steps and state.step % cfg.eval_steps == 0) or last:
            self._eval_and_record(row)
        # A checkpoint taken inside a run of skipped steps would not be "the last good one".
        if cfg.save_steps and state.step % cfg.save_steps == 0 and not last and not state.consecutive_skips:
            self.save_checkpoint()

    def _eval_and_record(self, row: dict) -> None:
        metrics = self.evaluate()
        values = {
            "eval_ppl": metrics["ppl"],
            "eval_kd": metrics.get("kd", float("nan")),
            "eval_top1_agreement": metrics.get("top1_agreement", float("nan")),
        }
        if "ppl_ema" in metrics:
            values["eval_ppl_ema"] = metrics["ppl_ema"]
        previous = self.state.last_eval
        if previous is not None and row["lr"] > 0 and abs(previous - metrics["ppl"]) <= 1e-7 * max(1.0, previous):
            log.warning(
                "eval perplexity %.6f is identical to the previous eval while LR = %.3g: the weights being "
                "evaluated are not the ones training (frozen copy?) or the eval data is wrong.",
                metrics["ppl"], row["lr"],
            )  # fmt: skip
        self.state.last_eval = metrics["ppl"]
        if self.is_main:
            self.history.update_last(values)
            self._emit("on_eval", {"step": row["step"], **values})
        cfg = self.config
        if self.state.record_eval(metrics["ppl"], cfg.early_stopping_min_delta, cfg.early_stopping_patience,
                                  judge=self.state.step > self.plan.warmup_steps):  # fmt: skip
            log.info("early stopping: %d evals without improving on perplexity %.4f",
                     cfg.early_stopping_patience, self.state.best_ppl)  # fmt: skip

    def _stop_non_finite(self, row: dict, window: Window) -> None:
        report = stopping.failure_report(self.state, row, window, self.latest_checkpoint())
        path = self.output_dir / rundir.FAILURE_FILE
        if self.is_main:
            rundir.write_json(path, report)
        raise TrainingStopped(f"training stopped at step {window.step}: {report['reason']}; see {path}", report)

    def _finish(self, wall_time: float) -> dict:
        state, resume = self.state, pause_session(self)  # resume: the command that continues a paused session
        if self.is_main and (state.step == self.plan.optimizer_steps or state.stopped_early):
            self.save_student(self.output_dir / rundir.STUDENT_DIR)
            if self.teacher_side.router_params:
                self.save_teacher_routers(self.output_dir / rundir.ROUTERS_DIR)
        summary = stopping.summarise(state, self.plan.optimizer_steps, self.history.rows, wall_time, resume)
        if self.cross is not None:
            summary["alignment"] = state.alignment.to_dict()  # this process's training positions
            if self.is_main and self.write_run_dir:
                rundir.merge_json(self.output_dir / rundir.ALIGNMENT_FILE, "training", summary["alignment"])
        if self.is_main:
            rundir.write_json(self.output_dir / rundir.SUMMARY_FILE, summary)
            self._emit("on_end", summary)
        return summary

    # ---- eval ------------------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module | None = None, with_ema: bool = True) -> dict:
        """Perplexity, KD loss and top-1 agreement of ``model`` (default: the student now training)."""
        self.setup()
        model = model or self.accelerator.unwrap_model(self.student)
        totals = self.evaluator.evaluate(model, with_teacher=True)
        out = {"ppl": totals.ppl, "tokens": totals.tokens}
        if self.teacher is not None:
            out.update(kd=totals.kd, top1_agreement=totals.top1_agreement)
        if with_ema and self.ema is not None:
            out["ppl_ema"] = self.evaluator.evaluate(self.ema.module, with_teacher=False).ppl
        return out

    def teacher_perplexity(self) -> float:
        """The teacher's held-out perplexity (per teacher token across vocabularies)."""
        return self.setup().evaluator.teacher_perplexity()

    def measure_alignment(self, max_blocks: int = 32) -> dict:
        """Cross-tokenizer alignment diagnostics on held-out blocks (see ``Evaluator.measure_alignment``)."""
        return self.setup().evaluator.measure_alignment(max_blocks)

    # ---- checkpoints -----------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / rundir.CHECKPOINTS_DIR

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.latest_checkpoint(self.checkpoint_dir)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N/ with the train state, history and every part's state."""
        extra = {"scheduler": self.scheduler.state_dict(), "rng_python": random.getstate(),
                 "rng_numpy": np.random.get_state(), **self.objective.state_dict(),
                 **self.teacher_side.state_dict()}  # fmt: skip
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        state = {**self.state.to_dict(), "balance": self.objective.balance, "history": self.history.rows,
                 "plan_steps": self.plan.optimizer_steps}  # fmt: skip
        return checkpoint.save(self.accelerator, self.checkpoint_dir, self.state.step, state, extra,
                               keep=self.config.save_total_limit)  # fmt: skip

    def load_checkpoint(self, path: str | Path) -> None:
        state, extra = checkpoint.load(self.accelerator, path, self.plan.optimizer_steps)
        self.scheduler.load_state_dict(extra["scheduler"])
        random.setstate(extra["rng_python"])
        np.random.set_state(extra["rng_numpy"])
        if self.ema is not None and "ema" in extra:
            self.ema.load_state_dict(extra["ema"])
        self.objective.load_state_dict(extra)
        self.teacher_side.load_state_dict(extra)
        self.objective.balance = dict(state.get("balance", {}))
        self.state = TrainState.from_dict(state)
        if self.is_main:
            self.history.reset(state["history"])

    def _maybe_resume(self) -> None:
        if self.state.step > 0:
            return  # already running in this process
        resume = self.config.resume
        path = self.latest_checkpoint() if resume == "auto" else None if resume == "never" else Path(resume)
        if resume == "never" and self.is_main and self.write_run_dir:
            checkpoint.set_aside(self.checkpoint_dir)  # an older run's checkpoints must not outrank this run's
        if path is not None:
            self.load_checkpoint(path)
        elif self.is_main and (resume != "never" or (self.output_dir / rundir.HISTORY_FILE).exists()):
            self.history.reset([])

    # ---- export ----------------------------------------------------------------------------------------
    def save_student(self, path: str | Path) -> Path:
        """``save_pretrained`` of the student alone (never teacher tensors) plus its tokenizer."""
        return rundir.export_student(self.accelerator.unwrap_model(self.student), self.tokenizer, path)

    def save_teacher_routers(self, path: str | Path) -> Path:
        """The SAR-adapted router weights, in the run dir beside (never inside) student/."""
        return self.teacher_side.save_routers(path)

    def _emit(self, event: str, payload: dict) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(dict(payload))


# ---- helpers ---------------------------------------------------------------------------------------------
def split_devices(student_device: torch.device) -> torch.device:
    """The teacher's device under strategy split: the GPU after the student's. Tests on CPU replace this with
    a stand-in device."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if student_device.type != "cuda" or count < 2:
        raise ConfigError(
            f"strategy split puts the teacher on a second GPU, but {count} GPU(s) are visible. On Kaggle choose "
            "GPU T4 x2, or set strategy single (or auto).",
            field="strategy",
        )
    return torch.device("cuda", (student_device.index or 0) + 1)


def window_sums(distiller: Distiller, sums: torch.Tensor, num_items: int) -> dict:
    """The window's loss and component sums as floats, over all ranks; extra params' grads averaged."""
    if distiller.world > 1:
        # Projections and SAR routers sit outside DDP: average their gradients like DDP does the student's.
        for param in distiller._extra_params():
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad /= distiller.world
        # each rank holds its share of the global mean; the log shows the whole window
        sums = distiller.accelerator.reduce(sums, reduction="sum")
    values = sums.tolist()
    return {"loss": values[0], "tokens": num_items, **dict(zip(COMPONENTS, values[1:]))}


def pause_session(distiller: Distiller) -> str | None:
    """When the session stops at ``config.stop_after`` inside the plan: a checkpoint at this step to resume from
    (unless there is one) and the resume command (logged, returned); else None."""
    state, plan_steps = distiller.state, distiller.plan.optimizer_steps
    if not stopping.paused(state.step, plan_steps, distiller.config.stop_after, state.stopped_early):
        return None
    newest = distiller.latest_checkpoint()
    if newest is None or checkpoint.step_of(newest) != state.step:
        newest = distiller.save_checkpoint()
    hint = stopping.resume_hint(distiller.output_dir, state.step, plan_steps, newest)
    log.warning(hint)
    return hint


def explain_oom(distiller: Distiller, err: Exception) -> OutOfMemory:
    """Turn a CUDA OOM into the planner's estimate plus config changes that fit."""
    from kagglekd import gpus, memory

    cfg = distiller.config
    where = distiller.latest_checkpoint()
    kept = f"the newest checkpoint {where} is intact" if where else "no checkpoint had been written yet"
    try:
        gpu = gpus.resolve(distiller.device)
        teacher_cfg = distiller.teacher.config if distiller.teacher is not None else None
        student_cfg = distiller.accelerator.unwrap_model(distiller.student).config
        plan = memory.plan_memory(cfg, gpu=gpu, teacher_cfg=teacher_cfg, student_cfg=student_cfg)
        fit = memory.largest_fitting(cfg, gpu=gpu, teacher_cfg=teacher_cfg, student_cfg=student_cfg)
        accumulation = math.ceil(cfg.batch_size * cfg.gradient_accumulation_steps / max(fit["batch_size"], 1))
        estimate = (
            f"the planner estimates {plan.summary()} for batch_size {cfg.batch_size} x max_length {cfg.max_length}; "
            f"batch_size {fit['batch_size']} (with gradient_accumulation_steps {accumulation} to keep the effective "
            f"batch) or max_length {fit['max_length']} would fit"
        )
    except Exception as planner_err:  # the estimate is advice; never hide the OOM behind a planner bug
        estimate = f"(memory planner unavailable: {planner_err})"
    top_k = "" if cfg.kd_top_k else "; kd_top_k 256 shrinks the teacher targets"
    return OutOfMemory(
        f"CUDA out of memory at step {distiller.state.step} ({str(err).splitlines()[0]}). {estimate}{top_k}. "
        f"Set these with --set and resume: {kept}."
    )


def build_optimizer(cfg: DistillConfig, student, projections, router_params) -> torch.optim.AdamW:
    """AdamW over the student (no decay on norms and biases), the projections and (SAR) the routers."""
    decay, no_decay = [], []
    for name, param in student.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if projections is not None:
        groups.append({"params": list(projections.parameters()), "weight_decay": 0.0})
    if router_params:
        groups.append({"params": list(router_params), "weight_decay": 0.0, "lr": cfg.router_lr})
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))


def build_ema(cfg: DistillConfig, student: torch.nn.Module, steps: int):
    """``torch.optim.swa_utils`` EMA of the student, or None; warns when the decay is too slow for the run."""
    if cfg.ema_decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    horizon = 1.0 / (1.0 - cfg.ema_decay)
    if steps < 3 * horizon:
        log.warning(
            "ema_decay %.4g averages over ~%d steps but the run has %d: the EMA weights will still be "
            "mostly the initial ones. Lower ema_decay (e.g. %.3g) or train longer.",
            cfg.ema_decay, horizon, steps, 1 - 3 / max(steps, 3),
        )  # fmt: skip
    return AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def resolve_strategy(cfg: DistillConfig, processes: int) -> str:
    """single, ddp or split: ``cfg.strategy``, or under auto what the launch and the visible GPUs allow."""
    if cfg.strategy != "auto":
        return cfg.strategy
    two_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    return "ddp" if processes > 1 else "split" if two_gpus and cfg.live_teacher else "single"


def make_accelerator(cfg: DistillConfig):
    """``(Accelerator, precision plan)``: fp16 autocast + GradScaler below sm_80, bf16 from sm_80, none on CPU."""
    from accelerate import Accelerator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        cputhreads.configure_cpu_threads(cfg.cpu_threads, device)
    precision = models.precision_for(device)
    if not cfg.use_amp or precision["autocast_dtype"] is None:
        mixed = "no"
    else:
        mixed = "bf16" if precision["autocast_dtype"] == torch.bfloat16 else "fp16"
    return Accelerator(mixed_precision=mixed, cpu=device == "cpu"), precision


def model_facts(teacher, student, vocab_relation: str | None, processes: int) -> rules.Facts:
    """What the model-dependent rules read, from the loaded models' configs and output widths."""
    width = lambda model: model.get_output_embeddings().weight.shape[0] if model is not None else None
    return rules.Facts(
        teacher=teacher.config if teacher is not None else None, student=student.config,
        vocab_relation=vocab_relation, teacher_vocab=width(teacher), student_vocab=width(student),
        processes=processes,
    )  # fmt: skip
