"""MoE teacher tests on real tiny transformers 5.x models (Qwen3-MoE through save/from_pretrained, Mixtral,
Qwen2-MoE, OLMoE) and on hand-built modules with the transformers 4.5x layout (``nn.Linear`` gate and an
``nn.ModuleList`` of expert MLPs inside the sparse block, top-k on the block)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers import (
    logging as hf_logging,
)

from kagglekd import moe
from kagglekd.data import next_token_batch
from kagglekd.errors import ConfigError
from kagglekd.losses import kd_loss
from kagglekd.models import tiny_dense_config, tiny_moe_config

hf_logging.set_verbosity_error()
VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=0,
             eos_token_id=0, pad_token_id=0)  # fmt: skip


def _seeded(config, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3moe")
    _seeded(tiny_moe_config(VOCAB)).save_pretrained(path)
    return path


@pytest.fixture
def qwen3(qwen3_dir):
    """The demo teacher's shape, saved and loaded back so the real loading code runs (fresh per test)."""
    return AutoModelForCausalLM.from_pretrained(qwen3_dir).float().eval()


def _mixtral():
    return _seeded(MixtralConfig(num_local_experts=4, **SMALL))


def _qwen2_moe():
    config = Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **SMALL)
    return _seeded(config)


def _olmoe():
    return _seeded(OlmoeConfig(num_experts=4, **SMALL))


FACTORIES = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "olmoe": _olmoe}


@pytest.fixture(params=["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def teacher(request, qwen3):
    return qwen3 if request.param == "qwen3_moe" else FACTORIES[request.param]()


# ------------------------------------------------------------------------ a transformers 4.5x layout mimic


class _LegacyExpert(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3MoeSparseMoeBlock(nn.Module):
    """The transformers 4.5x Qwen3-MoE sparse block (same class name, attributes and forward)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [_LegacyExpert(config.hidden_size, config.moe_intermediate_size) for _ in range(self.num_experts)]
        )

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
            current = (
                expert_layer(hidden_states[None, top_x].reshape(-1, hidden_dim)) * routing_weights[top_x, idx, None]
            )
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        return final.reshape(batch_size, sequence_length, hidden_dim), router_logits


class _LegacyLayer(nn.Module):
    def __init__(self, config, sparse):
        super().__init__()
        self.mlp = Qwen3MoeSparseMoeBlock(config) if sparse else _LegacyExpert(config.hidden_size, 16)

    def forward(self, hidden_states):
        out = self.mlp(hidden_states)
        return hidden_states + (out[0] if isinstance(out, tuple) else out)


class _LegacyModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([_LegacyLayer(config, sparse=i != 1) for i in range(config.num_hidden_layers)])


class _LegacyForCausalLM(nn.Module):
    """Decoder layers 0 and 2 sparse, layer 1 dense (like ``mlp_only_layers=[1]``)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = _LegacyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def base_model(self):
        return self.model

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        hidden = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            hidden = layer(hidden)
        return SimpleNamespace(logits=self.lm_head(hidden))


@pytest.fixture
def legacy():
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)  # fmt: skip
    return _LegacyForCausalLM(config).eval()


def _ids(batch=2, seq=6, seed=0):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ 1. introspection


def test_find_routers_and_moe_info(teacher):
    config = teacher.config
    experts = config.num_local_experts if config.model_type == "mixtral" else config.num_experts
    routers = moe.find_routers(teacher)
    assert [name for name, _ in routers] == [f"model.layers.{i}.mlp.gate" for i in range(config.num_hidden_layers)]
    assert all(router.weight.shape == (experts, config.hidden_size) for _, router in routers)
    info = moe.moe_info(teacher)
    assert info == moe.MoEInfo(config.model_type, list(range(config.num_hidden_layers)), experts,
                               config.num_experts_per_tok)  # fmt: skip
    assert info.is_moe


def test_dense_layers_are_skipped():
    config = tiny_moe_config(VOCAB)
    config.decoder_sparse_step = 2  # layers 1 and 3 sparse, 0 and 2 dense
    info = moe.moe_info(_seeded(config))
    assert info.moe_layers == [1, 3]


def test_legacy_layout_introspection(legacy):
    routers = moe.find_routers(legacy)
    assert [name for name, _ in routers] == ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]
    assert all(isinstance(router, nn.Linear) for _, router in routers)
    assert moe.moe_info(legacy) == moe.MoEInfo("qwen3_moe", [0, 2], 4, 2)


def test_dense_teacher_is_not_moe_and_moe_options_are_config_errors():
    dense = _seeded(tiny_dense_config(VOCAB))
    assert moe.find_routers(dense) == []
    assert not moe.moe_info(dense).is_moe
    with pytest.raises(ConfigError, match="sar needs a Mixture-of-Experts teacher") as err:
        moe.require_moe(dense, "sar")
    assert err.value.field == "sar"
    with pytest.raises(ConfigError) as err:
        moe.prepare_sar(dense)
    assert err.value.field == "sar"
    with pytest.raises(ConfigError, match="ka_samples"):
        moe.knowledge_augmentation(dense, _ids(), samples=2)


def test_router_patterns_escape_hatch():
    mixtral = _mixtral()
    found = moe.find_routers(mixtral, patterns=[r"\.gate$"])
    assert [name for name, _ in found] == [name for name, _ in moe.find_routers(mixtral)]
    info = moe.moe_info(mixtral, patterns=[r"\.gate$"])
    assert info == moe.MoEInfo("custom", [0, 1], 4, 2)
    # a pattern matching a parent module does not also return its children
    assert [name for name, _ in moe.find_routers(mixtral, patterns=[r"layers\.0\.mlp$", r"layers\.0\.mlp\."])] == [
        "model.layers.0.mlp"
    ]
    assert not moe.moe_info(mixtral, patterns=["no_such_module"]).is_moe


# ------------------------------------------------------------------------ 2. expert top-k control


def _counts(model, ids, k):
    with moe.experts_per_token(model, k), moe.count_expert_activations(model) as activations, torch.no_grad():
        logits = model(input_ids=ids).logits
    return activations, logits


@pytest.mark.parametrize("layout", ["fused", "list"])
def test_experts_per_token_really_changes_the_forward(layout, teacher, legacy):
    model = teacher if layout == "fused" else legacy
    info = moe.moe_info(model)
    ids = _ids()
    tokens, layers, experts = ids.numel(), len(info.moe_layers), info.experts_per_layer
    one, logits_one = _counts(model, ids, 1)
    assert one.total == tokens * layers
    assert (one.counts.sum(1) == tokens).all()
    every, logits_all = _counts(model, ids, experts)
    assert every.total == tokens * experts * layers
    assert (every.counts == tokens).all()
    assert not torch.allclose(logits_one, logits_all)
    assert moe.moe_info(model).experts_per_token == info.experts_per_token  # restored on exit
    previous = moe.set_experts_per_token(model, 3)
    assert previous == info.experts_per_token and moe.moe_info(model).experts_per_token == 3
    moe.set_experts_per_token(model, previous)


def test_all_experts_context_and_validation(qwen3):
    with moe.all_experts(qwen3):
        assert moe.moe_info(qwen3).experts_per_token == 4
    assert moe.moe_info(qwen3).experts_per_token == 2
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"\[1, 4\]"):
            moe.set_experts_per_token(qwen3, bad)


