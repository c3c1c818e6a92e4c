"""The runtime doctor on CPU: GPUs faked through monkeypatched torch.cuda functions, Kaggle dirs faked in tmp."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from kagglekd import env
from kagglekd.__main__ import main

T4_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
KAGGLE_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]  # no sm_60: the P100 case


@pytest.fixture
def fake_gpus(monkeypatch):
    def install(name: str, capability: tuple[int, int], count: int = 1, archs=KAGGLE_ARCHS, bf16_claim=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda index=0: SimpleNamespace(total_memory=15 * 1024**3)
        )
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_claim)  # the lie on a T4

    return install


@pytest.fixture(autouse=True)
def _not_on_kaggle(monkeypatch, tmp_path):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(env, "KAGGLE_WORKING", tmp_path / "no-kaggle-working")
    monkeypatch.chdir(tmp_path)


def test_arch_supported_rules():
    assert env.arch_supported((7, 5), KAGGLE_ARCHS)
    assert not env.arch_supported((6, 0), KAGGLE_ARCHS)  # P100 on the current Kaggle torch
    assert env.arch_supported((6, 0), T4_ARCHS)
    assert env.arch_supported((8, 9), ["sm_80"])  # same major, newer minor runs the sm_80 cubin
    assert not env.arch_supported((9, 0), ["sm_80", "sm_86"])
    assert env.arch_supported((12, 0), ["sm_80", "compute_90"])  # PTX JIT for newer devices
    assert not env.arch_supported((7, 5), [])


def test_p100_is_an_error_with_the_t4x2_fix(fake_gpus):
    fake_gpus("Tesla P100-PCIE-16GB", (6, 0))
    report = env.doctor()
    assert report.gpus[0].arch == "sm_60" and not report.gpus[0].has_kernels
    assert report.profile == "P100" and report.exit_code == 1
    error = next(c for c in report.checks if c.severity == "error")
    assert "no kernel image is available" in error.message
    assert "T4 x2" in error.fix and "NvidiaTeslaT4" in error.fix


def test_t4x2_is_fine_and_bf16_is_not_trusted(fake_gpus):
    fake_gpus("Tesla T4", (7, 5), count=2, bf16_claim=True)
    report = env.doctor()
    assert report.exit_code == 0 and report.profile == "T4x2" and len(report.gpus) == 2
    assert all(g.has_kernels and not g.native_bf16 for g in report.gpus)
    assert any("no native bf16" in c.message for c in report.checks)


def test_a100_has_native_bf16(fake_gpus):
    fake_gpus("NVIDIA A100-SXM4-40GB", (8, 0))
    report = env.doctor()
    assert report.gpus[0].native_bf16 and report.profile == "A100" and report.exit_code == 0


@pytest.mark.parametrize("name, capability", [("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA L40S", (8, 9))])
def test_a_gpu_without_a_profile_is_reported_unknown_never_a_t4(fake_gpus, name, capability):
    fake_gpus(name, capability, count=2)
    report = env.doctor()
    assert report.profile == f"unknown ({name})"  # not T4x2 (the old fallback), nor L4 for an L40S
    assert env.gpu_profile_name() == report.profile
    warning = next(c for c in report.checks if "no kagglekd GPU profile" in c.message)
    assert warning.severity == "warning" and name in warning.message and "T4x2" in warning.message
    assert {"item": "GPU profile", "value": report.profile} in report.rows()


def test_profile_names_come_from_the_one_resolver(fake_gpus):
    fake_gpus("Tesla T4", (7, 5), count=1)
    assert env.gpu_profile_name() == "T4"
    fake_gpus("NVIDIA L4", (8, 9), count=4)
    assert env.gpu_profile_name() == "L4x4"


def test_cpu_report_text_json_and_cli(capsys):
    report = env.doctor()
    assert report.gpus == [] and report.profile == "cpu" and report.exit_code == 0
    assert report.internet == "unknown (not checked)" and report.run_type is None
    assert set(report.versions) >= {"torch", "transformers", "accelerate", "datasets", "kagglekd"}
    assert "kagglekd doctor" in report.format_text()
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["profile"] == "cpu" and data["exit_code"] == 0 and "versions" in data


def test_cli_exit_code_on_p100(fake_gpus, capsys):
    fake_gpus("Tesla P100-PCIE-16GB", (6, 0))
    assert main(["doctor"]) == 1
    assert "[ERROR]" in capsys.readouterr().out


def test_kaggle_session_paths_and_run_type(monkeypatch, tmp_path):
    for name in ("input", "working", "temp"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(env, "KAGGLE_INPUT", tmp_path / "input")
    monkeypatch.setattr(env, "KAGGLE_WORKING", tmp_path / "working")
    monkeypatch.setattr(env, "KAGGLE_TEMP", tmp_path / "temp")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    report = env.doctor()
    assert report.on_kaggle and report.run_type == "Batch"
    assert set(report.paths) == {"input", "working", "temp"} and report.paths["working"]["writable"]
    assert any(c.severity == "warning" and "without a GPU" in c.message for c in report.checks)


def test_internet_is_only_checked_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(env, "internet_reachable", lambda *a, **k: calls.append(1) or False)
    assert env.doctor().internet.startswith("unknown") and not calls
    assert env.doctor(check_internet=True).internet == "unreachable" and calls


def test_notebook_config_smoke_and_run_dir(tmp_path):
    full = env.notebook_config("smollm2-360m-to-135m-t4x2")
    assert full.teacher_model == "HuggingFaceTB/SmolLM2-360M" and full.output_dir.startswith("/kaggle/working")
    smoke = env.notebook_config("smollm2-360m-to-135m-t4x2", tmp_path / "r", smoke=True)
    assert smoke.teacher_model == "tiny-random-moe" and smoke.max_steps == 4 and smoke.output_dir == str(tmp_path / "r")
    from_dict = env.notebook_config({"teacher_model": "tiny-random-moe", "max_steps": 7})
    assert from_dict.max_steps == 7


def test_write_report(tmp_path):
    path = env.write_report(env.doctor(), tmp_path / "x" / "doctor.json")
    assert json.loads(path.read_text())["profile"] == "cpu"
    assert os.access(path, os.R_OK)
