"""SAR's load balance on the teacher's own routing, SAR through router_patterns on a family the kit does not
know, and the teacher every evaluation after training uses (adapted routers, stated routing; KA's routing)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN

from kagglekd import data, evaluation, losses, moe
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller

pytestmark = pytest.mark.usefixtures("use_kit_cache")

NO_REGULARISERS = dict(sar_anchor_weight=0.0, sar_balance_weight=0.0, sar_entropy_weight=0.0, sar_teacher_ce_weight=0.0)


def tiny(tmp_path, **changes) -> DistillConfig:
    return DistillConfig.from_dict(
        {
            **TINY_RUN,
            "output_dir": str(tmp_path / "run"),
            "batch_size": 2,
            "max_steps": 3,
            "eval_max_blocks": 4,
            **changes,
        }  # fmt: skip
    )


def _gates(model):
    """The routers, found independently of moe.find_routers: the ``gate`` module of every sparse block."""
    return [m for name, m in model.named_modules() if name.endswith("mlp.gate")]


def _reference_balance(model, input_ids, own_k: int) -> torch.Tensor:
    """Switch-Transformer load balance E * sum_e f_e P_e, mean over layers, in float64 with plain autograd:
    f_e = share of the (token, slot) picks of each token's top-``own_k`` experts, P_e = mean router probability."""
    logits = []
    handles = [g.register_forward_hook(lambda m, a, out: logits.append(out[0] if isinstance(out, tuple) else out))
               for g in _gates(model)]  # fmt: skip
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    values = []
    for layer_logits in logits:
        probs = F.softmax(layer_logits.double(), dim=-1)
        experts = probs.shape[-1]
        picks = probs.topk(own_k, dim=-1).indices.reshape(-1)
        fraction = torch.bincount(picks, minlength=experts).double() / picks.numel()
        values.append(experts * (fraction * probs.mean(0)).sum())
    return torch.stack(values).mean()


def test_balance_term_is_measured_at_the_teachers_own_top_k_and_its_gradient_equals_autograd(tmp_path):
    distiller = Distiller(tiny(tmp_path, sar=True, **{**NO_REGULARISERS, "sar_balance_weight": 1.0})).setup()
    side, teacher = distiller.teacher_side, distiller.teacher
    info = moe.moe_info(teacher)
    assert side.own_top_k == 2 and info.experts_per_token == info.experts_per_layer == 4  # SAR runs all experts
    batch = distiller.blocks.train[:2]
    input_ids, labels = data.next_token_batch(batch)
    tokens = losses.valid_count(labels)
    out = side.outputs(batch, tokens)
    gates = _gates(teacher)
    grads = torch.autograd.grad(out.router, [g.weight for g in gates])

    reference_model = copy.deepcopy(teacher).double()
    reference_model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    reference_gates = _gates(reference_model)
    expected = torch.autograd.grad(_reference_balance(reference_model, input_ids, own_k=2),
                                   [g.weight for g in reference_gates])  # fmt: skip
    assert float(out.router) == pytest.approx(float(_reference_balance(reference_model, input_ids, 2)), rel=1e-5)
    for got, want in zip(grads, expected):
        assert want.norm() > 1e-4  # a real gradient (at all-experts routing it is ~1e-8: f is uniform)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_sar_through_router_patterns_on_a_family_the_kit_does_not_know(tmp_path, monkeypatch):
    """Without the family in the table, router_patterns find the routers; the teacher keeps its own top-k
    (the kit cannot change an unknown block's forward) and the KD loss alone trains the routers."""
    monkeypatch.delitem(moe.MOE_FAMILIES, "qwen3_moe")
    config = tiny(tmp_path, sar=True, router_patterns=[r"mlp\.gate$"], router_lr=1e-2, **NO_REGULARISERS)
    distiller = Distiller(config).setup()
    teacher = distiller.teacher
    assert moe.moe_info(teacher).family is None  # unknown without the patterns
    gates = _gates(teacher)
    assert all(g.top_k == 2 for g in gates)  # its own experts per token, not all four
    router_params = {id(g.weight) for g in gates}
    assert {id(p) for p in teacher.parameters() if p.requires_grad} == router_params
    distiller._train_step(next(distiller._windows(0)), apply=False)
    assert all(g.weight.grad is not None and g.weight.grad.norm() > 0 for g in gates)
    assert distiller.teacher_side.describe()["teacher_routing"] == "top-2 of 4 experts per token"


