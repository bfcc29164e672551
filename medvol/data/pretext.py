"""Pretext data for PCRL (PCRL, ICCV 2021; ``docs/methods/pcrl.md``): pairs of overlapping random
crops of unlabelled scans,
Models-Genesis distortions, and the indicated flips/rot90 whose indicator conditions the decoder.

One sample, all channel-first ``(C, *patch)`` in [0, 1], as the published dataset
(``pytorch/datasets/luna_pcrl_pretask.py``, ``PCRLLunaPretask.__getitem__``) returns it:
- two crops of one scan picked as the published preparation does (``pytorch/preprocess/
  luna_pre.py``, ``crop_pair``): sides drawn from five published sizes (relative to the
  patch), uniform starts inside a border, IoU of the two boxes > 0.25; each resized
  (trilinear) to ``patch``, optionally through a small random affine: the clean views
  ``g1``, ``g2`` (the published ``gt1``, ``gt2``, the targets of the mixup terms);
- the inputs ``x1``, ``x2``: the views distorted (blur, local pixel shuffle, then in- or
  out-painting with one draw for the pair);
- ``t1``, ``t2``: the *distorted* inputs under a random indicated transform (flip of each
  spatial axis with p = 0.5, then rot90 k ~ U{0..3} in the plane of the first two spatial axes;
  k = 0 when those sizes differ), the published ``mask1``, ``mask2`` (``spatial_aug``), and
  their indicators ``a1``, ``a2`` = ``[flip0, flip1, flip2, onehot(k)]``.
The per-batch draws of a step (the mixing weights alpha1, alpha2, the batch-mixup lambda and
permutation) are the trainer's. Every operation is a vectorised numpy/torch call (no
per-voxel Python loop), run in the data workers; sampling is a pure function of (seed, step,
slot), like the segmentation patches.

Sources: the cases of a preprocessing cache (their z-scored intensities mapped to [0, 1] by
the 0.5/99.5 percentiles of each case) or any folder of scans (NIfTI, MetaImage/NRRD, DICOM
series), converted once by :func:`prepare_scan_folder` (CT: HU window [-1000, 1000] -> [0, 1];
``spacing``: resampled first, linear, as the published 1 mm isotropic resampling).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medvol.data.dataset import StepDataset
from medvol.data.sampling import extract_patch
from medvol.errors import ConfigError, InputError
from medvol.io import read_volume
from medvol.io.discovery import find_scans, scan_id
from medvol.utils import read_json, save_npy, write_json

log = logging.getLogger(__name__)


# Crop sides the published data preparation draws from (``pytorch/preprocess/luna_pre.py``,
# ``col_size``: 64x64x32, 96x96x48, 96x96x96, 32x32x16, 112x112x64 voxels at 1 mm), as multiples
# of its input size 64x64x32, so that they scale with ``data.patch_size``.
PUBLISHED_CROPS = ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5), (1.5, 1.5, 3.0), (0.5, 0.5, 0.5), (1.75, 1.75, 2.0))


@dataclass
class PretextConfig:
    """PCRL's pretext samples (the recipe's ``method.pretext``): the crop pairs (sizes relative
    to the patch, overlap, border), the random affine, the indicated flips/rot90, the
    Models-Genesis distortions (pixel shuffle, in-/out-painting, blur) and, for folders of
    scans, how intensities reach [0, 1] and the spacing they are resampled to first."""

    crop_sizes: tuple = PUBLISHED_CROPS  # crop sides / patch sides per axis; each crop draws one
    min_iou: float = 0.25  # the two crops' boxes overlap with IoU above this (published: > 0.25)
    border: list | None = None  # voxels kept clear of each face, per axis (published LUNA: [70, 70, 15])
    crop_tries: int = 512  # candidate pairs per sample (LUNA at 1 mm passes ~4 %); none passes: the best
    affine_prob: float = 0.3
    affine_deg: float = 10.0
    affine_scale: tuple = (0.9, 1.1)
    flip_prob: float = 0.5  # per axis, in the indicated transforms
    rot90: bool = True  # indicated rot90 in the plane of the first two spatial axes
    shuffle_prob: float = 0.5  # local pixel shuffle
    shuffle_blocks: int = 10000  # blocks per shuffled crop (Models Genesis: 10,000 on 64x64x32)
    paint_prob: float = 0.9  # one draw per pair, as published: both views painted, or neither
    inpaint_prob: float = 0.2  # share of the painted pairs that are in-painted (else out-painted)
    blur_prob: float = 0.4
    blur_sigma: tuple = (0.5, 1.0)
    intensity: str = "percentile"  # scan folders only: percentile | ct (cache cases always by percentiles)
    ct_window: tuple = (-1000.0, 1000.0)
    spacing: list | None = None  # folders only: resample scans to this spacing (mm) first (published: 1 mm)


# ---------------------------------------------------------------- distortions (vectorised)
def local_pixel_shuffle(img: np.ndarray, rng: np.random.Generator, n_blocks: int, max_frac: float = 0.1,
                        groups: int = 4) -> np.ndarray:
    """Shuffle the voxels inside ``n_blocks`` random small blocks (side up to ``max_frac`` of the
    crop); values are drawn from the undistorted crop. Blocks come in ``groups`` sizes, each
    group handled by one gather/scatter."""
    src = np.ascontiguousarray(img)
    out = src.copy()
    c, shape = src.shape[0], np.asarray(src.shape[1:])
    flat_src, flat_out = src.reshape(c, -1), out.reshape(c, -1)
    for n in np.diff(np.linspace(0, n_blocks, groups + 1).astype(int)):
        if n == 0:
            continue
        size = np.array([rng.integers(1, max(1, int(s * max_frac)) + 1) for s in shape])
        corners = rng.integers(0, shape - size + 1, size=(n, 3))
        offs = np.stack(np.meshgrid(*[np.arange(b) for b in size], indexing="ij"), -1).reshape(-1, 3)
        coords = corners[:, None, :] + offs[None]  # (n, m, 3)
        flat = np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), tuple(shape))  # (n, m)
        perm = np.argsort(rng.random(flat.shape), axis=1)
        flat_out[:, flat] = np.take_along_axis(flat_src[:, flat], perm[None], axis=2)
    return out


def _box(rng: np.random.Generator, shape: np.ndarray, lo: float, hi: float) -> tuple[slice, ...]:
    size = np.maximum(1, (shape * rng.uniform(lo, hi, 3)).astype(int))
    start = rng.integers(0, shape - size + 1)
    return (slice(None),) + tuple(slice(a, a + b) for a, b in zip(start, size))


def in_painting(img: np.ndarray, rng: np.random.Generator, max_boxes: int = 5) -> np.ndarray:
    """Up to ``max_boxes`` boxes (1/6 to 1/3 of each side) replaced by uniform noise."""
    out = img.copy()
    shape = np.asarray(img.shape[1:])
    for i in range(max_boxes):
        if i and rng.random() >= 0.95:
            break
        sl = _box(rng, shape, 1 / 6, 1 / 3)
        out[sl] = rng.random(out[sl].shape, dtype=np.float32)
    return out


def out_painting(img: np.ndarray, rng: np.random.Generator, max_boxes: int = 5) -> np.ndarray:
    """Uniform noise everywhere but inside up to ``max_boxes`` boxes (3/7 to 4/7 of each side)."""
    out = rng.random(img.shape, dtype=np.float32)
    shape = np.asarray(img.shape[1:])
    for i in range(max_boxes):
        if i and rng.random() >= 0.95:
            break
        sl = _box(rng, shape, 3 / 7, 4 / 7)
        out[sl] = img[sl]
    return out


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma=(0, sigma, sigma, sigma), mode="nearest").astype(np.float32)


def distort_pair(g1: np.ndarray, g2: np.ndarray, rng: np.random.Generator, cfg: PretextConfig
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The inputs ``x1, x2`` of two clean views, in the published order
    (``pytorch/datasets/luna_pcrl_pretask.py``): blur, local pixel shuffle (each view on its
    own draw), then in- or out-painting, one draw for the pair (both views get the same kind)."""
    views = []
    for img in (g1, g2):
        if rng.random() < cfg.blur_prob:
            img = gaussian_blur(img, rng.uniform(*cfg.blur_sigma))
        if rng.random() < cfg.shuffle_prob:
            img = local_pixel_shuffle(img, rng, cfg.shuffle_blocks)
        views.append(img)
    if rng.random() < cfg.paint_prob:
        paint = in_painting if rng.random() < cfg.inpaint_prob else out_painting
        views = [paint(v, rng) for v in views]
    x1, x2 = (np.ascontiguousarray(v, dtype=np.float32) for v in views)
    return x1, x2


