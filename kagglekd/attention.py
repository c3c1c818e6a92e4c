"""Model hooks for attention transfer: head-averaged attention maps from q/k captured during a forward.

``capture_attention`` hooks the chosen layers' ``q_proj``/``k_proj`` outputs and the RoPE tables their attention
receives; ``AttentionCapture.maps`` then recomputes the attention probabilities from them, so the model keeps
its fast attention kernel (SDPA/flash) and only the maps of the hooked layers are ever materialised.
``attention_maps`` is the one-call form (forward + maps). Families are described by an explicit table
(``ATTENTION_FAMILIES``), keyed by ``config.model_type``. The loss on the maps is ``transfer.attention_loss``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kagglekd.errors import ConfigError
from kagglekd.moe import decoder_layers


@dataclass(frozen=True)
class AttentionFamily:
    """How a family's attention turns ``q_proj``/``k_proj`` outputs into rotated queries and keys.

    ``qk_norm``: ``"none"``; ``"head"`` = ``q_norm``/``k_norm`` over each head's dims before RoPE (Qwen3);
    ``"full"`` = over the whole projection before splitting heads (OLMoE, which also clamps q/k to
    ``config.clip_qkv`` when set). ``sliding_window``: the family applies ``config.sliding_window`` (if not
    None) to every layer. Every family here uses full-head-dim rotate-half RoPE and ``scaling = head_dim**-0.5``.
    """

    qk_norm: str = "none"
    clip_qkv: bool = False
    sliding_window: bool = False


ATTENTION_FAMILIES: dict[str, AttentionFamily] = {
    "llama": AttentionFamily(),
    "mistral": AttentionFamily(sliding_window=True),
    "mixtral": AttentionFamily(sliding_window=True),
    "qwen2": AttentionFamily(),
    "qwen2_moe": AttentionFamily(),
    "qwen3": AttentionFamily(qk_norm="head"),
    "qwen3_moe": AttentionFamily(qk_norm="head", sliding_window=True),
    "olmoe": AttentionFamily(qk_norm="full", clip_qkv=True),
}


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AttentionCapture:
    """q/k/RoPE of chosen layers captured during one forward; ``maps()`` turns them into attention maps."""

    def __init__(self, model: nn.Module, layers: Sequence[int]):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ATTENTION_FAMILIES:
            raise ConfigError(
                f"attention transfer supports {', '.join(ATTENTION_FAMILIES)}; this model is {model_type!r}",
                field="attention_layers",
            )
        layer_list = decoder_layers(model)
        for index in layers:
            if not -len(layer_list) <= index < len(layer_list):
                raise ValueError(f"attention layer {index} out of range for a {len(layer_list)}-layer model")
        self.family = ATTENTION_FAMILIES[model_type]
        self.config = model.config
        self.layers = [index % len(layer_list) for index in layers]
        self.modules = [layer_list[index].self_attn for index in self.layers]
        self.queries: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self.rope: dict[int, tuple[Tensor, Tensor]] = {}

    def _hooks(self):
        handles = []
        for position, attention in enumerate(self.modules):

            def pre_hook(module, args, kwargs, position=position):
                self.rope[position] = kwargs["position_embeddings"]

            def q_hook(module, args, output, position=position):
                self.queries[position] = output

            def k_hook(module, args, output, position=position):
                self.keys[position] = output

            handles.append(attention.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(attention.q_proj.register_forward_hook(q_hook))
            handles.append(attention.k_proj.register_forward_hook(k_hook))
        return handles

    def _project(
        self, attention: nn.Module, states: Tensor, norm: nn.Module | None, cos: Tensor, sin: Tensor
    ) -> Tensor:
        """``[B, T, heads * D]`` projection output -> ``[B, heads, T, D]`` float32 after norm and RoPE."""
        batch, seq, _ = states.shape
        if self.family.qk_norm == "full":
            states = norm(states)
        clip = getattr(self.config, "clip_qkv", None) if self.family.clip_qkv else None
        if clip is not None:
            states = states.clamp(min=-clip, max=clip)
        states = states.view(batch, seq, -1, attention.head_dim)
        if self.family.qk_norm == "head":
            states = norm(states)
        states = states.transpose(1, 2).float()
        cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
        return states * cos + _rotate_half(states) * sin

    def _allowed(self, batch: int, seq: int, attention_mask: Tensor | None, device: torch.device) -> Tensor:
        """``[B, T, T]`` bool: key ``s`` is visible to query ``t`` (causal, sliding window, not padding)."""
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        window = getattr(self.config, "sliding_window", None) if self.family.sliding_window else None
        if window is not None:
            offsets = torch.arange(seq, device=device)
            allowed &= (offsets[:, None] - offsets[None, :]) < window
        allowed = allowed.expand(batch, seq, seq)
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(device).bool()[:, None, :]
        return allowed

    def maps(self, attention_mask: Tensor | None = None, head_chunk: int = 4) -> list[Tensor]:
        """Head-averaged attention probabilities ``[B, T, T]`` float32 per captured layer (``layers`` order).

        ``maps[b, t, s]`` = mean over heads of softmax over keys ``s <= t`` (and not padding, and within
        the sliding window when the family has one) of ``q_t . k_s * scaling``. Rows of padding queries are
        all zero. Heads are processed ``head_chunk`` at a time so only ``[B, head_chunk, T, T]`` scores are
        alive at once. Differentiable with respect to the model's q/k projections and norms.
        """
        if len(self.queries) != len(self.modules):
            raise RuntimeError("no forward captured: run the model inside capture_attention before maps()")
        normed = self.family.qk_norm != "none"
        results = []
        for position, attention in enumerate(self.modules):
            cos, sin = self.rope[position]
            queries = self._project(attention, self.queries[position], attention.q_norm if normed else None, cos, sin)
            keys = self._project(attention, self.keys[position], attention.k_norm if normed else None, cos, sin)
            batch, heads, seq, _ = queries.shape
            keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
            allowed = self._allowed(batch, seq, attention_mask, queries.device)
            total = None
            for start in range(0, heads, head_chunk):
                scores = queries[:, start : start + head_chunk] @ keys[:, start : start + head_chunk].transpose(-1, -2)
                # finfo.min rather than -inf: a row with no allowed key gives a finite softmax (zeroed next)
                scores = (scores * attention.scaling).masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
                probs = (scores.softmax(dim=-1) * allowed[:, None]).sum(1)
                total = probs if total is None else total + probs
            maps = total / heads
            if attention_mask is not None:
                maps = maps * attention_mask.to(maps.device, maps.dtype)[:, :, None]
            results.append(maps)
        return results


@contextlib.contextmanager
def capture_attention(model: nn.Module, layers: Sequence[int]) -> Iterator[AttentionCapture]:
    """Hook ``layers``' attention so the forward run inside the context can give attention maps.

    Usage in a trainer step (the forward you already run; the model keeps its SDPA/flash kernel)::

        with attention.capture_attention(student, student_layers) as capture:
            out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        student_maps = capture.maps(mask)
    """
    capture = AttentionCapture(model, layers)
    handles = capture._hooks()
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(
    model: nn.Module, layers: Sequence[int], input_ids: Tensor, attention_mask: Tensor | None = None, **forward_kwargs
) -> list[Tensor]:
    """Run ``model`` on ``input_ids`` and return head-averaged attention maps ``[B, T, T]`` of ``layers``."""
    with capture_attention(model, layers) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
    return capture.maps(attention_mask)


__all__ = ["ATTENTION_FAMILIES", "AttentionCapture", "AttentionFamily", "attention_maps", "capture_attention"]
