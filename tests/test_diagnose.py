"""diagnose: the must-show hand-rolled config, --fix round trip, every check, exit codes, the dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kagglekd import diagnose as dg
from kagglekd.config import preset_names
from kagglekd.diagnose import FINDINGS, diagnose, fix_config, main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).parent / "data"
MUST_SHOW = DATA / "hand_rolled_p100.json"
ROOT = Path(__file__).parent.parent

SAME_TOKENIZER = {
    "teacher_model": "HuggingFaceTB/SmolLM2-360M",
    "student_model": "HuggingFaceTB/SmolLM2-135M",
    "batch_size": 4,
    "gradient_accumulation_steps": 4,
    "dataset_subset_size": 8000,
    "max_length": 256,
    "save_steps": 50,
    "eval_steps": 100,
}


def _raw() -> dict:
    return json.loads(MUST_SHOW.read_text())


def _find(report, id, field=None):
    return [f for f in report.findings if f.id == id and (field is None or f.field == field)]


def _run_json(capsys, *argv) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


# ---- the must-show config ---------------------------------------------------------------------------------
def test_must_show_config_via_main(capsys):
    code, out = _run_json(capsys, "--config", str(MUST_SHOW))
    assert code == 1
    errors = {f["id"] for f in out["findings"] if f["severity"] == "error"}
    assert {"device", "tokenizer"} <= errors
    assert out["gpu"] == "P100"  # read from the config's "device" key
    assert out["plan"]["optimizer_steps"] == 4689 and out["plan"]["batches_per_epoch"] == 25000
    assert out["plan"]["warmup_steps"] == 1000 and 0.21 < out["plan"]["warmup_fraction"] < 0.22
    memory = [f for f in out["findings"] if f["id"] == "memory"]
    assert len(memory) == 1 and "GiB of 16.0 GiB" in memory[0]["message"] and "%" in memory[0]["message"]
    assert out["memory"]["total"] == sum(out["memory"]["parts"].values())
    assert out["memory"]["capacity"] == 16 * 1024**3 and 0 < out["memory"]["fraction"] < 1
    assert set(out["time"]) >= {"tokens_per_s", "epoch_hours", "run_hours", "fits_12h", "recommended_save_steps"}
    for f in out["findings"]:
        assert set(f) == {"id", "severity", "field", "message", "fix"} and f["id"] in FINDINGS
    device = next(f for f in out["findings"] if f["id"] == "device")
    assert "sm_60" in device["message"] and "T4" in device["fix"]
    tokenizer = next(f for f in out["findings"] if f["id"] == "tokenizer")
    # one rule (kagglekd.rules) for diagnose and the trainer: it names the field the fix changes
    assert "cross_tokenizer" in tokenizer["fix"] and tokenizer["field"] == "cross_tokenizer"


def test_must_show_fix_then_rediagnose_on_t4x2_exits_0(tmp_path, capsys):
    fixed_path = tmp_path / "fixed.json"
    assert main(["--config", str(MUST_SHOW), "--gpu", "P100", "--fix", "--output", str(fixed_path)]) == 1
    text = capsys.readouterr().out
    assert "[ERROR] device" in text and f"wrote {fixed_path}" in text
    fixed = json.loads(fixed_path.read_text())
    assert fixed["_fixes"] and all(isinstance(line, str) and ": " in line for line in fixed["_fixes"])
    # the trainer transfers features across tokenizers (span-averaged teacher states); attention maps it cannot
    assert fixed["cross_tokenizer"] is True and fixed["alpha_feature"] == 0.1 and fixed["alpha_attention"] == 0
    assert "attention_layers" not in fixed
    assert "device" not in fixed and "warmup_steps" not in fixed
    assert any("T4 x2" in line for line in fixed["_unfixable"])
    assert main(["--config", str(fixed_path), "--gpu", "T4x2"]) == 0
    capsys.readouterr()
    # Same GPU as before: only the error no config change can fix remains.
    code, out = _run_json(capsys, "--config", str(fixed_path), "--gpu", "P100")
    assert code == 1 and {f["id"] for f in out["findings"] if f["severity"] == "error"} == {"device"}
    # the fixed config loads as a DistillConfig, cross_tokenizer on
    from kagglekd.config import DistillConfig

    assert DistillConfig.from_dict(fixed).cross_tokenizer is True


def test_must_show_via_python_m_kagglekd(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kagglekd", "diagnose", "--config", str(MUST_SHOW), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 1, out.stderr[-1500:]
    report = json.loads(out.stdout)
    assert report["plan"]["optimizer_steps"] == 4689
    assert {"device", "tokenizer"} <= {f["id"] for f in report["findings"] if f["severity"] == "error"}
    fixed = tmp_path / "fixed.json"
    subprocess.run([*cmd[:-1], "--fix", "--output", str(fixed)], capture_output=True, cwd=ROOT, env=env, timeout=120)
    again = subprocess.run(
        [sys.executable, "-m", "kagglekd", "diagnose", "--config", str(fixed), "--gpu", "T4x2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert again.returncode == 0, again.stdout[-2000:]


def test_plots_written(tmp_path, capsys):
    assert main(["--config", str(MUST_SHOW), "--plots", str(tmp_path)]) == 1
    for name in ("lr_plan.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 1000


# ---- exit code 2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_unusable_input_exits_2(tmp_path, capsys, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err


def test_missing_file_bad_gpu_and_fix_without_output_exit_2(capsys):
    assert main(["--config", "no/such/file.json"]) == 2
    assert main(["--config", str(MUST_SHOW), "--gpu", "V100"]) == 2
    assert main(["--config", str(MUST_SHOW), "--fix"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--gpu", "T4"])  # --config missing
    assert exit_info.value.code == 2


# ---- lenient parsing --------------------------------------------------------------------------------------
def test_unknown_alias_invalid_pending_and_gpu_hint():
    raw = {
        **SAME_TOKENIZER,
        "learnin_rate": 1e-3,
        "lr": "5e-4",
        "num_train_epochs": 2,
        "batch_size": -3,
        "use_sar": False,
        "use_cross_tokenizer": False,
        "machine_shape": "NvidiaTeslaT4",
    }
    report = diagnose(raw, gpu=None)
    unknown = _find(report, "unknown-key", "learnin_rate")[0]
    assert "learning_rate" in unknown.message and unknown.severity == "warning"
    assert {f.field for f in _find(report, "alias")} == {"lr", "num_train_epochs", "use_sar", "use_cross_tokenizer"}
    assert report.config.learning_rate == 5e-4 and report.config.num_epochs == 2  # '5e-4' read as a number
    assert _find(report, "invalid-value", "batch_size")[0].severity == "error" and report.config.batch_size == 16
    assert report.config.cross_tokenizer is False
    assert report.gpu == "T4x2" and _find(report, "gpu-hint", "machine_shape")


def test_gpu_hints():
    """GPU keys of the config are read through gpus.resolve; an unknown one is said so, never a silent T4."""
    for hint, profile in [("NvidiaTeslaP100", "P100"), ("T4 x2", "T4x2"), ("NvidiaTeslaT4", "T4x2"), ("t4", "T4")]:
        report = diagnose({**SAME_TOKENIZER, "device": hint}, gpu=None)
        assert report.gpu == profile and _find(report, "gpu-hint", "device"), hint
    assert diagnose({**SAME_TOKENIZER, "gpu": "a100"}, gpu=None).gpu == "A100"
    unknown = diagnose({**SAME_TOKENIZER, "device": "cuda"}, gpu=None)
    assert unknown.gpu == "T4x2" and not _find(unknown, "gpu-hint")
    finding = _find(unknown, "gpu-unknown", "device")[0]
    assert finding.severity == "warning" and "'cuda'" in finding.message and "T4x2" in finding.message
    assert _find(diagnose(SAME_TOKENIZER, gpu="V100"), "gpu-unknown", "gpu")


def test_scheduler_name():
    report = diagnose({**SAME_TOKENIZER, "scheduler_type": "cosin"})
    finding = _find(report, "scheduler", "scheduler_type")[0]
    assert finding.severity == "error" and "'cosine'" in finding.fix
    assert fix_config(report)["scheduler_type"] == "cosine"


def test_config_conflict_both_alphas_zero():
    report = diagnose({**SAME_TOKENIZER, "alpha_kd": 0, "alpha_ce": 0})
    assert _find(report, "config-conflict")[0].severity == "error"


# ---- schedule ---------------------------------------------------------------------------------------------
def test_total_steps_key_that_counts_batches():
    raw = {**SAME_TOKENIZER, "num_epochs": 1, "total_steps": 2000}  # 8000 / 4 = 2000 batches, GA 4 -> 500 steps
    report = diagnose(raw, gpu="T4")  # one process (ddp has its own test)
    assert report.plan["optimizer_steps"] == 500
    finding = _find(report, "total-steps-mismatch", "total_steps")[0]
    assert "micro-batches" in finding.message and "25.0%" in finding.message
    assert "total_steps" not in fix_config(report)
    shorter = diagnose({**SAME_TOKENIZER, "num_training_steps": 300}, gpu="T4")
    assert "LR 0" in _find(shorter, "total-steps-mismatch")[0].message
    assert not _find(diagnose({**SAME_TOKENIZER, "total_steps": 500}, gpu="T4"), "total-steps-mismatch")


def test_warmup_checks():
    long = diagnose({**SAME_TOKENIZER, "warmup_steps": 200})  # of 500
    assert _find(long, "warmup")[0].severity == "warning"
    never = diagnose({**SAME_TOKENIZER, "warmup_steps": 600})
    assert _find(never, "warmup")[0].severity == "error" and never.exit_code == 1
    assert _find(diagnose({**SAME_TOKENIZER, "warmup_ratio": 0.0}), "warmup")[0].severity == "info"


def test_lr_reaching_zero_before_the_end():
    report = diagnose({**SAME_TOKENIZER, "scheduler_kwargs": {"num_cycles": 1.0}}, gpu="T4")  # cosine down to 0 mid-run
    finding = _find(report, "lr-zero")[0]
    assert finding.severity == "warning" and "about 0" in finding.message and "of 500" in finding.message
    assert not _find(diagnose(SAME_TOKENIZER), "lr-zero")  # a plain cosine ends near 0 only at the very end


def test_batches_unknown_and_from_flag():
    raw = {k: v for k, v in SAME_TOKENIZER.items() if k != "dataset_subset_size"}
    assert _find(diagnose(raw), "batches-unknown") and not diagnose(raw).plan
    report = diagnose(raw, gpu="T4", batches_per_epoch=100)
    assert report.plan["optimizer_steps"] == 25 and not _find(report, "batches-unknown")


def test_ddp_plan_counts_the_steps_the_run_takes():
    """Under ddp the processes share each epoch's blocks (the trainer: blocks // (batch_size x N) micro-batches
    per process), so the run has half the optimizer steps of one process: the plan, the warmup fraction, the
    LR curve and the evaluation count must follow."""
    one = diagnose(SAME_TOKENIZER, gpu="T4")
    two = diagnose(SAME_TOKENIZER, gpu="T4x2")
    assert two.strategy["strategy"] == "ddp"
    # 8,000 blocks, batch 4, accumulation 4: one process 2,000 micro-batches -> 500 steps; two 1,000 -> 250
    assert (one.plan["batches_per_epoch"], one.plan["optimizer_steps"], one.plan["processes"]) == (2000, 500, 1)
    assert (two.plan["batches_per_epoch"], two.plan["optimizer_steps"], two.plan["processes"]) == (1000, 250, 2)
    assert "per process x 2 ddp processes" in two.format_text()
    assert "2-process ddp run" in _find(two, "optimizer-steps")[0].message
    # the epoch is the same text either way
    assert two.time["epoch_tokens"] == one.time["epoch_tokens"] == 8000 * 256
    # 1,000 micro-batches of one process from the flag -> 500 per process
    raw = {k: v for k, v in SAME_TOKENIZER.items() if k != "dataset_subset_size"}
    assert diagnose(raw, gpu="T4x2", batches_per_epoch=1000).plan["batches_per_epoch"] == 500
    # an eval cadence that fits one process's run can leave ddp too few evaluations for early stopping
    patient = {**SAME_TOKENIZER, "eval_steps": 100, "early_stopping_patience": 3}
    assert _find(diagnose(patient, gpu="T4"), "early-stopping")[0].severity == "info"  # 5 evaluations
    assert _find(diagnose(patient, gpu="T4x2"), "early-stopping")[0].severity == "warning"  # 2 evaluations


# ---- losses -----------------------------------------------------------------------------------------------
def test_loss_weight_findings():
    report = diagnose({**SAME_TOKENIZER, "alpha_kd": 0.0, "alpha_ce": 0.7})
    assert {f.field for f in _find(report, "loss-weights")} == {"alpha_kd"}
    # attention_layers unset is the trainer's default of one layer (the last), not an error
    prereq = diagnose({**SAME_TOKENIZER, "alpha_attention": 0.1})
    assert not _find(prereq, "loss-prerequisite") and prereq.exit_code == 0
    cost = _find(prereq, "attention-cost")[0]
    assert cost.severity == "warning" and "the last layer" in cost.message
    assert fix_config(prereq)["alpha_attention"] == 0.1
    ce_only = diagnose({**SAME_TOKENIZER, "alpha_kd": 0.0, "alpha_ce": 0.9, "alpha_attention": 0.1})
    assert _find(ce_only, "loss-prerequisite", "alpha_attention")[0].severity == "error"
    assert fix_config(ce_only)["alpha_attention"] == 0.0
    assert _find(diagnose({**SAME_TOKENIZER, "attention_layers": 2}), "unused-setting")


def test_temperature_states_the_real_risk():
    high = _find(diagnose({**SAME_TOKENIZER, "temperature": 8.0}), "temperature")[0]
    assert high.severity == "warning" and "float32" in high.message and "T^2 = 64" in high.message
    assert _find(diagnose({**SAME_TOKENIZER, "temperature": 2.0}), "temperature")[0].severity == "info"
    assert not _find(diagnose({**SAME_TOKENIZER, "temperature": 1.0}), "temperature")


# ---- cadence ----------------------------------------------------------------------------------------------
def test_eval_early_stopping_save_and_ema():
    report = diagnose(
        {**SAME_TOKENIZER, "eval_steps": 1000, "early_stopping_patience": 3, "save_steps": None, "ema_decay": 0.999},
        gpu="T4",
    )  # a 500-step run
    assert _find(report, "eval-cadence")[0].severity == "warning"
    assert _find(report, "early-stopping")[0].severity == "warning"
    assert _find(report, "save-cadence", "save_steps")[0].severity == "warning"
    ema = _find(report, "ema")[0]
    assert ema.severity == "warning" and "60.6%" in ema.message  # 0.999 ** 500
    fixed = fix_config(report)
    assert fixed["eval_steps"] == 50 and fixed["ema_decay"] == 0.98 and fixed["save_steps"] >= 1
    assert fixed["early_stopping_patience"] == 3  # 10 evals // 3
    again = diagnose({k: v for k, v in fixed.items() if not k.startswith("_")}, gpu="T4")
    assert not [f for f in again.findings if f.severity != "info" and f.id in ("eval-cadence", "early-stopping", "ema")]


def test_save_cadence_against_time_at_risk():
    report = diagnose({**SAME_TOKENIZER, "save_steps": 10_000, "dataset_subset_size": 2_000_000}, gpu="T4")
    finding = [f for f in _find(report, "save-cadence") if "minutes" in f.message][0]
    assert str(report.time["recommended_save_steps"]) in finding.fix
    assert report.time["step_seconds"] * report.time["recommended_save_steps"] <= 30 * 60


# ---- precision and device ---------------------------------------------------------------------------------
def test_precision_against_gpu():
    bf16 = diagnose({**SAME_TOKENIZER, "bf16": True}, gpu="T4")
    assert _find(bf16, "precision", "bf16")[0].severity == "warning"
    assert not _find(diagnose({**SAME_TOKENIZER, "bf16": True}, gpu="A100"), "precision", "bf16")
    fp32 = diagnose({**SAME_TOKENIZER, "use_amp": False}, gpu="T4x2")
    assert _find(fp32, "precision", "use_amp")[0].severity == "warning" and fix_config(fp32)["use_amp"] is True
    cpu = diagnose(SAME_TOKENIZER, gpu="cpu")
    assert "float32" in _find(cpu, "precision")[0].message and _find(cpu, "device")[0].severity == "warning"


def test_p100_is_a_device_error():
    report = diagnose(SAME_TOKENIZER, gpu="P100")
    assert [f.severity for f in _find(report, "device")] == ["error"]
    assert not _find(diagnose(SAME_TOKENIZER, gpu="L4"), "device")


# ---- models, tokenizers, memory ---------------------------------------------------------------------------
def test_same_tokenizer_family_is_not_an_error():
    report = diagnose(SAME_TOKENIZER)
    assert not _find(report, "tokenizer") and report.exit_code == 0


def test_unknown_model_ids():
    report = diagnose({**SAME_TOKENIZER, "teacher_model": "someone/mystery-7b"})
    finding = _find(report, "model-unknown", "teacher_model")[0]
    assert "config.json" in finding.fix and not report.memory
    assert _find(report, "tokenizer-unknown", "teacher_model")


def test_max_length_beyond_positions():
    report = diagnose(
        {
            **SAME_TOKENIZER,
            "teacher_model": "HuggingFaceTB/SmolLM-135M",
            "student_model": "HuggingFaceTB/SmolLM-135M",
            "max_length": 4096,
        }
    )
    assert _find(report, "max-length")[0].severity == "error"
    assert fix_config(report)["max_length"] == 2048


def test_memory_oom_is_an_error_with_a_fix():
    raw = {**SAME_TOKENIZER, "batch_size": 64, "max_length": 1024}
    report = diagnose(raw, gpu="T4")
    finding = _find(report, "memory")[0]
    assert finding.severity == "error" and "OOM" in finding.message and "gradient_accumulation_steps" in finding.fix
    fixed = fix_config(report)
    assert fixed["batch_size"] < 64 and fixed["batch_size"] * fixed["gradient_accumulation_steps"] >= 64 * 4
    again = diagnose({k: v for k, v in fixed.items() if not k.startswith("_")}, gpu="T4")
    assert _find(again, "memory")[0].severity == "info"


def test_session_time_beyond_12_hours():
    report = diagnose({**SAME_TOKENIZER, "dataset_subset_size": 2_000_000, "num_epochs": 1}, gpu="T4")
    assert _find(report, "session-time")[0].severity == "warning" and not report.time["fits_12h"]


def test_teacher_cache_size_and_incompatible_combinations():
    cache = "/kaggle/working/teacher_cache"
    big = diagnose({**SAME_TOKENIZER, "dataset_subset_size": 400_000, "teacher_cache": cache, "kd_top_k": 256})
    assert _find(big, "teacher-cache")[0].severity == "error"
    sar = diagnose({**SAME_TOKENIZER, "teacher_cache": cache, "use_sar": True, "alpha_feature": 0.1})
    assert {f.field for f in _find(sar, "incompatible")} == {"sar", "alpha_feature"}


def test_every_finding_id_is_documented():
    from kagglekd import rules

    package = Path(dg.__file__).parent
    tables = (package / "findings.py", Path(rules.__file__))
    sources = [p.read_text() for p in package.glob("*.py") if p.name != "findings.py"]
    sources.append(Path(rules.__file__).read_text().split("RULE_FINDINGS: dict", 1)[1].split("\n}\n", 1)[1])
    assert all(p.exists() for p in tables)
    for id, description in FINDINGS.items():
        assert description.endswith(".") and "\n" not in description
        assert any(f'"{id}"' in source for source in sources), id  # used somewhere


@pytest.mark.parametrize("name", [*preset_names(), str(MUST_SHOW)])
def test_fixed_config_of_every_preset_passes_diagnose(name):
    """diagnose --fix output (patches, re-checked against the rules) diagnoses without an error on T4x2."""
    raw = dg.read_raw(name)
    report = diagnose(raw, gpu="T4x2")
    fixed = fix_config(report)
    again = diagnose({k: v for k, v in fixed.items() if not k.startswith("_")}, gpu="T4x2")
    assert again.exit_code == 0, [(f.id, f.field, f.message) for f in again.errors]


# ---- dry run ----------------------------------------------------------------------------------------------
TINY = {
    "teacher_model": "tiny-random-moe",
    "student_model": "tiny-random-dense",
    "dataset": "stdlib-docs",
    "batch_size": 4,
    "max_length": 64,
    "max_steps": 50,
    "eval_steps": 10,
    "save_steps": 10,
}


def test_dry_run_on_tiny_models(tmp_path):
    pytest.importorskip("kagglekd.trainer")
    report = diagnose(TINY, gpu="cpu", dry_run=3, dry_run_dir=tmp_path / "dry")
    assert not _find(report, "dry-run-failed"), [f.message for f in report.findings]
    dry = report.time["dry_run"]
    assert dry["steps"] == 3 and dry["tokens_per_s"] > 0 and not dry["stand_ins"]
    blocks, batch = dry["train_blocks"], TINY["batch_size"]
    assert blocks > 0 and report.plan["batches_per_epoch"] == -(-blocks // batch)  # counted by the dry run
    assert report.time["source"] == "dry run on the configured models"
    assert report.time["tokens_per_s"] == pytest.approx(dry["tokens_per_s"])
    assert len(report.history) == 3 and any(k.startswith("share_") for k in report.history[0])
    written = dg.write_plots(report, tmp_path / "plots")
    assert {p.name for p in written} >= {"lr_plan.png", "component_shares.png"}
    assert _find(report, "dry-run")[0].severity == "info"


def test_stop_after_inside_the_plan_is_a_warning_with_a_fix_and_no_patch():
    """A stop leaves the plan unfinished (no decayed LR, no export): diagnose says so and how to finish; --fix
    keeps it, since a planned pause (a plan split over sessions) is legitimate."""
    plan_steps = diagnose(SAME_TOKENIZER, gpu="T4").plan["optimizer_steps"]  # 500
    report = diagnose({**SAME_TOKENIZER, "stop_after": 100}, gpu="T4")
    (finding,) = _find(report, "stop-after")
    assert finding.severity == "warning" and finding.field == "stop_after" and not finding.patch
    assert f"step 100 of the plan's {plan_steps}" in finding.message and "not exported" in finding.message
    assert "remove stop_after" in finding.fix and "resumes" in finding.fix
    assert fix_config(report)["stop_after"] == 100
    for outside in (plan_steps, plan_steps + 1):
        assert not _find(diagnose({**SAME_TOKENIZER, "stop_after": outside}, gpu="T4"), "stop-after")
    assert not _find(diagnose(SAME_TOKENIZER, gpu="T4"), "stop-after")
