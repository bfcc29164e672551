"""Batch Dice (+ CE) whose statistics span every DDP rank, as nnU-Net computes it.

A batch Dice pools true/false positives over the whole batch before forming the ratio. Under
DDP each rank holds only its part of the global batch, so a per-rank Dice is not the Dice of
the global batch: N processes with batch b would train unlike one process with batch N*b.
Like nnU-Net (``AllGatherGrad`` in its DC loss), the per-class statistics are all-gathered
with a gradient-carrying all-gather and summed before the ratio. Its backward sums the
gradients of every rank's (identical) loss, and DDP's gradient averaging divides by N: the
update equals the single-process one on the concatenated batch.

On one process the values equal MONAI's ``DiceLoss``/``DiceCELoss`` with
``include_background=False, to_onehot_y=True, softmax=True, batch=True``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def world_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the ranks, with gradients flowing back to every rank's part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.stack(all_gather(x)).sum(0)


def soft_dice(prob: torch.Tensor, target: torch.Tensor, dims, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
              squared: bool = False, gather: bool = True) -> torch.Tensor:
    """The one soft Dice of the losses: ``(2 sum(p g) + s_nr) / (sum(p) + sum(g) + s_dr)``, the sums
    over ``dims`` (what is left is one Dice per class, or per sample and channel). ``squared``:
    ``sum(p^2) + sum(g^2)`` below (V-Net's form, as the SDF and UGPCL papers have it); ``gather``:
    the sums span every DDP rank's part of the batch (:func:`world_sum`)."""
    sums = [(prob * target).sum(dims), (prob * prob if squared else prob).sum(dims),
            (target * target if squared else target).sum(dims)]
    inter, pred, ref = world_sum(torch.stack(sums)) if gather else sums
    return (2 * inter + smooth_nr) / (pred + ref + smooth_dr)


class BatchDiceLoss(nn.Module):
    """1 - mean over foreground classes of (2 tp + s_nr) / (2 tp + fp + fn + s_dr), with tp,
    fp, fn summed over the global batch (all ranks) and space. Logits ``(B, C, ...)``, integer
    target ``(B, 1, ...)``."""

    def __init__(self, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, include_background: bool = False):
        super().__init__()
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prob = torch.softmax(logits.float(), 1)
        onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(prob.dtype)
        if not self.include_background:
            prob, onehot = prob[:, 1:], onehot[:, 1:]
        dice = soft_dice(prob, onehot, [0] + list(range(2, prob.ndim)), self.smooth_nr, self.smooth_dr)
        return 1 - dice.mean()


class BatchDiceCELoss(nn.Module):
    """:class:`BatchDiceLoss` + cross-entropy (the mean over the rank's voxels; DDP's gradient
    averaging makes it the global mean for equal per-rank batches)."""

    def __init__(self, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
        super().__init__()
        self.dice = BatchDiceLoss(smooth_nr, smooth_dr)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + F.cross_entropy(logits.float(), target[:, 0].long())
