"""Strategy split (teacher on its own GPU) on CPU, with a stand-in for the second device."""

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN

from kagglekd import trainer as trainer_module
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError
from kagglekd.trainer import Distiller

pytestmark = pytest.mark.usefixtures("use_kit_cache")


def tiny(tmp_path, name, **changes) -> DistillConfig:
    return DistillConfig.from_dict(
        {**TINY_RUN, "output_dir": str(tmp_path / name), "gradient_accumulation_steps": 3, "batch_size": 2, **changes}
    )


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """split_devices answers with a recorded stand-in (the CPU) instead of cuda:1."""
    asked = []

    def stand_in(student_device):
        asked.append(student_device)
        return torch.device("cpu")

    monkeypatch.setattr(trainer_module, "split_devices", stand_in)
    return asked


def test_split_prefetches_the_next_teacher_forward_before_the_student_backward(tmp_path, stand_in_gpu):
    run = Distiller(tiny(tmp_path, "split", strategy="split", max_steps=1, warmup_steps=0)).setup()
    assert run.strategy == "split" and stand_in_gpu == [run.device]
    assert all(p.device == run.teacher_device for p in run.teacher.parameters())
    events = []
    run.teacher.register_forward_hook(lambda *_: events.append("teacher"))
    backward = run.accelerator.backward
    run.accelerator.backward = lambda loss, **kw: (events.append("student backward"), backward(loss, **kw))
    run.train()
    # micro-batch i+1's teacher forward is queued before micro-batch i's backward: on two GPUs they overlap
    window = ["teacher", "teacher", "student backward", "teacher", "student backward", "student backward"]
    assert events[:6] == window and set(events[6:]) == {"teacher"}  # then the final eval's teacher forwards


@pytest.mark.parametrize("changes", [{}, {"alpha_feature": 0.1, "kd_top_k": 8}, {"sar": True}])
def test_split_trains_exactly_like_one_device(tmp_path, stand_in_gpu, changes):
    Distiller(tiny(tmp_path, "single", strategy="single", **changes)).train()
    Distiller(tiny(tmp_path, "split", strategy="split", **changes)).train()
    a = pd.read_csv(tmp_path / "single" / "history.csv")
    b = pd.read_csv(tmp_path / "split" / "history.csv")
    for column in ("loss", "kd", "ce", "grad_norm", "eval_ppl"):
        x, y = a[column].dropna(), b[column].dropna()
        assert len(x) == len(y) > 0 and ((x - y).abs() <= 1e-6 * x.abs() + 1e-9).all(), column


def test_strategies_that_cannot_run_are_config_errors(tmp_path):
    cases = [
        ({"strategy": "ddp"}, "accelerate launch"),  # one process
        ({"strategy": "split"}, "GPU(s) are visible"),  # no second GPU here
        ({"strategy": "split", "alpha_kd": 0.0, "alpha_ce": 1.0}, "loads no teacher"),
    ]
    for changes, words in cases:
        with pytest.raises(ConfigError) as err:
            Distiller(tiny(tmp_path, "bad", **changes)).setup()
        assert err.value.field == "strategy" and words in str(err.value)
    assert Distiller(tiny(tmp_path, "auto")).setup().strategy == "single"  # auto on a CPU machine
