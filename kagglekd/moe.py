"""Mixture-of-Experts teacher introspection and control (attention-transfer hooks live in ``attention.py``).

What lives here (the losses themselves are pure functions in ``losses.py``):

* ``find_routers`` / ``moe_info`` / ``require_moe``: which modules route tokens to experts, in which layers.
* expert top-k control: ``set_experts_per_token`` / ``experts_per_token`` (k = number of experts is the
  all-experts mode), ``expert_top_k_schedule``, and ``count_expert_activations`` to verify it.
* Student-Aware Router (SAR): ``prepare_sar`` (router-only gradients), ``router_state_dict`` /
  ``load_router_state``, ``capture_router_logits``, ``router_regularisers``, ``enable_teacher_checkpointing``.
* Knowledge Augmentation (KA): ``sampled_routing`` (Gumbel top-k expert sampling) and
  ``knowledge_augmentation`` (M sampled teacher passes, averaged or single).

Families are described by an explicit table (``MOE_FAMILIES``), keyed by ``config.model_type``. Two module
layouts of the sparse MoE block are supported:

==========  ==============================  =======================================  ====================
layout      block.experts                   block.gate (the router)                  top-k read from
==========  ==============================  =======================================  ====================
``fused``   one module, 3-D expert weights  ``<Family>TopKRouter``; returns           ``router.top_k``
(5.x)                                       ``(logits, weights, indices)``
``list``    ``nn.ModuleList``, one MLP per  ``nn.Linear`` hidden -> experts; returns  ``block.top_k``
(4.5x)      expert                          the logits, top-k happens in the block
==========  ==============================  =======================================  ====================

Routers of other families can be named with ``patterns`` (regexes over module names, the config's
``router_patterns``); such routers support SAR (router-only training, logits capture, regularisers) but
not top-k control or KA sampling, which need to know the block's forward.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kagglekd.errors import ConfigError

FUSED = "fused"
EXPERT_LIST = "list"


@dataclass(frozen=True)
class MoEFamily:
    """How one model family builds its sparse MoE blocks.

    ``block_class``: class name of the sparse block (same name in 4.5x and 5.x); decoder layers whose
    ``block_attrs`` module is of another class (a dense MLP) are dense layers.
    ``block_attrs``: decoder-layer attribute(s) that hold the block, first present wins.
    ``num_experts_key`` / ``top_k_key``: config fields. ``normalise_key``: config field saying whether the
    kept top-k weights are renormalised to sum to 1 (``None`` = always renormalised, like Mixtral).
    ``shared_expert``: the block adds ``sigmoid(shared_expert_gate(x)) * shared_expert(x)`` (Qwen2-MoE).
    """

    block_class: str
    block_attrs: tuple[str, ...]
    num_experts_key: str
    top_k_key: str
    normalise_key: str | None
    shared_expert: bool = False


MOE_FAMILIES: dict[str, MoEFamily] = {
    "qwen3_moe": MoEFamily("Qwen3MoeSparseMoeBlock", ("mlp",), "num_experts", "num_experts_per_tok", "norm_topk_prob"),
    "qwen2_moe": MoEFamily(
        "Qwen2MoeSparseMoeBlock", ("mlp",), "num_experts", "num_experts_per_tok", "norm_topk_prob", shared_expert=True
    ),
    # 4.5x names the block ``block_sparse_moe``, 5.x ``mlp``.
    "mixtral": MoEFamily(
        "MixtralSparseMoeBlock", ("block_sparse_moe", "mlp"), "num_local_experts", "num_experts_per_tok", None
    ),  # fmt: skip
    "olmoe": MoEFamily("OlmoeSparseMoeBlock", ("mlp",), "num_experts", "num_experts_per_tok", "norm_topk_prob"),
}

CUSTOM_FAMILY = "custom"


@dataclass(frozen=True)
class MoEInfo:
    """What ``moe_info`` found. ``family`` is ``None`` for a dense model, ``"custom"`` for ``patterns``.

    ``moe_layers``: decoder-layer indices holding a sparse block; ``experts_per_layer``: routed experts per
    block; ``experts_per_token``: how many of them run per token right now (after ``set_experts_per_token``).
    """

    family: str | None
    moe_layers: list[int] = field(default_factory=list)
    experts_per_layer: int = 0
    experts_per_token: int = 0

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)


@dataclass
class _MoELayer:
    index: int  # decoder-layer index
    name: str  # module name of the block
    block: nn.Module
    router: nn.Module
    layout: str


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM or of a bare decoder (also used by ``attention.py``)."""
    # ``base_model`` is ``model.model`` for a *ForCausalLM and the model itself for a bare decoder.
    return model.base_model.layers


