"""Optional reorientation to the closest canonical (RAS) voxel order.

nnU-Net keeps each file's voxel order; so does medvol by default. Datasets that mix storage
orders (KiTS19's (slices, H, W) beside LiTS's (H, W, slices)) then put their coarse axis on
different array axes, and a per-axis target spacing means different things per case.
``--orientation RAS`` permutes/flips every case's axes (no interpolation) so that array axes
run Right, Anterior, Superior; the transform is recorded and undone on the way out.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from medvol.io.volume import Volume

ORIENTATIONS = ("stored", "RAS")


def _to_ras(affine: np.ndarray) -> np.ndarray:
    return ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))


def reorient(volume: Volume, orientation: str | None) -> Volume:
    """``volume`` in RAS voxel order (its affine updated: same world positions); as it is for
    ``None``/``"stored"``."""
    if orientation in (None, "stored"):
        return volume
    ornt = _to_ras(volume.affine)
    array = apply_orientation(volume.array, ornt)
    affine = volume.affine @ inv_ornt_aff(ornt, volume.spatial_shape)
    return Volume(array, affine, dict(volume.meta))


def undo_orientation(array: np.ndarray, original_affine) -> np.ndarray:
    """``array (C, X, Y, Z)`` in RAS voxel order back to the stored order of a file whose
    affine was ``original_affine``."""
    back = ornt_transform(axcodes2ornt("RAS"), io_orientation(np.asarray(original_affine)))
    return np.ascontiguousarray(np.stack([apply_orientation(a, back) for a in array]))


def orient_channels(array: np.ndarray, affine, orientation: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``array (C, X, Y, Z)`` and its ``affine`` in the requested voxel order."""
    if orientation in (None, "stored"):
        return array, np.asarray(affine)
    ornt = _to_ras(np.asarray(affine))
    out = np.ascontiguousarray(np.stack([apply_orientation(a, ornt) for a in array]))
    return out, np.asarray(affine) @ inv_ornt_aff(ornt, array.shape[1:])