def test_expert_top_k_schedule():
    assert [moe.expert_top_k_schedule(1, 4, step, 4) for step in range(4)] == [1, 2, 3, 4]
    assert [moe.expert_top_k_schedule(8, 2, step, 7) for step in range(7)] == [8, 7, 6, 5, 4, 3, 2]
    assert moe.expert_top_k_schedule(4, 2, 2, 5) == 3
    assert moe.expert_top_k_schedule(2, 3, 1, 3) == 3  # 2.5 rounds half up
    assert moe.expert_top_k_schedule(4, 2, 99, 5) == 2  # past the end: clamped
    assert moe.expert_top_k_schedule(4, 2, 0, 1) == 4
    with pytest.raises(ValueError):
        moe.expert_top_k_schedule(0, 2, 0, 5)


# ------------------------------------------------------------------------ 4. Knowledge Augmentation


def test_gumbel_top_k_zero_temperature_is_deterministic_and_one_samples_the_softmax():
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(-1)
    ref_weights, ref_indices = probs.topk(2, dim=-1)
    weights, indices = moe.gumbel_top_k(logits, 2, normalise=False, temperature=0.0)
    assert torch.equal(indices, ref_indices) and torch.equal(weights, ref_weights)
    weights, _ = moe.gumbel_top_k(logits, 2, normalise=True, temperature=0.0)
    torch.testing.assert_close(weights, ref_weights / ref_weights.sum(-1, keepdim=True))
    # temperature 1, k = 1: the chosen expert is distributed as the router softmax
    row = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).expand(40000, 4)
    _, chosen = moe.gumbel_top_k(row, 1, normalise=True, generator=torch.Generator().manual_seed(1))
    frequency = torch.bincount(chosen.reshape(-1), minlength=4).float() / 40000
    torch.testing.assert_close(frequency, row[0].softmax(-1), atol=0.01, rtol=0)
    _, two = moe.gumbel_top_k(row, 2, normalise=True, generator=torch.Generator().manual_seed(2))
    assert (two[:, 0] != two[:, 1]).all()  # without replacement


