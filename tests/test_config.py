import json

import pytest
from transformers.trainer_utils import SchedulerType

from kagglekd.config import ALIASES, SCHEDULERS, DistillConfig, describe_fields, preset_names
from kagglekd.errors import ConfigError

# The flat keys of hand-rolled distillation scripts the kit promises to read as they are.
FLAT_KEYS = {
    "teacher_model": "t",
    "student_model": "s",
    "batch_size": 4,
    "gradient_accumulation_steps": 16,
    "learning_rate": 5e-5,
    "num_epochs": 3,
    "max_steps": 100,
    "warmup_steps": 10,
    "warmup_ratio": 0.1,
    "scheduler_type": "cosine",
    "max_length": 384,
    "temperature": 3.0,
    "alpha_kd": 0.7,
    "alpha_ce": 0.3,
    "alpha_feature": 0.1,
    "alpha_attention": 0.1,
    "kd_top_k": 64,
    "attention_layers": 2,
    "eval_steps": 1000,
    "save_steps": 500,
    "early_stopping_patience": 3,
    "max_grad_norm": 1.0,
    "weight_decay": 0.01,
    "use_amp": True,
    "seed": 42,
}


def test_every_preset_parses_and_round_trips(tmp_path):
    names = preset_names()
    assert {"tiny-cpu", "smollm-135m-from-huihui-moe-t4x2", "smollm2-360m-to-135m-t4x2"} <= set(names)
    for name in names:
        config = DistillConfig.load(name)
        path = tmp_path / f"{name}.json"
        config.to_json(path)
        assert DistillConfig.load(path) == config


def test_flat_script_keys_are_fields():
    fields = DistillConfig.fields()
    missing = [k for k in FLAT_KEYS if k not in fields and k not in ALIASES]
    assert missing == []


def test_aliases_rename_and_point_at_fields():
    fields = DistillConfig.fields()
    assert all(target in fields for target in ALIASES.values())
    config = DistillConfig.from_json({"num_train_epochs": 2, "lr": 1e-4, "lr_scheduler_type": "linear"})
    assert (config.num_epochs, config.learning_rate, config.scheduler_type) == (2.0, 1e-4, "linear")


def test_alias_and_field_both_set_is_an_error():
    with pytest.raises(ConfigError, match="keep one"):
        DistillConfig.from_json({"lr": 1e-4, "learning_rate": 1e-3})


def test_unknown_key_names_it_and_the_closest_valid_name():
    with pytest.raises(ConfigError) as err:
        DistillConfig.from_json({"learning_rat": 1e-3})
    assert "learning_rat" in str(err.value) and "learning_rate" in str(err.value)
    assert err.value.field == "learning_rat"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("batch_size", "four", ["batch_size", "'four'", "integer"]),
        ("batch_size", 0, ["batch_size", "0", ">= 1"]),
        ("batch_size", 2.5, ["batch_size", "2.5", "integer"]),
        ("learning_rate", -1.0, ["learning_rate", "-1.0", "> 0"]),
        ("learning_rate", float("nan"), ["learning_rate", "finite"]),
        ("temperature", 0, ["temperature", "> 0"]),
        ("scheduler_type", "cosin", ["scheduler_type", "'cosin'", "cosine"]),
        ("divergence", "kl", ["divergence", "forward_kl"]),
        ("use_amp", "yes", ["use_amp", "true/false"]),
        ("max_steps", True, ["max_steps", "integer"]),
        ("scheduler_kwargs", [1], ["scheduler_kwargs", "object"]),
        ("eval_fraction", 1.0, ["eval_fraction", "< 1.0"]),
    ],
)
def test_bad_values_name_field_value_and_allowed(key, value, expected):
    with pytest.raises(ConfigError) as err:
        DistillConfig.from_json({key: value})
    for fragment in expected:
        assert fragment in str(err.value)
    assert err.value.field == key


def test_lossless_coercions():
    config = DistillConfig.from_json({"num_epochs": 3, "batch_size": 8.0, "use_amp": "false"})
    assert config.num_epochs == 3.0 and isinstance(config.batch_size, int) and config.use_amp is False


def test_both_alphas_zero_is_rejected():
    with pytest.raises(ConfigError, match="learn nothing"):
        DistillConfig(alpha_kd=0.0, alpha_ce=0.0)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="bad.json"):
        DistillConfig.load(bad)
    with pytest.raises(ConfigError, match="missing.json"):
        DistillConfig.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="tiny-cpu"):
        DistillConfig.load("tiny-cpuu")
    arr = tmp_path / "list.json"
    arr.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        DistillConfig.load(arr)


def test_overrides_parse_json_values():
    config = DistillConfig().with_overrides(["max_steps=7", "scheduler_type=linear", "kd_top_k=null", "lr=0.01"])
    assert (config.max_steps, config.scheduler_type, config.kd_top_k, config.learning_rate) == (7, "linear", None, 0.01)
    with pytest.raises(ConfigError, match="max_step"):
        DistillConfig().with_overrides(["max_step=7"])


def test_scheduler_names_are_transformers_names():
    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}


def test_every_field_is_documented():
    for name, help_text, _default in describe_fields():
        assert len(help_text) > 10, name


def test_readme_documents_every_field_alias_and_finding():
    from pathlib import Path

    from kagglekd.diagnose import FINDINGS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in list(DistillConfig.fields()) + list(ALIASES) + list(FINDINGS):
        assert f"`{name}`" in readme, f"README.md does not mention `{name}`: run python tools/readme_tables.py"
