"""Learning-rate schedules and ramp-ups shared by the method trainers (the EMA helper is
:mod:`medvol.training.ema`, re-exported here)."""

from __future__ import annotations

import math

import torch

from medvol.errors import ConfigError
from medvol.ramps import linear_rampup, sigmoid_rampup  # noqa: F401  (re-exported)
from medvol.training.ema import ema_update  # noqa: F401  (re-exported)


def lr_factor(cfg, step: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min(step, total) / max(total, 1)
    if cfg.name == "poly":
        return (1 - t) ** cfg.power
    if cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.name == "step":
        return cfg.gamma ** sum(step >= m for m in cfg.milestones)
    if cfg.name == "constant":
        return 1.0
    raise ConfigError(f"schedule.name '{cfg.name}' is unknown; known: poly, cosine, step, constant")


def make_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int, base_lr: float):
    min_frac = cfg.min_lr / base_lr if base_lr else 0.0

    def f(step: int) -> float:
        return max(lr_factor(cfg, step, total_steps), min_frac)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)




def recipe_in_epochs(recipe, steps_per_epoch: int, epochs: float | None, val_every_epochs: float | None):
    """``recipe`` with ``trainer.steps`` / ``val_every`` set from lengths given in epochs (as the
    published DC-MT and aggregation-network loops count), each left as it is when None."""
    import dataclasses

    in_steps = {key: max(1, int(round(value * steps_per_epoch)))
                for key, value in (("steps", epochs), ("val_every", val_every_epochs)) if value is not None}
    return dataclasses.replace(recipe, trainer=dataclasses.replace(recipe.trainer, **in_steps)) if in_steps else recipe


def epoch_step_decay(schedule, optimizers: dict, total_steps: int, steps_per_epoch: int, every_epochs: float,
                     factor: float) -> dict:
    """The published "x ``factor`` every ``every_epochs`` epochs" learning-rate decay (DC-MT and
    its aggregation network) as step schedulers of ``optimizers``; ``schedule`` (the recipe's)
    must be ``constant``, its warm-up and floor are kept."""
    from medvol.config import ScheduleConfig

    if schedule.name != "constant":
        raise ConfigError("method.lr_decay_every sets the learning-rate schedule; set schedule.name: constant "
                          f"(got '{schedule.name}')")
    every = every_epochs * steps_per_epoch
    marks = [int(round(k * every)) for k in range(1, int(total_steps / every) + 1)]
    milestones = [m for m in marks if m < total_steps]
    cfg = ScheduleConfig("step", milestones=milestones, gamma=factor, warmup_steps=schedule.warmup_steps,
                         min_lr=schedule.min_lr)
    return {k: make_scheduler(cfg, opt, total_steps, opt.defaults["lr"]) for k, opt in optimizers.items()}

def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    name = cfg.name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer.name '{cfg.name}' is unknown; known: sgd, adam, adamw")