@pytest.mark.parametrize("layout", ["fused", "list"])
def test_sampled_routing(layout, teacher, legacy):
    model = teacher if layout == "fused" else legacy
    ids = _ids(seq=12)
    with torch.no_grad():
        deterministic = model(input_ids=ids).logits
        with moe.sampled_routing(model, temperature=0.0):
            zero_noise = model(input_ids=ids).logits
        with (
            moe.sampled_routing(model, 1.0, torch.Generator().manual_seed(0)),
            moe.count_expert_activations(model) as sampled_counts,
        ):
            sampled = model(input_ids=ids).logits
        with moe.sampled_routing(model, 1.0, torch.Generator().manual_seed(0)):
            again = model(input_ids=ids).logits
        restored = model(input_ids=ids).logits
    torch.testing.assert_close(zero_noise, deterministic, atol=1e-5, rtol=1e-5)
    assert (sampled - deterministic).abs().max() > 1e-3
    assert torch.equal(sampled, again)  # seeded generator: reproducible
    assert torch.equal(restored, deterministic)  # hooks / instance forward removed
    assert sampled_counts.total == ids.numel() * moe.moe_info(model).experts_per_token * len(
        moe.moe_info(model).moe_layers
    )


def test_legacy_replacement_forward_matches_the_4_5x_block(legacy):
    block = legacy.model.layers[0].mlp
    hidden = torch.randn(2, 5, 32)
    family = moe.MOE_FAMILIES["qwen3_moe"]
    route = lambda logits, k: moe.gumbel_top_k(logits, k, normalise=True, temperature=0.0)  # noqa: E731
    ours, our_logits = moe._expert_list_forward(block, hidden, family, route)
    reference, reference_logits = block(hidden)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    assert torch.equal(our_logits, reference_logits)


