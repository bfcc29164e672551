"""MetaImage (``.mhd``/``.mha``) and NRRD scans through SimpleITK (LUNA16 ships ``.mhd``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.io.volume import Volume

ITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")


def is_itk(path: str | Path) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def read_itk(path: str | Path) -> Volume:
    """Read a 3D (optionally multi-component) ITK image into a RAS-affine Volume.

    ITK's geometry is LPS: world = origin + direction @ diag(spacing) @ (i, j, k); the RAS
    affine negates the first two rows of it. ITK's array is (z, y, x): transposed to (x, y, z).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InputError(path, f"not a readable ITK image ({msg})") from None
    if img.GetDimension() != 3:
        raise InputError(path, f"expected a 3D image, got {img.GetDimension()}D")
    data = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
    data = np.moveaxis(data, (0, 1, 2), (2, 1, 0))
    direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing(), float)[None, :]
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    meta = {"path": str(path), "format": "itk", "dtype": str(data.dtype), "original_shape": list(data.shape)}
    return Volume(np.ascontiguousarray(data), affine, meta)
