"""Cross-tokenizer distillation through the trainer: the permuted teacher, a SentencePiece-style teacher."""

import json
import math
from contextlib import nullcontext

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN
from test_alignment import _permuted_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config

from kagglekd import corpus, models
from kagglekd.alignment_data import AlignedBatch
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError
from kagglekd.teacher import TeacherSide, take_rows
from kagglekd.trainer import Distiller

pytestmark = pytest.mark.usefixtures("use_kit_cache")


def tiny(tmp_path, name="run", **changes) -> DistillConfig:
    return DistillConfig.from_dict(
        {**TINY_RUN, "output_dir": str(tmp_path / name), "max_steps": 3, "eval_steps": 3, **changes}
    )


@pytest.fixture
def permuted_teacher(tmp_path, use_kit_cache):
    """tiny-random-moe with its vocabulary permuted: embedding and lm_head rows moved with the token ids."""
    source = models.resolve_model("tiny-random-moe")
    student_tok = AutoTokenizer.from_pretrained(source)
    out = tmp_path / "permuted-teacher"
    _, permutation = _permuted_tokenizer(student_tok, out)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            moved = matrix.clone()
            matrix[permutation] = moved
    model.save_pretrained(out)
    return out


@pytest.fixture
def metaspace_teacher(tmp_path, use_kit_cache):
    """A tiny random Qwen3-MoE that reads text with the SentencePiece-style tokenizer (vocab 3000)."""
    tok = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(3000, pre_tokenizer="whitespace-digits"))
    out = tmp_path / "metaspace-teacher"
    models.tiny_random_moe(len(tok), seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("changes", [{}, {"fused_kd": True, "kd_top_k": 16}])
def test_permuted_teacher_trains_exactly_like_the_identical_one(tmp_path, permuted_teacher, changes):
    Distiller(tiny(tmp_path, "plain", **changes)).train()
    cross = Distiller(tiny(tmp_path, "cross", teacher_model=str(permuted_teacher), cross_tokenizer=True, **changes))
    assert cross.setup().cross is not None  # the pair is "different": the cross path ran
    cross.train()
    a = pd.read_csv(tmp_path / "plain" / "history.csv")
    b = pd.read_csv(tmp_path / "cross" / "history.csv")
    for column in ("loss", "kd", "ce", "grad_norm", "eval_ppl", "eval_kd", "eval_top1_agreement"):
        x, y = a[column].dropna(), b[column].dropna()
        assert len(x) == len(y) > 0 and ((x - y).abs() <= 1e-5 * x.abs() + 1e-7).all(), column  # float32 sums
    report = json.loads((tmp_path / "cross" / "alignment.json").read_text())
    assert report["setup"]["aligned_fraction"] == 1.0 and report["setup"]["teacher_mass_mapped"] == pytest.approx(1.0)
    assert report["training"]["aligned_fraction"] == 1.0


def test_different_vocabularies_need_cross_tokenizer(tmp_path, metaspace_teacher):
    with pytest.raises(ConfigError) as err:
        Distiller(tiny(tmp_path, teacher_model=str(metaspace_teacher))).setup()
    assert err.value.field == "cross_tokenizer" and "trains the student on noise" in str(err.value)
    with pytest.raises(ConfigError) as err:
        Distiller(
            tiny(tmp_path, teacher_model=str(metaspace_teacher), cross_tokenizer=True, alpha_attention=0.1)
        ).setup()
    assert err.value.field == "alpha_attention"
    with pytest.raises(ConfigError) as err:
        tiny(tmp_path, cross_tokenizer=True, kd_top_k=8, teacher_cache=str(tmp_path))
    assert err.value.field == "teacher_cache"


def test_sentencepiece_teacher_trains_and_reports_alignment(tmp_path, metaspace_teacher):
    run = Distiller(tiny(tmp_path, "sp", teacher_model=str(metaspace_teacher), cross_tokenizer=True, alpha_feature=0.1))
    summary = run.train()
    report = json.loads((tmp_path / "sp" / "alignment.json").read_text())
    setup, training = report["setup"], report["training"]
    assert 0.3 < setup["aligned_fraction"] < 1.0 and 0.0 < setup["teacher_mass_mapped"] <= 1.0
    assert setup["teacher_vocab"] == 3000 and setup["student_vocab"] == 4096 and setup["shared_tokens"] > 1000
    assert training["student_positions"] == summary["train_tokens"]
    assert 0 < training["aligned_positions"] < training["student_positions"]
    history = pd.read_csv(tmp_path / "sp" / "history.csv")
    assert history["kd"].notna().all() and (history["kd"] > 0).all() and (history["feature"] > 0).all()
    metrics = run.evaluate()
    assert 0.0 <= metrics["top1_agreement"] <= 1.0 and math.isfinite(metrics["kd"])
    assert math.isfinite(run.teacher_perplexity())


def test_fused_and_uld_paths_across_vocabularies(tmp_path, metaspace_teacher):
    common = dict(teacher_model=str(metaspace_teacher), cross_tokenizer=True, kd_top_k=32)
    Distiller(tiny(tmp_path, "plain", **common)).train()
    Distiller(tiny(tmp_path, "fused", fused_kd=True, loss_chunk_size=29, **common)).train()
    a = pd.read_csv(tmp_path / "plain" / "history.csv")
    b = pd.read_csv(tmp_path / "fused" / "history.csv")
    for column in ("loss", "kd", "ce", "grad_norm"):
        assert ((a[column] - b[column]).abs() / a[column].abs()).max() < 1e-4, column
    Distiller(tiny(tmp_path, "uld", cross_tokenizer_loss="uld", **common)).train()
    uld = pd.read_csv(tmp_path / "uld" / "history.csv")
    assert (uld["kd"] > 0).all() and (uld["kd"] < 2).all()  # an L1 distance of probability vectors is < 2
    with pytest.raises(ConfigError) as err:
        Distiller(tiny(tmp_path, "bad", fused_kd=True, cross_tokenizer_loss="uld", **common)).setup()
    assert err.value.field == "cross_tokenizer_loss"
    # hybrid: exact targets where aligned plus ULD at the rest, so its first KD (same weights, same batch) differs
    # from the exact one's; the fused path (ULD rows through the lm_head chunk by chunk) gives the same history
    Distiller(tiny(tmp_path, "hybrid", cross_tokenizer_loss="hybrid", **common)).train()
    hybrid = pd.read_csv(tmp_path / "hybrid" / "history.csv")
    assert hybrid["kd"].notna().all() and abs(hybrid["kd"].iloc[0] - a["kd"].iloc[0]) > 1e-6
    Distiller(tiny(tmp_path, "fused-hybrid", fused_kd=True, cross_tokenizer_loss="hybrid", loss_chunk_size=29,
                   **common)).train()  # fmt: skip
    fused_hybrid = pd.read_csv(tmp_path / "fused-hybrid" / "history.csv")
    for column in ("loss", "kd", "ce", "grad_norm"):
        assert ((hybrid[column] - fused_hybrid[column]).abs() / hybrid[column].abs()).max() < 1e-4, column
    report = json.loads((tmp_path / "fused-hybrid" / "alignment.json").read_text())["training"]
    assert report["context_positions"] > 0 and report["covered_fraction"] > report["aligned_fraction"]


def test_alignment_totals_survive_a_resume(tmp_path, metaspace_teacher):
    config = tiny(tmp_path, "resumed", teacher_model=str(metaspace_teacher), cross_tokenizer=True, save_steps=1)
    config = config.replace(resume="auto")
    Distiller(config).train(max_steps=2)
    summary = Distiller(config).train()  # resumes from step 2
    assert summary["optimizer_steps"] == 3
    assert summary["alignment"]["student_positions"] == summary["train_tokens"]
    report = json.loads((tmp_path / "resumed" / "alignment.json").read_text())
    assert report["training"] == summary["alignment"]


def test_sar_regularisers_across_tokenizers_read_no_row_padding(tmp_path, metaspace_teacher):
    """A cross-tokenizer batch's teacher rows are right-padded to its longest: SAR's balance and entropy read the
    real teacher tokens only, so the pad id cannot change the router term (causal attention: the real positions
    never see the padding after them; the padded positions' routing does depend on it)."""
    weights = dict(sar_anchor_weight=0.0, sar_teacher_ce_weight=0.0, sar_balance_weight=1.0, sar_entropy_weight=1.0)
    config = tiny(tmp_path, teacher_model=str(metaspace_teacher), cross_tokenizer=True, sar=True, **weights)
    distiller = Distiller(config).setup()
    side, blocks = distiller.teacher_side, distiller.blocks.train[:4]
    aligned = side.cross.align(blocks)
    width, real = aligned.teacher_ids.shape[1], [int(row.sum()) for row in aligned.teacher_tokens]
    assert min(real) < max(real) == width  # some rows are padded
    assert aligned.teacher_tokens.tolist() == [[t < n for t in range(width)] for n in real]  # a prefix per row
    terms = []
    for pad in (side.cross.teacher_pad, 7):
        side.cross.teacher_pad = pad
        terms.append(float(side.outputs(blocks, num_items=100).router.detach()))
    assert terms[1] == pytest.approx(terms[0], rel=1e-6)


def _head_rows(model) -> list[int]:
    """The positions per row of every call of ``model``'s output layer, recorded from now on."""
    seen: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    return seen


def test_a_live_teacher_runs_its_output_layer_at_the_student_positions_only(tmp_path, metaspace_teacher):
    """Across tokenizers the teacher's output layer (its widest matmul) runs on the rows the student's positions
    read, gathered from its decoder's last hidden states, and gives the full forward's logits there."""
    distiller = Distiller(tiny(tmp_path, teacher_model=str(metaspace_teacher), cross_tokenizer=True)).setup()
    side, blocks = distiller.teacher_side, distiller.blocks.train[:4]
    aligned = side.cross.align(blocks)
    student_length, teacher_length = blocks.shape[1] - 1, aligned.teacher_ids.shape[1]
    assert teacher_length != student_length
    seen = _head_rows(side.model)
    out = side.outputs(blocks, num_items=100)  # a training step's teacher pass
    assert side.head_apart is True and seen == [student_length]  # (setup's alignment report checked the split)
    rows, expected = aligned.at_student_positions()
    with torch.no_grad():
        whole = side.model(input_ids=aligned.teacher_ids).logits
    assert out.logits.shape == (*rows.shape, whole.shape[-1])
    assert torch.allclose(out.logits, take_rows(whole, rows), rtol=0, atol=1e-5)
    for name in ("target", "context"):
        assert torch.equal(getattr(out.aligned, name), getattr(expected, name))


def _side_and_batch(tmp_path, config):
    """A ``TeacherSide`` of ``config``'s model (saved and loaded) and a hand-made two-row ``AlignedBatch``."""
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "teacher")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    side = TeacherSide(DistillConfig.load("tiny-cpu"), model, cross=None, cache=None, device=torch.device("cpu"),
                       student_device=torch.device("cpu"), student_vocab=96, autocast=nullcontext)  # fmt: skip
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[0, 2, -1, 3, 5, 9], [1, -1, 4, 6, 7, 8]])
    spans = torch.zeros_like(target)
    return side, AlignedBatch(ids, torch.full_like(ids, -100), target, spans, spans)


