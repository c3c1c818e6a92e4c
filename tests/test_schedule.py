import math

import pytest
import torch
from transformers import get_scheduler

from kagglekd.config import SCHEDULERS, DistillConfig
from kagglekd.errors import ConfigError
from kagglekd.schedule import build_scheduler, plan_schedule


def test_worked_example_kaggle_run():
    # 100k samples / batch 4 = 25,000 batches; accumulation 16; 3 epochs; warmup 1000.
    config = DistillConfig(gradient_accumulation_steps=16, num_epochs=3, warmup_steps=1000, batch_size=4)
    plan = plan_schedule(config, batches_per_epoch=25_000)
    assert plan.steps_per_epoch == 1563  # ceil(25000 / 16): the last partial window steps too
    assert plan.optimizer_steps == 4689
    assert round(100 * plan.warmup_fraction, 1) == 21.3


def test_worked_example_odd_case():
    plan = plan_schedule(DistillConfig(gradient_accumulation_steps=8, num_epochs=2), batches_per_epoch=37)
    assert plan.optimizer_steps == 10 and len(plan.curve()) == 10


def test_max_steps_overrides_epochs_and_ratio_warmup_is_ceil():
    plan = plan_schedule(DistillConfig(max_steps=101, warmup_ratio=0.1), batches_per_epoch=5)
    assert plan.optimizer_steps == 101 and plan.warmup_steps == math.ceil(10.1)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_curve_equals_get_scheduler_stepped_by_hand(name):
    config = DistillConfig(scheduler_type=name, learning_rate=0.02, max_steps=57, warmup_steps=7)
    plan = plan_schedule(config, batches_per_epoch=100)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight], lr=0.02)
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=7,
        num_training_steps=57,
        scheduler_specific_kwargs=dict(plan.scheduler_kwargs),
    )
    expected = []
    for _ in range(57):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert plan.curve() == pytest.approx(expected, rel=0, abs=0)
    assert [plan.lr_at(k) for k in range(57)] == expected


def test_build_scheduler_reproduces_the_plan():
    plan = plan_schedule(DistillConfig(max_steps=30, warmup_steps=3), batches_per_epoch=10)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=plan.learning_rate)
    scheduler = build_scheduler(optimizer, plan)
    seen = []
    for _ in range(30):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == plan.curve()


def test_cosine_reaches_peak_after_warmup_and_decays():
    plan = plan_schedule(DistillConfig(max_steps=100, warmup_steps=10, learning_rate=1.0), batches_per_epoch=10)
    assert plan.lr_at(0) == 0.0 and plan.lr_at(10) == pytest.approx(1.0)
    assert plan.lr_at(99) < 0.01 and plan.first_zero_lr_step() is None


def test_warmup_not_shorter_than_run_is_an_error():
    with pytest.raises(ConfigError) as err:
        plan_schedule(DistillConfig(max_steps=10, warmup_steps=10), batches_per_epoch=10)
    assert err.value.field == "warmup_steps" and "10 optimizer steps" in str(err.value)


def test_warmup_error_counts_agree_with_their_nouns():
    """A one-step plan with one warmup step said "1 warmup steps ... only 1 optimizer steps"."""
    with pytest.raises(ConfigError) as err:
        plan_schedule(DistillConfig(max_steps=1, warmup_steps=1), batches_per_epoch=1)
    message = str(err.value)
    assert "gives 1 warmup step but the run has only 1 optimizer step (1 batch/epoch" in message, message
    assert "= 1 step/epoch)" in message and "1 steps" not in message, message
    with pytest.raises(ConfigError) as err:
        plan_schedule(DistillConfig(max_steps=3, warmup_steps=3, gradient_accumulation_steps=2), batches_per_epoch=6)
    assert "gives 3 warmup steps but the run has only 3 optimizer steps (6 batches/epoch" in str(err.value)
    assert "= 3 steps/epoch)" in str(err.value)


def test_lr_at_outside_plan():
    plan = plan_schedule(DistillConfig(max_steps=5), batches_per_epoch=5)
    with pytest.raises(IndexError):
        plan.lr_at(5)


def test_bad_scheduler_kwargs_is_config_error():
    with pytest.raises(ConfigError) as err:
        plan_schedule(DistillConfig(scheduler_type="linear", scheduler_kwargs={"bogus": 1}, max_steps=5), 5)
    assert err.value.field == "scheduler_kwargs"


def test_batches_per_epoch_one_process_keeps_the_ragged_batch_several_drop_it():
    from kagglekd.schedule import batches_per_epoch

    assert batches_per_epoch(37, 4) == 10  # 9 full batches + one of 1 block
    assert batches_per_epoch(37, 4, processes=2) == 4  # 4 global batches of 8; the last 5 blocks dropped
    assert batches_per_epoch(7, 4, processes=2) == 0  # the caller reports "does not fill one batch"
