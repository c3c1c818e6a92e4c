"""The embedded default's pipeline and the ablation, on tiny random models (the real demo is `make demo`)."""

import json
import math
import statistics

import pandas as pd
import pytest

from kagglekd.config import DistillConfig
from kagglekd.demo import (
    ABLATION_COLUMNS,
    ABLATION_VARIANTS,
    SUMMARY_COLUMNS,
    evaluate_run,
    run_ablation,
    run_demo,
    summarise_ablation,
)
from kagglekd.errors import ConfigError


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
        router_lr=0.05,  # SAR moves the routers visibly in 2 steps: its adapted teacher is not the judge
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


def test_ablation_writes_per_seed_rows_and_their_mean_and_sd(tmp_path, tiny_preset):
    out = tmp_path / "demo"
    variants = ["KD", "SAR"]
    result = run_ablation(
        output_dir=out, preset=str(tiny_preset), max_steps=2, echo=lambda _: None, seeds=[3, 5], variants=variants
    )  # fmt: skip
    runs = pd.read_csv(out / "ablation.csv")
    assert list(runs.columns) == ABLATION_COLUMNS and len(runs) == 4
    assert sorted(zip(runs["variant"], runs["seed"])) == [("KD", 3), ("KD", 5), ("SAR", 3), ("SAR", 5)]
    assert runs[["eval_ppl", "top1_agreement", "eval_kd", "tokens_per_s"]].notna().all().all()
    for variant, seed in zip(runs["variant"], runs["seed"]):  # each run trained under its own seed
        slug = variant.lower().replace("+", "-")
        assert DistillConfig.from_json(out / "ablation" / slug / f"seed-{seed}" / "config.json").seed == seed
    for variant in variants:  # different seeds, different students
        assert runs[runs["variant"] == variant]["eval_ppl"].nunique() == 2

    summary = pd.read_csv(out / "ablation_summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS and list(summary["variant"]) == variants
    for _, row in summary.iterrows():
        mine = runs[runs["variant"] == row["variant"]]
        assert row["seeds"] == 2
        for metric in ("eval_ppl", "top1_agreement"):
            values = list(mine[metric])
            assert row[f"{metric}_mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert row[f"{metric}_sd"] == pytest.approx(statistics.stdev(values), rel=1e-9)
        assert row["tokens_per_s_mean"] == pytest.approx(statistics.mean(mine["tokens_per_s"]), rel=1e-12)
        kd = runs[runs["variant"] == "KD"].set_index("seed")["eval_ppl"]
        paired = [ppl - kd[seed] for seed, ppl in zip(mine["seed"], mine["eval_ppl"])]  # vs KD of the same seed
        assert row["eval_ppl_vs_kd_mean"] == pytest.approx(statistics.mean(paired), abs=1e-9)
        assert row["eval_ppl_vs_kd_sd"] == pytest.approx(statistics.stdev(paired), abs=1e-9)
    assert summary.set_index("variant").loc["SAR", "eval_ppl_vs_kd_sd"] > 0
    assert [row["variant"] for row in result["summary"]] == variants and len(result["runs"]) == 4
    assert (out / "ablation.png").stat().st_size > 0

    # agreement and KD are against the unadapted top-k teacher (SAR runs all experts and adapts its own): a
    # plain-KD distiller of the preset, judging the saved SAR student, gives the reported numbers (agreement is
    # ~0 after 2 steps; the KD loss tells the teachers apart)
    from transformers import AutoModelForCausalLM

    from kagglekd.trainer import Distiller

    judge = Distiller(DistillConfig.from_json(tiny_preset), output_dir=tmp_path / "judge", write_run_dir=False)
    sar = runs[(runs["variant"] == "SAR") & (runs["seed"] == 5)].iloc[0]
    student = AutoModelForCausalLM.from_pretrained(out / "ablation" / "sar" / "seed-5" / "student")
    metrics = judge.evaluate(model=student, with_ema=False)
    assert metrics["top1_agreement"] == pytest.approx(sar["top1_agreement"], rel=1e-6)
    assert metrics["ppl"] == pytest.approx(sar["eval_ppl"], rel=1e-6)
    assert metrics["kd"] == pytest.approx(sar["eval_kd"], rel=1e-6)


def test_ablation_variants_are_valid_configs_and_bad_arguments_are_errors(tmp_path):
    base = DistillConfig.load("tiny-cpu")
    assert list(ABLATION_VARIANTS) == [
        "CE-only", "KD", "KD, all experts", "SAR", "KA", "SAR+KA", "on-policy", "GKD", "sequence-level KD",
    ]  # fmt: skip
    configs = {name: base.replace(**changes) for name, changes in ABLATION_VARIANTS.items()}
    assert configs["CE-only"].alpha_kd == 0 and configs["KD, all experts"].all_experts
    assert configs["SAR"].sar and not configs["SAR"].ka_samples and configs["KA"].ka_samples == 2
    assert configs["SAR+KA"].sar and configs["SAR+KA"].ka_samples == 2
    assert configs["on-policy"].lmbda == 1 and configs["GKD"].lmbda == 0.5 and configs["sequence-level KD"].seq_kd
    with pytest.raises(ConfigError, match="seeds"):
        run_ablation(output_dir=tmp_path, seeds=0, echo=lambda _: None)
    with pytest.raises(ConfigError, match="seeds"):
        run_ablation(output_dir=tmp_path, seeds=[1, 1], echo=lambda _: None)
    with pytest.raises(ConfigError, match="choose from"):
        run_ablation(output_dir=tmp_path, variants=["KD", "dropout"], echo=lambda _: None)


def test_a_single_seed_has_no_sd():
    runs = [{"variant": "KD", "seed": 0, "eval_ppl": 40.0, "top1_agreement": 0.5, "train_time_s": 1, "tokens_per_s": 9}]
    (row,) = summarise_ablation(runs)
    assert row["eval_ppl_mean"] == 40.0 and math.isnan(row["eval_ppl_sd"]) and row["seeds"] == 1
    assert row["eval_ppl_vs_kd_mean"] == 0 and math.isnan(row["eval_ppl_vs_kd_sd"])
    (row,) = summarise_ablation([dict(runs[0], variant="SAR")])  # no KD run to pair with
    assert math.isnan(row["eval_ppl_vs_kd_mean"]) and math.isnan(row["eval_ppl_vs_kd_sd"])


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