def test_sar_balance_without_a_known_top_k_is_a_config_error(tmp_path, monkeypatch):
    from kagglekd.errors import ConfigError

    monkeypatch.delitem(moe.MOE_FAMILIES, "qwen3_moe")
    distiller = Distiller(tiny(tmp_path, sar=True, router_patterns=[r"mlp\.gate$"]))
    monkeypatch.setattr(moe, "moe_info", lambda model, patterns=None: moe.MoEInfo("custom", [0, 1], 4, 0))
    with pytest.raises(ConfigError, match="sar_balance_weight"):
        distiller.setup()


def test_evaluation_after_a_sar_run_uses_the_adapted_routers_and_says_so(tmp_path):
    config = tiny(tmp_path, sar=True, router_lr=0.5, max_steps=4)
    trained = Distiller(config)
    trained.train()
    original = Distiller(config.replace(sar=False, all_experts=True), write_run_dir=False).setup()
    original_ppl = original.teacher_perplexity()

    loaded = evaluation.load_finished_run(config.output_dir)
    described = loaded.teacher_side.describe()
    routers = described["teacher_routers"]
    assert routers.startswith("adapted by SAR") and "teacher_routers" in routers
    assert described["teacher_routing"] == "all 4 experts per token"  # the routing SAR trained them under
    saved = moe.router_state_dict(trained.teacher)
    now = moe.router_state_dict(loaded.teacher)
    assert all(torch.equal(saved[k], now[k].to(saved[k].dtype)) for k in saved)
    adapted_ppl = loaded.teacher_perplexity()
    assert adapted_ppl == pytest.approx(trained.teacher_perplexity(), rel=1e-5)
    assert abs(adapted_ppl - original_ppl) > 1e-3 * original_ppl


def test_ka_evaluation_routing_is_the_teachers_deterministic_top_k(tmp_path):
    """KA samples routings for the training targets only; evaluation reads the teacher's own top-k routing."""
    distiller = Distiller(tiny(tmp_path, ka_samples=2)).setup()
    described = distiller.teacher_side.describe()
    assert described["teacher_routing"].startswith("top-2 of 4 experts per token (deterministic")
    input_ids, _ = data.next_token_batch(distiller.blocks.eval[:2])
    with torch.no_grad():
        plain = distiller.teacher(input_ids=input_ids).logits
    first, second = distiller.teacher_side.logits(input_ids), distiller.teacher_side.logits(input_ids)
    assert torch.equal(first, second) and torch.allclose(first, plain[..., : first.shape[-1]])


def test_evaluate_run_and_the_model_card_report_the_adapted_teacher(tmp_path):
    from kagglekd import report
    from kagglekd.demo import evaluate_run

    config = tiny(tmp_path, sar=True, router_lr=0.5, max_steps=4)
    Distiller(config).train()
    original = Distiller(config.replace(sar=False, all_experts=True), write_run_dir=False).setup()
    rows = evaluate_run(tmp_path / "run")
    teacher = next(row for row in rows if row["model"] == "teacher")
    assert teacher["teacher_routers"].startswith("adapted by SAR")
    assert abs(teacher["eval_ppl"] - original.teacher_perplexity()) > 1e-3 * teacher["eval_ppl"]
    evaluation = report.load_evaluation(tmp_path / "run")
    card = report.write_model_card(evaluation, report.perplexity_rows(evaluation)).read_text()
    assert "Teacher routers: adapted by SAR" in card
