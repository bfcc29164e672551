"""Losses. Segmentation: MONAI's Dice/CE (nnU-Net's batch Dice without background + CE),
wrapped for deep supervision."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.loss import _Loss

from medvol.errors import ConfigError


def segmentation_loss(name: str, deep_supervision: bool) -> nn.Module:
    from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss

    base: _Loss
    if name == "dice_ce":
        base = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                          smooth_nr=1e-5, smooth_dr=1e-5)
    elif name == "dice":
        base = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    elif name == "ce":
        base = _CE()
    else:
        raise ConfigError(f"trainer.loss '{name}' is unknown; known: dice_ce, dice, ce")
    return DeepSupervisionLoss(base, weight_mode="exp") if deep_supervision else base


class _CE(_Loss):
    """Cross-entropy with a ``(B, 1, ...)`` integer target, as MONAI's losses take it."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, target[:, 0].long())