def _family(model: nn.Module) -> MoEFamily | None:
    return MOE_FAMILIES.get(getattr(model.config, "model_type", None))


def _moe_layers(model: nn.Module) -> list[_MoELayer]:
    """The sparse blocks of a known family, in layer order; ``[]`` for other models."""
    family = _family(model)
    if family is None:
        return []
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    for index, decoder_layer in enumerate(decoder_layers(model)):
        attr = next((a for a in family.block_attrs if a in decoder_layer._modules), None)
        block = decoder_layer._modules.get(attr) if attr else None
        if block is None or type(block).__name__ != family.block_class:
            continue
        layout = EXPERT_LIST if isinstance(block.experts, nn.ModuleList) else FUSED
        layers.append(_MoELayer(index, names[id(block)], block, block.gate, layout))
    return layers


def _require_known_family(model: nn.Module, what: str) -> list[_MoELayer]:
    layers = _moe_layers(model)
    if not layers:
        model_type = getattr(model.config, "model_type", "?")
        raise ConfigError(
            f"{what} needs a Mixture-of-Experts teacher of a known family ({', '.join(MOE_FAMILIES)}); "
            f"this teacher is {model_type!r} with no sparse MoE block found. router_patterns can name the routers "
            "of other families for SAR, but not for expert top-k control or expert sampling.",
            field=what,
        )
    return layers


