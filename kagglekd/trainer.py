"""Distiller: setup, train, evaluate, checkpoint and resume, on accelerate.

One optimizer step = one accumulation window of micro-batches. Every loss component is a sum over valid
target tokens divided by the window's valid-target count (summed over ranks), so bs 4 x GA 1 and
bs 1 x GA 4 give the same gradients. A skipped step (non-finite loss or gradient) still counts as a step:
the data position and the LR plan advance, so the LR logged is always ``plan.lr_at(step)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kagglekd import alignment, data, losses, models
from kagglekd import env as kit_env
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError, KaggleKDError
from kagglekd.memory import live_teacher
from kagglekd.metrics import EvalTotals, HistoryWriter
from kagglekd.schedule import SchedulePlan, batches_per_epoch, build_scheduler, plan_schedule

log = logging.getLogger(__name__)

COMPONENTS = ("kd", "ce", "feature", "attention", "router")
STATE_FILE = "trainer_state.json"


class OutOfMemory(KaggleKDError):
    """CUDA ran out of memory; the message carries the planner's estimate and changes that would fit."""


class TrainingStopped(KaggleKDError):
    """The run stopped itself (too many non-finite steps); ``report`` is what failure_report.json holds."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class Window:
    """The micro-batches of one optimizer step and where they came from."""

    step: int
    epoch: int
    micro_batches: list[torch.Tensor]  # each [b, max_length + 1] token blocks
    block_indices: list[int]
    micro_rows: list[torch.Tensor] | None = None  # the train-block index of each micro-batch row


class Distiller:
    """Distils ``config.teacher_model`` into ``config.student_model``.

    ``Distiller(config).train()`` is the whole job; ``setup()`` runs on first use. Callbacks are objects with
    any of ``on_log(metrics)``, ``on_eval(metrics)``, ``on_end(summary)``.
    """

    def __init__(
        self, config: DistillConfig, callbacks=(), output_dir: str | Path | None = None, write_run_dir: bool = True
    ):
        self.config = config
        self.write_run_dir = write_run_dir
        self.callbacks = list(callbacks)
        self.output_dir = Path(output_dir or config.output_dir)
        self._ready = False

    # ---- setup -----------------------------------------------------------------------------------------
    def setup(self) -> Distiller:
        if self._ready:
            return self
        cfg = self.config
        self._check_supported()
        kit_env.quiet_library_bars()
        self._setup_accelerator()
        # Rank 0 builds caches (tiny models, corpus, tokenised data) first; the others then read them.
        with self.accelerator.main_process_first():
            self._setup_models()
            self._setup_data()
        self.plan: SchedulePlan = plan_schedule(cfg, self.batches_per_epoch)
        self._setup_transfer()
        self._setup_optimizer()
        self._setup_run_dir()
        self._ready = True
        if self.cross is not None and self.is_main and self.write_run_dir:
            self._report_alignment()
        return self

    def _check_supported(self) -> None:
        cfg = self.config
        if cfg.cross_tokenizer and cfg.alpha_attention > 0:
            raise ConfigError(
                "alpha_attention compares attention maps position by position, which a teacher reading other "
                "tokens does not have; with cross_tokenizer set alpha_attention 0 (the feature loss works: it uses "
                "span-averaged teacher states).",
                field="alpha_attention",
            )
        if cfg.cross_tokenizer and cfg.fused_kd and cfg.cross_tokenizer_loss == "uld":
            raise ConfigError(
                "cross_tokenizer_loss uld sorts the student's full probability vector, which fused_kd never builds; "
                "set fused_kd false or cross_tokenizer_loss exact.",
                field="cross_tokenizer_loss",
            )
        for name in ("alpha_feature", "alpha_attention"):
            if getattr(cfg, name) > 0 and cfg.alpha_kd == 0:
                raise ConfigError(
                    f"{name} > 0 transfers from the teacher, which a CE-only run (alpha_kd 0) does not "
                    "load; set alpha_kd > 0 or {name} to 0.",
                    field=name,
                )

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = models.precision_for(device)
        if not self.config.use_amp or self.precision["autocast_dtype"] is None:
            mixed = "no"
        else:
            mixed = "bf16" if self.precision["autocast_dtype"] == torch.bfloat16 else "fp16"
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=device == "cpu")
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.strategy = self._resolve_strategy()
        self.teacher_device = self.device
        if self.strategy == "split":
            self.teacher_device = split_devices(self.device)
            log.info("strategy split: student on %s, teacher on %s", self.device, self.teacher_device)

    def _resolve_strategy(self) -> str:
        """single, ddp or split, from ``config.strategy`` and what this process was launched with."""
        cfg = self.config
        if cfg.strategy == "auto":
            if self.world > 1:
                return "ddp"
            two_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
            return "split" if two_gpus and live_teacher(cfg) else "single"
        if cfg.strategy == "ddp" and self.world == 1:
            raise ConfigError(
                "strategy ddp needs one process per GPU, but this is a single process. Launch with `accelerate launch "
                "--multi_gpu --num_processes 2 -m kagglekd train ...` (or kagglekd.launch.notebook_launch from a "
                "notebook), or set strategy auto.",
                field="strategy",
            )
        if cfg.strategy in ("single", "split") and self.world > 1:
            raise ConfigError(
                f"strategy {cfg.strategy} runs in one process, but {self.world} were launched; set strategy ddp "
                "(or auto), or launch one process.",
                field="strategy",
            )
        if cfg.strategy == "split" and not live_teacher(cfg):
            raise ConfigError(
                "strategy split puts the teacher on its own GPU, but this run loads no teacher (CE-only or a teacher "
                "cache); set strategy single.",
                field="strategy",
            )
        return cfg.strategy

    def _setup_models(self) -> None:
        cfg = self.config
        self.tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.student_model)
        vocab = len(self.tokenizer)
        self.teacher = None
        self.cross: alignment.CrossTokenizer | None = None
        if live_teacher(cfg):  # a teacher cache stands in for the teacher; eval then reports no KD/agreement
            teacher_tokenizer = models.load_tokenizer(cfg.teacher_tokenizer or cfg.teacher_model)
            self.vocab_relation = alignment.classify_vocab_pair(teacher_tokenizer, self.tokenizer)
            if self.vocab_relation == "different" and not cfg.cross_tokenizer:
                raise ConfigError(
                    f"teacher {cfg.teacher_model} and student {cfg.student_model} have different vocabularies: "
                    "token id i means a different token on each side, so comparing their logits (or truncating "
                    "the wider one) trains the student on noise. Set cross_tokenizer: true (the teacher reads the "
                    "same text in its own tokens; positions are aligned by character offsets and its distribution "
                    "is mapped onto the student's vocabulary), or use a pair that shares a tokenizer.",
                    field="cross_tokenizer",
                )
            if self.vocab_relation != "different" and cfg.cross_tokenizer:
                log.info(
                    "cross_tokenizer is on but the vocabularies are %s: plain logit KD is used", self.vocab_relation
                )
            self.teacher = models.load_model(
                cfg.teacher_model,
                role="teacher",
                device=self.teacher_device,
                dtype=self.precision["teacher_dtype"],
                vocab_size=vocab,
                seed=cfg.seed,
            )
            if self.vocab_relation == "different":
                teacher_vocab = self.teacher.get_output_embeddings().weight.shape[0]
                self.cross = alignment.CrossTokenizer(teacher_tokenizer, self.tokenizer, teacher_vocab=teacher_vocab)
                # targets are mapped where the student trains (split moves the teacher's outputs there): move the
                # map once, not per chunk
                self.cross.vocab_map = self.cross.vocab_map.to(self.device)
        torch.manual_seed(cfg.seed)
        self.student = models.load_model(
            cfg.student_model,
            role="student",
            device=self.device,
            dtype=torch.float32,
            vocab_size=vocab,
            seed=cfg.seed,
        )
        if cfg.gradient_checkpointing:
            models.enable_gradient_checkpointing(self.student)
        self.student.train()
        self.student_vocab = self.student.get_output_embeddings().weight.shape[0]

    def _setup_data(self) -> None:
        cfg = self.config
        texts = data.load_texts(
            cfg.dataset,
            text_column=cfg.text_column,
            dataset_config=cfg.dataset_config,
            split=cfg.dataset_split,
            subset_size=cfg.dataset_subset_size,
        )
        self.blocks = data.build_blocks(
            texts,
            self.tokenizer,
            max_length=cfg.max_length,
            text_column=cfg.text_column,
            eval_fraction=cfg.eval_fraction,
            seed=cfg.split_seed,
        )
        global_batch = cfg.batch_size * self.world
        self.batches_per_epoch = batches_per_epoch(len(self.blocks.train), cfg.batch_size, self.world)
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"{len(self.blocks.train)} training blocks of {cfg.max_length + 1} tokens do not fill one batch of "
                f"{global_batch} ({cfg.batch_size} per process x {self.world}); lower batch_size or max_length, "
                "or add data.",
                field="batch_size",
            )
        self.teacher_cache = None
        if cfg.teacher_cache is not None:
            from kagglekd.teacher_cache import open_cache

            self.teacher_cache = open_cache(cfg.teacher_cache, self.cache_manifest())
        eval_blocks = self.blocks.eval
        if cfg.eval_max_blocks is not None:
            eval_blocks = eval_blocks[: cfg.eval_max_blocks]
        self.eval_blocks = eval_blocks

    def cache_manifest(self) -> dict:
        """What a teacher cache must have been built for to serve this run."""
        cfg = self.config
        fingerprint = data.dataset_fingerprint(
            source=cfg.dataset,
            tokenizer=self.tokenizer,
            max_length=cfg.max_length,
            eval_fraction=cfg.eval_fraction,
            seed=cfg.split_seed,
            subset_size=cfg.dataset_subset_size,
            text_column=cfg.text_column,
            dataset_config=cfg.dataset_config,
            split=cfg.dataset_split,
        )
        return {
            "teacher_model": cfg.teacher_model,
            "tokenizer_hash": data.tokenizer_fingerprint(self.tokenizer),
            "max_length": cfg.max_length,
            "dataset_fingerprint": fingerprint,
            "k": cfg.kd_top_k,
            "temperature": cfg.temperature,
        }

    def _setup_transfer(self) -> None:
        """MoE options, SAR, feature projections and attention layer maps; all checked before any step."""
        from kagglekd import moe

        cfg = self.config
        self.patterns = cfg.router_patterns or None
        self.projections: torch.nn.ModuleList | None = None
        self.feature_pairs: list[tuple[int, int]] = []
        self.attention_pairs: list[tuple[int, int]] = []
        self.router_params: list[torch.nn.Parameter] = []
        self.initial_routers: dict = {}
        self.balance: dict[str, float] = {}
        self._ka_generator = None
        if cfg.ka_samples:
            self._ka_generator = torch.Generator(device=self.teacher_device).manual_seed(cfg.seed + 17)
        moe_options = [
            name
            for name, on in (
                ("all_experts", cfg.all_experts),
                ("expert_top_k_start", cfg.expert_top_k_start is not None),
                ("sar", cfg.sar),
                ("ka_samples", cfg.ka_samples > 0),
            )
            if on
        ]
        if moe_options and self.teacher is None:
            raise ConfigError(
                f"{moe_options[0]} acts on the teacher, which a CE-only run does not load.", moe_options[0]
            )
        for option in moe_options:
            info = moe.require_moe(self.teacher, option, self.patterns)
        if cfg.expert_top_k_start is not None:
            for name in ("expert_top_k_start", "expert_top_k_end"):
                if getattr(cfg, name) > info.experts_per_layer:
                    raise ConfigError(
                        f"{name} = {getattr(cfg, name)}: the teacher has {info.experts_per_layer} experts per layer.",
                        name,
                    )
        if cfg.all_experts or (cfg.sar and not cfg.ka_samples):
            # SAR runs every expert so the routers' weights over all of them carry the gradient.
            moe.set_experts_per_token(self.teacher, info.experts_per_layer)
        student = self.student
        s_layers, t_layers = student.config.num_hidden_layers, None
        if self.teacher is not None:
            t_layers = self.teacher.config.num_hidden_layers
        if cfg.alpha_feature > 0:
            self.feature_pairs = _layer_pairs(s_layers, t_layers, cfg.feature_layers, "feature_layers")
            hs, ht = student.config.hidden_size, self.teacher.config.hidden_size
            # Projections live beside the student, never inside it: student/ exports none of them.
            torch.manual_seed(cfg.seed)
            self.projections = torch.nn.ModuleList(torch.nn.Linear(hs, ht, bias=False) for _ in self.feature_pairs).to(
                self.device
            )
        if cfg.alpha_attention > 0:
            self.attention_pairs = _layer_pairs(s_layers, t_layers, cfg.attention_layers or 1, "attention_layers")
            for model, field in ((student, "student_model"), (self.teacher, "teacher_model")):
                if model.config.model_type not in moe.ATTENTION_FAMILIES:
                    raise ConfigError(
                        f"attention transfer does not know the attention of {model.config.model_type} models "
                        f"({field}); supported: {', '.join(sorted(moe.ATTENTION_FAMILIES))}. Set alpha_attention 0.",
                        "alpha_attention",
                    )
        if cfg.sar:
            self.router_params = moe.prepare_sar(self.teacher, self.patterns)
            for param in self.router_params:  # router updates need fp32 even when the teacher runs in fp16
                param.data = param.data.float()
            self.initial_routers = moe.router_state_dict(self.teacher, self.patterns)
            if cfg.teacher_gradient_checkpointing:
                moe.enable_teacher_checkpointing(self.teacher)

    def _extra_params(self) -> list[torch.nn.Parameter]:
        """Trained parameters outside the (DDP-wrapped) student: projections and SAR routers."""
        extra = list(self.projections.parameters()) if self.projections is not None else []
        return extra + list(self.router_params)

    def _setup_optimizer(self) -> None:
        cfg = self.config
        decay, no_decay = [], []
        for name, param in self.student.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.projections is not None:
            groups.append({"params": list(self.projections.parameters()), "weight_decay": 0.0})
        if self.router_params:
            groups.append({"params": self.router_params, "weight_decay": 0.0, "lr": cfg.router_lr})
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.student, self.optimizer = self.accelerator.prepare(self.student, optimizer)
        # Not prepared: accelerate would step a prepared scheduler once per process, bending the plan.
        self.scheduler = build_scheduler(self.optimizer.optimizer, self.plan)
        self.ema = None
        if cfg.ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(
                self.accelerator.unwrap_model(self.student),
                multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                use_buffers=True,
            )
            horizon = 1.0 / (1.0 - cfg.ema_decay)
            if self.plan.optimizer_steps < 3 * horizon:
                log.warning(
                    "ema_decay %.4g averages over ~%d steps but the run has %d: the EMA weights will still be "
                    "mostly the initial ones. Lower ema_decay (e.g. %.3g) or train longer.",
                    cfg.ema_decay,
                    horizon,
                    self.plan.optimizer_steps,
                    1 - 3 / max(self.plan.optimizer_steps, 3),
                )

    def _setup_run_dir(self) -> None:
        self.state = {
            "step": 0,
            "best_ppl": math.inf,
            "evals_without_improvement": 0,
            "skipped": 0,
            "consecutive_skips": 0,
            "stopped_early": False,
            "last_eval": None,
            "balance": self.balance,
            # cross-tokenizer: training positions seen, aligned, and teacher mass mapped (kept across resumes)
            "alignment": dataclasses.asdict(alignment.AlignmentStats()),
        }
        extra = ["teacher_top_k"] if self.config.expert_top_k_start is not None else []
        self.history = HistoryWriter(self.output_dir / "history.csv", extra_columns=extra)
        if not self.is_main or not self.write_run_dir:
            return
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"output_dir {self.output_dir} is not writable ({err.strerror or err}). On Kaggle write under "
                "/kaggle/working (kept) or /kaggle/temp (scratch); /kaggle/input is read-only.",
                field="output_dir",
            ) from None
        self.config.to_json(self.output_dir / "config.json")
        _write_json(self.output_dir / "plan.json", self.plan.to_dict())
        _write_json(self.output_dir / "data.json", self.blocks.info)

    # ---- the step --------------------------------------------------------------------------------------
    def _teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T, V_teacher] logits, no grad. Extra teacher rows beyond the shared vocabulary get -inf."""
        # Same autocast as the student: the fp16/bf16 teacher's matmuls meet fp32 parts (SAR routers) safely.
        with torch.no_grad(), self.accelerator.autocast():
            logits = self.teacher(input_ids=input_ids.to(self.teacher_device)).logits
        logits = logits.to(self.device, non_blocking=True)
        return logits if self.cross is not None else _match_vocab(logits, self.student_vocab)

    def _teacher_forward(self, input_ids: torch.Tensor, labels: torch.Tensor, num_items: int, micro_tokens: int):
        """Teacher logits, hidden states, attention maps and (under SAR) the router component."""
        from kagglekd import moe

        cfg = self.config
        want_hidden = bool(self.feature_pairs)
        out = {"hidden": None, "maps": None, "router": None}
        plain = not cfg.sar and not cfg.ka_samples and not want_hidden and not self.attention_pairs
        if plain:
            out["logits"] = self._teacher_logits(input_ids)
            return out
        input_ids, labels = input_ids.to(self.teacher_device), labels.to(self.teacher_device)
        grad = torch.enable_grad() if cfg.sar else torch.no_grad()
        layers = [t for _, t in self.attention_pairs]
        routers = moe.capture_router_logits(self.teacher, self.patterns) if cfg.sar else nullcontext()
        with grad, self.accelerator.autocast(), routers as routed:
            if cfg.ka_samples:
                generator = None if cfg.teacher_gradient_checkpointing else self._ka_generator
                out["logits"] = moe.knowledge_augmentation(
                    self.teacher, input_ids, cfg.ka_samples, mode=cfg.ka_mode, generator=generator
                )
            if want_hidden or layers or not cfg.ka_samples:
                with moe.capture_attention(self.teacher, layers) if layers else nullcontext() as capture:
                    result = self.teacher(input_ids=input_ids, output_hidden_states=want_hidden)
                if "logits" not in out:
                    out["logits"] = result.logits
                out["hidden"] = result.hidden_states if want_hidden else None
                out["maps"] = [m.detach() for m in capture.maps()] if layers else None
            if cfg.sar:
                regs = moe.router_regularisers(self.teacher, self.initial_routers, routed, patterns=self.patterns)
                teacher_ce = losses.ce_loss(out["logits"], labels, num_items=micro_tokens)
                mean = (
                    cfg.sar_anchor_weight * regs["anchor"]
                    + cfg.sar_balance_weight * regs["balance"]
                    + cfg.sar_entropy_weight * regs["entropy"]
                    + cfg.sar_teacher_ce_weight * teacher_ce
                )
                # a per-micro-batch mean, weighted by its share of the window's tokens
                out["router"] = mean * (micro_tokens / num_items)
        if self.strategy == "split":  # everything the losses read moves to the student's GPU
            out["logits"] = out["logits"].to(self.device, non_blocking=True)
            out["router"] = out["router"].to(self.device) if out["router"] is not None else None
            if out["hidden"] is not None:
                out["hidden"] = tuple(h.to(self.device, non_blocking=True) for h in out["hidden"])
            if out["maps"] is not None:
                out["maps"] = [m.to(self.device, non_blocking=True) for m in out["maps"]]
        if self.cross is None:
            out["logits"] = _match_vocab(out["logits"], self.student_vocab)
        return out

    def _teacher_step(self, micro_batch: torch.Tensor, num_items: int):
        """``(teacher outputs, aligned)`` for one micro-batch: the teacher runs on its own device, its outputs
        land on the student's. Across vocabularies it reads the block in its own tokens (``aligned``)."""
        input_ids, labels = data.next_token_batch(micro_batch)
        micro_tokens = max(losses.valid_count(labels), 1)
        aligned = None
        if self.cross is not None:
            # the teacher reads the same text in its own tokens; labels are its own next tokens (SAR's CE)
            aligned = self.cross.align(micro_batch)
            input_ids, labels = aligned.teacher_ids, aligned.teacher_labels
            aligned = aligned.to(self.device)
        return self._teacher_forward(input_ids, labels, num_items, micro_tokens), aligned

    def _loss_step(
        self, micro_batch: torch.Tensor, num_items: int, rows: torch.Tensor | None = None, prefetched=None
    ) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch, already divided by the window's valid-target count. ``prefetched`` is this
        micro-batch's ``_teacher_step``, when it already ran (split)."""
        from kagglekd import moe

        cfg = self.config
        input_ids, labels = data.next_token_batch(micro_batch.to(self.device))
        layers = [s for s, _ in self.attention_pairs]
        forward = {"output_hidden_states": bool(self.feature_pairs) or cfg.fused_kd}
        if cfg.fused_kd:
            forward["logits_to_keep"] = 1  # the fused loss computes the logits chunk by chunk itself
        with self.accelerator.autocast():
            with (
                moe.capture_attention(self.accelerator.unwrap_model(self.student), layers)
                if layers
                else nullcontext() as capture
            ):
                result = self.student(input_ids=input_ids, **forward)
            student_logits = result.logits
        parts: dict[str, torch.Tensor] = {}
        teacher = aligned = None
        if self.teacher is not None:
            teacher, aligned = prefetched or self._teacher_step(micro_batch, num_items)
        elif self.teacher_cache is not None and cfg.alpha_kd > 0:
            teacher = {
                "logits": self.teacher_cache.get(rows, device=self.device),
                "hidden": None,
                "maps": None,
                "router": None,
            }
        fused_total = None
        if cfg.fused_kd:
            fused_total, fused_parts = self._fused_loss(result.hidden_states[-1], teacher, labels, aligned, num_items)
            parts.update({name: value for name, value in fused_parts.items() if self._alpha(name) > 0})
        elif cfg.alpha_ce > 0:
            parts["ce"] = losses.ce_loss(student_logits, labels, num_items=num_items, chunk_size=cfg.loss_chunk_size)
        if teacher is not None:
            if cfg.alpha_kd > 0 and not cfg.fused_kd:
                parts["kd"] = self._kd_loss(student_logits, teacher["logits"], labels, aligned, num_items)
            valid = labels != -100
            if self.feature_pairs:
                per_layer = []
                for (s, t), projection in zip(self.feature_pairs, self.projections):
                    target, where = teacher["hidden"][t + 1].float(), valid
                    if aligned is not None:  # the mean teacher state over each student token's span
                        target, spans = alignment.span_average(target, aligned)
                        where = valid & spans
                    per_layer.append(
                        losses.feature_loss(
                            result.hidden_states[s + 1].float(),
                            target,
                            projection,
                            where,
                            kind=cfg.feature_loss,
                            num_items=num_items,
                        )
                    )
                parts["feature"] = sum(per_layer) / len(per_layer)
            if self.attention_pairs:
                student_maps = capture.maps()
                per_layer = [
                    losses.attention_loss(sm.float(), tm.float(), valid, num_items=num_items)
                    for sm, tm in zip(student_maps, teacher["maps"])
                ]
                parts["attention"] = sum(per_layer) / len(per_layer)
            if teacher["router"] is not None:
                parts["router"] = teacher["router"]
        unfused = {name: value for name, value in parts.items() if fused_total is None or name not in ("kd", "ce")}
        total = sum(self._weight(name) * value for name, value in unfused.items())
        if fused_total is not None:
            total = fused_total + total
        return total, {name: value.detach() for name, value in parts.items()}

    def _kd_loss(self, student_logits, teacher_logits, labels, aligned, num_items) -> torch.Tensor:
        """The KD component: plain logit KD, or across vocabularies on the aligned positions."""
        cfg = self.config
        if aligned is None:
            return losses.kd_loss(
                student_logits,
                teacher_logits,
                labels,
                **self._kd_options(),
                num_items=num_items,
                chunk_size=cfg.loss_chunk_size,
            )
        loss, stats = alignment.cross_kd_loss(
            student_logits,
            teacher_logits,
            aligned,
            labels,
            self.cross.vocab_map,
            mode=cfg.cross_tokenizer_loss,
            **self._kd_options(),
            num_items=num_items,
            chunk_size=cfg.loss_chunk_size,
        )
        if torch.is_grad_enabled():
            self._count_alignment(stats)
        return loss

    def _count_alignment(self, stats: alignment.AlignmentStats) -> None:
        totals = alignment.AlignmentStats(**self.state["alignment"])
        totals += stats
        self.state["alignment"] = dataclasses.asdict(totals)

    def _fused_loss(self, hidden, teacher, labels, aligned, num_items) -> tuple[torch.Tensor, dict]:
        """lm_head + KD + CE in token chunks. Across vocabularies the KD term covers the aligned positions only
        (``kd_mask``); CE covers every valid one."""
        cfg = self.config
        head = self.accelerator.unwrap_model(self.student).get_output_embeddings()
        targets = teacher["logits"] if teacher and cfg.alpha_kd > 0 else None
        kd_mask, top_k = None, cfg.kd_top_k
        if aligned is not None and targets is not None:
            targets, kd_labels, stats = alignment.cross_targets(
                targets, aligned, labels, self.cross.vocab_map, cfg.temperature, cfg.kd_top_k, cfg.loss_chunk_size
            )
            self._count_alignment(stats)
            kd_mask, top_k = kd_labels != -100, None  # the mapped targets already hold the top-k
        return losses.fused_lm_head_kd(
            hidden,
            head.weight,
            targets,
            labels,
            alpha_kd=self._weight("kd"),
            alpha_ce=self._weight("ce"),
            **{**self._kd_options(), "top_k": top_k},
            num_items=num_items,
            chunk_size=cfg.loss_chunk_size,
            lm_head_bias=head.bias,
            kd_mask=kd_mask,
        )

    def _kd_options(self) -> dict:
        """The KD arguments every KD call of a run shares (train, fused and eval)."""
        cfg = self.config
        return {
            "temperature": cfg.temperature,
            "divergence": cfg.divergence,
            "beta": cfg.jsd_beta,
            "skew_alpha": cfg.skew_alpha,
            "top_k": cfg.kd_top_k,
            "scale_t2": cfg.kd_scale_t2,
        }

    def _alpha(self, name: str) -> float:
        cfg = self.config
        return {
            "kd": cfg.alpha_kd,
            "ce": cfg.alpha_ce,
            "feature": cfg.alpha_feature,
            "attention": cfg.alpha_attention,
            "router": 1.0 if cfg.sar else 0.0,
        }[name]

    def _weight(self, name: str) -> float:
        """alpha under ``fixed``; alpha / running magnitude under ``normalized`` (so alphas become shares)."""
        alpha = self._alpha(name)
        if self.config.loss_balance == "fixed" or name not in self.balance:
            return alpha
        return alpha / max(self.balance[name], 1e-8)

    def _update_balance(self, sums: dict) -> None:
        if self.config.loss_balance != "normalized":
            return
        momentum = self.config.balance_momentum
        for name, value in sums.items():
            if name not in COMPONENTS or not math.isfinite(value) or self._alpha(name) == 0:
                continue
            magnitude = abs(value)
            previous = self.balance.get(name)
            self.balance[name] = magnitude if previous is None else momentum * previous + (1 - momentum) * magnitude

    def _window_backward(self, window: Window) -> dict:
        """Forward and backward over one accumulation window; gradients are left in ``.grad``."""
        local = sum(int((mb[:, 1:] != -100).sum()) for mb in window.micro_batches)
        counts = torch.tensor([local], device=self.device, dtype=torch.long)
        num_items = int(self.accelerator.reduce(counts, reduction="sum").item()) if self.world > 1 else local
        # Sums stay on the device until the window ends: no host sync between micro-batches, so under split
        # the teacher's prefetched forward (its own GPU) runs while the student's backward runs on the other.
        sums: dict = {name: 0.0 for name in COMPONENTS}
        loss_sum = 0.0
        prefetch = self.strategy == "split"
        batches = window.micro_batches
        upcoming = self._teacher_step(batches[0], num_items) if prefetch else None
        for index, micro_batch in enumerate(batches):
            last = index == len(batches) - 1
            context = self.accelerator.no_sync(self.student) if not last else nullcontext()
            with context:
                rows = window.micro_rows[index] if window.micro_rows else None
                loss, parts = self._loss_step(micro_batch, num_items, rows, prefetched=upcoming)
                if prefetch and not last:  # queued on the teacher's GPU before the student's backward
                    upcoming = self._teacher_step(batches[index + 1], num_items)
                # DDP averages gradients over ranks; the loss is already a global mean, so undo that average.
                self.accelerator.backward(loss * self.world)
            loss_sum = loss_sum + loss.detach().double()
            for name, value in parts.items():
                sums[name] = sums[name] + value.double()
        loss_sum = float(loss_sum)
        sums = {name: float(value) for name, value in sums.items()}
        if self.world > 1:
            # Projections and SAR routers sit outside DDP: average their gradients like DDP does the student's.
            for param in self._extra_params():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= self.world
        if self.world > 1:  # each rank holds its share of the global mean; the log shows the whole window
            names = list(sums)
            packed = torch.tensor([loss_sum, *(sums[n] for n in names)], device=self.device, dtype=torch.float64)
            packed = self.accelerator.reduce(packed, reduction="sum").tolist()
            loss_sum, sums = packed[0], dict(zip(names, packed[1:]))
        return {"loss": loss_sum, "tokens": num_items, **sums}

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip, check, step. Returns (grad_norm, skipped)."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        params = list(self.student.parameters()) + self._extra_params()
        grad_norm = float(self.accelerator.clip_grad_norm_(params, max_norm))
        scaler = self.accelerator.scaler is not None
        if not math.isfinite(grad_norm) and not scaler:
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, True
        # Under fp16 the GradScaler skips the update itself (and lowers its scale); we only count it.
        self.optimizer.step()
        skipped = scaler and self.accelerator.optimizer_step_was_skipped
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped and self.ema is not None:
            self.ema.update_parameters(self.accelerator.unwrap_model(self.student))
        return grad_norm, bool(skipped)

    # ---- data order ------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.blocks.train), generator=generator)

    def _windows(self, start_step: int):
        """Windows from ``start_step`` on; the position in the data is a pure function of the step."""
        cfg = self.config
        ga, bs = cfg.gradient_accumulation_steps, cfg.batch_size
        per_epoch, global_batch = self.plan.steps_per_epoch, bs * self.world
        for step in range(start_step, self.plan.optimizer_steps):
            epoch, step_in_epoch = divmod(step, per_epoch)
            order = self._epoch_order(epoch)
            first = step_in_epoch * ga
            batches, indices, micro_rows = [], [], []
            for batch_index in range(first, min(first + ga, self.batches_per_epoch)):
                rows = order[batch_index * global_batch : (batch_index + 1) * global_batch]
                rows = rows[self.rank :: self.world]
                if len(rows) == 0:
                    continue
                batches.append(self.blocks.train[rows])
                micro_rows.append(rows)
                indices.extend(int(r) for r in rows)
            yield Window(step=step, epoch=epoch, micro_batches=batches, block_indices=indices, micro_rows=micro_rows)

    # ---- train -----------------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> dict:
        """Run (or continue) training; ``max_steps`` stops early after that many optimizer steps in total."""
        self.setup()
        self._maybe_resume()
        stop_at = self.plan.optimizer_steps if max_steps is None else min(max_steps, self.plan.optimizer_steps)
        start = time.perf_counter()
        start_step = self.state["step"]
        bar = kit_env.progress_bar()(
            total=stop_at, initial=start_step, desc="distil", unit="step", disable=not self.is_main, dynamic_ncols=True
        )
        for window in self._windows(start_step):
            if window.step >= stop_at or self.state["stopped_early"]:
                break
            try:
                row = self._train_step(window)
            except torch.cuda.OutOfMemoryError as err:
                raise self._explain_oom(err) from err
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            self._after_step(row, window)
        bar.close()
        summary = self._finish(time.perf_counter() - start, stop_at)
        return summary

    def _train_step(self, window: Window) -> dict:
        step_start = time.perf_counter()
        lr = self.optimizer.optimizer.param_groups[0]["lr"]
        teacher_top_k = self._apply_expert_schedule(window.step)
        sums = self._window_backward(window)
        grad_norm, skipped = self._optimizer_step()
        if not math.isfinite(sums["loss"]):
            skipped = True
        self.scheduler.step()
        elapsed = time.perf_counter() - step_start
        row = {
            "step": window.step,
            "epoch": window.step / self.plan.steps_per_epoch,
            "lr": lr,
            "loss": sums["loss"],
            "grad_norm": grad_norm,
            "tokens": sums["tokens"],
            "tokens_per_s": sums["tokens"] / elapsed if elapsed > 0 else float("nan"),
        }
        for name in COMPONENTS:
            active = self._alpha(name) > 0
            row[name] = sums[name] if active else float("nan")
            row[f"w_{name}"] = self._weight(name) * sums[name] if active else float("nan")
            row[f"share_{name}"] = row[f"w_{name}"] / sums["loss"] if active and sums["loss"] else float("nan")
        if not skipped:
            self._update_balance(sums)
        if skipped:
            self.state["skipped"] += 1
            self.state["consecutive_skips"] += 1
            log.warning("step %d skipped: non-finite loss %.4g or grad norm %.4g", window.step, sums["loss"], grad_norm)
        else:
            self.state["consecutive_skips"] = 0
        row["skipped"] = self.state["skipped"]
        if teacher_top_k is not None:
            row["teacher_top_k"] = teacher_top_k
        self.state["step"] = window.step + 1
        return row

    def _apply_expert_schedule(self, step: int) -> int | None:
        """Set the teacher's experts per token for this step (expert_top_k_start -> expert_top_k_end)."""
        cfg = self.config
        if cfg.expert_top_k_start is None:
            return None
        from kagglekd import moe

        k = moe.expert_top_k_schedule(cfg.expert_top_k_start, cfg.expert_top_k_end, step, self.plan.optimizer_steps)
        moe.set_experts_per_token(self.teacher, k)
        return k

    def _after_step(self, row: dict, window: Window) -> None:
        cfg = self.config
        step_done = self.state["step"]
        if self.is_main:
            self.history.append(row)
            if step_done % cfg.log_steps == 0:
                self._emit("on_log", row)
        if self.state["consecutive_skips"] >= cfg.max_consecutive_skips:
            self._stop_non_finite(row, window)
        last = step_done == self.plan.optimizer_steps
        if (cfg.eval_steps and step_done % cfg.eval_steps == 0) or last:
            self._eval_and_record(row)
        # A checkpoint taken inside a run of skipped steps would not be "the last good one".
        if cfg.save_steps and step_done % cfg.save_steps == 0 and not last and not self.state["consecutive_skips"]:
            self.save_checkpoint()

    def _explain_oom(self, err: Exception) -> OutOfMemory:
        """Turn a CUDA OOM into the planner's estimate plus config changes that fit."""
        from kagglekd import memory

        cfg = self.config
        where = self.latest_checkpoint()
        kept = f"the newest checkpoint {where} is intact" if where else "no checkpoint had been written yet"
        try:
            gpu = memory.gpu_for_device(self.device)
            teacher_cfg = self.teacher.config if self.teacher is not None else None
            student_cfg = self.accelerator.unwrap_model(self.student).config
            plan = memory.plan_memory(cfg, gpu=gpu, teacher_cfg=teacher_cfg, student_cfg=student_cfg)
            fit = memory.largest_fitting(cfg, gpu=gpu, teacher_cfg=teacher_cfg, student_cfg=student_cfg)
            estimate = (
                f"the planner estimates {plan.summary()} for batch_size {cfg.batch_size} x max_length "
                f"{cfg.max_length}; batch_size {fit['batch_size']} (with gradient_accumulation_steps "
                f"{math.ceil(cfg.batch_size * cfg.gradient_accumulation_steps / max(fit['batch_size'], 1))} to keep "
                f"the effective batch) or max_length {fit['max_length']} would fit"
            )
        except Exception as planner_err:  # the estimate is advice; never hide the OOM behind a planner bug
            estimate = f"(memory planner unavailable: {planner_err})"
        top_k = "" if cfg.kd_top_k else "; kd_top_k 256 shrinks the teacher targets"
        return OutOfMemory(
            f"CUDA out of memory at step {self.state['step']} ({str(err).splitlines()[0]}). {estimate}{top_k}. "
            f"Set these with --set and resume: {kept}."
        )

    def _eval_and_record(self, row: dict) -> None:
        metrics = self.evaluate()
        values = {
            "eval_ppl": metrics["ppl"],
            "eval_kd": metrics.get("kd", float("nan")),
            "eval_top1_agreement": metrics.get("top1_agreement", float("nan")),
        }
        if "ppl_ema" in metrics:
            values["eval_ppl_ema"] = metrics["ppl_ema"]
        previous = self.state["last_eval"]
        if previous is not None and row["lr"] > 0 and abs(previous - metrics["ppl"]) <= 1e-7 * max(1.0, previous):
            log.warning(
                "eval perplexity %.6f is identical to the previous eval while LR = %.3g: the weights being "
                "evaluated are not the ones training (frozen copy?) or the eval data is wrong.",
                metrics["ppl"],
                row["lr"],
            )
        self.state["last_eval"] = metrics["ppl"]
        if self.is_main:
            self.history.update_last(values)
            self._emit("on_eval", {"step": row["step"], **values})
        self._early_stopping(metrics["ppl"])

    def _early_stopping(self, ppl: float) -> None:
        cfg = self.config
        if ppl < self.state["best_ppl"] - cfg.early_stopping_min_delta:
            self.state["best_ppl"] = ppl
            self.state["evals_without_improvement"] = 0
            return
        if self.state["step"] <= self.plan.warmup_steps:
            return  # never judge a run that is still warming up
        self.state["evals_without_improvement"] += 1
        patience = cfg.early_stopping_patience
        if patience is not None and self.state["evals_without_improvement"] >= patience:
            log.info("early stopping: %d evals without improving on perplexity %.4f", patience, self.state["best_ppl"])
            self.state["stopped_early"] = True

    def _stop_non_finite(self, row: dict, window: Window) -> None:
        report = {
            "reason": f"{self.state['consecutive_skips']} optimizer steps in a row had a non-finite loss or gradient",
            "step": window.step,
            "epoch": window.epoch,
            "components": {k: row.get(k) for k in ("loss", *COMPONENTS)},
            "grad_norm": row["grad_norm"],
            "batch_indices": window.block_indices,
            "skipped_total": self.state["skipped"],
            "last_checkpoint": str(self.latest_checkpoint()) if self.latest_checkpoint() else None,
            "fix": "lower learning_rate, check the data around these blocks, or raise max_consecutive_skips.",
        }
        if self.is_main:
            _write_json(self.output_dir / "failure_report.json", report)
        raise TrainingStopped(
            f"training stopped at step {window.step}: {report['reason']}; see "
            f"{self.output_dir / 'failure_report.json'}",
            report,
        )

    def _finish(self, wall_time: float, stop_at: int) -> dict:
        if self.state["step"] == self.plan.optimizer_steps or self.state["stopped_early"]:
            if self.is_main:
                self.save_student(self.output_dir / "student")
                if self.router_params:
                    self.save_teacher_routers(self.output_dir / "teacher_routers")
        rows = self.history.rows
        tokens = sum(r["tokens"] for r in rows)
        summary = {
            "optimizer_steps": self.state["step"],
            "planned_steps": self.plan.optimizer_steps,
            "skipped": self.state["skipped"],
            "stopped_early": self.state["stopped_early"],
            "wall_time_s": wall_time,
            "tokens_per_s": _median([r["tokens_per_s"] for r in rows]) if rows else float("nan"),
            "eval_ppl": rows[-1].get("eval_ppl", float("nan")) if rows else float("nan"),
            "eval_top1_agreement": rows[-1].get("eval_top1_agreement", float("nan")) if rows else float("nan"),
            "train_tokens": tokens,
        }
        if self.cross is not None:
            # this process's training positions
            summary["alignment"] = alignment.AlignmentStats(**self.state["alignment"]).to_dict()
            path = self.output_dir / "alignment.json"
            if self.is_main and self.write_run_dir:
                report = json.loads(path.read_text()) if path.exists() else {}
                _write_json(path, {**report, "training": summary["alignment"]})
        if self.is_main:
            _write_json(self.output_dir / "summary.json", summary)
            self._emit("on_end", summary)
        return summary

    # ---- eval ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None, with_ema: bool = True) -> dict:
        """Perplexity, KD loss and top-1 agreement of ``model`` (default: the student now training)."""
        self.setup()
        model = model or self.accelerator.unwrap_model(self.student)
        totals = self._eval_model(model, with_teacher=self.teacher is not None)
        out = {"ppl": totals.ppl, "tokens": totals.tokens}
        if self.teacher is not None:
            out.update(kd=totals.kd, top1_agreement=totals.top1_agreement)
        if with_ema and self.ema is not None:
            out["ppl_ema"] = self._eval_model(self.ema.module, with_teacher=False).ppl
        return out

    @torch.no_grad()
    def teacher_perplexity(self) -> float:
        """The teacher's held-out perplexity. Across vocabularies it is per TEACHER token (the teacher reads
        the eval blocks in its own tokens), so it is not comparable with the student's number."""
        self.setup()
        if self.teacher is None:
            return float("nan")
        if self.cross is None:
            return self._eval_model(self.teacher, with_teacher=False).ppl
        totals = EvalTotals()
        rows = self.eval_blocks[self.rank :: self.world]
        for start in range(0, len(rows), self.config.batch_size):
            aligned = self.cross.align(rows[start : start + self.config.batch_size]).to(self.device)
            logits = self._teacher_logits(aligned.teacher_ids)
            ce = losses.ce_loss(logits, aligned.teacher_labels, num_items=1, chunk_size=self.config.loss_chunk_size)
            totals.add(losses.valid_count(aligned.teacher_labels), float(ce))
        if self.world > 1:
            packed = torch.tensor([totals.tokens, totals.ce_sum], device=self.device, dtype=torch.float64)
            packed = self.accelerator.reduce(packed, reduction="sum").tolist()
            totals = EvalTotals(int(packed[0]), packed[1])
        return totals.ppl

    def _report_alignment(self) -> None:
        """Log the held-out alignment diagnostics and start alignment.json with them."""
        report = self.measure_alignment()
        log.info(
            "cross-tokenizer alignment on %d held-out blocks: %.1f %% of student positions aligned, %.1f %% of "
            "the teacher's probability on tokens the student can spell (%d shared tokens, %.1f %% of its vocab)",
            report["eval_blocks_measured"], 100 * report["aligned_fraction"], 100 * report["teacher_mass_mapped"],
            report["shared_tokens"], 100 * report["student_vocab_shared"],
        )  # fmt: skip
        _write_json(self.output_dir / "alignment.json", {"setup": report})

    @torch.no_grad()
    def measure_alignment(self, max_blocks: int = 32) -> dict:
        """Alignment diagnostics on held-out blocks: the vocabularies, the fraction of student positions
        aligned and the teacher probability mass that maps onto the student vocabulary."""
        self.setup()
        cfg, vocab_map = self.config, self.cross.vocab_map
        stats = alignment.AlignmentStats()
        blocks = self.eval_blocks[:max_blocks]
        for start in range(0, len(blocks), cfg.batch_size):
            batch = blocks[start : start + cfg.batch_size]
            _, labels = data.next_token_batch(batch.to(self.device))
            aligned = self.cross.align(batch).to(self.device)
            logits = self._teacher_logits(aligned.teacher_ids)
            stats += alignment.cross_targets(
                logits, aligned, labels, vocab_map, cfg.temperature, chunk_size=cfg.loss_chunk_size
            )[2]
        return {
            "teacher_tokenizer": cfg.teacher_tokenizer or cfg.teacher_model,
            "student_tokenizer": cfg.tokenizer or cfg.student_model,
            "teacher_vocab": vocab_map.teacher_vocab,
            "student_vocab": vocab_map.student_vocab,
            "shared_tokens": int(vocab_map.shared.numel()),
            "student_vocab_shared": vocab_map.shared_fraction,
            "loss": cfg.cross_tokenizer_loss,
            "eval_blocks_measured": len(blocks),
            **stats.to_dict(),
        }

    def _eval_model(self, model, with_teacher: bool) -> EvalTotals:
        cfg = self.config
        was_training = model.training
        model.eval()
        totals = EvalTotals()
        rows = self.eval_blocks[self.rank :: self.world]
        for start in range(0, len(rows), cfg.batch_size):
            batch = rows[start : start + cfg.batch_size]
            input_ids, labels = data.next_token_batch(batch.to(self.device))
            with self.accelerator.autocast():
                logits = model(input_ids=input_ids).logits
            logits = _match_vocab(logits, self.student_vocab)
            tokens = losses.valid_count(labels)
            ce_sum = float(losses.ce_loss(logits, labels, num_items=1, chunk_size=cfg.loss_chunk_size))
            kd_sum, agree, compared = 0.0, 0, 0
            if with_teacher and self.cross is not None:
                aligned = self.cross.align(batch).to(self.device)
                teacher_logits = self._teacher_logits(aligned.teacher_ids)
                kd_sum = float(self._kd_loss(logits, teacher_logits, labels, aligned, 1))
                agree, compared = alignment.top1_agreement(
                    logits, teacher_logits, aligned, labels, self.cross.vocab_map
                )
            elif with_teacher:
                teacher_logits = self._teacher_logits(input_ids)
                kd_sum = float(
                    losses.kd_loss(
                        logits,
                        teacher_logits,
                        labels,
                        **self._kd_options(),
                        num_items=1,
                        chunk_size=cfg.loss_chunk_size,
                    )
                )
                valid = labels != -100
                agree = int(((logits.argmax(-1) == teacher_logits.argmax(-1)) & valid).sum())
            totals.add(tokens, ce_sum, kd_sum, agree, compared)
        if self.world > 1:
            fields = (totals.tokens, totals.ce_sum, totals.kd_sum, totals.agree, totals.compared)
            packed = torch.tensor(fields, device=self.device, dtype=torch.float64)
            packed = self.accelerator.reduce(packed, reduction="sum").tolist()
            totals = EvalTotals(int(packed[0]), packed[1], packed[2], int(packed[3]), int(packed[4]))
        model.train(was_training)
        return totals

    # ---- checkpoints -----------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_dir)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N/: written to a temp dir and renamed, so a killed write is never picked up."""
        step = self.state["step"]
        final = self.checkpoint_dir / f"step-{step}"
        tmp = self.checkpoint_dir / f".tmp-step-{step}"  # one name for all ranks: they write into it together
        self.accelerator.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(tmp))
            if self.is_main:
                extra = {
                    "scheduler": self.scheduler.state_dict(),
                    "rng_python": random.getstate(),
                    "rng_numpy": np.random.get_state(),
                }
                if self.ema is not None:
                    extra["ema"] = self.ema.state_dict()
                if self.projections is not None:
                    extra["projections"] = self.projections.state_dict()
                if self.router_params:
                    from kagglekd.moe import router_state_dict

                    extra["routers"] = router_state_dict(self.teacher, self.patterns)
                if self._ka_generator is not None:
                    extra["ka_generator"] = self._ka_generator.get_state()
                torch.save(extra, tmp / "kagglekd_extra.pt")
                _write_json(
                    tmp / STATE_FILE,
                    {**self.state, "history": self.history.rows, "plan_steps": self.plan.optimizer_steps},
                )
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._prune_checkpoints()
        except OSError as err:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest_checkpoint()
            raise KaggleKDError(
                f"could not write checkpoint {final} ({err.strerror or err}); "
                f"{'the previous checkpoint ' + str(previous) + ' is intact' if previous else 'no earlier checkpoint'}"
                ". Free space in the output dir (Kaggle keeps 20 GB in /kaggle/working) or lower save_total_limit."
            ) from err
        self.accelerator.wait_for_everyone()
        log.info("checkpoint %s", final)
        return final

    def _prune_checkpoints(self) -> None:
        done = sorted(complete_checkpoints(self.checkpoint_dir), key=_step_of)
        for old in done[: -self.config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / STATE_FILE).exists():
            raise ConfigError(f"resume: {path} is not a complete kagglekd checkpoint (no {STATE_FILE}).", "resume")
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("plan_steps") != self.plan.optimizer_steps:
            raise ConfigError(
                f"resume: checkpoint {path} belongs to a run of {state.get('plan_steps')} optimizer steps, this "
                f"config plans {self.plan.optimizer_steps}. Resume with the same config or start a new output_dir.",
                "resume",
            )
        self.accelerator.load_state(str(path))
        extra = torch.load(path / "kagglekd_extra.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        random.setstate(extra["rng_python"])
        np.random.set_state(extra["rng_numpy"])
        if self.ema is not None and "ema" in extra:
            self.ema.load_state_dict(extra["ema"])
        if self.projections is not None:
            self.projections.load_state_dict(extra["projections"])
        if self.router_params:
            from kagglekd.moe import load_router_state

            load_router_state(self.teacher, extra["routers"])
        if self._ka_generator is not None and "ka_generator" in extra:
            self._ka_generator.set_state(extra["ka_generator"])
        history = state.pop("history")
        state.pop("plan_steps", None)
        self.state.update(state)
        self.balance = self.state["balance"]
        if self.is_main:
            self.history.reset(history)
        log.info("resumed from %s at step %d", path, self.state["step"])

    def _maybe_resume(self) -> None:
        if self.state["step"] > 0:
            return  # already running in this process
        resume = self.config.resume
        if resume == "never":
            if self.is_main and (self.output_dir / "history.csv").exists():
                self.history.reset([])
            return
        path = self.latest_checkpoint() if resume == "auto" else Path(resume)
        if path is None:
            if self.is_main:
                self.history.reset([])
            return
        self.load_checkpoint(path)

    # ---- export ----------------------------------------------------------------------------------------
    def save_student(self, path: str | Path) -> Path:
        """``save_pretrained`` of the student alone (never teacher tensors) plus its tokenizer."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.accelerator.unwrap_model(self.student)
        model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path

    def save_teacher_routers(self, path: str | Path) -> Path:
        """The SAR-adapted router weights, in the run dir beside (never inside) student/."""
        from safetensors.torch import save_file

        from kagglekd.moe import router_state_dict

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.contiguous() for name, tensor in router_state_dict(self.teacher, self.patterns).items()}
        save_file(state, str(path / "routers.safetensors"))
        _write_json(path / "source.json", {"teacher_model": self.config.teacher_model, "routers": sorted(state)})
        return path

    def _emit(self, event: str, payload: dict) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(dict(payload))


# ---- helpers ---------------------------------------------------------------------------------------------
def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def complete_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists()]


def latest_checkpoint(directory: Path) -> Path | None:
    done = complete_checkpoints(Path(directory))
    return max(done, key=_step_of) if done else None


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


def _layer_pairs(student_layers: int, teacher_layers: int, count: int | None, field: str) -> list[tuple[int, int]]:
    """Uniform (student, teacher) layer pairs; a count the models cannot satisfy is a ConfigError."""
    try:
        return losses.layer_map(student_layers, teacher_layers, "uniform", count=count)
    except ValueError as err:
        raise ConfigError(
            f"{field} = {count}: {err} (student has {student_layers} layers, teacher {teacher_layers}).", field
        ) from None


def _match_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Make the last dim ``vocab`` wide when one side only has unused padding rows (classified "padded").

    Rows past the shared vocabulary are dropped from a wider teacher; a narrower one is padded with -inf
    (probability 0), never with zeros (which would be probability mass on tokens that do not exist).
    """
    width = logits.shape[-1]
    if width == vocab:
        return logits
    if width > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - width), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    return finite[len(finite) // 2] if finite else float("nan")


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
