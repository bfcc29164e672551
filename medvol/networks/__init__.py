"""Network architectures, built by name from a recipe's ``model`` section and the plans."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch.nn as nn

from medvol.errors import ConfigError
from medvol.plans import Plans

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def keyword_names(cls, *set_by_builder: str) -> set[str]:
    """The parameters of ``cls``'s constructor that a recipe may set: all but ``set_by_builder``."""
    return set(inspect.signature(cls).parameters) - set(set_by_builder)


def model_options(model_cfg, name: str, allowed: Iterable[str]) -> dict:
    """A copy of ``model.options``, refused with one line naming the key when it holds one that
    network ``name`` does not take (instead of a TypeError from its constructor)."""
    opts = dict(model_cfg.options or {})
    names = set(allowed)
    unknown = sorted(set(opts) - names)
    if unknown:
        raise ConfigError(f"'model.options': {name} does not take {unknown}; it takes {sorted(names)}")
    return opts


def build_model(model_cfg, plans: Plans | None, in_channels: int, num_classes: int) -> nn.Module:
    """Build ``model_cfg.name`` (registered builders: see :data:`_REGISTRY`)."""
    # each module registers its networks
    from medvol.networks import aggregator, dodnet, dynunet, pcrl, resenc_unet, seran, vnet_transformer  # noqa: F401
    from medvol.networks.slice import cnn, dcmt, de_dcgcn_ee, infnet, ugpcl  # noqa: F401

    if model_cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name '{model_cfg.name}' is unknown; known: {sorted(_REGISTRY)}")
    return _REGISTRY[model_cfg.name](model_cfg, plans, in_channels, num_classes)


def as_class_logits(y):
    """Logits with one channel per class: a single channel (sigmoid logit of the foreground,
    as binary models emit it) becomes two, [0, l], whose softmax is [1 - sigmoid(l), sigmoid(l)]."""
    import torch

    return torch.cat([torch.zeros_like(y), y], 1) if y.shape[1] == 1 else y
