"""Fused lm_head+KD and the offline teacher cache through the trainer."""

import pandas as pd
import pytest
from conftest import TINY_RUN

from kagglekd.__main__ import main
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError
from kagglekd.trainer import Distiller

pytestmark = pytest.mark.usefixtures("use_kit_cache")


def tiny(tmp_path, name="run", **changes) -> DistillConfig:
    return DistillConfig.from_dict(
        {
            **TINY_RUN,
            "output_dir": str(tmp_path / name),
            "max_steps": 4,
            "eval_steps": 2,
            "weight_decay": 0.0,
            **changes,
        }
    )


@pytest.mark.parametrize("top_k", [None, 16])
def test_fused_kd_trains_like_the_unfused_path(tmp_path, top_k):
    plain = Distiller(tiny(tmp_path, "plain", kd_top_k=top_k))
    plain.train()
    fused = Distiller(tiny(tmp_path, "fused", kd_top_k=top_k, fused_kd=True, loss_chunk_size=37))
    fused.train()
    a = pd.read_csv(tmp_path / "plain" / "history.csv")
    b = pd.read_csv(tmp_path / "fused" / "history.csv")
    for column in ("loss", "kd", "ce", "grad_norm"):
        assert ((a[column] - b[column]).abs() / a[column].abs()).max() < 1e-4, column
    eval_a, eval_b = a["eval_ppl"].dropna(), b["eval_ppl"].dropna()
    assert ((eval_a - eval_b).abs() / eval_a).max() < 1e-4


def test_teacher_cache_replaces_the_live_teacher(tmp_path, capsys):
    live = tiny(tmp_path, "live", kd_top_k=16, temperature=2.0)
    live.to_json(tmp_path / "live.json")
    assert main(["cache-teacher", "--config", str(tmp_path / "live.json"), "--output", str(tmp_path / "cache")]) == 0
    assert "written" in capsys.readouterr().out
    Distiller(live).train()
    cached = Distiller(tiny(tmp_path, "cached", kd_top_k=16, temperature=2.0, teacher_cache=str(tmp_path / "cache")))
    assert cached.setup().teacher is None  # the teacher is not even loaded
    cached.train()
    a = pd.read_csv(tmp_path / "live" / "history.csv")
    b = pd.read_csv(tmp_path / "cached" / "history.csv")
    # same targets up to the cache's fp16 log-probs
    assert ((a["kd"] - b["kd"]).abs() / a["kd"]).max() < 2e-3
    assert ((a["ce"] - b["ce"]).abs() / a["ce"]).max() < 2e-3


def test_teacher_cache_that_does_not_match_the_run_is_a_config_error(tmp_path):
    build = tiny(tmp_path, "build", kd_top_k=16)
    build.to_json(tmp_path / "build.json")
    assert main(["cache-teacher", "--config", str(tmp_path / "build.json"), "--output", str(tmp_path / "cache")]) == 0
    with pytest.raises(ConfigError) as err:
        Distiller(tiny(tmp_path, "other", kd_top_k=16, max_length=16, teacher_cache=str(tmp_path / "cache"))).setup()
    assert err.value.field == "teacher_cache" and "max_length" in str(err.value)
    with pytest.raises(ConfigError) as err:
        tiny(tmp_path, kd_top_k=16, teacher_cache=str(tmp_path / "cache"), sar=True)
    assert err.value.field == "sar"
