"""Signed distance maps (CANet / SASSNet convention) and the soft Dice of the paper."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from medvol.losses.dice import soft_dice


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Normalised signed distance of each sample of ``mask`` (B, X, Y, Z) bool.

    Outside the object: distance to it scaled to (0, 1]; inside: minus the distance to the
    background scaled to [-1, 0); exactly 0 on the object's boundary voxels. A sample
    without foreground (or without background) gives zeros.
    """
    from skimage.segmentation import find_boundaries

    out = np.zeros(mask.shape, np.float32)
    for b in range(mask.shape[0]):
        pos = mask[b].astype(bool)
        if not pos.any() or pos.all():
            continue
        neg = ~pos
        negdis = distance_transform_edt(neg)
        posdis = distance_transform_edt(pos)
        boundary = find_boundaries(pos, mode="inner")
        neg = (negdis - negdis.min()) / (negdis.max() - negdis.min())
        s = neg - (posdis - posdis.min()) / (posdis.max() - posdis.min())
        s[boundary] = 0
        out[b] = s
    return out


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - (2 sum(p g) + s) / (sum(p^2) + sum(g^2) + s), over the whole batch (the paper's);
    under DDP the sums span every rank's part of the batch (:func:`~medvol.losses.dice.soft_dice`)."""
    return 1 - soft_dice(prob, target.float(), list(range(prob.ndim)), smooth, smooth, squared=True)
