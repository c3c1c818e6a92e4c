"""kagglekd.rules: each rule once, its finding (field, fix, patch), and the former disagreements between
DistillConfig, the trainer and diagnose now agreeing (diagnose asks the same rules)."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import GPT2Config

from kagglekd import rules
from kagglekd.config import DistillConfig, describe_fields
from kagglekd.diagnose import FINDINGS, Report, diagnose, fix_config
from kagglekd.errors import ConfigError
from kagglekd.models import tiny_dense_config, tiny_moe_config
from kagglekd.rules import REMOVE, Facts, Finding

MOE, DENSE = tiny_moe_config(4096), tiny_dense_config(4096)  # 4 layers, 4 experts / 3 layers (configs only)
MODELS = Facts(teacher=MOE, student=DENSE, vocab_relation="identical")
TINY = {"teacher_model": "tiny-random-moe", "student_model": "tiny-random-dense", "dataset_subset_size": 200}


def config(**values) -> DistillConfig:
    return DistillConfig.without_combination_checks(**values)


def errors(cfg: DistillConfig, facts: Facts | None = None) -> list[Finding]:
    return [f for f in rules.check(cfg, facts) if f.severity == "error"]


def only(cfg: DistillConfig, facts: Facts | None = None) -> Finding:
    found = errors(cfg, facts)
    assert len(found) == 1, found
    return found[0]


# ---- config-only rules ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, id, field, patch",
    [
        ({"alpha_kd": 0.0, "alpha_ce": 0.0}, "config-conflict", "alpha_kd", {"alpha_kd": REMOVE, "alpha_ce": REMOVE}),
        ({"expert_top_k_start": 2}, "config-conflict", "expert_top_k_end", {"expert_top_k_end": 2}),
        ({"expert_top_k_end": 3}, "config-conflict", "expert_top_k_start", {"expert_top_k_start": 3}),
        ({"sar": True, "alpha_kd": 0.0, "alpha_ce": 1.0}, "config-conflict", "sar", {"sar": False}),
        ({"teacher_cache": "c"}, "config-conflict", "kd_top_k", None),
        ({"teacher_cache": "c", "kd_top_k": 8, "sar": True}, "incompatible", "sar", {"sar": False}),
        ({"teacher_cache": "c", "kd_top_k": 8, "ka_samples": 2}, "incompatible", "ka_samples", {"ka_samples": 0}),
        (
            {"teacher_cache": "c", "kd_top_k": 8, "cross_tokenizer": True},
            "config-conflict",
            "teacher_cache",
            {"teacher_cache": REMOVE},
        ),
        ({"resume": ""}, "config-conflict", "resume", {"resume": "auto"}),
        (
            {"cross_tokenizer": True, "alpha_attention": 0.1},
            "loss-prerequisite",
            "alpha_attention",
            {"alpha_attention": 0.0, "attention_layers": REMOVE},
        ),
        (
            {"cross_tokenizer": True, "fused_kd": True, "cross_tokenizer_loss": "uld"},
            "config-conflict",
            "cross_tokenizer_loss",
            {"cross_tokenizer_loss": "hybrid"},
        ),
        ({"alpha_kd": 0.0, "alpha_feature": 0.2}, "loss-prerequisite", "alpha_feature", {"alpha_feature": 0.0}),
        ({"strategy": "split", "alpha_kd": 0.0, "alpha_ce": 1.0}, "strategy", "strategy", {"strategy": "single"}),
        ({"alpha_kd": 0.0, "alpha_ce": 1.0, "all_experts": True}, "moe-option", "all_experts", {"all_experts": False}),
        ({"alpha_kd": 0.0, "alpha_ce": 1.0, "ka_samples": 2}, "moe-option", "ka_samples", {"ka_samples": 0}),
    ],
)
def test_config_only_rule(values, id, field, patch):
    finding = only(config(**values))
    assert (finding.id, finding.field, finding.patch) == (id, field, patch)
    assert finding.id in FINDINGS and finding.fix
    with pytest.raises(ConfigError) as err:  # DistillConfig raises the same rule
        DistillConfig(**values)
    assert err.value.field == field and finding.message in str(err.value) and finding.fix in str(err.value)
    if patch:  # the patch mends it
        fixed = {**values, **{k: v for k, v in patch.items() if v is not REMOVE}}
        for key in [k for k, v in patch.items() if v is REMOVE]:
            fixed.pop(key, None)
        assert not [f for f in errors(config(**fixed)) if f.field == field]


def test_valid_configs_have_no_findings():
    assert rules.check(DistillConfig()) == []
    assert rules.check(DistillConfig(), MODELS) == []
    for name, _help, _default in describe_fields():
        assert name in DistillConfig.fields()


def test_transfer_without_kd_names_the_field_in_its_message():
    """Mend: the trainer's message printed a literal '{name}' (a missing f-string)."""
    finding = only(config(alpha_kd=0.0, alpha_attention=0.1))
    assert "{name}" not in finding.message + finding.fix
    assert "alpha_attention to 0" in finding.fix and finding.field == "alpha_attention"


