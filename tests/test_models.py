"""Tests of kagglekd.models: tiny configs, resolving / loading, tokenizers, precision table, pretraining."""

import json
import math
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3MoeConfig

from kagglekd import corpus, models
from kagglekd.errors import ConfigError


@pytest.fixture(autouse=True)
def _session_cache(monkeypatch, kagglekd_cache):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path, kagglekd_cache):
    """An empty model cache that reuses the session's corpus and tokenizer (copied, not rebuilt)."""
    root = tmp_path / "cache"
    for sub in ("corpus", "tokenizers"):
        shutil.copytree(kagglekd_cache / sub, root / sub)
    monkeypatch.setenv("KAGGLEKD_CACHE", str(root))
    return root


def test_tiny_configs_are_the_real_classes_with_the_documented_shapes():
    moe = models.tiny_moe_config(4096)
    assert isinstance(moe, Qwen3MoeConfig) and moe.model_type == "qwen3_moe"
    assert (moe.hidden_size, moe.num_hidden_layers, moe.num_attention_heads, moe.num_key_value_heads) == (
        256, 4, 4, 2,
    )  # fmt: skip
    assert (moe.head_dim, moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (
        64,
        4,
        2,
        256,
    )
    assert moe.tie_word_embeddings is False and moe.norm_topk_prob and not moe.output_router_logits
    demo = models.demo_teacher_config(4096)  # the tiny-moe teacher: 8 experts, trained with load balancing
    assert (demo.num_experts, demo.num_experts_per_tok, demo.router_aux_loss_coef) == (8, 2, 0.01)
    assert (demo.hidden_size, demo.moe_intermediate_size) == (moe.hidden_size, moe.moe_intermediate_size)
    assert not demo.output_router_logits  # a distillation teacher does not return router logits
    dense = models.tiny_dense_config(4096)
    assert isinstance(dense, LlamaConfig) and dense.model_type == "llama"
    assert dense.tie_word_embeddings and dense.hidden_size // dense.num_attention_heads == dense.head_dim == 24
    assert dense.pad_token_id is None  # a pad id would freeze the eos embedding row


def test_tiny_models_parameter_counts_and_seeding():
    moe = models.tiny_random_moe(4096, seed=0)
    dense = models.tiny_random_dense(4096, seed=0)
    assert type(moe).__name__ == "Qwen3MoeForCausalLM" and type(dense).__name__ == "LlamaForCausalLM"
    assert models.count_parameters(moe) == 6_036_224
    # 4 more experts of 3 x 256 x 256 in each of 4 layers, and 4 more router rows of 256
    demo = AutoModelForCausalLM.from_config(models.demo_teacher_config(4096))
    assert models.count_parameters(demo) == 6_036_224 + 4 * 4 * 3 * 256 * 256 + 4 * 4 * 256 == 9_186_048
    assert models.count_parameters(dense) == 642_720  # tied embeddings counted once
    assert dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()

    state_before = torch.random.get_rng_state()
    again = models.tiny_random_dense(4096, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # caller's RNG untouched
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), again.state_dict().values()))
    other = models.tiny_random_dense(4096, seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, dense.model.embed_tokens.weight)


@pytest.mark.parametrize("name", [models.TINY_RANDOM_DENSE, models.TINY_RANDOM_MOE])
def test_resolve_tiny_random_round_trips_with_identical_logits(fresh_cache, name):
    directory = models.resolve_model(name, vocab_size=4096, seed=0)
    assert directory == fresh_cache / "models" / f"{name}-v4096-s0"
    assert (directory / "config.json").exists() and (directory / "tokenizer.json").exists()
    stamp = (directory / "config.json").stat().st_mtime_ns
    assert models.resolve_model(name, vocab_size=4096, seed=0) == directory  # cached
    assert (directory / "config.json").stat().st_mtime_ns == stamp

    built = (models.tiny_random_dense if name == models.TINY_RANDOM_DENSE else models.tiny_random_moe)(4096, 0)
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    assert type(loaded) is type(built)
    input_ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(built.eval()(input_ids=input_ids).logits, loaded.eval()(input_ids=input_ids).logits)
    assert len(AutoTokenizer.from_pretrained(directory)) == 4096


def test_load_model_roles():
    teacher = models.load_model(models.TINY_RANDOM_MOE, role="teacher")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.dtype == torch.float32
    student = models.load_model(models.TINY_RANDOM_DENSE, role="student")
    assert student.training and all(p.requires_grad for p in student.parameters())
    half = models.load_model(models.TINY_RANDOM_DENSE, role="teacher", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="role"):
        models.load_model(models.TINY_RANDOM_DENSE, role="assistant")


