"""MoE teacher options, SAR, KA, feature/attention transfer and loss balancing through the trainer."""

import json

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN
from safetensors.torch import load_file

from kagglekd import data, moe
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError
from kagglekd.trainer import Distiller

pytestmark = pytest.mark.usefixtures("use_kit_cache")


def tiny(tmp_path, **changes) -> DistillConfig:
    return DistillConfig.from_dict(
        {
            **TINY_RUN,
            "output_dir": str(tmp_path / "run"),
            "batch_size": 2,
            "max_steps": 3,
            "eval_max_blocks": 4,
            **changes,
        }
    )


def _router_names(teacher):
    return {f"{name}.{p}" for name, module in moe.find_routers(teacher) for p, _ in module.named_parameters()}


def test_sar_changes_only_router_weights_and_keeps_them_out_of_student(tmp_path):
    distiller = Distiller(tiny(tmp_path, sar=True, router_lr=1e-2, max_steps=2)).setup()
    teacher = distiller.teacher
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    routers = _router_names(teacher)
    assert routers and all(p.requires_grad == (n in routers) for n, p in teacher.named_parameters())
    distiller.train()
    changed = {name for name, p in teacher.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed == routers  # experts, attention, embeddings, norms: bitwise unchanged
    rows = pd.read_csv(distiller.output_dir / "history.csv")
    assert rows["router"].notna().all() and rows["w_router"].notna().all() and rows["share_router"].isna().all()
    saved = load_file(str(distiller.output_dir / "teacher_routers" / "routers.safetensors"))
    assert set(saved) == {name for name in routers if name.endswith("weight")}
    student = load_file(str(distiller.output_dir / "student" / "model.safetensors"))
    assert not any(
        "expert" in k or "gate" in k and "gate_proj" not in k or "router" in k or "projection" in k for k in student
    )
    assert set(student) <= set(distiller.accelerator.unwrap_model(distiller.student).state_dict())


def test_all_experts_and_top_k_schedule_change_expert_activations(tmp_path):
    distiller = Distiller(tiny(tmp_path, expert_top_k_start=1, expert_top_k_end=4, max_steps=4)).setup()
    ids, _ = data.next_token_batch(distiller.blocks.train[:2])
    counts = []
    for step in range(4):
        k = distiller.teacher_side.expert_schedule(step, distiller.plan.optimizer_steps)
        with moe.count_expert_activations(distiller.teacher) as seen, torch.no_grad():
            distiller.teacher(input_ids=ids)
        counts.append((k, int(seen.total)))
    layers = len(moe.moe_info(distiller.teacher).moe_layers)
    assert [k for k, _ in counts] == [1, 2, 3, 4]
    assert [total for _, total in counts] == [ids.numel() * layers * k for k in (1, 2, 3, 4)]
    distiller.train()
    assert list(pd.read_csv(distiller.output_dir / "history.csv")["teacher_top_k"]) == [1, 2, 3, 4]
    every = Distiller(tiny(tmp_path / "all", all_experts=True)).setup()
    assert moe.moe_info(every.teacher).experts_per_token == moe.moe_info(every.teacher).experts_per_layer


def test_feature_attention_and_ka_components_are_logged(tmp_path):
    config = tiny(
        tmp_path,
        alpha_kd=0.4,
        alpha_ce=0.3,
        alpha_feature=0.2,
        alpha_attention=0.1,
        feature_layers=2,
        attention_layers=1,
        ka_samples=2,
    )
    distiller = Distiller(config)
    distiller.train()
    rows = pd.read_csv(distiller.output_dir / "history.csv")
    for name in ("kd", "ce", "feature", "attention"):
        assert rows[name].notna().all() and (rows[name] > 0).all(), name
    total_share = rows[["share_kd", "share_ce", "share_feature", "share_attention"]].sum(axis=1)
    assert (total_share - 1).abs().max() < 1e-6
    assert len(distiller.projections) == 2


def test_normalized_balance_realises_the_alphas(tmp_path):
    alphas = {"kd": 0.5, "ce": 0.3, "feature": 0.2}
    config = tiny(
        tmp_path,
        alpha_kd=alphas["kd"],
        alpha_ce=alphas["ce"],
        alpha_feature=alphas["feature"],
        feature_layers=1,
        loss_balance="normalized",
        max_steps=50,
        learning_rate=1e-3,
    )
    distiller = Distiller(config)
    distiller.train()
    # the realised share over steps 40-49 (one step's share moves with that batch's noise)
    last = pd.read_csv(distiller.output_dir / "history.csv").iloc[-10:].mean()
    for name, alpha in alphas.items():
        assert abs(last[f"share_{name}"] - alpha) <= 0.1 * alpha, (name, last[f"share_{name}"])
    fixed = Distiller(config.replace(loss_balance="fixed", output_dir=str(tmp_path / "fixed"), max_steps=2))
    fixed.train()
    first = pd.read_csv(fixed.output_dir / "history.csv").iloc[-1]
    assert abs(first["share_ce"] - alphas["ce"]) > 0.1 * alphas["ce"]  # without balancing the raw scales decide


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"teacher_model": "tiny-random-dense", "sar": True}, "sar"),
        ({"teacher_model": "tiny-random-dense", "all_experts": True}, "all_experts"),
        ({"teacher_model": "tiny-random-dense", "ka_samples": 2}, "ka_samples"),
        ({"alpha_attention": 0.1, "attention_layers": 9}, "attention_layers"),
        ({"alpha_feature": 0.1, "feature_layers": 9}, "feature_layers"),
        ({"expert_top_k_start": 1, "expert_top_k_end": 8}, "expert_top_k_end"),
    ],
)
def test_model_mismatch_is_a_config_error_at_setup(tmp_path, changes, field):
    with pytest.raises(ConfigError) as err:
        Distiller(tiny(tmp_path, **changes)).setup()
    assert err.value.field == field


def test_sar_resume_restores_routers_and_projections(tmp_path):
    config = tiny(tmp_path, sar=True, alpha_feature=0.1, feature_layers=1, max_steps=4, save_steps=2)
    full = Distiller(config.replace(output_dir=str(tmp_path / "full")))
    full.train()
    cut = Distiller(config.replace(output_dir=str(tmp_path / "cut")))
    cut.train(max_steps=3)
    resumed = Distiller(config.replace(output_dir=str(tmp_path / "cut"), resume="auto"))
    resumed.train()
    a = pd.read_csv(tmp_path / "full" / "history.csv")
    b = pd.read_csv(tmp_path / "cut" / "history.csv")
    for column in ("loss", "kd", "feature", "router"):
        assert (a[column] - b[column]).abs().max() < 1e-6, column
    assert json.loads((tmp_path / "cut" / "teacher_routers" / "source.json").read_text())["routers"]


def test_expert_top_k_beyond_the_experts_is_a_config_error_with_router_patterns(tmp_path):
    """With router_patterns the rules cannot count experts from the config; setup counts them on the modules."""
    config = tiny(tmp_path, router_patterns=[r"mlp\.gate$"], expert_top_k_start=9, expert_top_k_end=9)
    with pytest.raises(ConfigError) as err:
        Distiller(config).setup()
    assert err.value.field == "expert_top_k_start" and "4 experts" in str(err.value)
