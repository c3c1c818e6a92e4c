"""Feature and attention transfer: the pure losses (identities, invariances, golden values, masking) and the
hook-based attention maps against transformers' own eager attention probabilities as the reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig
from transformers import logging as hf_logging

from kagglekd import attention
from kagglekd.errors import ConfigError
from kagglekd.models import tiny_dense_config, tiny_moe_config
from kagglekd.transfer import attention_loss, feature_loss, layer_map

hf_logging.set_verbosity_error()
F64 = torch.float64
IDENTITY = nn.Identity()


# ------------------------------------------------------------------------ layer map


def test_layer_map_uniform_golden_values():
    assert layer_map(3, 4) == [(0, 0), (1, 2), (2, 3)]
    assert layer_map(4, 8) == [(0, 1), (1, 3), (2, 5), (3, 7)]
    assert layer_map(4, 8, count=2) == [(1, 3), (3, 7)]
    assert layer_map(2, 2) == [(0, 0), (1, 1)]
    smol_from_huihui = layer_map(30, 28)  # SmolLM-135M student, Huihui-MoE teacher
    assert smol_from_huihui[-1] == (29, 27) and len(smol_from_huihui) == 30
    assert all(0 <= t < 28 for _, t in smol_from_huihui)
    assert [t for _, t in smol_from_huihui] == sorted(t for _, t in smol_from_huihui)


def test_layer_map_explicit_list_and_errors():
    assert layer_map(3, 4, [0, -1, 2]) == [(0, 0), (1, 3), (2, 2)]
    with pytest.raises(ValueError, match="teacher layer 4, but the teacher has 4 layers"):
        layer_map(3, 4, [0, 1, 4])
    with pytest.raises(ValueError, match="one teacher layer per student layer"):
        layer_map(3, 4, [0, 1])
    with pytest.raises(ValueError, match="count"):
        layer_map(3, 4, count=4)
    with pytest.raises(ValueError, match="uniform"):
        layer_map(3, 4, "spread")


# ------------------------------------------------------------------------ feature loss


def _hidden(batch=2, seq=5, dim=6, seed=0, scale=1.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, dim, generator=gen, dtype=F64) * scale + offset


MASK = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_identity_is_zero(kind):
    hidden = _hidden()
    assert feature_loss(hidden, hidden, IDENTITY, MASK, kind=kind).item() == pytest.approx(0.0, abs=1e-12)


def test_feature_loss_golden_value():
    student, teacher = _hidden(seed=1), _hidden(seed=2, offset=3.0)
    projection = nn.Linear(6, 6, bias=False).double()
    valid = MASK.reshape(-1)
    p = projection(student.reshape(-1, 6)[valid])
    t = teacher.reshape(-1, 6)[valid]
    variance = ((t - t.mean(0)) ** 2).mean(0).mean()
    expected = ((p - t) ** 2).mean(-1).sum() / variance / valid.sum()
    torch.testing.assert_close(feature_loss(student, teacher, projection, MASK), expected.detach())
    cosine = (1 - F.cosine_similarity(p, t, dim=-1)).sum() / valid.sum()
    torch.testing.assert_close(feature_loss(student, teacher, projection, MASK, kind="cosine"), cosine.detach())
    # predicting the teacher's per-dimension mean scores exactly 1
    mean_predictor = lambda x: t.mean(0).expand(x.shape[0], 6)  # noqa: E731
    assert feature_loss(student, teacher, mean_predictor, MASK).item() == pytest.approx(1.0, rel=1e-9)
    # num_items: the window count divides the sum
    total = feature_loss(student, teacher, projection, MASK, num_items=1)
    torch.testing.assert_close(feature_loss(student, teacher, projection, MASK, num_items=16), total / 16)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e3])
def test_feature_loss_is_invariant_to_teacher_scale(kind, scale):
    student, teacher = _hidden(seed=1), _hidden(seed=2, offset=0.5)
    base = feature_loss(student, teacher, IDENTITY, MASK, kind=kind)
    scaled = feature_loss(student * scale, teacher * scale, IDENTITY, MASK, kind=kind)
    torch.testing.assert_close(scaled, base, rtol=1e-9, atol=0)
    if kind == "mse":  # the raw MSE is not: it would grow with scale**2
        raw = ((student - teacher) ** 2).mean()
        assert ((student * scale - teacher * scale) ** 2).mean() == pytest.approx(raw.item() * scale**2)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_masked_tokens_do_not_contribute(kind):
    student, teacher = _hidden(seed=1).requires_grad_(), _hidden(seed=2)
    base = feature_loss(student, teacher, IDENTITY, MASK, kind=kind)
    base.backward()
    assert (student.grad[~MASK] == 0).all() and (student.grad[MASK] != 0).any()
    garbage_student, garbage_teacher = student.detach().clone(), teacher.clone()
    garbage_student[~MASK] = 1e6
    garbage_teacher[~MASK] = -1e6
    torch.testing.assert_close(feature_loss(garbage_student, garbage_teacher, IDENTITY, MASK, kind=kind), base.detach())


def test_feature_loss_no_valid_token_and_gradients():
    projection = nn.Linear(6, 4)
    student, teacher = _hidden().float(), _hidden(dim=4).float().requires_grad_()
    empty = feature_loss(student, teacher, projection, torch.zeros(2, 5, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()  # attached to the graph, zero gradients
    assert (projection.weight.grad == 0).all()
    projection.zero_grad()
    feature_loss(student, teacher, projection, MASK).backward()
    assert projection.weight.grad.abs().sum() > 0
    assert teacher.grad is None or (teacher.grad == 0).all()  # the teacher side is detached
    with pytest.raises(ValueError, match="projection outputs 4 dims"):
        feature_loss(student, _hidden(dim=5).float(), projection, MASK)
    with pytest.raises(ValueError, match="kind"):
        feature_loss(student, teacher, projection, MASK, kind="l1")


# ------------------------------------------------------------------------ attention loss


def _maps(batch=2, seq=5, seed=0, mask=MASK):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, seq, seq, generator=gen, dtype=F64)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril() & mask[:, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.nan_to_num(probs) * mask[:, :, None]


def test_attention_loss_identity_and_golden_value():
    student, teacher = _maps(seed=1), _maps(seed=2)
    assert attention_loss(teacher, teacher, MASK).item() == pytest.approx(0.0, abs=1e-12)
    rows = MASK.reshape(-1)
    s, t = student.reshape(-1, 5)[rows], teacher.reshape(-1, 5)[rows]
    # independent reference: F.kl_div(log q, p) summed per row, zero-probability terms dropped by xlogy
    expected = F.kl_div(s.clamp_min(1e-300).log(), t, reduction="sum") / rows.sum()
    torch.testing.assert_close(attention_loss(student, teacher, MASK), expected)
    torch.testing.assert_close(attention_loss(student, teacher, MASK, num_items=1), expected * rows.sum())


def test_attention_loss_masked_rows_and_keys_do_not_contribute():
    student, teacher = _maps(seed=1), _maps(seed=2)
    base = attention_loss(student, teacher, MASK)
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~MASK] = 0.3  # padding query rows
    noisy_teacher[~MASK] = 0.9
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    noisy_student[:, future] = 0.5  # future keys (the loss renormalises over allowed keys)
    noisy_teacher[:, future] = 0.7
    torch.testing.assert_close(attention_loss(noisy_student, noisy_teacher, MASK), base)
    empty = attention_loss(student.requires_grad_(), teacher, torch.zeros(2, 5, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()


# ------------------------------------------------------------------------ attention maps from hooks


def _mixtral_config():
    return MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip


def _olmoe_config():  # full-width q/k norm and q/k clipping
    return OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, clip_qkv=0.5, bos_token_id=0,
                       eos_token_id=0, pad_token_id=0)  # fmt: skip


CONFIGS = {
    "llama": lambda: tiny_dense_config(128),
    "qwen3_moe": lambda: tiny_moe_config(128),
    "mixtral": _mixtral_config,
    "olmoe": _olmoe_config,
}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_attention_maps_equal_eager_attention_probabilities(family, tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[family]()).float().save_pretrained(tmp_path)
    fast = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()  # default: sdpa
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert fast.config._attn_implementation != "eager"
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    layers = [0, fast.config.num_hidden_layers - 1]
    with torch.no_grad():
        ours = attention.attention_maps(fast, layers, ids, attention_mask=mask)
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    valid = mask.bool()
    for layer, maps in zip(layers, ours):
        expected = reference[layer].float().mean(1)
        assert maps.shape == (2, 9, 9)
        torch.testing.assert_close(maps[valid], expected[valid], atol=1e-5, rtol=0)
        assert (maps[~valid] == 0).all()
        torch.testing.assert_close(maps[valid].sum(-1), torch.ones(int(valid.sum())))
        assert (maps.triu(1) == 0).all()


def test_attention_transfer_trains_only_student_q_and_k():
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(tiny_dense_config(128)).float()
    teacher = AutoModelForCausalLM.from_config(tiny_moe_config(128)).float().eval()
    ids = torch.randint(1, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    pairs = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    with torch.no_grad():
        teacher_maps = attention.attention_maps(teacher, [t for _, t in pairs], ids)
    with attention.capture_attention(student, [s for s, _ in pairs]) as capture:
        student(input_ids=ids)  # the forward the trainer runs anyway
    student_maps = capture.maps(mask)
    loss = sum(attention_loss(s, t, mask) for s, t in zip(student_maps, teacher_maps)) / len(pairs)
    assert loss.item() > 0
    loss.backward()
    attn = student.model.layers[0].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
    # the last layer's maps depend on its q/k only, never on its values or MLP
    last = student.model.layers[-1]
    assert last.self_attn.v_proj.weight.grad is None and last.mlp.up_proj.weight.grad is None
    with pytest.raises(RuntimeError, match="no forward captured"):
        with attention.capture_attention(student, [0]) as unused:
            pass
        unused.maps()
    with pytest.raises(ValueError, match="out of range"):
        attention.capture_attention(student, [7]).__enter__()


def test_attention_maps_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="attention transfer supports"):
        attention.AttentionCapture(nn.Module.__new__(_Unknown), [0])


class _Unknown(nn.Module):
    config = type("Config", (), {"model_type": "gpt2"})()