def test_local_directories(tmp_path):
    model_dir = models.resolve_model(models.TINY_RANDOM_DENSE, vocab_size=4096)
    copy = shutil.copytree(model_dir, tmp_path / "my-student")
    assert models.resolve_model(str(copy), vocab_size=4096) == copy
    assert models.load_model(str(copy), role="student").config.model_type == "llama"

    (tmp_path / "weights-only").mkdir()
    with pytest.raises(ConfigError, match="config.json") as err:
        models.load_model(str(tmp_path / "weights-only"), role="teacher")
    assert err.value.field == "teacher_model" and "weights-only" in str(err.value)
    with pytest.raises(ConfigError) as err:
        models.resolve_model("/kaggle/input/not-mounted/model", vocab_size=4096, role="student")
    assert err.value.field == "student_model" and "not-mounted" in str(err.value)


def test_hub_id_offline_is_a_config_error_naming_the_field():
    assert models.resolve_model("someone/some-model", vocab_size=4096) == "someone/some-model"
    with pytest.raises(ConfigError) as err:
        models.load_model("someone/some-model", role="student")
    assert err.value.field == "student_model"
    assert "someone/some-model" in str(err.value) and "Kaggle" in str(err.value)
    with pytest.raises(ConfigError) as err:
        models.load_tokenizer("someone/some-model")
    assert err.value.field == "tokenizer"


def test_load_tokenizer_tiny_names_and_pad_fallback(tmp_path, demo_tokenizer_dir):
    for name in set(models.TINY_MODELS) - set(models.OWN_TOKENIZERS):  # those have a vocabulary of their own
        tok = models.load_tokenizer(name)
        assert len(tok) == 4096 and tok.eos_token == corpus.EOS_TOKEN
    no_pad = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").pad_token is None
    tok = models.load_tokenizer(str(tmp_path / "tok"))
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id


@pytest.mark.parametrize(
    "capability, autocast, scaler, teacher",
    [
        ((7, 5), torch.float16, True, torch.float16),  # T4
        ((6, 0), torch.float16, True, torch.float16),  # P100
        ((8, 0), torch.bfloat16, False, torch.bfloat16),  # A100
        ((9, 0), torch.bfloat16, False, torch.bfloat16),  # H100
    ],
)
def test_precision_table_by_compute_capability(capability, autocast, scaler, teacher):
    plan = models.precision_for("cuda", capability=capability)
    assert plan == {
        "autocast_dtype": autocast,
        "use_grad_scaler": scaler,
        "teacher_dtype": teacher,
        "student_dtype": torch.float32,
    }


def test_precision_on_cpu_and_never_asks_is_bf16_supported(monkeypatch):
    cpu = models.precision_for("cpu")
    assert cpu["autocast_dtype"] is None and not cpu["use_grad_scaler"]
    assert cpu["teacher_dtype"] == cpu["student_dtype"] == torch.float32

    def lying(*args, **kwargs):
        raise AssertionError("is_bf16_supported() reports True on a T4; gate on capability instead")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lying)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert models.precision_for("cuda:1")["autocast_dtype"] == torch.float16


