"""Evaluation report helpers on a tiny finished run (CPU): the numbers match the trainer's own eval, the
generations are greedy (deterministic), and the model card lists data, config and the measured numbers."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from kagglekd import env, report
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller


@pytest.fixture(scope="module")
def runs(kagglekd_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
        config = env.notebook_config("tiny-cpu", root / "kd", smoke=True)
        # the run dir named here, whatever name notebook_config gives a smoke run's
        config = config.replace(save_steps=None, resume="never", output_dir=str(root / "kd"))
        kd = Distiller(config).train()
        Distiller(config.replace(alpha_kd=0.0, alpha_ce=1.0, output_dir=str(root / "ce"))).train()
    return root, kd


@pytest.fixture
def evaluation(runs, kagglekd_cache, monkeypatch):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
    root, _ = runs
    return report.load_evaluation(root / "kd", ce_run_dir=root / "ce")


def test_perplexity_rows_match_the_trainer(evaluation, runs):
    _, summary = runs
    rows = report.perplexity_rows(evaluation)
    assert [r["model"] for r in rows] == [report.TEACHER, report.STUDENT, report.BASELINE]
    student = rows[1]
    assert student["eval_ppl"] == pytest.approx(summary["eval_ppl"], rel=1e-5)
    assert student["top1_agreement"] == pytest.approx(summary["eval_top1_agreement"])
    assert rows[0]["top1_agreement"] == 1.0 and len({r["eval_tokens"] for r in rows}) == 1
    assert json.loads((evaluation.run_dir / "eval.json").read_text())[1]["model"] == report.STUDENT


def test_without_a_baseline_dir(runs, kagglekd_cache, monkeypatch):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
    root, _ = runs
    assert list(report.load_evaluation(root / "kd", ce_run_dir=root / "missing").models) == [
        report.TEACHER,
        report.STUDENT,
    ]


def test_unfinished_run_is_a_config_error(tmp_path):
    with pytest.raises(report.ConfigError, match="finished run directory"):
        report.load_evaluation(tmp_path)


def test_side_by_side_is_greedy_and_deterministic(evaluation):
    prompts = report.eval_prompts(evaluation, count=2, prompt_tokens=8)
    assert len(prompts) == 2 and all(p.shape == (8,) for p in prompts)
    first = report.side_by_side(evaluation, prompts, max_new_tokens=6)
    second = report.side_by_side(evaluation, prompts, max_new_tokens=6)
    assert first == second
    assert set(first[0]) == {"prompt", *evaluation.models}
    assert all(isinstance(row[report.STUDENT], str) for row in first)
    assert set(evaluation.generation_speed) == set(evaluation.models)


def test_size_and_speed(evaluation):
    rows = report.size_speed_rows(evaluation, max_batches=1)
    by_model = {r["model"]: r for r in rows}
    teacher, student = by_model[report.TEACHER], by_model[report.STUDENT]
    assert student["parameters_m"] * 1e6 == sum(p.numel() for p in evaluation.models[report.STUDENT].parameters())
    assert student["parameters_m"] < teacher["parameters_m"]
    # fp32 safetensors: ~4 bytes per parameter (tied embeddings stored once)
    assert student["mb_on_disk"] == pytest.approx(student["parameters_m"] * 4, rel=0.05)
    assert all(r["forward_tokens_per_s"] > 0 for r in rows)
    assert teacher["size_vs_teacher"] == 1.0


def test_weights_mb_unknown_is_nan(tmp_path):
    assert math.isnan(report.weights_mb(None)) and math.isnan(report.weights_mb(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"0" * 2_000_000)
    assert report.weights_mb(tmp_path) == 2.0


def test_forward_speed_counts_tokens(monkeypatch):
    model = torch.nn.Linear(2, 2)
    calls = []
    model.forward = lambda input_ids: calls.append(input_ids.numel())
    speed = report.forward_tokens_per_s(
        model, torch.zeros(10, 5, dtype=torch.long), batch_size=4, max_batches=2, min_seconds=0.0
    )
    assert speed > 0 and calls[:3] == [16, 16, 8]


def test_model_card(evaluation, tmp_path):
    rows = report.perplexity_rows(evaluation)
    sizes = report.size_speed_rows(evaluation, max_batches=1)
    samples = report.side_by_side(evaluation, report.eval_prompts(evaluation, 1, 6), max_new_tokens=4)
    card = report.write_model_card(evaluation, rows, sizes, samples, path=tmp_path / "README.md")
    text = card.read_text()
    assert text.startswith("---\nlibrary_name: transformers")
    _, header, body = text.split("---\n", 2)
    assert yaml.safe_load(header) == {  # the tiny run's models and corpus are no hub ids
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["knowledge-distillation", "kagglekd"],
    }
    assert body.startswith("\n# ")
    cfg = evaluation.config
    for expected in (
        cfg.teacher_model,
        cfg.student_model,
        "## Data",
        "stdlib-docs",
        "train blocks",
        "## Training",
        "| alpha_kd | 0.5 |",
        "## Results",
        f"{rows[1]['eval_ppl']:,.4g}",
        "## Size and speed",
        "## Sample generations",
        "from_pretrained",
    ):
        assert expected in text, expected
    default = report.write_model_card(evaluation, rows)
    assert default == evaluation.run_dir / "student" / "README.md"


def test_model_card_use_section_loads_the_exported_student(evaluation, tmp_path, monkeypatch):
    """The card's "Use" code runs as written: it names the exported folder (it said "path/to/student")."""
    card = report.write_model_card(evaluation, report.perplexity_rows(evaluation)).read_text()
    code = card.split("## Use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # an absolute path: the code works from any directory
    namespace: dict = {}
    exec(code, namespace)
    student = evaluation.models[report.STUDENT]
    loaded = namespace["model"].state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in student.state_dict().items())
    assert namespace["tokenizer"]("def main():")["input_ids"] == evaluation.tokenizer("def main():")["input_ids"]
    on_kaggle = "\n".join(report._card_use_and_limitations({}, Path("/kaggle/working/runs/kd/student")))
    assert 'from_pretrained("/kaggle/working/runs/kd/student")' in on_kaggle
    assert "/kaggle/input/<notebook>/runs/kd/student" in on_kaggle  # where the saved output is attached


