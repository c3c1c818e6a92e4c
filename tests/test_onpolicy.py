"""On-policy (lmbda) and sequence-level (seq_kd) distillation on tiny random models (CPU)."""

import math

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN
from test_alignment_training import metaspace_teacher  # noqa: F401  (fixture)

from kagglekd import onpolicy
from kagglekd import trainer as trainer_module
from kagglekd.checkpoint import latest_checkpoint
from kagglekd.config import DistillConfig, KDOptions
from kagglekd.errors import ConfigError
from kagglekd.losses import IGNORE_INDEX
from kagglekd.trainer import Distiller

pytestmark = pytest.mark.usefixtures("use_kit_cache")


def tiny(tmp_path, name="run", **changes) -> DistillConfig:
    return DistillConfig.from_dict(
        {**TINY_RUN, "output_dir": str(tmp_path / name), "max_steps": 3, "alpha_ce": 0.0, **changes}
    )


def history(distiller) -> pd.DataFrame:
    return pd.read_csv(distiller.output_dir / "history.csv")


def reference_labels(sequences: torch.Tensor, prompt: int, eos_id: int) -> torch.Tensor:
    """Written out position by position: targets are the generated tokens up to and including the first EOS."""
    labels = torch.full((sequences.shape[0], sequences.shape[1] - 1), IGNORE_INDEX, dtype=torch.long)
    for row in range(sequences.shape[0]):
        for position in range(prompt, sequences.shape[1]):
            labels[row, position - 1] = sequences[row, position]
            if sequences[row, position] == eos_id:
                break
    return labels


def test_continuation_labels_mask_the_prompt_and_everything_after_eos():
    eos = 7
    sequences = torch.tensor([[1, 2, 3, 4, 7, 7, 7], [1, 2, 3, 5, 6, 8, 9], [1, 2, 3, 7, 5, 7, 6]])
    labels = onpolicy.continuation_labels(sequences, prompt=3, eos_id=eos)
    assert torch.equal(labels, reference_labels(sequences, 3, eos))
    assert labels[0].tolist() == [-100, -100, 4, 7, -100, -100]


class _NoOnPolicy:
    """The trainer as it was before on-policy distillation: no generation, no extra columns."""

    def __init__(self, *args, **kwargs):
        self.history_columns = []

    def prepare(self, window, student, autocast):
        return window

    def columns(self, elapsed):
        return {}


def test_lmbda_zero_reproduces_the_off_policy_history(tmp_path, monkeypatch):
    settings = dict(max_steps=4, gradient_accumulation_steps=2, eval_steps=2, alpha_ce=0.5)
    on = Distiller(tiny(tmp_path, "lmbda0", lmbda=0.0, prompt_length=5, generation_temperature=0.7, **settings))
    on.train()
    monkeypatch.setattr(trainer_module, "OnPolicy", _NoOnPolicy)
    off = Distiller(tiny(tmp_path, "off", **settings))
    off.train()
    a, b = history(on), history(off)
    assert list(a.columns) == list(b.columns)  # no generation columns either
    for column in ("loss", "kd", "ce", "grad_norm", "tokens", "eval_ppl", "eval_kd"):
        assert ((a[column] - b[column]).abs().fillna(0) <= 1e-6).all(), column


class Recorder:
    """Records what ``generate`` returned and what the teacher's forward read outside ``generate``."""

    def __init__(self):
        self.generated, self.teacher_inputs, self.generating = [], [], False

    def wrap_generate(self, model):
        original = model.generate

        def generate(*args, **kwargs):
            self.generating = True
            try:
                out = original(*args, **kwargs)
            finally:
                self.generating = False
            self.generated.append(out.detach().clone())
            return out

        model.generate = generate

    def hook_teacher(self, teacher):
        def record(module, args, kwargs):
            if not self.generating:
                self.teacher_inputs.append(kwargs["input_ids"].detach().clone())

        teacher.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_every_kd_target_is_a_generated_token(tmp_path, source):
    """lmbda 1: the student writes every continuation; seq_kd (lmbda 0): the teacher does. Recorders on
    ``generate``, on the teacher's inputs and on the labels the KD loss reads."""
    changes = {"lmbda": 1.0} if source == "student" else {"seq_kd": True}
    distiller = Distiller(tiny(tmp_path, max_steps=2, gradient_accumulation_steps=2, prompt_length=9, **changes))
    distiller.setup()
    generator = distiller.accelerator.unwrap_model(distiller.student) if source == "student" else distiller.teacher
    recorder, kd_labels = Recorder(), []
    recorder.wrap_generate(generator)
    recorder.hook_teacher(distiller.teacher)
    kd = distiller.objective.kd
    distiller.objective.kd = lambda logits, teacher, labels, n: (
        kd_labels.append(labels.clone()) or kd(logits, teacher, labels, n)
    )
    distiller.train()
    micro_batches = 2 * 2  # the training steps' records come first; the final eval's follow
    assert len(recorder.generated) == micro_batches and len(recorder.teacher_inputs) >= micro_batches
    eos = distiller.tokenizer.eos_token_id
    for sequences, inputs, labels in zip(recorder.generated, recorder.teacher_inputs, kd_labels):
        assert torch.equal(inputs, sequences[:, :-1])  # the teacher read exactly the generated sequences
        assert torch.equal(labels.cpu(), reference_labels(sequences, 9, eos))
        valid = labels != IGNORE_INDEX
        assert valid.any() and not valid[:, : 9 - 1].any()  # no target inside the prompt
    rows = history(distiller)
    assert (rows["generation_share"] > 0).all() and (rows["generation_share"] < 1).all()
    expected = sum((lab != IGNORE_INDEX).sum().item() for lab in kd_labels[:2]) / (2 * TINY_RUN["batch_size"])
    assert rows["generated_length"][0] == pytest.approx(expected)