def find_routers(model: nn.Module, patterns: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """``(module name, router module)`` of every MoE layer, in layer order; ``[]`` for a dense model.

    A router maps hidden states to one logit per expert (its ``weight`` is ``[experts, hidden]``).
    ``patterns`` (regexes, ``re.search`` over module names) overrides the family table; a matched module
    whose ancestor also matched is skipped, so ``"gate$"`` does not also return children.
    """
    if patterns:
        compiled = [re.compile(p) for p in patterns]
        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if name and any(p.search(name) for p in compiled):
                if not any(name.startswith(parent + ".") for parent, _ in found):
                    found.append((name, module))
        return found
    return [(f"{layer.name}.gate", layer.router) for layer in _moe_layers(model)]


def _layer_index_from_name(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def moe_info(model: nn.Module, patterns: Sequence[str] | None = None) -> MoEInfo:
    """Family, MoE layer indices, experts per layer and experts per token of ``model``.

    Experts per token are read from the live modules, so they reflect ``set_experts_per_token``; with
    ``patterns`` the config's ``num_experts_per_tok`` is reported (0 if it has none).
    """
    if patterns:
        routers = find_routers(model, patterns)
        if not routers:
            return MoEInfo(None)
        return MoEInfo(
            CUSTOM_FAMILY,
            [_layer_index_from_name(name) for name, _ in routers],
            int(routers[0][1].weight.shape[0]),
            int(getattr(model.config, "num_experts_per_tok", 0) or 0),
        )
    layers = _moe_layers(model)
    if not layers:
        return MoEInfo(None)
    return MoEInfo(
        model.config.model_type,
        [layer.index for layer in layers],
        int(getattr(model.config, _family(model).num_experts_key)),
        _top_k(layers[0]),
    )


def require_moe(model: nn.Module, option: str, patterns: Sequence[str] | None = None) -> MoEInfo:
    """``moe_info(model)``, or a ConfigError naming ``option`` when the model has no MoE layer."""
    info = moe_info(model, patterns)
    if not info.is_moe:
        model_type = getattr(model.config, "model_type", "?")
        raise ConfigError(
            f"{option} needs a Mixture-of-Experts teacher, but the teacher is {model_type!r} and no router was "
            f"found. Use an MoE teacher ({', '.join(MOE_FAMILIES)}), set router_patterns to regexes matching its "
            f"router module names, or turn {option} off.",
            field=option,
        )
    return info


# ---------------------------------------------------------------------------------------------------------
# Expert top-k control and activation counting
# ---------------------------------------------------------------------------------------------------------


def _top_k(layer: _MoELayer) -> int:
    return int(layer.router.top_k if layer.layout == FUSED else layer.block.top_k)


def _set_top_k(layer: _MoELayer, k: int) -> None:
    if layer.layout == FUSED:
        layer.router.top_k = k
    else:
        layer.block.top_k = k


def set_experts_per_token(model: nn.Module, k: int) -> int:
    """Make every MoE layer run ``k`` experts per token from now on; returns the previous k.

    ``k`` = experts per layer is the all-experts mode. The change is to the attribute the forward
    reads (``router.top_k`` in 5.x, ``block.top_k`` in 4.5x), so it really changes the computation;
    ``count_expert_activations`` verifies it.
    """
    layers = _require_known_family(model, "expert_top_k")
    experts = int(getattr(model.config, _family(model).num_experts_key))
    if not 1 <= k <= experts:
        raise ValueError(f"experts per token must be in [1, {experts}] (the experts per layer), got {k}")
    previous = _top_k(layers[0])
    for layer in layers:
        _set_top_k(layer, int(k))
    return previous


@contextlib.contextmanager
def experts_per_token(model: nn.Module, k: int) -> Iterator[None]:
    """Context manager form of ``set_experts_per_token``: restores each layer's previous k on exit."""
    layers = _require_known_family(model, "expert_top_k")
    previous = [_top_k(layer) for layer in layers]
    set_experts_per_token(model, k)
    try:
        yield
    finally:
        for layer, old in zip(layers, previous):
            _set_top_k(layer, old)


def all_experts(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Context manager: every expert runs for every token (SAR's all-experts mode)."""
    return experts_per_token(model, moe_info(model).experts_per_layer)


def expert_top_k_schedule(start: int, end: int, step: int, total_steps: int) -> int:
    """Experts per token at optimizer step ``step`` (0-based) of ``total_steps``: linear from ``start``
    (step 0) to ``end`` (the last step), rounded half up, clamped outside the run."""
    if start < 1 or end < 1:
        raise ValueError(f"expert top-k must be >= 1, got start={start}, end={end}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    fraction = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return int(math.floor(start + (end - start) * fraction + 0.5))


class ExpertActivations:
    """Counts filled by ``count_expert_activations``: ``counts[i, e]`` = token rows expert ``e`` of the
    i-th MoE layer processed (``layers[i]`` is its decoder-layer index)."""

    def __init__(self, layers: list[int], experts: int):
        self.layers = layers
        self.counts = torch.zeros(len(layers), experts, dtype=torch.long)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


@contextlib.contextmanager
def count_expert_activations(model: nn.Module) -> Iterator[ExpertActivations]:
    """Count, with forward hooks on the experts, how many token rows each expert computes.

    5.x: a hook on the fused experts module reads the ``top_k_index`` it is called with; 4.5x: a hook on
    each expert MLP counts its input rows. Under gradient checkpointing the recomputation counts again.
    """
    layers = _require_known_family(model, "count_expert_activations")
    experts = int(getattr(model.config, _family(model).num_experts_key))
    activations = ExpertActivations([layer.index for layer in layers], experts)
    handles = []

    def fused_hook(position):
        def hook(module, args, kwargs, output):
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            # index == experts is the "no expert" sentinel some implementations use; drop it.
            counts = torch.bincount(top_k_index.reshape(-1).cpu(), minlength=experts + 1)[:experts]
            activations.counts[position] += counts

        return hook

    def expert_hook(position, expert):
        def hook(module, args, output):
            activations.counts[position, expert] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return hook

    try:
        for position, layer in enumerate(layers):
            if layer.layout == FUSED:
                handles.append(layer.block.experts.register_forward_hook(fused_hook(position), with_kwargs=True))
            else:
                for expert, module in enumerate(layer.block.experts):
                    handles.append(module.register_forward_hook(expert_hook(position, expert)))
        yield activations
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------
# Routing with Gumbel top-k sampling (Knowledge Augmentation)
# ---------------------------------------------------------------------------------------------------------


def gumbel_top_k(
    router_logits: Tensor, k: int, normalise: bool, temperature: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sample ``k`` distinct experts per token from ``softmax(router_logits)``: ``[N, E] -> ([N, k], [N, k])``.

    Returns ``(weights float32, indices int64)``. The experts are the top-k of ``logits + temperature * G``
    with ``G`` i.i.d. Gumbel(0, 1): at temperature 1 this samples k experts without replacement from the
    router's softmax; as temperature -> 0 it becomes the deterministic top-k (exactly, at 0). The weights
    are the router's softmax probabilities of the chosen experts (renormalised when ``normalise``), as the
    deterministic router computes them, so only the choice of experts is random.
    """
    if temperature < 0:
        raise ValueError(f"expert sampling temperature must be >= 0, got {temperature}")
    logits = router_logits.float()
    probs = logits.softmax(dim=-1)
    scores = probs
    if temperature > 0:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        scores = logits + temperature * gumbel
    indices = scores.topk(k, dim=-1).indices
    weights = probs.gather(-1, indices)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def _normalises(model: nn.Module, family: MoEFamily) -> bool:
    return True if family.normalise_key is None else bool(getattr(model.config, family.normalise_key))


def _expert_list_forward(block: nn.Module, hidden_states: Tensor, family: MoEFamily, route) -> tuple[Tensor, Tensor]:
    """The 4.5x sparse-block forward with ``route(logits, k) -> (weights, indices)`` choosing the experts.

    Same computation as transformers 4.5x (gate -> route -> per-expert MLP on its tokens, weighted sum, plus
    the sigmoid-gated shared expert for Qwen2-MoE); returns ``(hidden_states, router_logits)`` like it.
    """
    batch, sequence, hidden = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden)
    router_logits = block.gate(flat)
    weights, indices = route(router_logits, block.top_k)
    weights = weights.to(flat.dtype)
    output = torch.zeros_like(flat)
    for expert_index, expert in enumerate(block.experts):
        token, slot = torch.where(indices == expert_index)
        if token.numel() == 0:
            continue
        output.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
    if family.shared_expert:
        output = output + torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
    return output.reshape(batch, sequence, hidden), router_logits


@contextlib.contextmanager
def sampled_routing(
    model: nn.Module, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Iterator[None]:
    """Inside this context every MoE layer picks its experts by Gumbel top-k sampling (``gumbel_top_k``).

    The number of experts per token stays whatever it is (``set_experts_per_token``). 5.x: a forward hook
    replaces the router's ``(logits, weights, indices)``; 4.5x: the block's forward is replaced on the
    instance by ``_expert_list_forward`` for the duration. ``generator`` (on the model's device) makes the
    samples reproducible; under teacher gradient checkpointing leave it ``None``: checkpointing replays the
    global RNG state in the recomputation, but not an explicit generator's.
    """
    family = _family(model)
    layers = _require_known_family(model, "ka_samples")
    normalise = _normalises(model, family)
    route = lambda logits, k: gumbel_top_k(logits, int(k), normalise, temperature, generator)  # noqa: E731
    handles, patched = [], []

    def router_hook(module, args, output):
        logits, old_weights, _ = output
        weights, indices = route(logits, module.top_k)
        return logits, weights.to(old_weights.dtype), indices

    try:
        for layer in layers:
            if layer.layout == FUSED:
                handles.append(layer.router.register_forward_hook(router_hook))
            else:
                block = layer.block
                block.forward = lambda hidden_states, _block=block: _expert_list_forward(
                    _block, hidden_states, family, route
                )
                patched.append(block)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block in patched:
            del block.forward  # the class's forward is visible again


def _forward_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, **forward_kwargs) -> Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits


KA_MODES = ("average", "single")


def knowledge_augmentation(
    teacher: nn.Module,
    input_ids: Tensor,
    samples: int,
    mode: str = "average",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
    **forward_kwargs,
) -> Tensor:
    """Teacher targets with sampled expert routing: ``input_ids [B, T] -> [B, T, V]``.

    ``"average"``: ``samples`` forward passes, each with Gumbel top-k expert choices (``sampled_routing``),
    and returns ``log(mean_m softmax(logits_m))`` in float32, a log-probability tensor that plugs into
    ``losses.kd_loss`` as teacher logits (at distillation temperature T the target is the averaged
    distribution sharpened/flattened as p^(1/T), renormalised). ``"single"``: one sampled pass, its raw
    logits. Runs under the caller's grad mode: wrap in ``torch.no_grad()`` for plain KD targets.
    """
    if mode not in KA_MODES:
        raise ValueError(f"ka_mode must be one of {', '.join(KA_MODES)}, got {mode!r}")
    if samples < 1:
        raise ValueError(f"ka_samples must be >= 1, got {samples}")
    with sampled_routing(teacher, temperature, generator):
        if mode == "single":
            return _forward_logits(teacher, input_ids, attention_mask, **forward_kwargs)
        log_sum = None
        for _ in range(samples):
            log_probs = F.log_softmax(_forward_logits(teacher, input_ids, attention_mask, **forward_kwargs).float(), -1)
            log_sum = log_probs if log_sum is None else torch.logaddexp(log_sum, log_probs)
    return log_sum - math.log(samples)


# ---------------------------------------------------------------------------------------------------------
# Student-Aware Router (SAR)
# ---------------------------------------------------------------------------------------------------------


def prepare_sar(teacher: nn.Module, patterns: Sequence[str] | None = None) -> list[nn.Parameter]:
    """Freeze every teacher parameter except the routers'; return the router parameters.

    Give the returned list to the optimizer as its own param group (lr = ``router_lr``). Expert,
    attention, embedding and norm weights get ``requires_grad=False`` and so never change.
    """
    require_moe(teacher, "sar", patterns)
    teacher.requires_grad_(False)
    params: list[nn.Parameter] = []
    for _, router in find_routers(teacher, patterns):
        for param in router.parameters():
            param.requires_grad_(True)
            params.append(param)
    return params


def router_state_dict(teacher: nn.Module, patterns: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Detached copies of the router parameters, keyed ``"<router module>.<param>"``.

    The anchor regulariser's ``initial_router_state`` and what a run saves as ``teacher_routers/``.
    """
    return {
        f"{name}.{param_name}": param.detach().clone()
        for name, router in find_routers(teacher, patterns)
        for param_name, param in router.named_parameters()
    }


def load_router_state(teacher: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``router_state_dict`` tensors back into ``teacher`` (every key must name a teacher parameter)."""
    params = dict(teacher.named_parameters())
    missing = [key for key in state if key not in params]
    if missing:
        raise ValueError(f"router state has keys the teacher does not: {missing[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)


@contextlib.contextmanager
def capture_router_logits(model: nn.Module, patterns: Sequence[str] | None = None) -> Iterator[dict[int, Tensor]]:
    """Yield a dict that each forward fills with ``{router position: logits [tokens, experts]}``.

    Positions follow ``find_routers`` order; ``tokens`` = B*T rows in ``[B, T]`` row-major order. The
    logits stay in the graph (router gradients flow through them). A recomputation under gradient
    checkpointing overwrites entries, it does not append.
    """
    captured: dict[int, Tensor] = {}

    def make_hook(position):
        def hook(module, args, output):
            # 5.x router classes return (logits, weights, indices); 4.5x nn.Linear gates return the logits.
            captured[position] = output if isinstance(output, Tensor) else output[0]

        return hook

    routers = find_routers(model, patterns)
    handles = [router.register_forward_hook(make_hook(i)) for i, (_, router) in enumerate(routers)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def router_regularisers(
    teacher: nn.Module,
    initial_router_state: Mapping[str, Tensor],
    router_logits: Mapping[int, Tensor] | Sequence[Tensor],
    token_mask: Tensor | None = None,
    patterns: Sequence[str] | None = None,
    top_k: int | None = None,
) -> dict[str, Tensor]:
    """SAR regularisers, float32 scalars: ``{"anchor", "balance", "entropy"}``.

    * anchor: ``sum ||W - W0||^2 / sum ||W0||^2`` over router parameters (relative squared drift from
      ``initial_router_state``; 0 at the start, scale-free).
    * balance: Switch-Transformer load balance ``E * sum_e f_e * P_e`` averaged over layers, with ``f_e``
      the fraction of (token, slot) assignments of the current top-k that go to expert e and ``P_e`` the
      mean router probability of e. 1 when perfectly balanced, up to E when collapsed. (In all-experts
      mode f is uniform and the value is constant 1: no gradient.)
    * entropy: mean per-token entropy (nats) of the router softmax, averaged over layers. A positive
      weight sharpens the routing, a negative one spreads it.

    ``router_logits``: from ``capture_router_logits`` (dict) or a list of ``[tokens, E]`` tensors.
    ``token_mask``: ``[B, T]`` bool (e.g. ``attention_mask.bool()``); only those rows count.
    ``top_k``: the experts per token the forward ran with (default: the teacher's current setting).
    """
    params = dict(teacher.named_parameters())
    drift = sum(((params[key].float() - init.to(params[key].device).float()) ** 2).sum()
                for key, init in initial_router_state.items())  # fmt: skip
    scale = sum((init.float() ** 2).sum() for init in initial_router_state.values())
    anchor = drift / max(float(scale), 1e-12)

    logits_list = (
        [router_logits[k] for k in sorted(router_logits)] if isinstance(router_logits, Mapping) else list(router_logits)
    )
    if not logits_list:
        raise ValueError("router_logits is empty: run the teacher forward inside capture_router_logits")
    if top_k is None:
        top_k = moe_info(teacher, patterns).experts_per_token or 1
    balances, entropies = [], []
    for logits in logits_list:
        logits = logits.float().reshape(-1, logits.shape[-1])
        if token_mask is not None:
            logits = logits[token_mask.reshape(-1).to(logits.device).bool()]
        experts = logits.shape[-1]
        if logits.shape[0] == 0:
            zero = logits.sum()
            balances.append(zero)
            entropies.append(zero)
            continue
        log_probs = F.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        chosen = probs.topk(min(top_k, experts), dim=-1).indices
        fraction = torch.bincount(chosen.reshape(-1), minlength=experts).float() / chosen.numel()
        balances.append(experts * (fraction * probs.mean(0)).sum())
        entropies.append(-(probs * log_probs).sum(-1).mean())
    return {
        "anchor": anchor if isinstance(anchor, Tensor) else torch.tensor(float(anchor)),
        "balance": torch.stack(balances).mean(),
        "entropy": torch.stack(entropies).mean(),
    }


def enable_teacher_checkpointing(teacher: nn.Module) -> None:
    """Activation checkpointing of the teacher's decoder layers (non-reentrant), for SAR's teacher backward.

    transformers only checkpoints layers in training mode; this marks the decoder *layers* as training
    while every submodule keeps eval behaviour (no dropout, no router jitter). Call it after any
    ``teacher.eval()``, which would undo it.
    """
    with warnings.catch_warnings():
        # 5.x deprecates the name in favour of activation_checkpointing_enable, which 4.5x lacks.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
        teacher.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher.config.use_cache = False
    for layer in decoder_layers(teacher):
        layer.training = True  # this module only, not its children


__all__ = [
    "KA_MODES",
    "MOE_FAMILIES",
    "ExpertActivations",
    "MoEFamily",
    "MoEInfo",
    "all_experts",
    "capture_router_logits",
    "count_expert_activations",
    "decoder_layers",
    "enable_teacher_checkpointing",
    "expert_top_k_schedule",
    "experts_per_token",
    "find_routers",
    "gumbel_top_k",
    "knowledge_augmentation",
    "load_router_state",
    "moe_info",
    "prepare_sar",
    "require_moe",
    "router_regularisers",
    "router_state_dict",
    "sampled_routing",
    "set_experts_per_token",
]