def test_plot_size_speed(tmp_path):
    rows = [
        {"model": "teacher", "parameters_m": 6.0, "forward_tokens_per_s": 2000.0},
        {"model": "student", "parameters_m": 0.6, "forward_tokens_per_s": 5000.0},
    ]
    report.plot_size_speed(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _front_matter(cfg: DistillConfig) -> dict:
    lines = report._card_front_matter(cfg)
    assert lines[0] == "---" and lines[-1] == "---" and lines.count("---") == 2, lines
    return yaml.safe_load("\n".join(lines[1:-1]))


def test_card_front_matter_is_valid_yaml_with_hub_ids_only(tmp_path):
    hub = DistillConfig(student_model="HuggingFaceTB/SmolLM2-135M", dataset="HuggingFaceFW/fineweb-edu")
    assert _front_matter(hub) == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["knowledge-distillation", "kagglekd"],
        "base_model": "HuggingFaceTB/SmolLM2-135M",
        "datasets": ["HuggingFaceFW/fineweb-edu"],
    }
    local_dir = tmp_path / "my-student"
    local_dir.mkdir()
    for student, dataset in (
        ("/kaggle/input/my-student/v2", "/kaggle/input/corpus/train.jsonl"),
        (str(local_dir), "x"),
    ):
        header = _front_matter(DistillConfig(student_model=student, dataset=dataset))
        assert "base_model" not in header and "datasets" not in header, header


def test_table_cells_never_turn_scientific_in_the_thousands():
    from kagglekd.metrics import format_table

    rows = [{"a": 12345.6, "b": 9999.7, "c": 376.25, "d": 0.64321, "e": float("nan"), "f": 1234567.0}]
    body = format_table(rows, list("abcdef")).splitlines()[-1]
    assert [cell.strip() for cell in body.strip("| ").split("|")] == ["12,346", "10,000", "376.2", "0.6432", "-",
                                                                      "1,234,567"]  # fmt: skip
