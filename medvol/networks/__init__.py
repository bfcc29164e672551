"""Network architectures, built by name from a recipe's ``model`` section and the plans."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from medvol.errors import ConfigError

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def build_model(model_cfg, plans: dict, in_channels: int, num_classes: int) -> nn.Module:
    """Build ``model_cfg.name`` (registered builders: see :data:`_REGISTRY`)."""
    from medvol.networks import dynunet  # noqa: F401  (registers itself)

    if model_cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name '{model_cfg.name}' is unknown; known: {sorted(_REGISTRY)}")
    return _REGISTRY[model_cfg.name](model_cfg, plans, in_channels, num_classes)
