"""Network architectures, built by name from a recipe's ``model`` section and the plans."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from medvol.errors import ConfigError
from medvol.plans import Plans

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def build_model(model_cfg, plans: Plans | None, in_channels: int, num_classes: int) -> nn.Module:
    """Build ``model_cfg.name`` (registered builders: see :data:`_REGISTRY`)."""
    from medvol.networks import aggregator, dodnet, dynunet, pcrl, vnet_transformer  # noqa: F401  (register themselves)
    from medvol.networks.slice import cnn, dcmt, infnet, ugpcl  # noqa: F401

    if model_cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name '{model_cfg.name}' is unknown; known: {sorted(_REGISTRY)}")
    return _REGISTRY[model_cfg.name](model_cfg, plans, in_channels, num_classes)


def as_class_logits(y):
    """Logits with one channel per class: a single channel (sigmoid logit of the foreground,
    as binary models emit it) becomes two, [0, l], whose softmax is [1 - sigmoid(l), sigmoid(l)]."""
    import torch

    return torch.cat([torch.zeros_like(y), y], 1) if y.shape[1] == 1 else y