_SHAPE = dict(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8)  # fmt: skip


def _keeps_its_full_forward(side, aligned) -> None:
    """``aligned_logits`` ran the model's whole forward: its logits at the teacher's own positions, ``aligned``
    unchanged."""
    logits, kept = side.aligned_logits(aligned)
    assert side.head_apart is False
    with torch.no_grad():
        whole = side.model(input_ids=aligned.teacher_ids).logits
    assert torch.allclose(logits, whole, rtol=0, atol=1e-6)
    assert torch.equal(kept.target, aligned.target)


def test_a_teacher_that_caps_its_logits_keeps_its_full_forward(tmp_path):
    """A model whose config caps its logits after the output layer (Gemma 2's soft cap at 30) runs its whole
    forward, even where the first batch's logits are too small for the probe to see the cap."""
    side, aligned = _side_and_batch(tmp_path, Gemma2Config(final_logit_softcapping=30.0, **_SHAPE))
    with torch.no_grad():
        capped = side.model(input_ids=aligned.teacher_ids).logits
        uncapped = side.model.get_output_embeddings()(side.model.get_decoder()(input_ids=aligned.teacher_ids)[0])
    assert 0 < float((capped - uncapped).abs().max()) < 1e-4 * max(1.0, float(capped.abs().max()))
    _keeps_its_full_forward(side, aligned)


