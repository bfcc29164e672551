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

from medvol.labels import LabelScheme


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
    target ``(B, 1, ...)``. ``batch=False``: one Dice per sample and class, averaged (nnU-Net's
    ``batch_dice: false``).

    ``labels`` (:class:`medvol.labels.LabelScheme`) adds nnU-Net's two label modes: with an
    ignore label the sums run over the annotated voxels only (its partial loss); with regions
    the probabilities are per-region sigmoids against the regions of the target, every region
    channel scored (nnU-Net's ``do_bg=True``: no channel is background)."""

    def __init__(self, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, include_background: bool = False,
                 labels: LabelScheme | None = None, batch: bool = True):
        super().__init__()
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr
        self.include_background = include_background
        self.labels = labels
        self.batch = batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prob, ref, mask = dice_inputs(logits, target, self.labels, self.include_background)
        if mask is not None:
            prob, ref = prob * mask, ref * mask
        spatial = list(range(2, prob.ndim))
        dice = soft_dice(prob, ref, [0, *spatial] if self.batch else spatial, self.smooth_nr, self.smooth_dr,
                         gather=self.batch)  # per sample: the rank's mean; DDP averages it into the global one
        return 1 - dice.mean()


def dice_inputs(logits: torch.Tensor, target: torch.Tensor, labels: LabelScheme | None = None,
                include_background: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(probabilities, reference, annotated mask (B, 1, ...) or None)`` of the Dice: class
    softmax against the one-hot target (ignored voxels given class 0; the mask removes them),
    or per-region sigmoids against the region targets."""
    mask = labels.annotated(target) if labels is not None else None
    mask = mask.float() if mask is not None else None
    if labels is not None and labels.has_regions:
        prob = torch.sigmoid(logits.float())
        return prob, labels.region_targets(target).to(prob.dtype), mask
    prob = torch.softmax(logits.float(), 1)
    classes = _annotated_classes(target, labels)
    onehot = F.one_hot(classes, logits.shape[1]).movedim(-1, 1).to(prob.dtype)
    if not include_background:
        prob, onehot = prob[:, 1:], onehot[:, 1:]
    return prob, onehot, mask


def _annotated_classes(target: torch.Tensor, labels: LabelScheme | None) -> torch.Tensor:
    """The integer target ``(B, ...)`` with ignored voxels set to 0 (masked out later)."""
    t = target[:, 0].long()
    if labels is None or labels.ignore_label is None:
        return t
    return torch.where(t == labels.ignore_label, torch.zeros_like(t), t)


class BatchDiceCELoss(nn.Module):
    """:class:`BatchDiceLoss` + cross-entropy (the mean over the rank's voxels; DDP's gradient
    averaging makes it the global mean for equal per-rank batches).

    With ``labels`` as nnU-Net's compound losses: an ignore label leaves its voxels out of the
    CE (the mean over annotated voxels; 0 when a batch has none, as nnU-Net skips it); regions
    take BCE with logits per region channel instead of CE (``DC_and_BCE_loss``). Regions with
    an ignore label: nnU-Net's masked BCE, the sum over region channels and annotated voxels
    divided by the number of annotated voxels (not by voxels x regions), kept as it is."""

    def __init__(self, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, labels: LabelScheme | None = None,
                 batch: bool = True):
        super().__init__()
        self.dice = BatchDiceLoss(smooth_nr, smooth_dr, include_background=False, labels=labels, batch=batch)
        self.labels = labels

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + cross_entropy(logits, target, self.labels)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, labels: LabelScheme | None = None) -> torch.Tensor:
    """The CE term of :class:`BatchDiceCELoss` (BCE per region for regions), with a
    ``(B, 1, ...)`` integer target."""
    logits = logits.float()
    ignore = labels.ignore_label if labels is not None else None
    if labels is not None and labels.has_regions:
        ref = labels.region_targets(target)
        if ignore is None:
            return F.binary_cross_entropy_with_logits(logits, ref)
        mask = (target != ignore).float()
        bce = F.binary_cross_entropy_with_logits(logits, ref, reduction="none")
        return (bce * mask).sum() / mask.sum().clamp_min(1e-8)
    t = target[:, 0].long()
    if ignore is None:
        return F.cross_entropy(logits, t)
    if not bool((t != ignore).any()):
        return logits.sum() * 0.0  # nothing annotated: no CE (and no NaN), as nnU-Net
    return F.cross_entropy(logits, t, ignore_index=ignore)
