"""How an MoE teacher routes tokens: per-expert usage by token class, balance and specialisation, per layer.

The Student-Aware Router (SAR) and Knowledge Augmentation (KA) change *which experts* see a token; that only
matters when the experts differ, i.e. when the routing carries information about the token. This module puts
a number on that, from the router logits of held-out blocks (``moe.capture_router_logits``):

* ``usage``: the share of routed assignments each expert receives (a token routed to k experts counts 1/k
  for each), and its entropy against the uniform ``log E``: ``balance`` = H(usage) / log E, 1 when every
  expert is used equally, 0 when one expert takes every token (collapse).
* ``class_usage``: the same shares within each token class (``TOKEN_CLASSES``: letters, digits,
  punctuation, whitespace, Python keywords, other), i.e. which experts the words / numbers / code go to.
* ``mutual_information``: I(class; expert) in nats, with (class, expert) drawn as (a held-out token's class,
  one of its k experts at random); ``specialisation`` = I / min(H(class), H(expert)) in [0, 1]: 0 when the
  expert choice is independent of the token class (e.g. a router with zero weights, which routes every token
  alike), 1 when the class determines the expert.
* ``router_entropy``: mean over tokens of the entropy of softmax(router logits), over log E: 1 for a router
  that is indifferent between experts, near 0 for a confident one.

Only top-k hard assignments enter usage and mutual information (ties, as in a zero-weight router, go to the
lowest expert indices, like ``torch.topk``).
"""

from __future__ import annotations

import keyword
import math
import string
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kagglekd import data, moe

TOKEN_CLASSES = ("letters", "digits", "punctuation", "whitespace", "keyword", "other")
_PUNCTUATION = frozenset(string.punctuation)
_KEYWORDS = frozenset(keyword.kwlist)


def classify_token(text: str) -> str:
    """The ``TOKEN_CLASSES`` name of one token's decoded text (leading/trailing whitespace ignored).

    ``" def"`` -> keyword, ``" the"`` -> letters, ``"42"`` -> digits, ``"):"`` -> punctuation,
    ``"\\n    "`` -> whitespace, anything mixed (``"x1"``, ``"_name"``, ``"<|endoftext|>"``) -> other.
    """
    stripped = text.strip()
    if not stripped:
        return "whitespace"
    if stripped in _KEYWORDS:
        return "keyword"
    if stripped.isascii() and stripped.isalpha():
        return "letters"
    if stripped.isascii() and stripped.isdigit():
        return "digits"
    if all(char in _PUNCTUATION for char in stripped):
        return "punctuation"
    return "other"


def token_class_table(tokenizer, vocab_size: int | None = None) -> Tensor:
    """``[vocab_size]`` long tensor: the ``TOKEN_CLASSES`` index of every token id (decoded one at a time).

    ``vocab_size`` defaults to ``len(tokenizer)``; ids past the tokenizer's length (padding rows of a larger
    embedding) are "other".
    """
    vocab_size = vocab_size or len(tokenizer)
    table = torch.full((vocab_size,), TOKEN_CLASSES.index("other"), dtype=torch.long)
    for token_id in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        table[token_id] = TOKEN_CLASSES.index(classify_token(text))
    return table


@torch.no_grad()
def routing_counts(
    model: nn.Module,
    blocks: Tensor,
    class_of_token: Tensor,
    *,
    batch_size: int = 16,
    patterns: Sequence[str] | None = None,
) -> dict:
    """Routed-assignment counts of ``model`` over ``[N, L + 1]`` blocks, per router, by token class.

    Returns ``{"counts": [routers, classes, experts] float64, "router_entropy": [routers] float64 (nats summed
    over tokens), "tokens": int, "experts_per_token": k}``; ``counts[r, c, e]`` is the number of tokens of
    class ``c`` (the class of the *input* token at that position, ``class_of_token[input_id]``) routed by
    router ``r`` to expert ``e``, each token adding 1/k per selected expert, so ``counts[r].sum() == tokens``.
    """
    info = moe.moe_info(model, patterns)
    if not info.is_moe:
        raise ValueError("routing_counts needs an MoE model; this one has no router (see moe.find_routers).")
    top_k = info.experts_per_token or 1
    routers, experts, classes = len(info.moe_layers), info.experts_per_layer, len(TOKEN_CLASSES)
    counts = torch.zeros(routers, classes, experts, dtype=torch.float64)
    entropy = torch.zeros(routers, dtype=torch.float64)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(blocks), batch_size):
            input_ids, _ = data.next_token_batch(blocks[start : start + batch_size])
            token_classes = class_of_token.to(input_ids.device)[input_ids].flatten().cpu()  # [B*T], row-major
            with moe.capture_router_logits(model, patterns) as captured:
                model(input_ids=input_ids)
            for position in range(routers):
                logits = captured[position].detach().float().cpu()  # [B*T, experts]
                chosen = logits.topk(top_k, dim=-1).indices  # [B*T, k]
                flat = (token_classes[:, None] * experts + chosen).flatten()
                counts[position] += torch.bincount(flat, minlength=classes * experts).view(classes, experts) / top_k
                log_probs = torch.log_softmax(logits.double(), dim=-1)
                entropy[position] += -(log_probs.exp() * log_probs).sum()
            tokens += input_ids.numel()
    finally:
        model.train(was_training)
    return {"counts": counts, "router_entropy": entropy, "tokens": tokens, "experts_per_token": top_k}


