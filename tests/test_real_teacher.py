"""The real teacher through the kit: SmolLM2-135M-Instruct (``registry:smollm2``) on stdlib-docs.

Its held-out perplexity through the kit's data pipeline and evaluator must match transformers' own loss
(``labels=``, computed here outside the kit) on the same blocks, and 20 KD steps into a small Llama with the
same tokenizer must keep a finite history. The GGUF comes from the package registry on first use and is
cached in the kit's cache folder; when the registry cannot be reached these tests skip and say so.
"""

import math

import pandas as pd
import pytest
import torch

from kagglekd import models
from kagglekd.config import DistillConfig
from kagglekd.demo_real import REAL_TEACHER, real_student_dir
from kagglekd.errors import RegistryUnavailable
from kagglekd.trainer import Distiller

# A small student (1.6 M parameters, nearly all of them the 49,152-row embedding) and short blocks: seconds.
SMALL_STUDENT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True,
)  # fmt: skip
EVAL_BLOCKS = 32


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    try:
        models.resolve_model(REAL_TEACHER, role="teacher")
        student = real_student_dir(REAL_TEACHER, seed=0, shape=SMALL_STUDENT)
    except RegistryUnavailable as err:
        pytest.skip(f"the package registry cannot be reached, so the real teacher is missing: {err}")
    config = DistillConfig(
        teacher_model=REAL_TEACHER, student_model=str(student), dataset="stdlib-docs", dataset_subset_size=4,
        eval_fraction=0.25, max_length=16, batch_size=4, max_steps=20, warmup_steps=2, learning_rate=3e-3,
        kd_top_k=64, eval_steps=None, eval_max_blocks=EVAL_BLOCKS, save_steps=None, resume="never", seed=0,
        output_dir=str(tmp_path_factory.mktemp("real-teacher")),
    )  # fmt: skip
    return Distiller(config).setup()


@torch.no_grad()
def test_teacher_perplexity_through_the_kit_matches_transformers_own_loss(real_run):
    blocks = real_run.eval_blocks
    assert blocks.shape == (EVAL_BLOCKS, 17)
    kit_ppl = real_run.teacher_perplexity()
    teacher = real_run.teacher
    # transformers shifts the labels itself; every block has the same 16 targets, so the mean of the
    # per-block mean losses is the token-weighted mean
    losses = [float(teacher(input_ids=row[None], labels=row[None]).loss) for row in blocks]
    reference_ppl = math.exp(sum(losses) / len(losses))
    assert abs(kit_ppl / reference_ppl - 1) < 0.01, (kit_ppl, reference_ppl)
    assert 2 < reference_ppl < 200  # a real language model on English prose and code, not a random one


def test_twenty_kd_steps_from_the_real_teacher_keep_a_finite_history(real_run):
    summary = real_run.train()
    history = pd.read_csv(real_run.output_dir / "history.csv")
    assert summary["optimizer_steps"] == 20 and len(history) == 20
    for column in ("loss", "kd", "ce", "grad_norm"):
        assert history[column].map(math.isfinite).all(), column
    assert (history["kd"] > 0).all() and history["skipped"].sum() == 0
    assert history["loss"].iloc[-5:].mean() < history["loss"].iloc[:5].mean()
