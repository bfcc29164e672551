"""Partial-label loss (DoDNet over MOTS): Dice + BCE per output channel, only on the channels
that a sample's source dataset annotates. Unannotated channels are masked out, never treated
as background, so they contribute no gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medvol.losses.dice import soft_dice, world_sum


def partial_dice_bce(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                     smooth: float = 1.0) -> torch.Tensor:
    """``logits``/``target`` (B, K, ...) (target 0/1), ``annotated`` (B, K) bool/0-1.

    Returns the mean over annotated (sample, channel) pairs of soft Dice loss + BCE (1:1).
    """
    b, k = logits.shape[:2]
    mask = annotated.to(logits.dtype).reshape(b, k)
    prob = torch.sigmoid(logits).flatten(2)
    t = target.to(logits.dtype).flatten(2)
    dice = 1 - soft_dice(prob, t, -1, smooth, smooth, gather=False)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(2), t, reduction="none").mean(-1)
    per = (dice + bce) * mask
    total, count = world_sum(torch.stack([per.sum(), mask.sum()]))  # the mean over every rank's pairs
    return total / count.clamp_min(1.0)  # no annotated pair anywhere: 0, every rank still joins