def test_teacher_cache_with_every_live_option_is_one_finding_each():
    cfg = config(teacher_cache="c", kd_top_k=8, sar=True, alpha_feature=0.1, expert_top_k_start=1, expert_top_k_end=2)
    found = errors(cfg)
    assert [(f.id, f.field) for f in found] == [
        ("incompatible", "sar"),
        ("incompatible", "alpha_feature"),
        ("incompatible", "expert_top_k_start"),
    ]
    assert found[-1].patch == {"expert_top_k_start": REMOVE, "expert_top_k_end": REMOVE}


# ---- rules on the launch ----------------------------------------------------------------------------------
def test_launch_rules_need_their_facts():
    ddp, single, split = config(strategy="ddp"), config(strategy="single"), config(strategy="split")
    assert not errors(ddp) and not errors(single) and not errors(split)  # processes and GPUs unknown: skipped
    finding = only(ddp, Facts(processes=1))
    assert finding.field == "strategy" and "accelerate launch" in finding.fix and finding.patch == {"strategy": "auto"}
    assert only(single, Facts(processes=2)).patch == {"strategy": "ddp"}
    assert "2 were launched" in only(split, Facts(processes=2)).message
    assert not errors(ddp, Facts(processes=2)) and not errors(config(strategy="auto"), Facts(processes=2, gpus=0))
    finding = only(split, Facts(processes=1, gpus=1))
    assert "1 GPU(s) are visible" in finding.message and finding.patch == {"strategy": "single"}
    assert not errors(split, Facts(processes=1, gpus=2))


# ---- rules on the models ----------------------------------------------------------------------------------
def test_different_vocabularies_need_cross_tokenizer():
    finding = only(DistillConfig(), Facts(vocab_relation="different"))
    assert (finding.id, finding.field, finding.patch) == ("tokenizer", "cross_tokenizer", {"cross_tokenizer": True})
    assert "trains the student on noise" in finding.message
    assert not errors(DistillConfig(cross_tokenizer=True), Facts(vocab_relation="different"))
    assert not errors(DistillConfig(alpha_kd=0.0, alpha_ce=1.0), Facts(vocab_relation="different"))  # no teacher


@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("jsd", 1.0)])
def test_reverse_kl_against_a_narrower_padded_teacher_is_infinite(divergence, beta):
    cfg = DistillConfig(divergence=divergence, jsd_beta=beta)
    narrower = Facts(vocab_relation="padded", teacher_vocab=4096, student_vocab=4100)
    finding = only(cfg, narrower)
    assert finding.id == "divergence" and finding.patch == {"divergence": "forward_kl"} and "forward_kl" in finding.fix
    assert "infinite" in finding.message
    wider = Facts(vocab_relation="padded", teacher_vocab=4100, student_vocab=4096)
    assert not errors(cfg, wider)
    across = dataclasses.replace(narrower, vocab_relation="different")  # mapped through the cross-tokenizer path
    assert not errors(cfg.replace(cross_tokenizer=True), across)
    for fine in (DistillConfig(divergence="jsd", jsd_beta=0.5), DistillConfig(), DistillConfig(alpha_kd=0.0)):
        assert not errors(fine, narrower)


def test_data_size_counts_the_global_batch():
    cfg = DistillConfig(batch_size=4)
    assert not errors(cfg, Facts(train_blocks=1))  # one process takes a ragged last batch
    finding = only(cfg, Facts(train_blocks=0))
    assert finding.id == "data-size" and finding.field == "batch_size"
    assert only(cfg, Facts(train_blocks=7, processes=2)).patch == {"batch_size": 3}  # 7 // (4 x 2) = 0 batches
    assert not errors(cfg, Facts(train_blocks=8, processes=2))


@pytest.mark.parametrize(
    "values, field",
    [({"sar": True}, "sar"), ({"all_experts": True}, "all_experts"), ({"ka_samples": 2}, "ka_samples")],
)
def test_moe_options_on_a_dense_teacher(values, field):
    dense_teacher = Facts(teacher=DENSE, student=DENSE)
    finding = only(DistillConfig(**values), dense_teacher)
    assert (finding.id, finding.field) == ("moe-option", field) and "'llama'" in finding.message
    assert not errors(DistillConfig(**values), MODELS)
    assert not errors(DistillConfig(**values, router_patterns=[r"mlp\.gate$"]), dense_teacher)  # found at load