def indicated_transform(img: np.ndarray, rng: np.random.Generator, cfg: PretextConfig
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Random flips then rot90 of a ``(C, X, Y, Z)`` crop, and their 7-number indicator."""
    flips = rng.random(3) < cfg.flip_prob
    k = int(rng.integers(4)) if cfg.rot90 and img.shape[1] == img.shape[2] else 0
    return apply_indicated(img, flips, k), indicator(flips, k)


def apply_indicated(img: np.ndarray, flips: Sequence[bool] | np.ndarray, k: int) -> np.ndarray:
    axes = tuple(a + 1 for a in range(3) if flips[a])
    out = np.flip(img, axes) if axes else img
    return np.ascontiguousarray(np.rot90(out, k, axes=(1, 2)))


def indicator(flips: Sequence[bool] | np.ndarray, k: int) -> np.ndarray:
    ind = np.zeros(7, np.float32)
    ind[:3] = np.asarray(flips, np.float32)
    ind[3 + k] = 1
    return ind


def random_affine(img: np.ndarray, rng: np.random.Generator, max_deg: float, scale: Sequence[float]) -> np.ndarray:
    """Small random rotation (about each axis) and isotropic scaling, trilinear, zero padding."""
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = (rz @ ry @ rx) / rng.uniform(scale[0], scale[1])  # output voxel offsets -> input voxel offsets (X, Y, Z)
    half = np.asarray(img.shape[1:], float) / 2
    m = np.diag(1 / half) @ m @ np.diag(half)  # ... in affine_grid's normalised coordinates
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = torch.from_numpy(m[::-1, ::-1].copy())  # whose order is (Z, Y, X)
    t = torch.from_numpy(np.ascontiguousarray(img))[None]
    grid = F.affine_grid(theta.float(), list(t.shape), align_corners=False)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0].numpy()


def resize(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    if tuple(img.shape[1:]) == tuple(size):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)[0].numpy()


def box_iou(start1: np.ndarray, size1: np.ndarray, start2: np.ndarray, size2: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes ``(start, size)``, along the last axis (any batch shape)."""
    inter = np.clip(np.minimum(start1 + size1, start2 + size2) - np.maximum(start1, start2), 0, None).prod(-1)
    return inter / (size1.prod(-1) + size2.prod(-1) - inter)


def crop_pair(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator, cfg: PretextConfig
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two (start, size) boxes as the published preparation picks them: each crop's sides are
    one of ``crop_sizes`` (times the patch; at most the room inside the border), its start
    uniform inside the volume less ``border``, and the pair is kept when their IoU exceeds
    ``min_iou``; ``crop_tries`` candidates are drawn at once and the first that passes is taken
    (the best, if none does)."""
    vol, window = np.asarray(shape), np.asarray(patch, float)
    border = np.asarray(cfg.border if cfg.border is not None else (0, 0, 0), int)
    border = np.where(vol - 2 * border >= 1, border, 0)  # a volume too small for its border ignores it
    room = vol - 2 * border
    rel = np.asarray(cfg.crop_sizes, float).reshape(-1, 3)
    n = max(1, int(cfg.crop_tries))
    sizes = np.clip(np.round(rel[rng.integers(len(rel), size=(n, 2))] * window).astype(int), 1, room)
    starts = border + np.floor(rng.random((n, 2, 3)) * (room - sizes + 1)).astype(int)
    iou = box_iou(starts[:, 0], sizes[:, 0], starts[:, 1], sizes[:, 1])
    passed = np.flatnonzero(iou > cfg.min_iou)
    i = int(passed[0]) if passed.size else int(np.argmax(iou))
    return [(starts[i, 0], sizes[i, 0]), (starts[i, 1], sizes[i, 1])]


# ---------------------------------------------------------------- sources
def percentile_bounds(image: np.ndarray, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per channel 0.5 / 99.5 percentiles of ``(C, X, Y, Z)`` as ``(C, 1, 1, 1)`` arrays, on
    every ``stride``-th voxel per axis (a memory-mapped case stays cheap); hi > lo always."""
    sub = np.asarray(image[:, ::stride, ::stride, ::stride], dtype=np.float32).reshape(image.shape[0], -1)
    lo, hi = np.percentile(sub, [0.5, 99.5], axis=1).astype(np.float32)
    return lo[:, None, None, None], np.maximum(hi, lo + 1e-6)[:, None, None, None]


class PretextDataset(StepDataset):
    """Map-style dataset indexed by ``step * global_batch + slot`` (see :mod:`medvol.data.dataset`).

    ``root`` is a preprocessing cache (``kind="cache"``) or a folder that
    :func:`prepare_scan_folder` wrote (``kind="folder"``: ``<case>.npy`` already in [0, 1]).
    """

    def __init__(self, root, cases: list[str], kind: str, patch_size: Sequence[int], cfg: PretextConfig,
                 global_batch: int, seed: int = 0):
        if not cases:
            raise ValueError("no scans to draw pretext crops from")
        super().__init__(global_batch, seed)
        self.root, self.cases, self.kind = str(root), list(cases), kind
        self.patch = [int(p) for p in patch_size]
        self.cfg = cfg
        self._volumes: dict = {}  # per worker: case -> (array, lo, hi), lo/hi per channel

    def _volume(self, case: str):
        if case not in self._volumes:
            if self.kind == "cache":
                from medvol.cache import load_case

                image = load_case(self.root, case, mmap=True)[0]
                self._volumes[case] = (image, *percentile_bounds(image, stride=2))
            else:
                self._volumes[case] = (np.load(Path(self.root) / f"{case}.npy", mmap_mode="r"), 0.0, 1.0)
        return self._volumes[case]

    def sample(self, step: int, slot: int, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        image, lo, hi = self._volume(self.cases[int(rng.integers(len(self.cases)))])
        clean = []
        for start, size in crop_pair(image.shape[1:], self.patch, rng, cfg):
            crop = extract_patch(image, start, size, -np.inf).astype(np.float32)
            crop = np.clip((crop - lo) / (hi - lo), 0.0, 1.0)
            crop = resize(crop, self.patch)
            if rng.random() < cfg.affine_prob:
                crop = random_affine(crop, rng, cfg.affine_deg, cfg.affine_scale)
            clean.append(np.ascontiguousarray(crop, dtype=np.float32))
        g1, g2 = clean
        x1, x2 = distort_pair(g1, g2, rng, cfg)
        t1, a1 = indicated_transform(x1, rng, cfg)
        t2, a2 = indicated_transform(x2, rng, cfg)
        arrays = {"x1": x1, "x2": x2, "t1": t1, "t2": t2, "g1": g1, "g2": g2, "a1": a1, "a2": a2}
        out = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}
        out["slot"] = torch.tensor(slot)
        return out


# ---------------------------------------------------------------- scan folders
def to_unit_range(data: np.ndarray, mode: str, ct_window: Sequence[float]) -> np.ndarray:
    """``ct``: clip to the HU window and map it to [0, 1]; ``percentile``: per channel, the
    0.5/99.5 percentiles to [0, 1]."""
    data = data.astype(np.float32, copy=False)
    if mode == "ct":
        lo, hi = float(ct_window[0]), float(ct_window[1])
        return np.clip((data - lo) / (hi - lo), 0, 1)
    p_lo, p_hi = percentile_bounds(data)
    return np.clip((data - p_lo) / (p_hi - p_lo), 0, 1)


def prepare_scan_folder(folder: str | Path, out_dir: str | Path, cfg: PretextConfig, quiet: bool = False
                        ) -> list[str]:
    """Convert every scan under ``folder`` to ``out_dir/<name>.npy`` (C, X, Y, Z), float16 in
    [0, 1]; returns the names. A scan that cannot be read (or holds NaNs) is reported in one
    line naming the file and skipped; the others carry on. Done scans are kept on a rerun."""
    from tqdm import tqdm

    folder, out_dir = Path(folder), Path(out_dir)
    scans = find_scans(folder, recursive=True)
    if not scans:
        raise ConfigError(f"{folder}: no plans.json (not a preprocessing cache) and no scans found "
                          f"(NIfTI, MetaImage/NRRD or DICOM series)")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {"scans": {}, "failed": {}}
    mode = cfg.intensity
    if mode not in ("percentile", "ct"):
        raise ConfigError(f"method.pretext.intensity '{mode}' is unknown; known: percentile, ct")
    if not cfg.spacing:  # crops of a fixed voxel size mean other anatomy at every spacing
        log.warning("%s: scans are pretrained at their own spacing; set method.pretext.spacing (published: "
                    "1 mm; the crops of pcrl_demo suit 3 mm) so that crops cover the same anatomy", folder)
    names = []
    for p in tqdm(scans, desc="pretext scans", unit="scan", disable=quiet or not sys.stderr.isatty()):
        name = scan_id(folder, p)
        target = out_dir / f"{name}.npy"
        if name in manifest["scans"] and target.exists():
            names.append(name)
            continue
        try:
            vol = read_volume(p)
            data = vol.channel_first()
            if not np.isfinite(data).all():
                raise InputError(p, "image holds NaN or infinite values")
            if cfg.spacing:
                from medvol.resampling import compute_new_shape, resample_image

                shape = compute_new_shape(data.shape[1:], vol.spacing, cfg.spacing)
                data = resample_image(data, shape, vol.spacing, cfg.spacing, order="linear")
            save_npy(target, to_unit_range(data, mode, cfg.ct_window).astype(np.float16))
        except InputError as e:
            log.error("%s", e)
            manifest["failed"][name] = str(e)
            continue
        manifest["scans"][name] = {"source": str(p), "shape": list(data.shape)}
        manifest["failed"].pop(name, None)
        names.append(name)
    write_json(manifest_path, manifest)
    if not names:
        raise ConfigError(f"{folder}: none of the {len(scans)} scans could be read (see {manifest_path})")
    return names
