"""Warmup-stable-decay schedule: exact values, phase boundaries, the container and its state."""

import math
from dataclasses import replace

import pytest
import torch

from torchtitan.components.lr_scheduler import build_lr_schedulers, lr_factor, schedule_phases
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import ConfigError, JobConfig


def _optimizers(lr: float = 1.0) -> OptimizersContainer:
    return OptimizersContainer([torch.nn.Linear(2, 2)], torch.optim.SGD, {"lr": lr})


def _lrs_per_training_step(lr_config, training_steps: int, base_lr: float = 1.0) -> list[float]:
    """The lr each training step 1..training_steps runs with (optimizer step, then scheduler step)."""
    optimizers = _optimizers(base_lr)
    schedulers = build_lr_schedulers(optimizers, lr_config, training_steps)
    lrs = []
    for _ in range(training_steps):
        lrs.append(optimizers.param_groups[0]["lr"])
        optimizers.step()
        schedulers.step()
    return lrs


def test_phases_default_decay_after_warmup():
    # 10 steps, warmup 2: decay over the 8 remaining, plus torchtitan's virtual last step in the stable phase.
    assert schedule_phases(10, 2, None) == (2, 1, 8)


def test_phases_decay_ratio_and_clamping():
    assert schedule_phases(20, 5, 0.25) == (5, 11, 5)
    assert schedule_phases(10, 15, None) == (10, 1, 0)  # warmup clamped to the run
    assert schedule_phases(10, 6, 0.8) == (6, 1, 4)  # decay clamped to what warmup leaves


@pytest.mark.parametrize(
    "decay_type, curve",
    [
        ("linear", lambda p: 1 - p),
        ("sqrt", lambda p: 1 - math.sqrt(p)),
        ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2),
    ],
)
def test_lr_factor_every_step(decay_type, curve):
    # warmup 2, stable 1, decay 8 (a 10-step run): decay starts at scheduler step 3, progress (s+1-3)/8.
    min_lr = 0.1
    got = [lr_factor(s, 2, 1, 8, decay_type, min_lr) for s in range(11)]
    expected = [0.5, 1.0, 1.0] + [min_lr + (1 - min_lr) * curve((s + 1 - 3) / 8) for s in range(3, 11)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_lr_factor_hand_values():
    # scheduler step 5 of the run above: p = 3/8
    assert lr_factor(5, 2, 1, 8, "linear", 0.0) == pytest.approx(0.625, abs=1e-12)
    assert lr_factor(5, 2, 1, 8, "sqrt", 0.0) == pytest.approx(0.3876275643042055, abs=1e-12)
    assert lr_factor(5, 2, 1, 8, "cosine", 0.0) == pytest.approx(0.6913417161825449, abs=1e-12)
    assert lr_factor(5, 2, 1, 8, "linear", 0.1) == pytest.approx(0.6625, abs=1e-12)
    assert lr_factor(5, 2, 1, 8, "cosine", 0.1) == pytest.approx(0.7222075445642904, abs=1e-12)
    # end of the schedule (virtual step) reaches the minimum; beyond it stays there
    assert lr_factor(10, 2, 1, 8, "linear", 0.1) == pytest.approx(0.1, abs=1e-12)
    assert lr_factor(50, 2, 1, 8, "cosine", 0.1) == pytest.approx(0.1, abs=1e-12)


def test_lr_factor_no_warmup_no_decay():
    assert [lr_factor(s, 0, 11, 0, "linear", 0.0) for s in (0, 5, 10, 20)] == [1.0, 1.0, 1.0, 1.0]


def test_lr_factor_unknown_decay_type():
    with pytest.raises(ConfigError, match="lr_scheduler.decay_type='exp'"):
        lr_factor(9, 2, 1, 8, "exp", 0.0)


def test_training_loop_lrs_linear():
    cfg = replace(JobConfig().lr_scheduler, warmup_steps=2, decay_type="linear", min_lr_factor=0.0)
    lrs = _lrs_per_training_step(cfg, 10, base_lr=1e-3)
    expected = [0.5e-3, 1e-3, 1e-3, 0.875e-3, 0.75e-3, 0.625e-3, 0.5e-3, 0.375e-3, 0.25e-3, 0.125e-3]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_training_loop_lrs_decay_ratio_cosine():
    cfg = replace(JobConfig().lr_scheduler, warmup_steps=5, decay_ratio=0.25, decay_type="cosine", min_lr_factor=0.2)
    lrs = _lrs_per_training_step(cfg, 20)
    warm = [0.2, 0.4, 0.6, 0.8, 1.0]
    decay = [0.2 + 0.8 * (1 + math.cos(math.pi * k / 5)) / 2 for k in range(1, 5)]  # steps 17..20
    assert lrs == pytest.approx(warm + [1.0] * 11 + decay, abs=1e-12)
    assert decay == pytest.approx([0.9236067977499789, 0.7236067977499789, 0.4763932022500210, 0.2763932022500211])


def test_total_steps_overrides_training_steps():
    cfg = replace(JobConfig().lr_scheduler, warmup_steps=0, total_steps=4, decay_type="linear")
    assert _lrs_per_training_step(cfg, 6) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0], abs=1e-12)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("decay_ratio", 1.5, "lr_scheduler.decay_ratio=1.5"),
        ("min_lr_factor", -0.1, "lr_scheduler.min_lr_factor=-0.1"),
        ("warmup_steps", -1, "lr_scheduler.warmup_steps=-1"),
        ("decay_type", "step", "lr_scheduler.decay_type='step'"),
    ],
)
def test_bad_config(field, value, message):
    cfg = replace(JobConfig().lr_scheduler, **{field: value})
    with pytest.raises(ConfigError, match=message):
        build_lr_schedulers(_optimizers(), cfg, 10)


def test_one_scheduler_per_optimizer_and_state_round_trip():
    cfg = replace(JobConfig().lr_scheduler, warmup_steps=4)
    parts = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    optimizers = OptimizersContainer(parts, torch.optim.SGD, {"lr": 1.0})
    schedulers = build_lr_schedulers(optimizers, cfg, 10)
    assert len(schedulers) == 2
    for _ in range(3):
        optimizers.step()
        schedulers.step()
    state = schedulers.state_dict()
    assert state["last_epoch"] == 3

    fresh_optimizers = OptimizersContainer([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], torch.optim.SGD, {"lr": 1.0})
    fresh = build_lr_schedulers(fresh_optimizers, cfg, 10)
    fresh.load_state_dict(state)
    fresh_optimizers.step()
    fresh.step()
    assert [g["lr"] for g in fresh_optimizers.param_groups] == [1.0, 1.0]  # step 4 = first post-warmup step
    assert fresh.last_lr() == 1.0
    assert all(s.last_epoch == 4 for s in fresh)
