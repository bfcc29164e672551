"""Patch sampling with nnU-Net's foreground oversampling.

A patch is either random (uniform over all positions that keep it within the padded case)
or centred on a random stored voxel of a random class present in the case (the class
locations sampled at preprocessing time). With an ignore label, random patches are centred on
annotated voxels instead (nnU-Net's rule). With regions the foreground class is drawn among the
labels present, where nnU-Net draws among the regions present: the same voxels, other weights.
Cases smaller than the patch are padded (image with 0, label with -1, nnU-Net's convention).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

from medvol.cache import ANNOTATED


def patch_bounds(shape: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest patch start per axis (negative / beyond: padding)."""
    size, window = np.asarray(shape), np.asarray(patch)
    need = np.maximum(window - size, 0)
    lbs = -(need // 2)
    ubs = size + need // 2 + need % 2 - window
    return lbs, ubs


def choose_patch_start(shape, patch, rng: np.random.Generator, class_locations: dict | None = None,
                       force_fg: bool = False) -> tuple[np.ndarray, int | None]:
    """Start corner of a patch; with ``force_fg`` centred on a stored voxel of a random
    foreground class present. With an ignore label (the locations hold
    :data:`medvol.cache.ANNOTATED`) every other patch is centred on a random annotated voxel,
    as nnU-Net's loader does, so no patch is all ignored voxels.

    Returns (start, the class it was centred on or None).
    """
    lbs, ubs = patch_bounds(shape, patch)
    locations = class_locations or {}
    if force_fg:
        present = [c for c, locs in locations.items() if c != ANNOTATED and len(locs)]
        if present:
            cls = present[rng.integers(len(present))]
            return _centred(locations[cls], patch, lbs, ubs, rng), int(cls)
    annotated = locations.get(ANNOTATED)
    if annotated is not None and len(annotated):
        return _centred(annotated, patch, lbs, ubs, rng), None
    return np.array([rng.integers(lo, hi + 1) for lo, hi in zip(lbs, ubs)]), None


def _centred(locs, patch, lbs, ubs, rng: np.random.Generator) -> np.ndarray:
    """The start of a patch centred on a random one of ``locs``, kept within the bounds."""
    loc = np.asarray(locs[rng.integers(len(locs))])
    return np.clip(loc - np.asarray(patch) // 2, lbs, ubs)


def extract_patch(array: np.ndarray, start: ArrayLike, patch: ArrayLike, pad_value: float) -> np.ndarray:
    """``array[:, start:start+patch]`` (channel-first), padded with ``pad_value`` where it
    leaves the array. Reads only the patch from a memory map."""
    first, size = np.asarray(start), np.asarray(patch)
    stop = first + size
    lo, hi = np.maximum(first, 0), np.minimum(stop, np.asarray(array.shape[1:]))
    src = array[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))]
    if np.all(lo == first) and np.all(hi == stop):
        return np.array(src)
    out = np.full((array.shape[0],) + tuple(int(p) for p in size), pad_value, dtype=array.dtype)
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, first))
    out[(slice(None),) + dst] = src
    return out
