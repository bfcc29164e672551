"""Schedules, ramp-ups, EMA: values against the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from medvol.config import OptimizerConfig, ScheduleConfig
from medvol.errors import ConfigError
from medvol.training.schedules import (
    ema_update,
    linear_rampup,
    lr_factor,
    make_optimizer,
    make_scheduler,
    sigmoid_rampup,
)


def test_poly_cosine_step_factors():
    assert lr_factor(ScheduleConfig("poly", power=0.9), 50, 100) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(ScheduleConfig("cosine"), 50, 100) == pytest.approx(0.5)
    step = ScheduleConfig("step", milestones=[2500, 3800], gamma=0.1)
    assert [lr_factor(step, s, 6000) for s in (0, 2499, 2500, 3800)] == pytest.approx([1, 1, 0.1, 0.01])
    assert lr_factor(ScheduleConfig("poly", warmup_steps=10), 4, 100) == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        lr_factor(ScheduleConfig("nope"), 0, 10)


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer(OptimizerConfig("sgd", lr=0.01, momentum=0.9), [p])
    sched = make_scheduler(ScheduleConfig("poly", power=1.0), opt, 10, 0.01)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01, 0.009, 0.008, 0.007, 0.006])
    with pytest.raises(ConfigError):
        make_optimizer(OptimizerConfig("lion"), [p])


def test_rampups():
    assert sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(20, 40) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(80, 40) == 1.0
    assert linear_rampup(10, 40) == 0.25


def test_ema_follows_the_formula():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t_old, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.9 * t_old + 0.1 * s.detach())
