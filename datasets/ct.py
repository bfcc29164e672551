"""CT-sized volumes (512 x 512 x slices, Hounsfield units) built from one real CT slice.

No real CT volume ships inside a wheel, but pydicom-data holds a real 512 x 512 head CT slice
(``693_UNCI.dcm``: skull, brain, air at -1000 HU, the scanner's head rest, -3995 HU outside the
reconstruction circle). Each case stacks that slice into a volume whose head cross-section
grows and shrinks along z like a skull (an ellipsoid profile), rotated in plane and with
scanner-like noise, at its own voxel spacing; labels: brain (1) and bone (2), from the slice's
own Hounsfield units. Used where a benchmark needs CT-sized arrays with CT's properties (no
zero background, so nnU-Net's nonzero crop keeps the whole field of view; CT normalisation);
it is not a substitute for a real CT when accuracy is measured.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from medvol.datasets.realdata import pydicom_test_file
from medvol.io import Volume, write_volume
from medvol.utils import write_json

SLICE = "693_UNCI.dcm"
LABELS = {"background": 0, "brain": 1, "bone": 2}
AIR = -1000
DEFAULT_SPACINGS = ((0.70, 0.70, 1.0), (0.60, 0.60, 1.25), (0.80, 0.80, 0.8))


@lru_cache(maxsize=1)
def load_slice() -> tuple[np.ndarray, np.ndarray]:
    """The real slice in HU as (X, Y) int16 and its brain/bone label map."""
    import pydicom

    ds = pydicom.dcmread(pydicom_test_file(SLICE))
    hu = (ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T
    parts, _ = ndimage.label(hu > 300)
    bone = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1  # the skull, not the head rest
    inside = ndimage.binary_fill_holes(ndimage.binary_closing(bone, iterations=3))
    brain = inside & ~bone & (hu > -100) & (hu < 150)
    label = np.where(bone, LABELS["bone"], np.where(brain, LABELS["brain"], 0)).astype(np.uint8)
    return np.round(hu).astype(np.int16), label


def make_ct_case(slices: int, spacing, seed: int = 0) -> tuple[Volume, Volume]:
    """One case: the slice scaled per z by an ellipsoid profile, rotated by a per-case angle."""
    hu, label = load_slice()
    rs = np.random.RandomState(seed)
    centre = np.array(ndimage.center_of_mass(label > 0))
    angle = np.deg2rad(rs.uniform(-15, 15))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    image = np.empty(hu.shape + (slices,), np.int16)
    seg = np.empty(hu.shape + (slices,), np.uint8)
    for z in range(slices):
        t = (z + 0.5) / slices * 2 - 1  # -1 .. 1 from bottom to top
        scale = np.sqrt(max(1 - (0.95 * t) ** 2, 0.09))
        matrix = rot / scale  # output -> input coordinates about the head's centre
        offset = centre - matrix @ centre
        moved = ndimage.affine_transform(hu.astype(np.float32), matrix, offset, order=1, cval=AIR)
        image[..., z] = np.round(moved + rs.normal(0, 8, moved.shape))  # scanner-like noise
        seg[..., z] = ndimage.affine_transform(label, matrix, offset, order=0, cval=0)
    affine = np.diag([*map(float, spacing), 1.0])
    return Volume(image, affine, {}), Volume(seg, affine, {})


def build_ct_dataset(out: str | Path, cases: int = 3, slices: int = 300, spacings=DEFAULT_SPACINGS,
                     name: str = "Dataset002_HeadCT") -> Path:
    """Write an nnU-Net v2 raw dataset of ``cases`` 512 x 512 x ``slices`` CT cases."""
    out = Path(out)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        image, label = make_ct_case(slices, spacings[i % len(spacings)], seed=i)
        write_volume(image, out / "imagesTr" / f"ct_{i:03d}_0000.nii.gz")
        write_volume(label, out / "labelsTr" / f"ct_{i:03d}.nii.gz")
    meta = {"name": name, "description": "CT-sized head volumes built from the real 512x512 head CT slice "
                                         f"{SLICE} of pydicom-data (see medvol.datasets.ct)",
            "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": cases, "file_ending": ".nii.gz"}
    write_json(out / "dataset.json", meta)
    return out