def test_kd_on_generated_sequences_equals_trl_generalized_jsd(tmp_path):
    """On one fixed set of student-generated sequences the kit's KD component (kd_scale_t2 off) equals TRL's
    ``generalized_jsd_loss`` at beta 0 and 1, and beta (1 - beta) x the kit's at beta 0.5 (the kit rescales the
    generalized JSD by 1 / (beta (1 - beta)) so it is continuous in beta; see ``losses.kd_per_position``)."""
    pytest.importorskip("trl", reason="trl (bench/requirements.txt) is the reference implementation")
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    distiller = Distiller(tiny(tmp_path, lmbda=1.0, divergence="jsd", kd_scale_t2=False, prompt_length=6)).setup()
    window = distiller.onpolicy.prepare(next(distiller._windows(0)), distiller.student, distiller.accelerator.autocast)
    sequences, labels = window.micro_batches[0], window.targets(0)
    num_items = int((labels != IGNORE_INDEX).sum())
    teacher = distiller.teacher_side.outputs(sequences, num_items)
    with torch.no_grad():
        student_logits = distiller.student(input_ids=sequences[:, :-1]).logits
        teacher_logits = distiller.teacher(input_ids=sequences[:, :-1]).logits
    assert teacher_logits.shape == student_logits.shape
    reference = reference_labels(sequences, 6, distiller.tokenizer.eos_token_id)
    for temperature in (1.0, 2.0):
        for beta in (0.0, 0.5, 1.0):
            distiller.objective.options = KDOptions(
                temperature=temperature, divergence="jsd", beta=beta, scale_t2=False
            )
            with torch.no_grad():
                _, parts = distiller._loss_step(sequences, teacher, num_items, labels)
            trl = GKDTrainer.generalized_jsd_loss(
                student_logits[:, 5:], teacher_logits[:, 5:], reference[:, 5:], beta=beta, temperature=temperature
            )
            scale = beta * (1 - beta) if 0 < beta < 1 else 1.0
            assert float(parts["kd"]) * scale == pytest.approx(float(trl), abs=1e-5, rel=1e-5), (beta, temperature)


def test_resumed_run_at_lmbda_half_reproduces_the_uninterrupted_history(tmp_path):
    settings = dict(lmbda=0.5, max_steps=8, save_steps=3, eval_steps=3, gradient_accumulation_steps=2, alpha_ce=0.2)
    full = Distiller(tiny(tmp_path / "full", **settings))
    full.train()
    interrupted = Distiller(tiny(tmp_path / "cut", **settings))
    interrupted.train(max_steps=5)  # "killed" after step 5; newest checkpoint is step-3
    assert latest_checkpoint(interrupted.checkpoint_dir).name == "step-3"
    resumed = Distiller(tiny(tmp_path / "cut", resume="auto", **settings))
    resumed.train()
    a, b = history(full), history(resumed)
    assert list(a["step"]) == list(b["step"]) == list(range(8))
    generated = a["generated_length"].notna()
    assert 0 < generated.sum() < 8 or a["tokens"].nunique() > 1  # a mix of generated and data micro-batches
    for column in ("loss", "kd", "ce", "tokens", "generated_length", "eval_ppl"):
        assert ((a[column] - b[column]).abs().fillna(0) <= 1e-6).all(), column
        assert (a[column].isna() == b[column].isna()).all(), column


def test_fused_top_k_loss_equals_the_unfused_one_on_generated_sequences(tmp_path):
    """Step 0 generates from the same initial student with the same seeds, so both runs train on the same
    sequences: the fused chunked loss must equal the plain one there."""
    rows = []
    for name, fused in (("plain", False), ("fused", True)):
        run = Distiller(
            tiny(tmp_path, name, lmbda=1.0, kd_top_k=16, fused_kd=fused, alpha_ce=0.3, max_steps=1, warmup_steps=0)
        )
        run.train()
        rows.append(history(run).iloc[0])
    plain, fused = rows
    assert plain["generated_length"] == fused["generated_length"] and plain["tokens"] == fused["tokens"]
    for column in ("loss", "kd", "ce"):
        assert fused[column] == pytest.approx(plain[column], rel=1e-5, abs=1e-6), column


