"""Brain-tissue datasets built from the real MNI152 2009a template that nilearn ships.

Labels are background / grey matter / white matter = argmax of (255 - GM - WM, GM, WM)
probability maps. Each case is the same real head seen through a different acquisition:
resampled to another spacing, flipped to another orientation (LPS, ...), with an oblique
affine, a cropped field of view, or rescaled intensities with noise. Sources:
``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from medvol.datasets.realdata import FSL_MNI152, MNI152_2009A, package_file
from medvol.io import Volume, write_volume
from medvol.utils import write_json

LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
# Small structures: five Harvard-Oxford cortical regions (left and right are one region in this
# atlas) within the template's grey matter, value -> Harvard-Oxford index.
GYRI = {"heschl_gyrus": 45, "frontal_operculum": 41, "planum_polare": 44, "supracalcarine_cortex": 47,
        "superior_temporal_gyrus_anterior": 9}
GYRI_LABELS = {"background": 0, **{name: i + 1 for i, name in enumerate(GYRI)}}


@dataclass
class Acquisition:
    """How one synthetic case views the real template."""

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    flip: tuple[int, ...] = ()  # array axes to flip (e.g. (0, 1) turns RAS storage into LPS)
    oblique_deg: float = 0.0  # rotation of the world placement about the z axis
    crop: tuple[float, float, float] = (0.0, 0.0, 0.0)  # fraction removed from the low end per axis
    intensity: tuple[float, float] = (1.0, 0.0)  # scale, shift (MRI units are arbitrary)
    noise: float = 0.0  # Gaussian noise std (relative to the image's 99th percentile), inside the head
    seed: int = 0
    extra: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 float32 (X,Y,Z), probabilities float32 (3,X,Y,Z) in [0,1], affine) at 1 mm."""
    t1 = nib.load(package_file("nilearn", MNI152_2009A["t1"]))
    gm = np.asarray(nib.load(package_file("nilearn", MNI152_2009A["gm"])).dataobj, np.float32)
    wm = np.asarray(nib.load(package_file("nilearn", MNI152_2009A["wm"])).dataobj, np.float32)
    bg = np.clip(255.0 - gm - wm, 0, None)
    probs = np.stack([bg, gm, wm]) / 255.0
    return np.asarray(t1.dataobj, np.float32), probs, t1.affine.copy()


@lru_cache(maxsize=1)
def load_gyri() -> np.ndarray:
    """Probabilities float32 (6, X, Y, Z) on the template's 1 mm grid: background and the five
    ``GYRI`` regions, each = grey-matter probability x the region's Harvard-Oxford mask (its
    2 mm maxprob map, sampled at each template voxel's world position, nearest neighbour). The
    atlas is in FSL's MNI152 (6th gen) space, the template in 2009a: a few mm apart, enough for
    real gyral shapes, not an anatomical atlas of this template."""
    _, probs, affine = load_template()
    ho = nib.load(package_file("nimare", FSL_MNI152["harvard_oxford_2mm"]))
    atlas = np.asarray(ho.dataobj)
    ijk = np.indices(probs.shape[1:]).reshape(3, -1)
    to_atlas = np.linalg.inv(ho.affine) @ affine
    idx = np.rint(to_atlas[:3, :3] @ ijk + to_atlas[:3, 3:]).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array(atlas.shape)[:, None]), axis=0)
    region = np.zeros(ijk.shape[1], atlas.dtype)
    region[inside] = atlas[tuple(idx[:, inside])]
    region = region.reshape(probs.shape[1:])
    out = np.stack([np.zeros_like(probs[1])] + [probs[1] * (region == r) for r in GYRI.values()])
    out[0] = 1.0 - out[1:].sum(0)
    return out


