"""The objective: loss components, their alphas and balancing -> the total of one micro-batch, and the logged row.

Components (``COMPONENTS``, the one tuple the trainer, the history and the charts share): ``kd`` (teacher ->
student distribution), ``ce`` (the data), ``feature`` (hidden states through projections), ``attention``
(attention maps), ``router`` (SAR's regularisers of the teacher's routers). Each is a sum over valid target
tokens divided by the window's valid-target count. Under ``loss_balance: normalized`` each of the student's
components (``STUDENT_COMPONENTS``) is divided by a running mean of its own magnitude, so the alphas become
their realised shares of the student's objective. The router term trains the teacher's routers only (the
student's weights get no gradient from it): it keeps weight 1, is never balanced and is no share of the
student's objective. The total backpropagated, logged as ``loss``, is the student's objective plus the
router term; the student's objective alone is ``loss - w_router``.
"""

from __future__ import annotations

import math

import torch

from kagglekd import alignment, losses, transfer
from kagglekd.config import COMPONENTS, DistillConfig
from kagglekd.fused import fused_lm_head_kd
from kagglekd.teacher import TeacherOutputs

__all__ = ["COMPONENTS", "STUDENT_COMPONENTS", "Objective"]

# The components that train the student, whose weighted values make its objective; "router" trains the teacher.
STUDENT_COMPONENTS = tuple(name for name in COMPONENTS if name != "router")


