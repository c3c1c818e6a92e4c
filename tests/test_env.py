"""The runtime doctor on CPU: GPUs faked through monkeypatched torch.cuda functions, Kaggle dirs faked in tmp."""

import io
import json
import os
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import tqdm.auto
import tqdm.std

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
    for name in env.KAGGLE_MARKERS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(env.LOCAL_WORKING_VAR, raising=False)
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


@pytest.mark.parametrize("name, capability", [("NVIDIA GeForce RTX 4090", (8, 9)), ("NVIDIA L40S", (8, 9))])
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


def test_notebook_config_smoke_and_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")  # on Kaggle: the preset's dir as it is
    full = env.notebook_config("smollm2-360m-to-135m-t4x2")
    assert full.teacher_model == "HuggingFaceTB/SmolLM2-360M" and full.output_dir.startswith("/kaggle/working")
    smoke = env.notebook_config("smollm2-360m-to-135m-t4x2", tmp_path / "r", smoke=True)
    assert smoke.teacher_model == "tiny-random-moe" and smoke.max_steps == 4
    assert smoke.output_dir == str(tmp_path / "r-smoke")  # never the real run's dir
    assert env.notebook_config("smollm2-360m-to-135m-t4x2", smoke=True).output_dir == f"{full.output_dir}-smoke"
    from_dict = env.notebook_config({"teacher_model": "tiny-random-moe", "max_steps": 7})
    assert from_dict.max_steps == 7


def test_write_report(tmp_path):
    path = env.write_report(env.doctor(), tmp_path / "x" / "doctor.json")
    assert json.loads(path.read_text())["profile"] == "cpu"
    assert os.access(path, os.R_OK)


# ---- where the session runs, and where its files go -----------------------------------------------------------
@pytest.mark.parametrize("marker", ["KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_TOKEN"])
def test_on_kaggle_follows_kaggles_variables_not_folders(monkeypatch, tmp_path, marker):
    working = tmp_path / "kaggle" / "working"
    working.mkdir(parents=True)
    monkeypatch.setattr(env, "KAGGLE_WORKING", working)  # a folder of that name exists here...
    assert not env.on_kaggle()  # ...and proves nothing
    assert env.kaggle_paths() == {"working": env._path_info(tmp_path)}  # the cwd stands in for /kaggle/working
    monkeypatch.setenv(marker, "Interactive" if marker == "KAGGLE_KERNEL_RUN_TYPE" else "x")
    assert env.on_kaggle() and set(env.kaggle_paths()) == {"input", "working", "temp"}


def test_off_kaggle_a_presets_kaggle_working_dir_maps_to_a_local_folder(monkeypatch, tmp_path, caplog):
    from kagglekd.config import DistillConfig

    preset = DistillConfig.load("smollm2-360m-to-135m-t4x2")
    relative = Path(preset.output_dir).relative_to("/kaggle/working")
    with caplog.at_level("WARNING", logger="kagglekd.env"):
        config = env.notebook_config("smollm2-360m-to-135m-t4x2")
    assert config.output_dir == str(tmp_path / relative)  # the cwd, as /kaggle/working is a kernel's cwd
    assert str(tmp_path / relative) in caplog.text and env.LOCAL_WORKING_VAR in caplog.text  # said in the log
    chosen = tmp_path / "elsewhere"
    monkeypatch.setenv(env.LOCAL_WORKING_VAR, str(chosen))
    assert env.notebook_config("smollm2-360m-to-135m-t4x2").output_dir == str(chosen / relative)
    assert env.notebook_config("smollm2-360m-to-135m-t4x2", smoke=True).output_dir == f"{chosen / relative}-smoke"
    assert env.local_path("/kaggle/temp/cache") == str(Path(tempfile.gettempdir()) / "kaggle-temp" / "cache")
    assert env.local_path("/kaggle/input/data.jsonl") == "/kaggle/input/data.jsonl"  # inputs are read, not mapped
    assert env.local_path("runs/mine") == "runs/mine"
    kaggle_existed = Path("/kaggle").exists()
    env.write_report(env.doctor(), Path(config.output_dir) / "doctor.json")  # what 00_setup writes first
    assert (tmp_path / relative / "doctor.json").is_file()
    assert Path("/kaggle").exists() == kaggle_existed  # nothing created under /kaggle
    from kagglekd.trainer import Distiller

    assert Distiller(preset).output_dir == chosen / relative  # a preset's config used directly, as in Python
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert env.local_path(preset.output_dir) == preset.output_dir  # on Kaggle: unchanged