def _entropy(probabilities: Tensor) -> float:
    """Shannon entropy in nats of a probability vector (zeros contribute 0)."""
    positive = probabilities[probabilities > 0]
    return float(-(positive * positive.log()).sum())


def layer_statistics(counts: Tensor) -> dict:
    """Usage, balance, class usage, mutual information and specialisation of one router's ``[classes, experts]``
    assignment counts (see the module docstring; entropies in nats)."""
    total = counts.sum()
    if total <= 0:
        raise ValueError("no routed tokens to measure (empty held-out blocks?)")
    joint = counts.double() / total  # P(class, expert)
    class_share, usage = joint.sum(1), joint.sum(0)
    class_entropy, usage_entropy = _entropy(class_share), _entropy(usage)
    experts = counts.shape[1]
    independent = class_share[:, None] * usage[None, :]
    mask = joint > 0
    mutual_information = max(0.0, float((joint[mask] * (joint[mask] / independent[mask]).log()).sum()))
    ceiling = min(class_entropy, usage_entropy)
    return {
        "usage": [round(float(u), 4) for u in usage],
        "usage_entropy": usage_entropy,
        "balance": usage_entropy / math.log(experts) if experts > 1 else 1.0,
        "mutual_information": mutual_information,
        "specialisation": mutual_information / ceiling if ceiling > 1e-12 else 0.0,
        "class_usage": {
            name: [round(float(share), 4) for share in counts[index] / counts[index].sum()]
            for index, name in enumerate(TOKEN_CLASSES)
            if counts[index].sum() > 0
        },
    }


def routing_report(
    model: nn.Module,
    blocks: Tensor,
    class_of_token: Tensor,
    *,
    batch_size: int = 16,
    patterns: Sequence[str] | None = None,
) -> dict:
    """The routing of ``model`` on held-out ``[N, L + 1]`` blocks, as written into the teacher's ``pretrain.json``.

    ``{"tokens", "experts", "experts_per_token", "log_experts", "class_tokens": {class: count}, "mean_balance",
    "mean_specialisation", "layers": [{"layer", "router_entropy", **layer_statistics}, ...]}``; ``layer`` is
    the decoder-layer index, ``router_entropy`` the mean per-token router entropy over log E.
    """
    measured = routing_counts(model, blocks, class_of_token, batch_size=batch_size, patterns=patterns)
    counts, experts = measured["counts"], measured["counts"].shape[-1]
    log_experts = math.log(experts)
    layers = []
    for position, layer_index in enumerate(moe.moe_info(model, patterns).moe_layers):
        mean_entropy = float(measured["router_entropy"][position]) / measured["tokens"]
        layers.append(
            {
                "layer": layer_index,
                "router_entropy": mean_entropy / log_experts if experts > 1 else 0.0,
                **layer_statistics(counts[position]),
            }
        )
    class_tokens = counts[0].sum(1)
    return {
        "tokens": measured["tokens"],
        "experts": experts,
        "experts_per_token": measured["experts_per_token"],
        "log_experts": log_experts,
        "class_tokens": {name: round(float(class_tokens[i])) for i, name in enumerate(TOKEN_CLASSES)},
        "mean_balance": sum(layer["balance"] for layer in layers) / len(layers),
        "mean_specialisation": sum(layer["specialisation"] for layer in layers) / len(layers),
        "layers": layers,
    }
