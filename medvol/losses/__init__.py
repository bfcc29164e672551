"""Losses. Segmentation: nnU-Net's batch Dice without background + CE (values as MONAI's
DiceCELoss; statistics gathered over DDP ranks), wrapped for deep supervision."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.loss import _Loss

from medvol.errors import ConfigError


def segmentation_loss(name: str, deep_supervision: bool) -> nn.Module:
    """nnU-Net's loss: batch Dice without background (statistics gathered over DDP ranks) +
    CE, over every deep-supervision level with MONAI's exponential weights."""
    from monai.losses import DeepSupervisionLoss

    from medvol.losses.dice import BatchDiceCELoss, BatchDiceLoss

    base: nn.Module
    if name == "dice_ce":
        base = BatchDiceCELoss()
    elif name == "dice":
        base = BatchDiceLoss()
    elif name == "ce":
        base = _CE()
    else:
        raise ConfigError(f"trainer.loss '{name}' is unknown; known: dice_ce, dice, ce")
    if not deep_supervision:
        return base
    return DeepSupervisionLoss(base, weight_mode="exp")  # type: ignore[arg-type]  # any loss module works


class _CE(_Loss):
    """Cross-entropy with a ``(B, 1, ...)`` integer target, as MONAI's losses take it."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, target[:, 0].long())
