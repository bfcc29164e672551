"""Real head-CT slices in the COVID-SemiSeg layout (Inf-Net's folders), target: bone or brain.

The slices come from :mod:`medvol.datasets.ct`: pydicom-data's real 512 x 512 head CT slice,
scaled along z like a skull, rotated in plane, with scanner-like noise, per case. Each slice
is downsampled to ``size`` x ``size`` (area averaging), windowed to [-1000, 2000] HU and
written as an RGB JPEG (``Imgs/``) with a 0/255 PNG mask of the target (``GT/``), as the
published folders hold them: ``bone`` (the skull, a ring 2-4 px thick at 128 px) or ``brain``
(the region inside it, a large blob as lung infections are). Training and unlabelled slices
come from other cases (other rotations and noise) than the test slices. The task of the
Inf-Net comparison (issue 27).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvol.datasets.covid_semiseg import write_split
from medvol.datasets.ct import LABELS, make_ct_case

HU_WINDOW = (-1000.0, 2000.0)
SPLIT_SEEDS = {"train": 100, "unlabelled": 200, "test": 300}


def _downsample(array: np.ndarray, size: int) -> np.ndarray:
    """Area average of a square (X, Y) array to (size, size); the side must divide evenly."""
    f = array.shape[0] // size
    return array[: f * size, : f * size].reshape(size, f, size, f).mean(axis=(1, 3))


def _slices(n: int, seed: int, size: int, target: str, per_case: int = 8):
    """``n`` (grey uint8, target mask) pairs, ``per_case`` slices from each of n/per_case cases."""
    out = []
    for case in range(-(-n // per_case)):
        image, label = make_ct_case(per_case + 4, (0.5, 0.5, 1.0), seed=seed + case)
        for z in range(2, per_case + 2):  # skip the narrow caps of the ellipsoid profile
            hu = _downsample(image.array[..., z].astype(np.float32), size)
            mask = _downsample((label.array[..., z] == LABELS[target]).astype(np.float32), size) >= 0.5
            grey = np.clip((hu - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]), 0, 1) * 255
            out.append((np.round(grey).astype(np.uint8), mask))
    return out[:n]


def write_ct_semiseg_layout(root: str | Path, n_labelled: int = 24, n_unlabelled: int = 48, n_test: int = 16,
                            size: int = 128, seed: int = 0, target: str = "bone") -> Path:
    """``root/train`` (Imgs + GT), ``root/unlabelled`` (images), ``root/test`` (Imgs + GT)."""
    root = Path(root)
    for split, n in (("train", n_labelled), ("unlabelled", n_unlabelled), ("test", n_test)):
        write_split(root, split, _slices(n, SPLIT_SEEDS[split] + 1000 * seed, size, target))
    return root
