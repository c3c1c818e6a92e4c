"""The training engine end to end on tiny random models (CPU)."""

import json
import math

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN
from transformers import AutoModelForCausalLM

from kagglekd import data
from kagglekd.checkpoint import latest_checkpoint
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller, TrainingStopped

pytestmark = pytest.mark.usefixtures("use_kit_cache")


def tiny_config(tmp_path, **changes) -> DistillConfig:
    return DistillConfig.from_dict(
        {
            **TINY_RUN,
            "output_dir": str(tmp_path / "run"),
            "learning_rate": 3e-3,
            "eval_steps": 3,
            "weight_decay": 0.0,
            **changes,
        }
    )


def history(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv")


@pytest.fixture
def truncate_train(monkeypatch):
    """Limit the training blocks to an exact count so batches per epoch are known."""

    def apply(count: int):
        original = data.build_blocks

        def limited(*args, **kwargs):
            blocks = original(*args, **kwargs)
            assert len(blocks.train) >= count
            blocks.train = blocks.train[:count]
            return blocks

        monkeypatch.setattr(data, "build_blocks", limited)

    return apply


def test_logged_lr_equals_plan_in_odd_case(tmp_path, kagglekd_cache, truncate_train):
    truncate_train(37)  # batch 1 -> 37 batches per epoch
    config = tiny_config(
        tmp_path,
        batch_size=1,
        gradient_accumulation_steps=8,
        num_epochs=2,
        max_steps=None,
        scheduler_type="cosine",
        warmup_steps=2,
        eval_steps=None,
    )
    distiller = Distiller(config)
    distiller.train()
    assert distiller.plan.batches_per_epoch == 37 and distiller.plan.optimizer_steps == 10
    rows = history(distiller.output_dir)
    assert len(rows) == 10 and list(rows["step"]) == list(range(10))
    for step, lr in zip(rows["step"], rows["lr"]):
        assert lr == pytest.approx(distiller.plan.lr_at(step), rel=1e-12, abs=0)
    plan = json.loads((distiller.output_dir / "plan.json").read_text())
    assert plan["optimizer_steps"] == 10 and len(plan["lr"]) == 10


def _first_window_grads(config):
    distiller = Distiller(config).setup()
    window = next(distiller._windows(0))
    distiller._train_step(window, apply=False)
    return torch.cat([p.grad.flatten() for p in distiller.student.parameters() if p.grad is not None]), window


def test_gradient_accumulation_invariance(tmp_path, kagglekd_cache):
    big, window_a = _first_window_grads(tiny_config(tmp_path / "a", batch_size=4, gradient_accumulation_steps=1))
    small, window_b = _first_window_grads(tiny_config(tmp_path / "b", batch_size=1, gradient_accumulation_steps=4))
    assert window_a.block_indices == window_b.block_indices  # the same four blocks in both windows
    assert len(window_b.micro_batches) == 4
    assert (big - small).norm() / big.norm() < 1e-6


def test_nan_in_teacher_logits_skips_one_step(tmp_path, kagglekd_cache, monkeypatch):
    config = tiny_config(tmp_path, max_steps=5, eval_steps=None)
    distiller = Distiller(config).setup()
    original = distiller.teacher_side.logits
    calls = {"n": 0}

    def poisoned(input_ids):
        calls["n"] += 1
        logits = original(input_ids)
        if calls["n"] == 3 and distiller.student.training:  # the third training step's teacher
            logits = logits.clone()
            logits[0, 0, 0] = float("nan")
        return logits

    monkeypatch.setattr(distiller.teacher_side, "logits", poisoned)
    summary = distiller.train()
    rows = history(distiller.output_dir)
    assert summary["skipped"] == 1 and summary["optimizer_steps"] == 5
    assert list(rows["skipped"]) == [0, 0, 1, 1, 1]
    assert math.isnan(rows["loss"][2]) and rows["loss"].drop(index=2).notna().all()
    assert all(torch.isfinite(p).all() for p in distiller.student.parameters())


def test_non_finite_storm_stops_with_report_and_keeps_checkpoint(tmp_path, kagglekd_cache, monkeypatch):
    config = tiny_config(tmp_path, max_steps=12, save_steps=2, eval_steps=None, max_consecutive_skips=3)
    distiller = Distiller(config).setup()
    original = distiller.teacher_side.logits

    def poisoned(input_ids):
        logits = original(input_ids)
        return logits * float("nan") if distiller.state.step >= 4 else logits

    monkeypatch.setattr(distiller.teacher_side, "logits", poisoned)
    with pytest.raises(TrainingStopped) as stop:
        distiller.train()
    report = json.loads((distiller.output_dir / "failure_report.json").read_text())
    assert report["step"] == 6 and report["skipped_total"] == 3 and report["batch_indices"]
    assert stop.value.report["step"] == 6
    newest = latest_checkpoint(distiller.output_dir / "checkpoints")
    assert newest.name == "step-4"  # the last good one; nothing was written from the bad steps
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["skipped"] == 0


def test_resumed_run_reproduces_uninterrupted_history(tmp_path, kagglekd_cache):
    full = Distiller(tiny_config(tmp_path / "full", max_steps=8, save_steps=3, eval_steps=4))
    full.train()
    interrupted = Distiller(tiny_config(tmp_path / "cut", max_steps=8, save_steps=3, eval_steps=4))
    interrupted.train(max_steps=5)  # "killed" after step 5; newest checkpoint is step-3
    assert latest_checkpoint(interrupted.checkpoint_dir).name == "step-3"
    resumed = Distiller(tiny_config(tmp_path / "cut", max_steps=8, save_steps=3, eval_steps=4, resume="auto"))
    resumed.train()
    a, b = history(full.output_dir), history(resumed.output_dir)
    assert list(a["step"]) == list(b["step"]) == list(range(8))
    for column in ("loss", "lr", "kd", "ce"):
        assert (a[column] - b[column]).abs().max() < 1e-6, column
    assert (a["eval_ppl"].dropna() - b["eval_ppl"].dropna()).abs().max() < 1e-6


def test_fresh_student_perplexity_is_about_vocab_size(tmp_path, kagglekd_cache):
    distiller = Distiller(tiny_config(tmp_path)).setup()
    vocab = len(distiller.tokenizer)
    assert 0.5 * vocab <= distiller.evaluate()["ppl"] <= 2 * vocab


def test_evals_change_while_lr_positive_and_student_reloads(tmp_path, kagglekd_cache):
    distiller = Distiller(tiny_config(tmp_path, max_steps=6, eval_steps=3))
    distiller.train()
    rows = history(distiller.output_dir)
    evals = rows["eval_ppl"].dropna()
    assert len(evals) == 2 and evals.iloc[0] != evals.iloc[1]
    assert rows["eval_top1_agreement"].dropna().between(0, 1).all()
    reloaded = AutoModelForCausalLM.from_pretrained(distiller.output_dir / "student")
    again = distiller.evaluate(model=reloaded)["ppl"]
    assert again == pytest.approx(evals.iloc[-1], rel=1e-5)
    # the student folder holds the student alone
    tensors = reloaded.state_dict().keys()
    assert not any("expert" in k or "router" in k or k.startswith("teacher") for k in tensors)


def test_ema_evaluated_separately(tmp_path, kagglekd_cache):
    distiller = Distiller(tiny_config(tmp_path, max_steps=4, eval_steps=2, ema_decay=0.5))
    distiller.train()
    rows = history(distiller.output_dir).dropna(subset=["eval_ppl"])
    assert rows["eval_ppl_ema"].notna().all() and (rows["eval_ppl_ema"] != rows["eval_ppl"]).all()


def test_early_stopping_never_before_warmup(tmp_path, kagglekd_cache):
    # LR 0 after warmup start would never improve: patience 1 with a huge min_delta stops at the first eval
    # after warmup, not during it.
    config = tiny_config(
        tmp_path, max_steps=12, warmup_steps=4, eval_steps=1, early_stopping_patience=1, early_stopping_min_delta=1e9
    )
    distiller = Distiller(config)
    summary = distiller.train()
    assert summary["stopped_early"] and summary["optimizer_steps"] == 5
    assert (distiller.output_dir / "student" / "config.json").exists()


def test_ce_only_run_loads_no_teacher(tmp_path, kagglekd_cache):
    distiller = Distiller(tiny_config(tmp_path, alpha_kd=0.0, alpha_ce=1.0, max_steps=2)).setup()
    assert distiller.teacher is None
    distiller.train()
    rows = history(distiller.output_dir)
    assert rows["kd"].isna().all() and (rows["share_ce"] == 1.0).all()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    plain, _ = _first_window_grads(tiny_config(tmp_path / "a"))
    checkpointed, _ = _first_window_grads(tiny_config(tmp_path / "b", gradient_checkpointing=True))
    assert (plain - checkpointed).norm() / plain.norm() < 1e-6


def test_kaggle_commit_runs_use_text_progress_bars(monkeypatch):
    """A commit run ("Save & Run All") keeps no widget state: the kit's bars are text there and the libraries'
    widget bars are off; an interactive session keeps tqdm.auto and the libraries' bars."""
    import datasets
    import huggingface_hub.utils
    import transformers
    from tqdm.auto import tqdm as auto_tqdm
    from tqdm.std import tqdm as text_tqdm

    from kagglekd import env

    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert env.progress_bar() is auto_tqdm and env.quiet_library_bars() is False
    assert datasets.is_progress_bar_enabled() and transformers.utils.logging.is_progress_bar_enabled()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert issubclass(env.progress_bar(), text_tqdm)  # a text bar (CommitProgressBar: a few lines per bar)
    try:
        assert env.quiet_library_bars() is True
        assert not datasets.is_progress_bar_enabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert huggingface_hub.utils.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()


def test_stop_after_pauses_with_a_checkpoint_and_a_resume_finishes_the_plan_exactly(tmp_path, kagglekd_cache):
    """stop_after pauses a session inside the plan: a checkpoint at that step, no export, the command to resume
    printed; training the same config again resumes there and reproduces the uninterrupted run's history."""
    common = dict(max_steps=8, save_steps=3, eval_steps=4, scheduler_type="linear", warmup_steps=1)
    full = Distiller(tiny_config(tmp_path / "full", **common))
    full_summary = full.train()
    paused = Distiller(tiny_config(tmp_path / "cut", stop_after=5, **common))
    summary = paused.train()
    assert summary["paused"] and summary["optimizer_steps"] == 5 and summary["planned_steps"] == 8
    assert latest_checkpoint(paused.checkpoint_dir).name == "step-5"  # saved at the pause (save_steps is 3)
    assert not (paused.output_dir / "student").exists()  # the plan is unfinished: nothing exported
    config_file = paused.output_dir / "config.json"
    assert f"--config {config_file}" in summary["resume"] and "step 5 of 8" in summary["resume"]
    assert json.loads(config_file.read_text())["stop_after"] is None  # config.json holds the plan, not the pause
    resumed = Distiller(DistillConfig.load(config_file).replace(resume="auto"))  # what the printed command runs
    resumed_summary = resumed.train()
    assert not resumed_summary["paused"] and resumed_summary["optimizer_steps"] == 8
    a, b = history(full.output_dir), history(resumed.output_dir)
    assert list(a["step"]) == list(b["step"]) == list(range(8))
    for column in ("loss", "lr", "kd", "ce", "grad_norm"):
        assert (a[column] - b[column]).abs().max() < 1e-6, column
    assert (a["eval_ppl"].dropna() - b["eval_ppl"].dropna()).abs().max() < 1e-6
    assert abs(full_summary["eval_ppl"] - resumed_summary["eval_ppl"]) < 1e-6
    assert (resumed.output_dir / "student" / "config.json").is_file()