def test_on_policy_across_tokenizers_runs_end_to_end(tmp_path, metaspace_teacher):  # noqa: F811
    config = tiny(tmp_path, teacher_model=str(metaspace_teacher), cross_tokenizer=True, lmbda=1.0, max_steps=2)
    distiller = Distiller(config)
    summary = distiller.train()
    assert distiller.cross is not None
    rows = history(distiller)
    assert rows["kd"].map(math.isfinite).all() and (rows["generated_length"] > 0).all()
    assert distiller.state.alignment.positions > 0 and summary["optimizer_steps"] == 2


def test_onpolicy_rules_name_the_field():
    with pytest.raises(ConfigError) as err:
        DistillConfig(lmbda=0.5, prompt_length=200, max_length=128)
    assert err.value.field == "prompt_length"
    with pytest.raises(ConfigError) as err:
        DistillConfig(lmbda=0.5, kd_top_k=8, teacher_cache="somewhere")
    assert err.value.field == "lmbda"
    with pytest.raises(ConfigError) as err:
        DistillConfig(seq_kd=True, cross_tokenizer=True)
    assert err.value.field == "seq_kd"
    with pytest.raises(ConfigError) as err:
        DistillConfig(lmbda=1.0, alpha_kd=0.0, alpha_ce=1.0)
    assert err.value.field == "lmbda"


def test_generation_plan_counts_the_kv_cache_of_the_generating_model():
    from transformers import LlamaConfig

    student = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=1000)  # fmt: skip
    config = DistillConfig(lmbda=1.0, alpha_ce=0.0, batch_size=4, max_length=32, prompt_length=8, max_new_tokens=20)
    plan = onpolicy.generation_plan(config, gpu="T4", teacher_cfg=None, student_cfg=student)
    # 2 (k and v) x 3 layers x 2 KV heads x 16 head dims x 4 rows x 28 positions x 2 bytes (fp16)
    assert plan.kv_cache_bytes == 2 * 3 * 2 * 16 * 4 * 28 * 2
    assert plan.seconds_per_step > 0 and plan.generated_micro_batches == 1.0
    off = onpolicy.generation_plan(config.replace(lmbda=0.0), gpu="T4", teacher_cfg=None, student_cfg=student)
    assert off.kv_cache_bytes == 0 and off.seconds_per_step == 0.0


def test_generation_plan_of_an_unknown_gpu_reads_its_bandwidth_by_name():
    """A GPU without a kagglekd profile (peak FLOPS 0, e.g. an H200 read off the device): the plan is the weights'
    traffic at the bandwidth of the GPU its name holds plus the per-token overhead, not a compute term divided by
    zero FLOPS; a name holding no listed GPU counts as a T4."""
    from transformers import LlamaConfig

    from kagglekd import gpus
    from kagglekd.memory import Shape, count_parameters

    student = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=1000)  # fmt: skip
    config = DistillConfig(lmbda=1.0, alpha_ce=0.0, batch_size=4, max_length=32, prompt_length=8, max_new_tokens=20)
    fixed, per_layer = onpolicy.DECODE_OVERHEAD_S["gpu"]
    weights = count_parameters(student).total * 2  # fp16 bytes read per generated token
    for label, bandwidth in (("NVIDIA H200", 4.8e12), ("Some Future GPU", 320e9)):
        profile = gpus._unknown(label, 1, capacity=140 * gpus.GiB, capability=(9, 0))
        assert profile.peak_flops == 0
        plan = onpolicy.generation_plan(config, gpu=profile, teacher_cfg=None, student_cfg=student)
        per_token = weights / bandwidth + fixed + Shape.of(student).layers * per_layer
        assert plan.seconds_per_step == pytest.approx(20 * per_token, rel=1e-9), label


def test_two_processes_each_generate_their_share(tmp_path, kagglekd_cache):
    """DDP (gloo, CPU): every rank replaces its own micro-batch by generated sequences. The window's target count
    (``tokens``, summed over ranks) is then at most 2 ranks x 2 rows x 17 generated tokens; a rank training on its
    data block instead would add 2 x 32 targets."""
    from test_ddp import _launch

    config = tiny(tmp_path, "ddp", lmbda=1.0, batch_size=2, max_steps=2, eval_steps=2, strategy="ddp")
    config.to_json(tmp_path / "ddp.json")
    _launch(kagglekd_cache, "-m", "kagglekd", "-q", "train", "--config", str(tmp_path / "ddp.json"))
    rows = pd.read_csv(tmp_path / "ddp" / "history.csv")
    assert len(rows) == 2 and rows["loss"].map(math.isfinite).all()
    assert (rows["generated_length"] > 0).all() and (rows["tokens"] <= 2 * 2 * onpolicy.new_tokens(config)).all()


@pytest.mark.parametrize("changes", [{"sar": True}, {"expert_top_k_start": 1, "expert_top_k_end": 2}])
def test_on_policy_with_moe_options(tmp_path, changes):
    distiller = Distiller(tiny(tmp_path, lmbda=1.0, max_steps=2, **changes))
    distiller.train()
    rows = history(distiller)
    assert rows["loss"].map(math.isfinite).all() and (rows["generated_length"] > 0).all()
    if changes.get("sar"):
        assert rows["router"].map(math.isfinite).all()
