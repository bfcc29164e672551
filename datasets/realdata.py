"""Locate real volumes shipped inside PyPI wheels, without importing those packages.

Install the carriers with ``pip install --no-deps nilearn==0.14.* nimare==0.22.* pydicom-data``
(their own dependencies are heavy and not needed: we only read files from them).
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from medvol.errors import InputError

MNI152_2009A = {  # nilearn: MNI152 2009a symmetric, 197x233x189 @ 1 mm, uint8
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
FSL_MNI152 = {  # nimare: FSL MNI152 6th gen asym, brain mask and Harvard-Oxford atlas (2 mm grid)
    "t1_1mm": "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
    "t1_2mm": "nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz",
    "mask_2mm": "nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz",
    "harvard_oxford_2mm": "nimare/resources/atlases/HarvardOxford-cort-maxprob-thr25-2mm.nii.gz",
}


def package_file(dist: str, relpath: str) -> Path:
    """Absolute path of ``relpath`` inside the installed distribution ``dist``."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise InputError(None, f"the real-data package '{dist}' is not installed: "
                               f"pip install --no-deps {dist}") from None
    p = Path(d.locate_file(relpath))
    if not p.is_file():
        raise InputError(p, f"expected inside the installed '{dist}' wheel, but it is missing")
    return p


def pydicom_test_file(name: str) -> Path:
    """A file of pydicom's own test set (``pydicom/data/test_files``) or of pydicom-data."""
    try:
        return package_file("pydicom", f"pydicom/data/test_files/{name}")
    except InputError:
        return package_file("pydicom-data", f"data_store/data/{name}")


def available(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False