def test_pretrain_tiny_moe_saves_reloads_and_caches(fresh_cache, monkeypatch):
    directory = models.pretrain_tiny_moe(steps=5, batch_size=4, max_length=32, eval_fraction=0.01)
    assert directory.parent == fresh_cache / "models"
    report = json.loads((directory / "pretrain.json").read_text())
    assert report["steps"] == 5 and report["parameters"] == 9_186_048 and report["recipe_version"] == 2
    assert report["teacher_config"]["num_experts"] == 8 and report["teacher_config"]["router_aux_loss_coef"] == 0.01
    assert math.isfinite(report["eval_perplexity"]) and 1 < report["eval_perplexity"] < 4096 * 2
    assert report["final_train_aux_loss"] >= 2 - 1e-4  # E * sum_e f_e P_e >= top-k, equality at balance
    assert report["data"]["eval_blocks"] > 0 and len(report["data_fingerprint"]) == 16
    routing = report["routing"]  # how the pretrained teacher routes its held-out tokens
    assert routing["experts"] == 8 and len(routing["layers"]) == 4
    assert routing["tokens"] == report["data"]["eval_blocks"] * 32
    assert sum(routing["class_tokens"].values()) == routing["tokens"]
    assert all(0 <= layer["specialisation"] <= 1 and 0 < layer["balance"] <= 1 for layer in routing["layers"])

    teacher = models.load_model(str(directory), role="teacher")
    assert type(teacher).__name__ == "Qwen3MoeForCausalLM" and not teacher.training
    assert teacher.config.num_experts == 8 and not teacher.config.output_router_logits
    blocks = torch.randint(0, 4096, (2, 33), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(models.evaluate_perplexity(teacher, blocks))

    # another teacher shape is another recipe: its own cache directory, not the 8-expert teacher's
    four_experts = models.pretrain_tiny_moe(
        steps=5, batch_size=4, max_length=32, eval_fraction=0.01, teacher_config=models.tiny_moe_config(4096)
    )
    assert four_experts != directory and four_experts.parent == directory.parent
    assert json.loads((four_experts / "pretrain.json").read_text())["parameters"] == 6_036_224

    def no_retraining(*args, **kwargs):
        raise AssertionError("cached teacher was trained again")

    monkeypatch.setattr(models, "_seeded_model", no_retraining)
    assert models.pretrain_tiny_moe(steps=5, batch_size=4, max_length=32, eval_fraction=0.01) == directory


def test_pretraining_an_moe_adds_the_load_balancing_loss():
    """One pretraining step: the returned aux loss is transformers' own load_balancing_loss_func of the batch,
    and it reaches the routers' gradient (routers move differently with the coefficient at 0 and at 1) but
    not the output head, which no router logit depends on."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    blocks = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(0))
    batch = blocks[torch.randperm(8, generator=torch.Generator().manual_seed(3))[:4]]  # the step's seeded batch
    trained = {}
    for coef in (0.0, 1.0):
        model = models._seeded_model(models.tiny_moe_config(64, num_experts=8, router_aux_loss_coef=coef), seed=0)
        if coef == 1.0:
            with torch.no_grad():
                output = model(input_ids=batch[:, :-1], output_router_logits=True)
                expected_aux = load_balancing_loss_func(output.router_logits, 8, 2).item()
        final = models._train_cross_entropy(
            model, blocks, steps=1, batch_size=4, lr=1e-2, warmup_steps=0, seed=3, desc="test"
        )  # fmt: skip
        trained[coef] = model
    assert final["aux_loss"] == pytest.approx(expected_aux, rel=1e-5) and final["aux_loss"] > 2.0
    # Clipping rescales the whole gradient and AdamW's eps then nudges the head's tiniest entries, so the head
    # is compared on average: ~1e-8 apart, while every router moved ~1e-2 differently.
    routers = [[layer.mlp.gate.weight for layer in trained[c].model.layers] for c in (0.0, 1.0)]
    assert all((a - b).abs().mean() > 1e-4 for a, b in zip(*routers))
    assert (trained[0.0].lm_head.weight - trained[1.0].lm_head.weight).abs().mean() < 1e-7

    dense = models._seeded_model(models.tiny_dense_config(64), seed=0)
    final = models._train_cross_entropy(dense, blocks, steps=1, batch_size=4, lr=1e-2, warmup_steps=0, seed=3, desc="t")
    assert final["aux_loss"] is None and math.isfinite(final["loss"])


def test_evaluate_perplexity_of_a_uniform_model_is_the_vocab_size():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 50)
            return type("Output", (), {"logits": logits})()

    blocks = torch.randint(0, 50, (3, 9))
    assert models.evaluate_perplexity(Uniform(), blocks, batch_size=2) == pytest.approx(50.0)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KAGGLEKD_RUN_SLOW"), reason="pretrains the demo teacher (minutes)")
def test_default_tiny_moe_teacher_beats_the_target_perplexity():
    directory = models.resolve_model(models.TINY_MOE, vocab_size=4096, seed=0)
    report = json.loads((directory / "pretrain.json").read_text())
    # Measured on the document-level held-out split (CPU, seed 0): teacher 30.36 (the 4-expert v1 recipe: 30.29);
    # a tiny-random-dense student trained 600 CE steps on the same blocks reaches 34.2. The teacher must stay
    # clearly better.
    assert report["steps"] == models.PRETRAIN_STEPS and report["eval_perplexity"] < 32.0
    # Its experts specialise: measured mean balance 0.79 and specialisation 0.089 over the 4 layers (the v1
    # teacher, 4 experts without the load-balancing loss: 0.90 and 0.033; a router with zero weights: 0).
    routing = report["routing"]
    assert routing["experts"] == 8 and routing["mean_specialisation"] > 0.06 and routing["mean_balance"] > 0.7


def test_tiny_moe_is_one_artifact_whatever_the_run_seed(monkeypatch, tmp_path):
    from kagglekd import models

    seen = []
    monkeypatch.setattr(models, "pretrain_tiny_moe", lambda **kw: seen.append(kw["seed"]) or tmp_path)
    models.resolve_model("tiny-moe", vocab_size=4096, seed=7)
    assert seen == [0]  # its held-out split is split seed 0's, so it must not follow the run seed
