"""Crop to the nonzero region, as nnU-Net does (before normalisation and resampling)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

OUTSIDE_LABEL = -1  # nnU-Net's marker for label voxels outside the nonzero mask


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any channel of ``image`` (C, X, Y, Z) is nonzero, with holes filled."""
    mask = image[0] != 0
    for c in range(1, image.shape[0]):
        mask |= image[c] != 0
    return fill_holes(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (background connected face to face), computed
    as the background components that do not reach the border, inside the mask's bounding
    box grown by one voxel (everything outside that box reaches the border): ~2-4x faster."""
    box = tuple(slice(max(a - 1, 0), min(b + 1, n)) for (a, b), n in zip(bbox_of(mask), mask.shape))
    background, _ = ndimage.label(~mask[box])
    edge = np.zeros(int(background.max()) + 1, bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            edge[np.unique(np.take(background, end, axis=axis))] = True
    edge[0] = False  # label 0: the mask itself
    out = mask.copy()
    out[box] = ~edge[background]
    return out


def bbox_of(mask: np.ndarray) -> list[list[int]]:
    """``[[start, stop), ...]`` per axis of the True voxels; the whole array if none."""
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, int(mask.shape[ax])])
    return box


def crop_to_nonzero(image: np.ndarray, label: np.ndarray | None = None):
    """Crop ``image`` (C, X, Y, Z) and ``label`` (1, X, Y, Z) to the nonzero bounding box.

    Returns ``(image, seg, bbox)``. ``seg`` is the cropped label with background voxels
    outside the nonzero mask set to -1, or, without a label, 0 inside the mask and -1
    outside (so normalisation can ignore the outside either way).
    """
    mask = nonzero_mask(image)
    bbox = bbox_of(mask)
    sl = tuple(slice(a, b) for a, b in bbox)
    image = image[(slice(None),) + sl]
    mask = mask[sl][None]
    if label is not None:
        seg = np.array(label[(slice(None),) + sl], dtype=np.int16)
        seg[(seg == 0) & ~mask] = OUTSIDE_LABEL
    else:  # built as int16 directly (np.where would allocate an int64 volume first)
        seg = np.full(mask.shape, OUTSIDE_LABEL, dtype=np.int16)
        seg[mask] = 0
    return image, seg, bbox