def _resample(arr: np.ndarray, affine: np.ndarray, src_spacing, dst_spacing, order: int):
    zoom = np.asarray(src_spacing, float) / np.asarray(dst_spacing, float)
    new_shape = np.maximum(np.round(np.array(arr.shape[-3:]) * zoom).astype(int), 1)
    scale = np.array(arr.shape[-3:]) / new_shape  # exact index scale after rounding
    import torch  # torch's trilinear (half-pixel centres) is the same grid as ndimage.zoom(grid_mode=True)

    mode = "trilinear" if order == 1 else "nearest-exact"
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(arr.reshape(1, -1, *arr.shape[-3:]), dtype=np.float32))
        out = torch.nn.functional.interpolate(t, size=tuple(int(v) for v in new_shape), mode=mode,
                                              align_corners=False if order == 1 else None)
    out = out[0].numpy().reshape(*arr.shape[:-3], *new_shape)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = (scale - 1) / 2  # new voxel centre i sits at old index (i + 0.5) * s - 0.5
    return out, affine @ m


def make_case(acq: Acquisition, labels: str = "tissue") -> tuple[Volume, Volume]:
    """Image and label volumes of one acquisition of the template; ``labels="gyri"``: the
    five small ``GYRI`` regions instead of the tissue classes."""
    t1, probs, affine = load_template()
    if labels == "gyri":
        probs = load_gyri()
    stacked = np.concatenate([t1[None], probs])
    stacked, affine = _resample(stacked, affine, (1.0, 1.0, 1.0), acq.spacing, order=1)
    image, probs = stacked[0], stacked[1:]
    label = np.argmax(probs, axis=0).astype(np.uint8)
    image[image < 1e-3] = 0  # keep the true zero background that cropping relies on

    if any(acq.crop):
        start = [int(round(f * n)) for f, n in zip(acq.crop, image.shape)]
        sl = tuple(slice(s, None) for s in start)
        image, label = image[sl], label[sl]
        t = np.eye(4)
        t[:3, 3] = start
        affine = affine @ t
    for ax in acq.flip:
        image, label = np.flip(image, ax), np.flip(label, ax)
        f = np.eye(4)
        f[ax, ax] = -1
        f[ax, 3] = image.shape[ax] - 1
        affine = affine @ f
    if acq.oblique_deg:
        c = affine @ np.r_[(np.array(image.shape) - 1) / 2, 1]
        th = np.deg2rad(acq.oblique_deg)
        rot = np.eye(4)
        rot[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
        tr, tr_back = np.eye(4), np.eye(4)
        tr[:3, 3], tr_back[:3, 3] = -c[:3], c[:3]
        affine = tr_back @ rot @ tr @ affine
    rng = np.random.default_rng(acq.seed)
    image = image * acq.intensity[0] + acq.intensity[1] * (image > 0)
    if acq.noise:
        head = image > 0
        image[head] += rng.normal(0, acq.noise * np.percentile(image[head], 99), head.sum())
        image[head] = np.maximum(image[head], 1e-3)
    image = np.ascontiguousarray(image, np.float32)
    return Volume(image, affine, {}), Volume(np.ascontiguousarray(label), affine, {})


def default_acquisitions(n: int, base_spacing: float = 2.0) -> list[Acquisition]:
    """``n`` varied acquisitions: spacings, orientations, FOVs and intensities differ."""
    s = base_spacing
    pool = [
        Acquisition((s, s, s)),
        Acquisition((s, s, s), flip=(0, 1), intensity=(0.8, 20.0), noise=0.02, seed=1),  # LPS storage
        Acquisition((0.8 * s, 0.8 * s, 1.3 * s), noise=0.03, seed=2),
        Acquisition((1.2 * s, 1.2 * s, 1.2 * s), oblique_deg=12.0, intensity=(1.3, -5.0), seed=3),
        Acquisition((s, s, 1.5 * s), crop=(0.1, 0.15, 0.2), noise=0.02, seed=4),
        Acquisition((0.9 * s, 1.1 * s, s), flip=(2,), intensity=(0.6, 0.0), seed=5),
        Acquisition((s, s, s), crop=(0.0, 0.25, 0.0), oblique_deg=-8.0, noise=0.04, seed=6),
        Acquisition((1.1 * s, 1.1 * s, 1.1 * s), flip=(0,), intensity=(1.1, 10.0), noise=0.01, seed=7),
    ]
    out = []
    for i in range(n):
        a = pool[i % len(pool)]
        if i >= len(pool):  # later rounds: same kinds, other noise and scale
            a = Acquisition(a.spacing, a.flip, a.oblique_deg, a.crop, (a.intensity[0] * 0.9, a.intensity[1]),
                            max(a.noise, 0.02), seed=100 + i)
        out.append(a)
    return out


def build_brain_dataset(out: str | Path, n_train: int = 8, n_test: int = 2, base_spacing: float = 2.0,
                        acquisitions: list[Acquisition] | None = None,
                        name: str = "Dataset001_BrainTissue", binary: str | None = None,
                        labelled_cases: int | None = None, labels: str = "tissue") -> Path:
    """Write an nnU-Net v2 raw dataset (``dataset.json``, ``imagesTr``, ``labelsTr``,
    ``imagesTs``, ``labelsTs``) of brain-tissue cases built from the real template.

    ``binary="white_matter"`` (or "grey_matter") makes a one-structure task; with
    ``labelled_cases=k`` the dataset declares only its first k training cases labelled
    (semi-supervised), the other labels staying on disk for evaluation. ``labels="gyri"``: five
    small cortical regions (``GYRI_LABELS``) instead of the tissue classes."""
    out = Path(out)
    acqs = acquisitions or default_acquisitions(n_train + n_test, base_spacing)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i, acq in enumerate(acqs):
        image, label = make_case(acq, labels)
        if binary:
            label = Volume((label.array == LABELS[binary]).astype(np.uint8), label.affine, {})
        train = i < len(acqs) - n_test
        case = f"brain_{i:03d}"
        write_volume(image, out / ("imagesTr" if train else "imagesTs") / f"{case}_0000.nii.gz")
        write_volume(label, out / ("labelsTr" if train else "labelsTs") / f"{case}.nii.gz")
    meta = {
        "name": name,
        "description": ("Five Harvard-Oxford cortical regions within the grey matter" if labels == "gyri" else
                        "Brain tissue (background/GM/WM)") + " of the MNI152 2009a template shipped by nilearn, "
                       "seen through varied spacings, orientations, fields of view and intensities.",
        "reference": "Fonov et al. 2009/2011 (MNI ICBM152 2009a); files from the nilearn wheel"
                     + ("; Harvard-Oxford cortical atlas (Desikan et al. 2006), from the nimare wheel"
                        if labels == "gyri" else ""),
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, binary: 1} if binary else GYRI_LABELS if labels == "gyri" else LABELS,
        "numTraining": len(acqs) - n_test,
        "file_ending": ".nii.gz",
    }
    if labelled_cases is not None:
        meta["labelled_cases"] = [f"brain_{i:03d}" for i in range(labelled_cases)]
    write_json(out / "dataset.json", meta)
    return out


PARTIAL_TASKS = {"0": {"name": "brain", "organ": [1, 2], "tumour": None},
                 "1": {"name": "white_matter", "organ": None, "tumour": [2]}}


def build_brain_partial_dataset(out: str | Path, n_train: int = 8, n_test: int = 2, base_spacing: float = 2.0,
                                acquisitions: list[Acquisition] | None = None) -> Path:
    """A partially labelled brain dataset for DoDNet: even cases are annotated for the whole
    brain only (task 0, "organ" channel), odd cases for white matter only (task 1, "tumour"
    channel); no case is fully labelled. Label files keep all tissue values; the tasks'
    rules in dataset.json say which of them each task's annotators drew."""
    out = build_brain_dataset(out, n_train, n_test, base_spacing, acquisitions, name="Dataset021_BrainPartial")
    meta = json.loads((out / "dataset.json").read_text())
    n = n_train + n_test
    meta["tasks"] = PARTIAL_TASKS
    meta["case_tasks"] = {f"brain_{i:03d}": {"task_id": i % 2, "annotated": [1, 0] if i % 2 == 0 else [0, 1]}
                          for i in range(n)}
    write_json(out / "dataset.json", meta)
    return out
