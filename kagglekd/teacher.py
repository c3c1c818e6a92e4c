"""The teacher side of a step: live forward, cache read, expert schedule, SAR/KA state -> ``TeacherOutputs``.

Everything a loss reads from the teacher arrives in one typed object on the student's device. The teacher
runs on its own device (the second GPU under strategy ``split``) without grad, except the routers under SAR,
whose gradient flows through the router term (and, where the path keeps the teacher's logits attached, KD).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from kagglekd import alignment, data, losses, models, moe, onpolicy
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError

log = logging.getLogger(__name__)

ROUTERS_FILE = "routers.safetensors"  # in the run dir's teacher_routers/
# config fields of transformers models that change the logits after the output layer (Gemma 2/3's soft cap,
# Cohere's scale, Granite's divisor): such a teacher's logits are never computed from its output layer alone
POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class TeacherOutputs:
    """What one micro-batch's losses read from the teacher, on the student's device.

    ``logits``: ``[B, T, V]`` (vocabulary matched to the student's unless the tokenizers differ, then
    ``[B, T, V_teacher]`` at the rows the student's positions read, ``aligned`` pointing there, or from the
    instrumented forward (SAR, KA, features) ``[B, T_teacher, V_teacher]``) or a cached ``TeacherTopK``;
    ``hidden``: the teacher's hidden states (feature transfer); ``maps``: attention maps of the matched layers;
    ``router``: the SAR router term (already a share of the window's mean); ``aligned``: the teacher's own tokens
    and the offset alignment (cross-tokenizer).
    """

    logits: torch.Tensor | losses.TeacherTopK | None
    hidden: tuple[torch.Tensor, ...] | None = None
    maps: list[torch.Tensor] | None = None
    router: torch.Tensor | None = None
    aligned: alignment.AlignedBatch | None = None

    def to(self, device: torch.device) -> TeacherOutputs:
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None
        return TeacherOutputs(
            logits=move(self.logits),
            hidden=tuple(move(h) for h in self.hidden) if self.hidden is not None else None,
            maps=[move(m) for m in self.maps] if self.maps is not None else None,
            router=move(self.router),
            aligned=self.aligned,
        )


class TeacherSide:
    """The teacher model (or its cache) and the MoE state a run keeps for it (SAR routers, KA generator)."""

    def __init__(
        self,
        config: DistillConfig,
        model: torch.nn.Module | None,
        *,
        cross: alignment.CrossTokenizer | None,
        cache,
        device: torch.device,
        student_device: torch.device,
        student_vocab: int,
        autocast,
    ):
        self.config, self.model, self.cross, self.cache = config, model, cross, cache
        self.device, self.student_device, self.student_vocab = device, student_device, student_vocab
        self.autocast = autocast  # a context-manager factory: the student's autocast (accelerate's)
        self.patterns = config.router_patterns or None
        self.router_params: list[torch.nn.Parameter] = []
        self.initial_routers: dict = {}
        self.ka_generator: torch.Generator | None = None
        self.hidden_wanted = False  # feature transfer reads the hidden states
        self.attention_layers: list[int] = []  # teacher layers whose attention maps are matched
        self.own_top_k: int | None = None  # the teacher's own experts per token (before all-experts)
        self.routers_source = "original"  # or the adapted routers' file, once loaded for evaluation
        self.head_apart: bool | None = None  # logits == output layer(decoder's last hidden states)? (first batch)

    @property
    def live(self) -> bool:
        return self.model is not None

    # ---- setup -------------------------------------------------------------------------------------------
    def prepare_moe(self) -> moe.MoEInfo | None:
        """Expert control, SAR and KA on the loaded teacher (the rules checked the combination already)."""
        cfg = self.config
        wanted = {"all_experts": cfg.all_experts, "expert_top_k_start": cfg.expert_top_k_start is not None,
                  "sar": cfg.sar, "ka_samples": cfg.ka_samples > 0}  # fmt: skip
        options = [name for name, on in wanted.items() if on]
        if not options or self.model is None:
            return None
        info = moe.require_moe(self.model, options[0], self.patterns)
        # the routing the teacher was trained with: SAR's load balance is measured at this k (under all-experts
        # every expert gets every token, so a balance term there would be constant)
        self.own_top_k = info.experts_per_token or None
        known = bool(moe.find_routers(self.model))  # a family in moe.MOE_FAMILIES, not only router_patterns
        for name in ("expert_top_k_start", "expert_top_k_end"):  # rules check this from the config, except for
            value = getattr(cfg, name)  # families found through router_patterns: checked here on the modules
            if value is not None and value > info.experts_per_layer:
                raise ConfigError(f"{name} = {value}: the teacher has {info.experts_per_layer} experts per layer. "
                                  f"Set {name} to at most {info.experts_per_layer}.", name)  # fmt: skip
        if cfg.ka_samples:
            self.ka_generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 17)
        if cfg.all_experts or (cfg.sar and not cfg.ka_samples and known):
            # SAR runs every expert so the routers' weights over all of them carry the gradient. A family known
            # only through router_patterns keeps its own routing (its top-k lives in a forward the kit cannot
            # change); the gradient then reaches the routers through the chosen experts' weights.
            moe.set_experts_per_token(self.model, info.experts_per_layer)
        if cfg.sar and cfg.sar_balance_weight > 0 and self.own_top_k is None:
            raise ConfigError("sar_balance_weight > 0 needs the teacher's experts per token, and its config has no "
                              "num_experts_per_tok. Set sar_balance_weight = 0 for this teacher.",
                              "sar_balance_weight")  # fmt: skip
        if cfg.sar:
            self.router_params = moe.prepare_sar(self.model, self.patterns)
            for param in self.router_params:  # router updates need fp32 even when the teacher runs in fp16
                param.data = param.data.float()
            self.initial_routers = moe.router_state_dict(self.model, self.patterns)
            if cfg.teacher_gradient_checkpointing:
                moe.enable_teacher_checkpointing(self.model)
        return info

    def expert_schedule(self, step: int, total_steps: int) -> int | None:
        """Set the teacher's experts per token for ``step`` (expert_top_k_start -> expert_top_k_end)."""
        cfg = self.config
        if cfg.expert_top_k_start is None:
            return None
        k = moe.expert_top_k_schedule(cfg.expert_top_k_start, cfg.expert_top_k_end, step, total_steps)
        moe.set_experts_per_token(self.model, k)
        return k

    # ---- forward -----------------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, V]`` logits without grad, on the student's device; vocabulary matched unless cross."""
        # Same autocast as the student: the fp16/bf16 teacher's matmuls meet fp32 parts (SAR routers) safely.
        with torch.no_grad(), self.autocast():
            logits = self.model(input_ids=input_ids.to(self.device)).logits
        logits = logits.to(self.student_device, non_blocking=True)
        return logits if self.cross is not None else match_vocab(logits, self.student_vocab)

    def aligned_logits(self, aligned: alignment.AlignedBatch) -> tuple[torch.Tensor, alignment.AlignedBatch]:
        """Across tokenizers: the teacher's logits without grad, on the student's device, and ``aligned`` pointing
        at their rows. Where the model's logits are its output layer applied to its decoder's last hidden states
        (``head_apart``, checked on the first batch), the output layer runs only at the rows the student's
        ``[B, T]`` positions read (``AlignedBatch.at_student_positions``): ``[B, T, V_t]``, gathered from the hidden
        states first. A model that caps or scales its logits after the output layer runs its whole forward and
        keeps the teacher's own positions, ``[B, T_teacher, V_t]`` with ``aligned`` as it was (no second copy of
        the largest tensor); every loss reads the rows through ``aligned``, so either layout serves."""
        ids = aligned.teacher_ids.to(self.device)
        with torch.no_grad(), self.autocast():
            if self.head_apart is None:
                self.head_apart = self._head_apart(ids)
            if self.head_apart:
                rows, aligned = aligned.at_student_positions()
                hidden = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                logits = self.model.get_output_embeddings()(take_rows(hidden, rows.to(self.device)))
                logits = logits.to(self.student_device, non_blocking=True)
        if not self.head_apart:
            logits = self.logits(ids)  # the whole forward, the teacher's own positions
        return logits, aligned.to(self.student_device)

    def _head_apart(self, ids: torch.Tensor) -> bool:
        """Whether the output layer applied to the decoder's last hidden states gives the model's logits: not for a
        config that caps or scales them (``POST_HEAD_FIELDS``), else read on the first 32 tokens of the batch's
        first row (within float rounding: 1e-4 of the logits' scale in float32, 1e-3 in 16-bit; both run the same
        kernels on the same rows; a short probe, so the check adds no memory peak to the first step)."""
        config, name = self.model.config, type(self.model).__name__
        changed = {f: getattr(config, f) for f in POST_HEAD_FIELDS if getattr(config, f, None) not in (None, 1, 1.0)}
        if changed:
            log.info("teacher logits: full forward (%s changes its logits after the output layer: %s)", name, changed)
            return False
        probe = ids[:1, :32]
        try:
            decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
            apart = head(decoder(input_ids=probe, use_cache=False).last_hidden_state)
        except Exception as err:  # noqa: BLE001 -- any model the split does not fit keeps its own forward
            log.info("teacher logits: full forward (%s: no decoder and output layer apart: %r)", name, err)
            return False
        whole = self.model(input_ids=probe, use_cache=False).logits
        exact = apart.dtype == whole.dtype == torch.float32
        tolerance = (1e-4 if exact else 1e-3) * max(1.0, float(whole.float().abs().max()))
        same = apart.shape == whole.shape and float((apart.float() - whole.float()).abs().max()) <= tolerance
        if not same:
            log.info("teacher logits: full forward (%s's logits are not its output layer's alone)", name)
        return same

    def outputs(
        self,
        micro_batch: torch.Tensor,
        num_items: int,
        rows: torch.Tensor | None = None,
        generated: torch.Tensor | None = None,
    ):
        """``TeacherOutputs`` of one ``[b, S]`` micro-batch (``rows``: its train-block indices, for a cache);
        None when the run has no teacher signal (CE-only).

        ``generated``: the ``[b, S - 1]`` labels of a generated micro-batch (``onpolicy.continuation_labels``; its
        first ``prompt_length`` tokens are a data block's), None for a data block. SAR's regularisers then read
        ``onpolicy.sar_scope``: the teacher's CE covers the prompt's own targets only (real data), the balance and
        entropy the positions up to each row's end. The router term is the micro-batch's per-position mean of the
        regularisers times its share of the window's count, ``valid targets / num_items``, with the targets
        counted exactly as the window counts them (a generated micro-batch's: its generated tokens). So every
        counted position carries 1/num_items of its micro-batch's mean, data block or generated, and the terms'
        weights sum to 1 over a window whatever ``lmbda`` and ``prompt_length`` are."""
        if self.model is None:
            if self.cache is None or self.config.alpha_kd == 0:
                return None
            return TeacherOutputs(logits=self.cache.get(rows, device=self.student_device))
        input_ids, labels = data.next_token_batch(micro_batch)
        micro_tokens = max(losses.valid_count(labels if generated is None else generated), 1)
        cfg, positions = self.config, None
        scoped = generated is not None and cfg.sar
        if scoped:
            labels, positions = onpolicy.sar_scope(micro_batch, generated, onpolicy.prompt_length(cfg))
        aligned = None
        if self.cross is not None:
            # the teacher reads the same text in its own tokens; labels are its own next tokens (SAR's CE)
            aligned = self.cross.align(micro_batch)
            input_ids, labels = aligned.teacher_ids, aligned.teacher_labels
            if scoped:
                labels, positions = onpolicy.teacher_scope(aligned, onpolicy.prompt_length(cfg), positions)
            elif cfg.sar:  # the balance and entropy read the real teacher tokens, not the rows' padding
                positions = aligned.teacher_tokens
        if not (cfg.sar or cfg.ka_samples or self.hidden_wanted or self.attention_layers):
            if aligned is not None:  # the rows the student's positions read, at those positions
                logits, aligned = self.aligned_logits(aligned)
                out = TeacherOutputs(logits=logits)
            else:
                out = TeacherOutputs(logits=self.logits(input_ids))
        else:
            move = lambda t: t.to(self.device) if t is not None else None
            out = self._instrumented(move(input_ids), move(labels), micro_tokens, num_items, move(positions))
            out = out.to(self.student_device) if self.device != self.student_device else out
            if self.cross is None:
                out.logits = match_vocab(out.logits, self.student_vocab)
        out.aligned = aligned.to(self.student_device) if aligned is not None else None
        return out

    def window_outputs(self, window, index: int, num_items: int):
        """``outputs`` of micro-batch ``index`` of the trainer's ``Window`` (a generated one's labels in
        ``window.micro_labels``)."""
        generated = window.micro_labels[index] if window.micro_labels is not None else None
        return self.outputs(window.micro_batches[index], num_items, window.micro_rows[index], generated)

    def _instrumented(self, input_ids, labels, micro_tokens: int, num_items: int, positions=None):
        """The forward with hooks: hidden states, attention maps, KA sampling, SAR's router term (with grad).

        ``input_ids`` / ``labels`` ``[b, T]`` (the teacher's CE targets), ``positions`` ``[b, T]`` bool or None
        (all): whose routing balance and entropy read; ``micro_tokens``: the micro-batch's counted targets."""
        cfg = self.config
        grad = torch.enable_grad() if cfg.sar else torch.no_grad()
        routers = moe.capture_router_logits(self.model, self.patterns) if cfg.sar else nullcontext()
        out = TeacherOutputs(logits=None)
        with grad, self.autocast(), routers as routed:
            if cfg.ka_samples:
                generator = None if cfg.teacher_gradient_checkpointing else self.ka_generator
                out.logits = moe.knowledge_augmentation(
                    self.model, input_ids, cfg.ka_samples, mode=cfg.ka_mode, generator=generator
                )
            if self.hidden_wanted or self.attention_layers or not cfg.ka_samples:
                from kagglekd.attention import capture_attention

                layers = self.attention_layers
                with capture_attention(self.model, layers) if layers else nullcontext() as capture:
                    result = self.model(input_ids=input_ids, output_hidden_states=self.hidden_wanted)
                out.logits = out.logits if out.logits is not None else result.logits
                out.hidden = result.hidden_states if self.hidden_wanted else None
                out.maps = [m.detach() for m in capture.maps()] if layers else None
            if cfg.sar:
                regs = moe.router_regularisers(self.model, self.initial_routers, routed, token_mask=positions,
                                               patterns=self.patterns, top_k=self.own_top_k)  # fmt: skip
                # a mean over the CE's own targets: a generated micro-batch's are its prompt's, not its counted ones
                teacher_ce = losses.ce_loss(out.logits, labels)  # num_items None: / its own valid targets
                mean = (
                    cfg.sar_anchor_weight * regs["anchor"]
                    + cfg.sar_balance_weight * regs["balance"]
                    + cfg.sar_entropy_weight * regs["entropy"]
                    + cfg.sar_teacher_ce_weight * teacher_ce
                )
                # a per-micro-batch mean, weighted by its share of the window's tokens
                out.router = mean * (micro_tokens / num_items)
        return out

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The teacher-side part of a checkpoint: adapted routers and the KA generator."""
        state = {}
        if self.router_params:
            state["routers"] = moe.router_state_dict(self.model, self.patterns)
        if self.ka_generator is not None:
            state["ka_generator"] = self.ka_generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.router_params:
            moe.load_router_state(self.model, state["routers"])
        if self.ka_generator is not None and "ka_generator" in state:
            self.ka_generator.set_state(state["ka_generator"])

    def use_adapted_routers(self, run_dir: str | Path) -> str:
        """Load a finished SAR run's adapted routers (``run_dir/teacher_routers/``) into the teacher, for
        evaluation; returns (and keeps in ``routers_source``) which routers the teacher now has."""
        from safetensors.torch import load_file

        from kagglekd.rundir import ROUTERS_DIR

        path = Path(run_dir) / ROUTERS_DIR / ROUTERS_FILE
        if self.model is None or not self.config.sar:
            return self.routers_source
        if not path.exists():
            log.warning("%s is missing: the teacher is evaluated with its ORIGINAL routers, not the adapted ones "
                        "this SAR run trained", path)  # fmt: skip
            return self.routers_source
        moe.load_router_state(self.model, load_file(str(path), device=str(self.device)))
        self.routers_source = f"adapted by SAR ({path})"
        log.info("teacher routers: %s", self.routers_source)
        return self.routers_source

    def describe(self) -> dict:
        """Which routers and which routing the teacher's evaluation uses (stated in eval.json and the card)."""
        if self.model is None:
            return {}
        info = moe.moe_info(self.model, self.patterns)
        if not info.is_moe:
            return {"teacher_routers": "dense teacher (no routers)", "teacher_routing": "dense"}
        k = info.experts_per_token
        routing = (f"all {info.experts_per_layer} experts per token" if k == info.experts_per_layer
                   else f"top-{k} of {info.experts_per_layer} experts per token" if k
                   else "the model's own top-k")  # fmt: skip
        if self.config.ka_samples:
            routing += " (deterministic: KA's sampled routings make the training targets only)"
        return {"teacher_routers": self.routers_source, "teacher_routing": routing}

    def save_routers(self, path: str | Path) -> Path:
        """The SAR-adapted router weights, in the run dir beside (never inside) student/."""
        from safetensors.torch import save_file

        from kagglekd.rundir import write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {name: t.contiguous() for name, t in moe.router_state_dict(self.model, self.patterns).items()}
        save_file(state, str(path / ROUTERS_FILE))
        write_json(path / "source.json", {"teacher_model": self.config.teacher_model, "routers": sorted(state)})
        return path


def load(config: DistillConfig, student_tokenizer, *, device, dtype, student_device):
    """``(teacher model or None, CrossTokenizer or None, vocab relation or None)`` for ``config``.

    No teacher is loaded when none is needed (CE-only, or a teacher cache stands in for it)."""
    if not config.live_teacher:
        return None, None, None
    teacher_tokenizer = models.load_tokenizer(config.teacher_tokenizer or config.teacher_model)
    relation = alignment.classify_vocab_pair(teacher_tokenizer, student_tokenizer)
    from kagglekd import rules

    rules.raise_errors(rules.check(config, rules.Facts(vocab_relation=relation)))
    if relation != "different" and config.cross_tokenizer:
        log.info("cross_tokenizer is on but the vocabularies are %s: plain logit KD is used", relation)
    model = models.load_model(
        config.teacher_model,
        role="teacher",
        device=device,
        dtype=dtype,
        vocab_size=len(student_tokenizer),
        seed=config.seed,
    )
    cross = None
    if relation == "different":
        teacher_vocab = model.get_output_embeddings().weight.shape[0]
        cross = alignment.CrossTokenizer(teacher_tokenizer, student_tokenizer, teacher_vocab=teacher_vocab)
        # targets are mapped where the student trains (split moves the teacher's outputs there): move the map
        # once, not per chunk
        cross.vocab_map = cross.vocab_map.to(student_device)
    return model, cross, relation


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[b, rows[b, t]]``: ``[B, T_x, D]``, ``[B, T]`` -> ``[B, T, D]``."""
    return x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def match_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
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
