"""The preprocessing cache on disk (format version 3).

``OUT/`` holds ``dataset.json`` (the raw dataset's description), ``fingerprint.json``,
``plans.json`` and per training case, under ``OUT/cases/``:

- ``<case>.npy``: image, float32 (or float16 by plan), ``(C, X, Y, Z)``, C-contiguous, so
  training reads patches through a memory map without loading the case;
- ``<case>_seg.npy``: label, int8 (int16 when labels exceed 127), ``(1, X, Y, Z)``; -1 marks
  background outside the nonzero mask (nnU-Net's convention);
- ``<case>_locations.npz`` (labelled cases): per class ``"<value>"`` an ``(n, 3)`` int32
  array of sampled foreground voxels for oversampling (a binary file: as JSON these were
  most of preprocessing's writing time), and with an ignore label ``"annotated"``, voxels
  of any other value;
- ``<case>.json``: small properties (original shape/affine/spacing, crop box, resampled
  shape, sources, ...). Written last: it marks a finished case. ``load_case`` puts the
  locations back under ``class_locations``.

Format version 3 (2 gave label ties in resampling to the lower label, where 3 gives them to
the nearest voxel's, as nnU-Net does; 1 kept the locations inside the JSON). The version is
part of every case's plan digest, so a cache of another version is redone, never misread.

Per-case fingerprints live in ``OUT/fingerprints/``; cropped arrays waiting for the plan
in ``OUT/staging/`` (removed as each case finishes).

An *overlay* (:func:`link_overlay`) is a cache of its own that starts as a view of another:
its top-level files are copies and its case files symbolic links to the other cache's. A case
written into the overlay (:func:`write_label`: Semi-Inf-Net's pseudo-labels) replaces its links
with files of its own; every write here goes to a temporary name renamed over the link, so the
linked cache is never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from medvol.errors import CacheError, InputError
from medvol.labels import LabelScheme
from medvol.utils import atomic_path, read_json, save_npy, write_json

CACHE_VERSION = 3
SPLITS_FILE = "splits_final.json"  # nnU-Net's cross-validation folds, beside the raw data and in the cache
NUM_LOCATION_SAMPLES = 10_000
MIN_LOCATION_COVERAGE = 0.01


def check_splits(splits, path: Path, case_ids, where: str) -> None:
    """``splits`` (read from ``path``) is nnU-Net's list of folds, each ``train`` and ``val``
    listing distinct case ids of ``case_ids`` (the ``where``: cache or dataset), none in both."""
    if not isinstance(splits, list) or not all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list)
            for s in splits):
        raise InputError(path, 'must be a list of {"train": [...], "val": [...]} (nnU-Net\'s format)')
    for k, s in enumerate(splits):
        for key in ("train", "val"):
            bad = [c for c in s[key] if not isinstance(c, str)]
            if bad:
                raise InputError(path, f"fold {k}: '{key}' must list case ids (strings), got {bad[0]!r}")
            twice = sorted(c for c, n in Counter(s[key]).items() if n > 1)
            if twice:
                raise InputError(path, f"fold {k}: '{key}' names '{twice[0]}' twice")
        both = sorted(set(s["train"]) & set(s["val"]))
        if both:  # the fold would validate on cases it trained on
            raise InputError(path, f"fold {k}: case(s) {both[:5]} are in both 'train' and 'val'")
    unknown = sorted({c for s in splits for c in s["train"] + s["val"]} - set(case_ids))
    if unknown:
        raise InputError(path, f"names cases that are not in the {where}: {unknown[:5]}")


def cases_dir(out: Path) -> Path:
    return Path(out) / "cases"


def plans_digest(plans: dict) -> str:
    """What a cached case was made with: the plan and the cache format version. The extra
    ``configurations`` (the 2d plan) are left out: 2d training slices this same cache."""
    plans = {k: v for k, v in plans.items() if k != "configurations"}
    key = json.dumps({"plans": plans, "cache_version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def case_paths(out: Path, case_id: str) -> tuple[Path, Path, Path]:
    d = cases_dir(out)
    return d / f"{case_id}.npy", d / f"{case_id}_seg.npy", d / f"{case_id}.json"


def locations_path(out: Path, case_id: str) -> Path:
    return cases_dir(out) / f"{case_id}_locations.npz"


def save_locations(out: Path, case_id: str, locations: dict[str, np.ndarray]) -> None:
    with atomic_path(locations_path(out, case_id)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v, np.int32) for k, v in locations.items()})  # type: ignore[arg-type]


def sample_class_locations(seg: np.ndarray, classes: Iterable[int], seed: int = 1234) -> dict[str, np.ndarray]:
    """Up to 10,000 voxel positions (x, y, z) per class (at least 1 % of its voxels), for
    foreground oversampling, as ``(n, 3)`` int32 arrays; fixed seed, as nnU-Net."""
    rng = np.random.default_rng(seed)  # draws n of N in O(n) (RandomState permutes all N)
    flat = seg.reshape(-1)
    return {str(c): _sample_voxels(np.flatnonzero(flat == c), seg.shape[1:], rng) for c in classes}


ANNOTATED = "annotated"  # the locations key of the voxels not of the ignore label (medvol.labels)


def label_locations(seg: np.ndarray, scheme: LabelScheme, seed: int = 1234) -> dict[str, np.ndarray]:
    """:func:`sample_class_locations` of the scheme's foreground labels; with an ignore label
    also :data:`ANNOTATED`, the voxels of any other value (nnU-Net then centres even its
    random patches on annotated voxels)."""
    fg = [v for v in scheme.label_values if v > 0]
    out = sample_class_locations(seg, fg, seed)
    if scheme.ignore_label is not None:
        rng = np.random.default_rng(seed + 1)
        out[ANNOTATED] = _sample_voxels(np.flatnonzero(seg.reshape(-1) != scheme.ignore_label), seg.shape[1:], rng)
    return out


def _sample_voxels(idx: np.ndarray, spatial, rng: np.random.Generator) -> np.ndarray:
    if idx.size == 0:
        return np.zeros((0, len(spatial)), np.int32)
    n = max(min(NUM_LOCATION_SAMPLES, idx.size), int(np.ceil(idx.size * MIN_LOCATION_COVERAGE)))
    chosen = idx[rng.choice(idx.size, n, replace=False)]
    return np.stack(np.unravel_index(chosen, spatial), axis=1).astype(np.int32)


def link_overlay(src: Path, dst: Path) -> None:
    """Make ``dst`` an overlay of the cache ``src`` (see the module's docstring): ``src``'s
    top-level files copied, its case files linked. Idempotent: files already in ``dst`` (copies,
    links, or cases written there) are left as they are; only what is missing is added."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CacheError(f"{dst}: an overlay cannot be the cache it links ({src})")
    cases_dir(dst).mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
    for f in cases_dir(src).iterdir():
        link = cases_dir(dst) / f.name
        if f.is_file() and not f.name.startswith(".") and not (link.exists() or link.is_symlink()):
            os.symlink(f.resolve(), link)


def write_label(out: Path, case_id: str, seg: np.ndarray, props: dict, classes: Iterable[int]) -> None:
    """Give ``case_id`` of the cache ``out`` the label ``seg`` ``(1, X, Y, Z)`` (stored as int8):
    the label, the sampled locations of ``classes``, then ``props`` with ``has_label: true``,
    written last as it marks the case finished. Each file replaces what was there (in an
    overlay, a link: the linked cache is not written)."""
    _, seg_path, props_path = case_paths(out, case_id)
    seg = np.asarray(seg).astype(np.int8)
    save_npy(seg_path, seg)
    save_locations(out, case_id, sample_class_locations(seg, classes))
    write_json(props_path, {**props, "has_label": True})


def load_locations(out: Path, case_id: str) -> dict[str, np.ndarray]:
    path = locations_path(out, case_id)
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CacheError(f"{path}: missing or corrupt; rerun `medvol preprocess` (it redoes broken cases) ({e})") \
            from None


def case_is_complete(out: Path, case_id: str, digest: str | None = None) -> bool:
    """True when the case's arrays and properties are all there, consistent, and (when
    ``digest`` is given) were made with that plan."""
    img, seg, props = case_paths(out, case_id)
    if not props.exists() or not img.exists():
        return False
    try:
        p = read_json(props)
        if digest is not None and p.get("plans_digest") != digest:
            return False
        arr = np.load(img, mmap_mode="r")
        if list(arr.shape[1:]) != p["shape_after_resampling"]:
            return False
        if p.get("has_label"):
            if not seg.exists() or list(np.load(seg, mmap_mode="r").shape[1:]) != p["shape_after_resampling"]:
                return False
            if not locations_path(out, case_id).exists():
                return False
    except (ValueError, KeyError, OSError, json.JSONDecodeError):
        return False
    return True


def list_cases(out: str | Path) -> list[str]:
    """Finished case ids in the cache, sorted."""
    d = cases_dir(Path(out))
    if not d.is_dir():
        raise CacheError(f"{out}: not a medvol preprocessing cache (no cases/ folder); run `medvol preprocess`")
    return sorted(p.stem for p in d.glob("*.json") if not p.name.startswith("."))


def load_case(out: str | Path, case_id: str, mmap: bool = True):
    """``(image (C, X, Y, Z) float32, label (1, X, Y, Z) int or None, properties)``.

    With ``mmap`` the arrays are read-only memory maps (patches are read lazily).
    """
    out = Path(out)
    img, seg, props = case_paths(out, case_id)
    if not props.exists():
        raise CacheError(f"{props}: case '{case_id}' is not in the cache (or unfinished); rerun `medvol preprocess`")
    p = read_json(props)
    mode: Literal["r"] | None = "r" if mmap else None
    image = _load_array(img, mode, p)
    if image.dtype != np.float32 and not mmap:
        image = image.astype(np.float32)
    label = _load_array(seg, mode, p) if p.get("has_label") and seg.exists() else None
    if label is not None:
        p["class_locations"] = load_locations(out, case_id)
    return image, label, p


def _load_array(path: Path, mode, props: dict) -> np.ndarray:
    """One cached array, checked against its case's properties; a truncated or damaged file
    is a CacheError naming it (``medvol preprocess`` redoes such cases)."""
    fix = "truncated or corrupt cache array; rerun `medvol preprocess` (it redoes broken cases)"
    try:
        arr = np.load(path, mmap_mode=mode)
    except FileNotFoundError:
        raise CacheError(f"{path}: missing; rerun `medvol preprocess` (it redoes broken cases)") from None
    except (ValueError, OSError, EOFError) as e:
        raise CacheError(f"{path}: {fix} ({e})") from None
    if list(arr.shape[1:]) != props.get("shape_after_resampling", list(arr.shape[1:])):
        raise CacheError(f"{path}: shape {list(arr.shape)} does not match its properties; {fix}")
    return arr


LOWRES_DIR = "3d_lowres"  # the 3d_lowres cases: a cache of their own inside the fullres cache


def configuration_cache(out: str | Path, configuration: str) -> Path:
    """The cache a configuration trains on: for ``3d_lowres`` the folder ``3d_lowres/`` inside
    the fullres cache ``out`` (or ``out`` itself when it is that folder), for the others ``out``.
    A plan without a 3d_lowres configuration is a ConfigError; one whose lowres cases are not
    cached yet a CacheError."""
    from medvol.errors import ConfigError
    from medvol.plans import LOWRES, lowres_plans

    out = Path(out)
    marked = read_json(out / "plans.json").get("configuration") if (out / "plans.json").exists() else None
    if configuration != LOWRES:
        if marked == LOWRES:
            raise ConfigError(f"{out}: the 3d_lowres cache; data.configuration {configuration} trains on the cache "
                              f"above it ({out.parent})")
        return out
    if marked == LOWRES:
        return out
    sub = out / LOWRES_DIR
    if not (sub / "plans.json").exists():
        lowres_plans(load_plans(out))  # no such configuration: the ConfigError says why
        raise CacheError(f"{sub}: the 3d_lowres cases are not cached; rerun `medvol preprocess` (it adds them)")
    return sub


def load_plans(out: str | Path) -> dict:
    path = Path(out) / "plans.json"
    if not path.exists():
        raise CacheError(f"{path}: no plans yet; run `medvol plan` or `medvol preprocess`")
    return read_json(path)
