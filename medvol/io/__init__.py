"""Scan I/O: ``read_volume`` (NIfTI file, MetaImage/NRRD file or DICOM series folder) and
``write_volume`` (NIfTI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.io.dicom import read_dicom_series
from medvol.io.itk import ITK_SUFFIXES, is_itk, read_itk
from medvol.io.nifti import is_nifti, read_nifti, write_nifti
from medvol.io.volume import Volume, spacing_from_affine

__all__ = ["Volume", "read_volume", "write_volume", "spacing_from_affine", "is_nifti", "is_itk", "ITK_SUFFIXES"]


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI file (``.nii``/``.nii.gz``), a MetaImage/NRRD file (``.mhd``, ``.mha``,
    ``.nrrd``) or a folder holding one DICOM series."""
    path = Path(path)
    if path.is_dir():
        return check_grid(read_dicom_series(path), path)
    if is_nifti(path):
        return check_grid(read_nifti(path), path)
    if is_itk(path):
        return check_grid(read_itk(path), path)
    if not path.exists():
        raise InputError(path, "file not found")
    raise InputError(path, "unknown scan format: expected .nii/.nii.gz, .mhd/.mha/.nrrd or a folder of DICOM files")


def check_grid(volume: Volume, path: str | Path) -> Volume:
    """Refuse a scan with no voxels along an axis, or a voxel size that is zero or not a number."""
    if 0 in volume.array.shape:
        raise InputError(path, f"has a zero-size dimension (shape {tuple(volume.array.shape)})")
    spacing = volume.spacing
    if not all(np.isfinite(s) and s > 0 for s in spacing) or not np.isfinite(volume.affine).all():
        raise InputError(path, f"voxel spacing must be finite and > 0, got {[round(s, 6) for s in spacing]} mm "
                               "(check the header's pixdim / affine)")
    return volume


def write_volume(volume: Volume, path: str | Path, dtype=None) -> Path:
    """Write ``volume`` as NIfTI at ``path`` (atomic; affine kept exactly)."""
    return write_nifti(volume, path, dtype=dtype)
