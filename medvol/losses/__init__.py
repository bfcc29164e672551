"""Losses. Segmentation: nnU-Net's batch Dice without background + CE (values as MONAI's
DiceCELoss; statistics gathered over DDP ranks), wrapped for deep supervision."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.loss import _Loss

from medvol.errors import ConfigError
from medvol.labels import LabelScheme


def segmentation_loss(name: str, deep_supervision: bool, labels: LabelScheme | None = None,
                      batch_dice: bool = True) -> nn.Module:
    """nnU-Net's loss: batch Dice without background (statistics gathered over DDP ranks) +
    CE, over every deep-supervision level with MONAI's exponential weights. ``labels``: an
    ignore label masks both terms; regions take sigmoid Dice + BCE per region
    (:mod:`medvol.losses.dice`). The deep-supervision targets are the label map downsampled by
    nearest neighbour, from which each level's regions are made: the same targets as regions
    downsampled by nearest neighbour, as nnU-Net makes them. ``batch_dice``: False takes one
    Dice per sample (nnU-Net's ``batch_dice`` of the configuration, :func:`medvol.plans.batch_dice`)."""
    from monai.losses import DeepSupervisionLoss

    from medvol.losses.dice import BatchDiceCELoss, BatchDiceLoss

    base: nn.Module
    if name == "dice_ce":
        base = BatchDiceCELoss(labels=labels, batch=batch_dice)
    elif name == "dice":
        base = BatchDiceLoss(labels=labels, batch=batch_dice)
    elif name == "ce":
        base = _CE(labels)
    else:
        raise ConfigError(f"trainer.loss '{name}' is unknown; known: dice_ce, dice, ce")
    if not deep_supervision:
        return base
    return DeepSupervisionLoss(base, weight_mode="exp")  # type: ignore[arg-type]  # any loss module works


class _CE(_Loss):
    """Cross-entropy with a ``(B, 1, ...)`` integer target, as MONAI's losses take it (BCE per
    region for regions, ignored voxels left out: :func:`medvol.losses.dice.cross_entropy`)."""

    def __init__(self, labels: LabelScheme | None = None):
        super().__init__()
        self.labels = labels

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from medvol.losses.dice import cross_entropy

        return cross_entropy(logits, target, self.labels)