class Objective:
    """Components -> weighted total for one micro-batch; owns the transfer projections and the balance state."""

    def __init__(self, config: DistillConfig, *, vocab_map: alignment.VocabMap | None = None):
        self.config = config
        self.options = config.kd_options
        self.vocab_map = vocab_map  # cross-tokenizer runs: the teacher -> student vocabulary map
        self.balance: dict[str, float] = {}
        self.feature_pairs: list[tuple[int, int]] = []  # (student layer, teacher layer)
        self.attention_pairs: list[tuple[int, int]] = []
        self.projections: torch.nn.ModuleList | None = None  # beside the student, never exported with it

    def setup_transfer(self, student_config, teacher_config, device: torch.device) -> None:
        """Layer pairs and projections for feature/attention transfer (the rules checked the counts)."""
        cfg = self.config
        s_layers = student_config.num_hidden_layers
        t_layers = teacher_config.num_hidden_layers if teacher_config is not None else None
        if cfg.alpha_feature > 0:
            self.feature_pairs = transfer.layer_map(s_layers, t_layers, "uniform", count=cfg.feature_layers)
            hs, ht = student_config.hidden_size, teacher_config.hidden_size
            torch.manual_seed(cfg.seed)
            self.projections = torch.nn.ModuleList(torch.nn.Linear(hs, ht, bias=False) for _ in self.feature_pairs).to(
                device
            )
        if cfg.alpha_attention > 0:
            self.attention_pairs = transfer.layer_map(s_layers, t_layers, "uniform", count=cfg.attention_layers or 1)

    # ---- weights -----------------------------------------------------------------------------------------
    def alpha(self, name: str) -> float:
        cfg = self.config
        alphas = {"kd": cfg.alpha_kd, "ce": cfg.alpha_ce, "feature": cfg.alpha_feature,
                  "attention": cfg.alpha_attention, "router": 1.0 if cfg.sar else 0.0}  # fmt: skip
        return alphas[name]

    def weight(self, name: str) -> float:
        """alpha under ``fixed``; alpha / running magnitude under ``normalized`` (the student's components only:
        the router term keeps weight 1)."""
        alpha = self.alpha(name)
        # (a checkpoint written before the router term left the balance may still hold a "router" entry)
        if self.config.loss_balance == "fixed" or name not in self.balance or name not in STUDENT_COMPONENTS:
            return alpha
        return alpha / max(self.balance[name], 1e-8)

    def update_balance(self, sums: dict) -> None:
        """Move each student component's running magnitude towards this window's value (``normalized`` only)."""
        if self.config.loss_balance != "normalized":
            return
        momentum = self.config.balance_momentum
        for name in STUDENT_COMPONENTS:
            value = sums.get(name)
            if value is None or not math.isfinite(value) or self.alpha(name) == 0:
                continue
            previous = self.balance.get(name)
            self.balance[name] = abs(value) if previous is None else momentum * previous + (1 - momentum) * abs(value)

    # ---- components --------------------------------------------------------------------------------------
    def kd(self, student_logits, teacher: TeacherOutputs, labels, num_items) -> tuple[torch.Tensor, object]:
        """The KD component from full student logits: plain logit KD, or across vocabularies on the aligned
        positions. Returns ``(loss, AlignmentStats or None)``."""
        chunk = self.config.loss_chunk_size
        if teacher.aligned is None:
            loss = losses.kd_loss(student_logits, teacher.logits, labels, self.options, num_items=num_items,
                                  chunk_size=chunk)  # fmt: skip
            return loss, None
        return alignment.cross_kd_loss(
            student_logits, teacher.logits, teacher.aligned, labels, self.vocab_map, self.options,
            mode=self.config.cross_tokenizer_loss, num_items=num_items, chunk_size=chunk,
        )  # fmt: skip

    def fused(self, hidden, head, teacher: TeacherOutputs | None, labels, num_items):
        """lm_head + KD + CE in token chunks, from the student's last hidden states. Across vocabularies the
        KD term covers the aligned positions only (``kd_mask``); CE covers every valid one.
        Returns ``(weighted kd + ce, {"kd", "ce"}, AlignmentStats or None)``."""
        cfg = self.config
        targets = teacher.logits if teacher is not None and cfg.alpha_kd > 0 else None
        kd_mask, options, stats = None, self.options, None
        if targets is not None and teacher.aligned is not None:
            targets, kd_labels, stats = alignment.cross_targets(
                targets, teacher.aligned, labels, self.vocab_map, self.options, chunk_size=cfg.loss_chunk_size
            )
            kd_mask, options = kd_labels != losses.IGNORE_INDEX, self.options.replace(top_k=None)  # top-k is mapped
        total, parts = fused_lm_head_kd(
            hidden, head.weight, targets, labels, options,
            alpha_kd=self.weight("kd"), alpha_ce=self.weight("ce"), num_items=num_items,
            chunk_size=cfg.loss_chunk_size, lm_head_bias=head.bias, kd_mask=kd_mask,
        )  # fmt: skip
        if stats is not None and cfg.cross_tokenizer_loss == "hybrid":  # ULD at the context positions
            uld, stats.context = alignment.context_uld(hidden, head, teacher.logits, teacher.aligned, labels,
                                                       self.options, chunk_size=cfg.loss_chunk_size)  # fmt: skip
            uld = uld / losses._normaliser(num_items, losses.valid_count(labels))
            total, parts["kd"] = total + self.weight("kd") * uld, parts["kd"] + uld.detach()
        return total, parts, stats

    def transfer_terms(self, student_hidden, student_maps, teacher: TeacherOutputs, labels, num_items) -> dict:
        """Feature and attention components (each the mean over its matched layer pairs)."""
        parts = {}
        valid = labels != losses.IGNORE_INDEX
        if self.feature_pairs:
            per_layer = []
            for (s, t), projection in zip(self.feature_pairs, self.projections):
                target, where = teacher.hidden[t + 1].float(), valid
                if teacher.aligned is not None:  # the mean teacher state over each student token's span
                    target, spans = alignment.span_average(target, teacher.aligned)
                    where = valid & spans
                per_layer.append(transfer.feature_loss(student_hidden[s + 1].float(), target, projection, where,
                                                       kind=self.config.feature_loss, num_items=num_items))  # fmt: skip
            parts["feature"] = sum(per_layer) / len(per_layer)
        if self.attention_pairs:
            per_layer = [
                transfer.attention_loss(sm.float(), tm.float(), valid, num_items=num_items)
                for sm, tm in zip(student_maps, teacher.maps)
            ]
            parts["attention"] = sum(per_layer) / len(per_layer)
        return parts

    def total(self, parts: dict, fused_total: torch.Tensor | None = None) -> torch.Tensor:
        """sum(weight x component); the fused total already holds its weighted kd and ce."""
        rest = {n: v for n, v in parts.items() if fused_total is None or n not in ("kd", "ce")}
        total = sum(self.weight(name) * value for name, value in rest.items())
        return total if fused_total is None else fused_total + total

    def columns(self, sums: dict) -> dict:
        """The logged columns of one step: raw value and weighted value of each component, and the realised share
        of each student component in the student's objective (the sum of their weighted values, so the shares sum
        to 1). The router term has no share (``share_router`` is NaN): it trains the teacher, and the
        ``loss`` column (the total backpropagated) holds it on top of the student's objective."""
        row = {}
        for name in COMPONENTS:
            active = self.alpha(name) > 0
            row[name] = sums[name] if active else float("nan")
            row[f"w_{name}"] = self.weight(name) * sums[name] if active else float("nan")
        student = sum(row[f"w_{name}"] for name in STUDENT_COMPONENTS if self.alpha(name) > 0)
        for name in COMPONENTS:
            active = self.alpha(name) > 0 and name in STUDENT_COMPONENTS
            row[f"share_{name}"] = row[f"w_{name}"] / student if active and student else float("nan")
        return row

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"projections": self.projections.state_dict()} if self.projections is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.projections is not None:
            self.projections.load_state_dict(state["projections"])