def test_off_kaggle_a_teacher_cache_under_kaggle_working_maps_like_the_output_dir(monkeypatch, tmp_path):
    """cache-teacher writes <output_dir>/teacher_cache, mapped off Kaggle; a config naming that cache by its
    /kaggle/working path must read it from the same local folder (it was left unmapped: a missing-cache error)."""
    from kagglekd.__main__ import _load_config, build_parser
    from kagglekd.config import DistillConfig
    from kagglekd.launch import run_config

    preset = DistillConfig.load("smollm2-360m-to-135m-t4x2").to_dict()
    preset.update(kd_top_k=8, teacher_cache="/kaggle/working/kd/teacher_cache")
    mapped = str(tmp_path / "kd" / "teacher_cache")
    assert env.notebook_config(preset).teacher_cache == mapped
    config = DistillConfig.from_dict(preset)
    assert run_config(config).teacher_cache == mapped  # launch.train's config
    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset))
    assert _load_config(build_parser().parse_args(["train", "--config", str(path)])).teacher_cache == mapped
    for outside in ("/kaggle/input/cache", "caches/mine", None):  # read-only inputs and other paths: unchanged
        assert env.local_config(config.replace(teacher_cache=outside)).teacher_cache == outside
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert env.notebook_config(preset).teacher_cache == "/kaggle/working/kd/teacher_cache"  # on Kaggle: as given


# ---- SMOKE and the real run in one session -----------------------------------------------------------------
def test_a_smoke_run_then_the_real_run_of_the_same_preset_does_not_resume_the_smoke_checkpoint(tmp_path, use_kit_cache):
    """Mend: 02_train with SMOKE = True, then SMOKE = False in the same session, shared the run dir: the real run
    resumed the SMOKE checkpoint (a 4-step plan) and stopped with a ConfigError (4 vs N planned steps)."""
    from conftest import TINY_RUN

    from kagglekd import checkpoint
    from kagglekd.trainer import Distiller

    preset = {**TINY_RUN, "max_steps": 6, "save_steps": 2, "resume": "auto", "output_dir": str(tmp_path / "run")}
    smoke = env.notebook_config(preset, smoke=True)
    Distiller(smoke).train()
    smoke_checkpoints = checkpoint.complete_checkpoints(Path(smoke.output_dir) / "checkpoints")
    assert [p.name for p in smoke_checkpoints] == ["step-2"]  # the SMOKE run left a checkpoint of its 4-step plan
    real = env.notebook_config(preset)
    assert checkpoint.prepare_resume(real.output_dir, search_roots=[]) is None  # 02_train's resume check
    distiller = Distiller(real).setup()
    distiller._maybe_resume()
    assert distiller.state.step == 0  # nothing resumed
    summary = distiller.train()
    assert summary["optimizer_steps"] == summary["planned_steps"] == 6


# ---- progress bars in a commit run -------------------------------------------------------------------------
def _bar_lines(bar_class, steps: int, clock: list[float] | None = None, seconds_per_step: float = 0.0) -> list[str]:
    """The lines a bar of ``steps`` steps writes to a non-tty stream (a commit run's stderr), updated and given a
    postfix each step as the trainer does; ``clock`` (the fake time tqdm reads) advances ``seconds_per_step``."""
    stream = io.StringIO()
    bar = bar_class(total=steps, desc="distil", unit="step", file=stream, dynamic_ncols=True)
    for step in range(steps):
        if clock is not None:
            clock[0] += seconds_per_step
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}", lr="1.00e-03")
    bar.close()
    return [line for line in re.split(r"[\r\n]", stream.getvalue()) if line.strip()]