def test_knowledge_augmentation(qwen3):
    ids = _ids()
    with torch.no_grad():
        averaged = moe.knowledge_augmentation(qwen3, ids, samples=4, generator=torch.Generator().manual_seed(0))
        single = moe.knowledge_augmentation(qwen3, ids, samples=4, mode="single",
                                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        zero = moe.knowledge_augmentation(qwen3, ids, samples=3, temperature=0.0)
        deterministic = qwen3(input_ids=ids).logits
    assert averaged.shape == single.shape == (2, 6, VOCAB) and averaged.dtype == torch.float32
    torch.testing.assert_close(averaged.exp().sum(-1), torch.ones(2, 6))
    torch.testing.assert_close(zero, F.log_softmax(deterministic.float(), -1), atol=1e-5, rtol=1e-5)
    assert (single - deterministic).abs().max() > 1e-3
    # the average of M samples is not any single sample's distribution
    assert (averaged - F.log_softmax(single, -1)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="ka_mode"):
        moe.knowledge_augmentation(qwen3, ids, samples=2, mode="mean")
    with pytest.raises(ValueError, match="ka_samples"):
        moe.knowledge_augmentation(qwen3, ids, samples=0)


# ------------------------------------------------------------------------ 3. Student-Aware Router


def _student():
    return _seeded(tiny_dense_config(VOCAB), seed=1).train()


def _sar_step(teacher, all_experts: bool):
    """One SAR optimizer step driven by KD (plus the router regularisers); returns (before, routers)."""
    router_params = moe.prepare_sar(teacher)
    router_names = {name for name, p in teacher.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    initial = moe.router_state_dict(teacher)
    student = _student()
    optimizer = torch.optim.AdamW(
        [{"params": list(student.parameters()), "lr": 1e-3}, {"params": router_params, "lr": 1e-2}]
    )
    ids, labels = next_token_batch(_ids(seq=11))
    top_k = moe.moe_info(teacher).experts_per_layer if all_experts else moe.moe_info(teacher).experts_per_token
    with moe.experts_per_token(teacher, top_k), moe.capture_router_logits(teacher) as router_logits:
        teacher_logits = teacher(input_ids=ids).logits
    loss = kd_loss(student(input_ids=ids).logits, teacher_logits, labels)
    regularisers = moe.router_regularisers(teacher, initial, router_logits, top_k=top_k)
    loss = loss + 0.1 * regularisers["balance"] + 0.01 * regularisers["entropy"] + regularisers["anchor"]
    optimizer.zero_grad()
    loss.backward()
    for name, param in teacher.named_parameters():
        if name in router_names:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    optimizer.step()
    return before, router_names


@pytest.mark.parametrize("all_experts", [False, True])
@pytest.mark.parametrize("layout", ["fused", "list"])
def test_sar_step_changes_only_router_weights(layout, all_experts, teacher, legacy):
    model = teacher if layout == "fused" else legacy
    before, router_names = _sar_step(model, all_experts)
    assert router_names == {f"{name}.weight" for name, _ in moe.find_routers(model)}
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed == router_names  # routers changed; experts, attention, embeddings bitwise identical


def test_router_state_roundtrip(qwen3):
    state = moe.router_state_dict(qwen3)
    assert set(state) == {f"model.layers.{i}.mlp.gate.weight" for i in range(4)}
    original = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for _, router in moe.find_routers(qwen3):
            router.weight.add_(1.0)
    moe.load_router_state(qwen3, original)
    assert all(torch.equal(v, moe.router_state_dict(qwen3)[k]) for k, v in original.items())
    with pytest.raises(ValueError, match="does not"):
        moe.load_router_state(qwen3, {"model.nope.weight": torch.zeros(1)})


def test_router_regularisers_golden_values():
    mixtral = _mixtral()  # 4 experts, top-2, 2 MoE layers
    initial = moe.router_state_dict(mixtral)
    # entropy of uniform routing is log E; balance with perfectly spread top-2 choices is exactly 1
    spread = torch.tensor([[5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0]]).repeat(3, 1)
    uniform = torch.zeros(6, 4)
    values = moe.router_regularisers(mixtral, initial, [uniform, spread])
    assert values["anchor"].item() == 0.0
    probs = spread.softmax(-1)
    expected_entropy = (math.log(4) + (-(probs * probs.log()).sum(-1).mean()).item()) / 2
    assert values["entropy"].item() == pytest.approx(expected_entropy, rel=1e-6)
    # uniform logits: top-2 ties pick experts 0, 1 -> f = [.5, .5, 0, 0], P = .25 -> 4 * .25 = 1
    assert values["balance"].item() == pytest.approx(1.0, rel=1e-6)
    # collapsed: every token prefers experts 0 and 1 -> f = [.5, .5, 0, 0]; balance = 4 * (.5 P0 + .5 P1)
    collapsed = torch.tensor([[4.0, 3.0, 0.0, 0.0]]).repeat(5, 1)
    p = collapsed[0].softmax(-1)
    value = moe.router_regularisers(mixtral, initial, {0: collapsed})["balance"]
    assert value.item() == pytest.approx(4 * (0.5 * p[0] + 0.5 * p[1]).item(), rel=1e-6)
    # explicit top_k = 1: f = [1, 0, 0, 0] -> 4 * P0
    value = moe.router_regularisers(mixtral, initial, [collapsed], top_k=1)["balance"]
    assert value.item() == pytest.approx(4 * p[0].item(), rel=1e-6)
    # token mask: only the masked-in rows count
    mixed = torch.cat([collapsed[:2], spread[:2]])
    masked = moe.router_regularisers(mixtral, initial, [mixed], token_mask=torch.tensor([[False, False, True, True]]))
    assert masked["balance"].item() == pytest.approx(
        moe.router_regularisers(mixtral, initial, [spread[:2]])["balance"].item(), rel=1e-6
    )
    # anchor: relative squared drift
    with torch.no_grad():
        mixtral.model.layers[0].mlp.gate.weight.add_(0.1)
    scale = sum((w**2).sum() for w in initial.values())
    drift = 0.1**2 * mixtral.model.layers[0].mlp.gate.weight.numel()
    anchor = moe.router_regularisers(mixtral, initial, [spread])["anchor"]
    assert anchor.item() == pytest.approx(drift / scale.item(), rel=1e-4)


def test_teacher_gradient_checkpointing_recomputes_and_gives_the_same_router_gradients():
    ids = _ids(seq=8)

    def router_grads(checkpointing):
        model = _mixtral()
        moe.prepare_sar(model)
        if checkpointing:
            moe.enable_teacher_checkpointing(model)
        calls = []
        handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda *args: calls.append(1))
        model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
        handle.remove()
        assert not model.model.layers[0].self_attn.training  # submodules keep eval behaviour
        return [r.weight.grad.clone() for _, r in moe.find_routers(model)], len(calls)

    plain, plain_calls = router_grads(False)
    checkpointed, checkpointed_calls = router_grads(True)
    assert plain_calls == 1 and checkpointed_calls == 2  # the backward re-ran the layer
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
