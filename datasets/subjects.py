"""Subject-level demo data: brain scans whose subject class depends on what their slices show.

Every scan is the real MNI152 2009a T1 that nilearn ships
(``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, through
:func:`medvol.datasets.brain.make_case`), seen with its own crop, flips, intensity and noise.
Two scans in three get one bright ellipsoidal "lesion" inside the brain: half of those large,
half small, each with its own size, shape and position. Slices run along the last array axis
(Z of the written files), the axis ``slice_labels.csv`` indexes.

- voxel label (``labelsTr``): 1 inside the lesion, 0 elsewhere;
- slice label: 1 when the slice holds any lesion voxel;
- subject label: 1 when some slice's lesion cross-section is at least ``threshold_mm2``.

A scan with a small lesion is therefore negative although some of its slices are positive: the
subject class depends on how much lesion the slices hold, not on whether a positive slice exists.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from scipy import ndimage

from medvol.datasets.brain import Acquisition, make_case
from medvol.io import Volume, write_volume
from medvol.utils import write_json, write_text

KINDS = ("large", "small", "none")
# In-plane semi-axes (mm) per kind; with the default threshold (80 mm^2) a large lesion's widest
# cross-section (pi * a * b >= 154 mm^2) is well above it and a small one's (<= 50 mm^2) well below.
IN_PLANE_MM = {"large": (7.0, 12.0), "small": (2.0, 4.0)}
THROUGH_PLANE_MM = {"large": (4.0, 10.0), "small": (2.0, 4.0)}


def random_acquisition(rng: np.random.Generator, spacing: float, seed: int,
                       slice_spacing: float | None = None) -> Acquisition:
    """``spacing`` in-plane and ``slice_spacing`` (default: ``spacing``) along Z; random flips,
    low-end crop, intensity scale/shift and noise."""
    flip = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
    crop = tuple(float(c) for c in rng.uniform(0.0, 0.1, 3))
    intensity = (float(rng.uniform(0.7, 1.3)), float(rng.uniform(0.0, 20.0)))
    return Acquisition((spacing, spacing, slice_spacing or spacing), flip=flip, crop=crop, intensity=intensity,
                       noise=float(rng.uniform(0.0, 0.03)), seed=seed)


def ellipsoid_mask(shape: tuple[int, ...], spacing: np.ndarray, centre: np.ndarray,
                   semi_axes_mm: np.ndarray) -> np.ndarray:
    """Boolean mask of the voxels whose centres lie inside an axis-aligned ellipsoid
    (``centre`` a voxel index, so that voxel is always inside)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - c) * s / a) ** 2 for g, c, s, a in zip(grids, centre, spacing, semi_axes_mm))
    return r2 <= 1.0


def insert_lesion(image: np.ndarray, brain: np.ndarray, spacing: np.ndarray, kind: str,
                  rng: np.random.Generator) -> np.ndarray:
    """Brighten a random ellipsoid of ``kind`` inside ``brain`` (in place); returns its mask,
    restricted to the head (image > 0) so no lesion voxel lies in the air."""
    lo, hi = IN_PLANE_MM[kind]
    semi = np.r_[rng.uniform(lo, hi, 2), rng.uniform(*THROUGH_PLANE_MM[kind])]
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    inside = np.argwhere(depth >= semi.max())
    if not len(inside):  # a tiny brain: its deepest voxel
        inside = np.argwhere(depth == depth.max())
    centre = inside[rng.integers(len(inside))]
    mask = ellipsoid_mask(image.shape, spacing, centre, semi) & (image > 0)
    bright = 0.9 * np.percentile(image[image > 0], 99)
    image[mask] = 0.4 * image[mask] + bright
    return mask