@pytest.mark.parametrize("seconds_per_step, expected", [(1.0, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]),
                                                        (0.01, [0, 100]), (30.0, list(range(0, 101, 10)))])  # fmt: skip
def test_a_commit_run_bar_writes_a_line_per_tenth_or_minute_whichever_is_rarer(monkeypatch, seconds_per_step, expected):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert env.progress_bar() is env.CommitProgressBar
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])  # what tqdm reads as its clock
    lines = _bar_lines(env.progress_bar(), 600, clock, seconds_per_step)
    assert len(lines) <= 12
    percents = [int(re.search(r"(\d+)%\|", line).group(1)) for line in lines]
    # 1 s/step: a tenth takes a minute; 30 s/step: a minute is 2 steps, a tenth 60; 0.01 s/step: 6 s in all
    assert percents == expected
    assert "600/600" in lines[-1] and "loss=0.002" in lines[-1]  # the final line shows the final state


def test_the_real_commit_bar_and_interactive_bars_unchanged(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert len(_bar_lines(env.progress_bar(), 2000)) <= 12  # the real clock: a fast bar, first and final line
    for run_type in ("Interactive", None):
        if run_type is None:
            monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
        else:
            monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", run_type)
        assert env.progress_bar() is tqdm.auto.tqdm  # behaviour unchanged outside commit runs


@pytest.mark.parametrize("run_type, most", [("Batch", 12), ("Interactive", 22), (None, 22)])
def test_the_sessions_relay_passes_a_few_lines_per_bar(monkeypatch, run_type, most):
    """env.progress_relay: a training child's bar redraws on every step (set_postfix refreshes bypass
    mininterval), 601 lines for 600 steps at 1 s. A commit run's relay passes a line per 10 % / minute, a watched
    cell's per 5 % / 10 s, each with the bar's first and final state; other lines all pass."""
    if run_type is None:
        monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    else:
        monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", run_type)
    steps = 600
    lines = [tqdm.std.tqdm.format_meter(n, steps, n * 1.0, prefix="distil", unit="step") for n in range(steps + 1)]
    lines.insert(300, "error: something the kit says")
    relay = env.progress_relay()
    shown = [out for line in lines for out in relay.lines(line)] + relay.finish()
    bars = [line for line in shown if "%|" in line]
    assert bars[0].startswith("distil:   0%") and "600/600" in bars[-1] and len(bars) <= most, len(bars)
    assert "error: something the kit says" in shown
    if run_type != "Batch":  # a watched cell: more often than a commit run's log
        assert len(bars) > 12


def test_progress_relay_thins_a_childs_bar_lines_in_commit_runs():
    """The relay of a training child's output: tqdm lines of each bar pass at the rarer of 10 % and a minute
    by the bar's own clock (read from the line); other lines pass unchanged; the final state comes at the end."""
    steps = 600
    lines = [tqdm.std.tqdm.format_meter(n, steps, n * 1.0, prefix="distil", unit="step") for n in range(steps + 1)]
    lines.insert(100, "INFO kagglekd.checkpoint: checkpoint runs/x/checkpoints/step-100")
    relay = env.ProgressRelay()
    shown = [out for line in lines for out in relay.lines(line)] + relay.finish()
    assert "INFO kagglekd.checkpoint: checkpoint runs/x/checkpoints/step-100" in shown
    bars = [line for line in shown if "%|" in line]
    assert len(bars) <= 12
    assert bars[0].startswith("distil:   0%") and "600/600" in bars[-1]  # the last line seen is the final one
    percents = [int(re.search(r"(\d+)%\|", b).group(1)) for b in bars]
    assert percents[:10] == list(range(0, 100, 10)) and set(percents[10:]) == {100}  # 99.5 % shows as 100 %
    again = [tqdm.std.tqdm.format_meter(n, 10, n * 100.0, prefix="distil") for n in range(11)]  # a new bar
    assert len([out for line in again for out in relay.lines(line)] + relay.finish()) == 11  # 100 s per tenth
