"""The embedded default's pipeline and the ablation, on tiny random models (the real demo is `make demo`)."""

import json

import pandas as pd
import pytest

from kagglekd.config import DistillConfig
from kagglekd.demo import ABLATION_VARIANTS, evaluate_run, run_ablation, run_demo


@pytest.fixture
def tiny_preset(tmp_path, kagglekd_cache, monkeypatch):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
    config = DistillConfig.load("tiny-cpu").replace(
        teacher_model="tiny-random-moe",
        dataset_subset_size=12,
        max_length=32,
        batch_size=4,
        max_steps=3,
        eval_steps=None,
        eval_max_blocks=8,
        save_steps=None,
    )
    path = tmp_path / "tiny.json"
    config.to_json(path)
    return path


def test_demo_writes_results_table_and_plots(tmp_path, tiny_preset):
    results = run_demo(output_dir=tmp_path / "demo", preset=str(tiny_preset), echo=lambda _: None)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    for key in ("teacher_ppl", "ce_student_ppl", "kd_student_ppl", "kd_top1_agreement", "ce_top1_agreement"):
        assert saved[key] == pytest.approx(results[key]) and saved[key] == saved[key]  # present and not NaN
    for name in ("kd_history.png", "ce_history.png", "eval_ppl.png", "results.md"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    ce_rows = pd.read_csv(tmp_path / "demo" / "ce" / "history.csv")
    kd_rows = pd.read_csv(tmp_path / "demo" / "kd" / "history.csv")
    assert len(ce_rows) == len(kd_rows) == 3 and ce_rows["kd"].isna().all()
    # `evaluate --run` gives the numbers the demo reported for the KD student
    rows = evaluate_run(tmp_path / "demo" / "kd")
    assert rows[-1]["eval_ppl"] == pytest.approx(saved["kd_student_ppl"], rel=1e-5)
    assert rows[0]["eval_ppl"] == pytest.approx(saved["teacher_ppl"], rel=1e-5)


def test_ablation_table(tmp_path, tiny_preset):
    table = run_ablation(output_dir=tmp_path / "demo", preset=str(tiny_preset), max_steps=2, echo=lambda _: None)
    frame = pd.read_csv(tmp_path / "demo" / "ablation.csv")
    assert list(frame.columns) == ["variant", "eval_ppl", "top1_agreement", "tokens_per_s"]
    assert list(frame["variant"]) == list(ABLATION_VARIANTS) and frame["eval_ppl"].notna().all()
    assert len(table) == len(ABLATION_VARIANTS) and (tmp_path / "demo" / "ablation.png").stat().st_size > 0


def test_cross_tokenizer_demo(tmp_path, tiny_preset):
    from transformers import AutoTokenizer

    from kagglekd import corpus, models

    tokenizer = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(3000, pre_tokenizer="whitespace-digits"))
    teacher = tmp_path / "teacher"
    models.tiny_random_moe(len(tokenizer), seed=0).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "cross"
    results = run_demo(
        output_dir=out, preset=str(tiny_preset), echo=lambda _: None, cross_tokenizer=True, cross_teacher=str(teacher)
    )
    setup = results["alignment"]["setup"]
    assert results["cross_tokenizer"] and 0 < setup["aligned_fraction"] < 1 and setup["teacher_vocab"] == 3000
    assert "per teacher token" in (out / "results.md").read_text()
    rows = evaluate_run(out / "kd")
    assert rows[0]["model"] == "teacher (ppl per teacher token)"
    assert rows[0]["eval_ppl"] == pytest.approx(results["teacher_ppl"], rel=1e-5)
    assert rows[-1]["top1_agreement"] == pytest.approx(results["kd_top1_agreement"], rel=1e-5)