def slice_areas_mm2(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Lesion cross-section (mm^2) of each slice along the last axis."""
    return mask.sum(axis=(0, 1)) * float(spacing[0] * spacing[1])


def make_subject(acq: Acquisition, kind: str, rng: np.random.Generator,
                 with_brain: bool = False) -> tuple[Volume, ...]:
    """Image and lesion-label volumes of one scan (no lesion when ``kind == "none"``), and with
    ``with_brain`` the brain mask (the template's tissue classes) as a third volume."""
    image, tissue = make_case(acq)
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    img = image.array.copy()
    mask = np.zeros(img.shape, bool)
    brain = tissue.array > 0
    if kind != "none":
        mask = insert_lesion(img, brain, spacing, kind, rng)
    out = (Volume(img, image.affine, {}), Volume(mask.astype(np.uint8), image.affine, {}))
    return (*out, Volume(brain.astype(np.uint8), image.affine, {})) if with_brain else out


def slice_label_rows(subject: str, areas: np.ndarray, threshold_mm2: float) -> list[tuple]:
    """``(subject, slice_index, label)`` per slice (lesion present), then the subject's own row."""
    rows = [(subject, z, int(a > 0)) for z, a in enumerate(areas)]
    return rows + [(subject, "", int(bool((areas >= threshold_mm2).any())))]


def build_subject_dataset(out: str | Path, n: int = 12, spacing: float = 2.0, threshold_mm2: float = 80.0,
                          seed: int = 0, name: str = "Dataset031_BrainLesionSubjects",
                          slice_spacing: float | None = None) -> Path:
    """Write ``n`` scans in the nnU-Net v2 layout (``imagesTr/<case>_0000.nii.gz``,
    ``labelsTr/<case>.nii.gz`` with the lesion as label 1, ``dataset.json``) and
    ``slice_labels.csv`` beside them (per-slice and subject labels, see the module docstring).
    ``spacing`` (mm) in-plane, ``slice_spacing`` along Z, default ``1.5 * spacing``: Z is then
    the coarsest axis, the one the 2d plan slices across, as the CSV's slice indices need
    (with isotropic scans the plan would pick whichever axis the crops left coarsest).
    The same ``seed`` writes the same dataset."""
    slice_spacing = slice_spacing or 1.5 * spacing
    out = Path(out)
    rng = np.random.default_rng(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows: list[tuple] = []
    for i, kind in enumerate(kinds):
        case = f"subject_{i:03d}"
        image, label = make_subject(random_acquisition(rng, spacing, seed * 1000 + i, slice_spacing), kind, rng)[:2]
        write_volume(image, out / "imagesTr" / f"{case}_0000.nii.gz")
        write_volume(label, out / "labelsTr" / f"{case}.nii.gz")
        areas = slice_areas_mm2(label.array > 0, np.linalg.norm(label.affine[:3, :3], axis=0))
        rows += slice_label_rows(case, areas, threshold_mm2)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows([("subject", "slice_index", "label"), *rows])
    write_text(out / "slice_labels.csv", buf.getvalue())
    meta = {
        "name": name,
        "description": f"MNI152 2009a T1 (nilearn wheel) with varied crops, flips, intensities and noise; some "
                       f"scans hold one bright ellipsoidal lesion (label 1). slice_labels.csv: a slice is 1 when "
                       f"it holds lesion voxels (slices along the last axis); a subject is 1 when some slice's "
                       f"lesion cross-section is >= {threshold_mm2:g} mm^2, so small lesions make negatives.",
        "reference": "Fonov et al. 2009/2011 (MNI ICBM152 2009a); files from the nilearn wheel",
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    write_json(out / "dataset.json", meta)
    return out


def slice_grades(areas: np.ndarray, threshold_mm2: float) -> np.ndarray:
    """Per slice: 0 no lesion, 1 a cross-section below ``threshold_mm2``, 2 at or above it."""
    return np.where(areas <= 0, 0, np.where(areas < threshold_mm2, 1, 2)).astype(np.int64)


def build_graded_subjects(out: str | Path, n: int = 30, spacing: float = 4.0, threshold_mm2: float = 80.0,
                          seed: int = 0, min_brain_fraction: float = 0.3,
                          labelled: list[str] | None = None) -> tuple[Path, dict[str, int]]:
    """Graded slices for DC-MT (``datasets/dcmt.py``'s subject stacks): ``n`` scans made as in
    :func:`build_subject_dataset` (the REAL MNI152 T1 with SYNTHETIC lesions: the lesions and
    so the grades are made up, the anatomy is not), isotropic ``spacing`` mm, each written as the stack of its axial
    slices whose brain area is at least ``min_brain_fraction`` of its largest (slices through
    the brain, as DC-MT takes slices through the knee, chosen without looking at the lesion).
    Slice grade (:func:`slice_grades`): 0 no lesion, 1 a small cross-section, 2 one of at least
    ``threshold_mm2``; subject grade = the maximum of its slice grades (DC-MT's rule; large
    lesions make 2, small ones 1, none 0). Region mask (DC-MT's attention target) = the brain:
    like the knee's cartilage band it is on every slice, whatever the grade, and marks where a
    finding can lie. ``labelled``: the semi-supervised split written to ``dataset.json``.
    Returns ``(out, {subject: grade})``."""
    from medvol.datasets.dcmt import GradedSlice, write_subject_stacks

    rng = np.random.default_rng(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    slices, grades = [], {}
    for i, kind in enumerate(kinds):
        case = f"subject_{i:03d}"
        image, lesion, brain = make_subject(random_acquisition(rng, spacing, seed * 1000 + i),
                                            kind, rng, with_brain=True)
        sp = np.linalg.norm(image.affine[:3, :3], axis=0)
        g = slice_grades(slice_areas_mm2(lesion.array > 0, sp), threshold_mm2)
        area = brain.array.sum(axis=(0, 1))
        keep = np.flatnonzero(area >= min_brain_fraction * area.max())
        grades[case] = int(g[keep].max())
        slices += [GradedSlice(case, f"{case}_z{z:03d}", image.array[None, :, :, z].astype(np.float32),
                               brain.array[:, :, z].astype(np.uint8), int(g[z])) for z in keep]
    write_subject_stacks(slices, out, labelled=labelled, name="Dataset041_BrainGradedSlices",
                         description="Real MNI152 2009a T1 (nilearn wheel) with SYNTHETIC ellipsoidal lesions: "
                                     "slice grade 0 none, 1 small, 2 large cross-section (>= "
                                     f"{threshold_mm2:g} mm^2); subject grade = max; region = the brain mask.")
    return Path(out), grades
