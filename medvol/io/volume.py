"""The in-memory scan: voxel array + RAS affine + metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the norms of the affine's first 3 columns."""
    x, y, z = (float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    return x, y, z


@dataclass
class Volume:
    """A scan as medvol holds it.

    ``array`` is in nibabel's voxel order: ``(X, Y, Z)`` for one channel or
    ``(X, Y, Z, C)`` for several (4D NIfTI). Voxel ``(i, j, k)`` sits at world position
    ``affine @ (i, j, k, 1)`` in RAS+ millimetres (nibabel's convention; DICOM's LPS is
    converted on reading).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim not in (3, 4):
            raise ValueError(f"array must be (X, Y, Z) or (X, Y, Z, C), got shape {self.array.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        x, y, z = (int(s) for s in self.array.shape[:3])
        return x, y, z

    @property
    def num_channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[3])

    def channel_first(self, dtype=np.float32) -> np.ndarray:
        """The array as ``(C, X, Y, Z)``."""
        a = self.array if self.array.ndim == 4 else self.array[..., None]
        return np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=dtype)
