"""Exponential moving averages of a network: the mean teacher (and DC-MT on it), the slice
aggregator's teacher and PCRL's momentum encoder all move their copy with :func:`ema_update`."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters never require a gradient (an EMA's start)."""
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    return twin


def teacher_decay(step: int, ema_decay: float) -> float:
    """``min(1 - 1/(step + 1), ema_decay)``: the true average of the students so far while that
    weighs old students less than ``ema_decay`` would, then the exponential average."""
    return min(1.0 - 1.0 / (step + 1), ema_decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, buffers: bool = True) -> None:
    """teacher = decay * teacher + (1 - decay) * student, for every parameter of the teacher,
    paired with the student's by name (the teacher may hold a part of the student); with
    ``buffers`` the teacher's buffers (BatchNorm statistics) are copied from the student."""
    params = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        t.mul_(decay).add_(params[name].detach(), alpha=1 - decay)
    if buffers:
        own = dict(student.named_buffers())
        for name, b in teacher.named_buffers():
            b.copy_(own[name])


def update_teacher(teacher: nn.Module, student: nn.Module, clock: int, ema_decay: float, buffers: bool) -> float:
    """The mean teacher's update at ``clock`` (the 0-based step just done, or an epoch):
    :func:`ema_update` with :func:`teacher_decay`; returns the decay used."""
    decay = teacher_decay(clock, ema_decay)
    ema_update(teacher, student, decay, buffers=buffers)
    return decay


__all__ = ["ema_update", "frozen_copy", "teacher_decay", "update_teacher"]