@pytest.mark.parametrize("change", ["rescaled after the output layer", "no decoder apart"])
def test_a_teacher_the_split_does_not_fit_keeps_its_full_forward(tmp_path, change):
    """Found out on the first batch's probe, whatever the config says: logits changed after the output layer
    (a forward hook doubles them), or a model whose decoder cannot be called apart."""
    side, aligned = _side_and_batch(tmp_path, Gemma2Config(final_logit_softcapping=None, **_SHAPE))

    def no_decoder():
        raise RuntimeError("no decoder apart")

    def double(_model, _args, out) -> None:
        out.logits.mul_(2.0)

    if change == "no decoder apart":
        side.model.get_decoder = no_decoder
    else:
        side.model.register_forward_hook(double)
    _keeps_its_full_forward(side, aligned)


def test_a_teacher_whose_logits_are_its_output_layers_runs_it_at_the_student_positions(tmp_path):
    """The same model without the cap: the output layer runs at the rows the student's positions read."""
    side, aligned = _side_and_batch(tmp_path, Gemma2Config(final_logit_softcapping=None, **_SHAPE))
    seen = _head_rows(side.model)
    logits, moved = side.aligned_logits(aligned)
    assert side.head_apart is True and seen[-1] == aligned.target.shape[1]
    with torch.no_grad():
        whole = side.model(input_ids=aligned.teacher_ids).logits
    assert torch.allclose(logits, take_rows(whole, aligned.target.clamp_min(0)), rtol=0, atol=1e-5)
    assert torch.equal(moved.target, torch.tensor([[0, 1, -1, 3, 4, 5], [0, -1, 2, 3, 4, 5]]))
