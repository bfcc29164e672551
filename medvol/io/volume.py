"""The in-memory scan: voxel array + RAS affine + metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

COPY_CHUNK = 16  # slices along the last axis copied at a time by c_order


def c_order(a: np.ndarray, dtype=None) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype`` (its own when None), itself when it already is.

    NIfTI arrays come Fortran-ordered (x fastest); turning a 512 x 512 x 300 CT to C order in
    one ``np.ascontiguousarray`` strides through memory and takes ~1 s, copying 16 slices of
    the last axis at a time keeps both sides in cache and takes ~0.25 s."""
    dtype = np.dtype(dtype or a.dtype)
    if a.flags.c_contiguous and a.dtype == dtype:
        return a
    if a.ndim < 2 or a.flags.c_contiguous:
        return np.ascontiguousarray(a, dtype=dtype)
    out = np.empty(a.shape, dtype)
    for k in range(0, a.shape[-1], COPY_CHUNK):
        out[..., k:k + COPY_CHUNK] = a[..., k:k + COPY_CHUNK]
    return out


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
        """The array as C-contiguous ``(C, X, Y, Z)`` of ``dtype`` (None: the file's own)."""
        if self.array.ndim == 3:
            return c_order(self.array, dtype)[None]
        out = np.empty((self.array.shape[3],) + self.array.shape[:3], np.dtype(dtype or self.array.dtype))
        for c in range(out.shape[0]):
            out[c] = c_order(self.array[..., c], dtype)
        return out