def test_expert_top_k_beyond_the_teachers_experts():
    finding = only(DistillConfig(expert_top_k_start=1, expert_top_k_end=8), MODELS)
    assert (
        finding.field == "expert_top_k_end"
        and "4 experts" in finding.message
        and finding.patch == {"expert_top_k_end": 4}
    )
    assert not errors(DistillConfig(expert_top_k_start=4, expert_top_k_end=1), MODELS)


def test_layer_counts_and_attention_families():
    found = errors(DistillConfig(alpha_feature=0.1, feature_layers=9, alpha_attention=0.1, attention_layers=9), MODELS)
    assert [(f.id, f.field, f.patch) for f in found] == [
        ("layer-count", "feature_layers", {"feature_layers": 3}),
        ("layer-count", "attention_layers", {"attention_layers": 3}),
    ]
    assert not errors(DistillConfig(alpha_feature=0.1, alpha_attention=0.1, attention_layers=3), MODELS)
    gpt2 = Facts(teacher=MOE, student=GPT2Config(n_layer=2))
    finding = only(DistillConfig(alpha_attention=0.1), gpt2)
    assert (finding.id, finding.field) == ("attention-family", "alpha_attention") and "gpt2" in finding.message


def test_raise_errors_raises_the_first_error_with_its_fix_and_field():
    rules.raise_errors([Finding("memory", "warning", "batch_size", "tight")])  # warnings never raise
    first = Finding("tokenizer", "error", "cross_tokenizer", "differ.", "Set cross_tokenizer.")
    with pytest.raises(ConfigError) as err:
        rules.raise_errors([first, Finding("strategy", "error", "strategy", "other")])
    assert str(err.value) == "differ. Set cross_tokenizer." and err.value.field == "cross_tokenizer"


# ---- the former disagreements, now one answer -------------------------------------------------------------
def test_feature_transfer_across_tokenizers_is_supported_everywhere():
    cfg = DistillConfig(cross_tokenizer=True, alpha_feature=0.1)  # DistillConfig accepts it
    assert not errors(cfg, Facts(teacher=MOE, student=DENSE, vocab_relation="different"))
    report = diagnose(
        {**TINY, "teacher_model": "tiny-moe-8k", "cross_tokenizer": True, "alpha_feature": 0.1}, gpu="cpu"
    )
    assert report.exit_code == 0 and fix_config(report)["alpha_feature"] == 0.1


def test_attention_without_layers_defaults_to_one_layer_everywhere():
    assert not errors(DistillConfig(alpha_attention=0.1), MODELS)
    assert diagnose({**TINY, "alpha_attention": 0.1}, gpu="cpu").exit_code == 0


def test_sar_on_a_dense_teacher_is_a_diagnose_error():
    report = diagnose({**TINY, "teacher_model": "tiny-random-dense", "sar": True}, gpu="cpu")
    assert [(f.id, f.field) for f in report.errors] == [("moe-option", "sar")]
    assert "sar" not in fix_config(report) or fix_config(report)["sar"] is False


def test_teacher_cache_and_sar_is_one_finding():
    report = diagnose({**TINY, "teacher_cache": "/tmp/cache", "kd_top_k": 8, "sar": True}, gpu="cpu")
    assert [(f.id, f.field) for f in report.errors] == [("incompatible", "sar")]


def test_no_stale_texts():
    """Mends: 'later issue' in the pending-key finding, 'need support' in the transfer help texts."""
    pending = [f for f in diagnose({**TINY, "bf16": True}, gpu="cpu").findings if f.id == "pending-key"][0]
    for text in (FINDINGS["pending-key"], pending.message, pending.fix):
        assert "later issue" not in text and "yet" not in text
    helps = {name: text for name, text, _ in describe_fields()}
    for name in ("alpha_feature", "alpha_attention"):
        assert "support" not in helps[name] and "alpha_kd > 0" in helps[name]
    assert "last layer" in helps["attention_layers"]


def test_fix_applies_patches_not_prose():
    cfg = DistillConfig.without_combination_checks(scheduler_type="linear")
    garbled = Finding("scheduler", "error", "scheduler_type", "x", "no quotes here", {"scheduler_type": "cosine"})
    removing = Finding("unknown-key", "warning", "learnin_rate", "x", "y", {"learnin_rate": REMOVE})
    report = Report("cpu", [garbled, removing], {}, {}, {}, cfg, {"scheduler_type": "cosin"}, {}, facts=Facts())
    fixed = fix_config(report)
    assert fixed["scheduler_type"] == "cosine" and "learnin_rate" not in fixed
    assert fixed["_fixes"] == ["scheduler_type: 'cosin' -> 'cosine': x", "removed 'learnin_rate': x"]
