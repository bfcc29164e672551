"""The preprocessing cache on disk (format version 1).

``OUT/`` holds ``dataset.json`` (the raw dataset's description), ``fingerprint.json``,
``plans.json`` and per training case, under ``OUT/cases/``:

- ``<case>.npy``: image, float32 (or float16 by plan), ``(C, X, Y, Z)``, C-contiguous, so
  training reads patches through a memory map without loading the case;
- ``<case>_seg.npy``: label, int8 (int16 when labels exceed 127), ``(1, X, Y, Z)``; -1 marks
  background outside the nonzero mask (nnU-Net's convention);
- ``<case>.json``: properties (original shape/affine/spacing, crop box, resampled shape,
  sampled foreground locations per class, ...). Written last: it marks a finished case.

Per-case fingerprints live in ``OUT/fingerprints/``; cropped arrays waiting for the plan
in ``OUT/staging/`` (removed as each case finishes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np

from medvol.errors import CacheError
from medvol.utils import read_json

CACHE_VERSION = 1


def cases_dir(out: Path) -> Path:
    return Path(out) / "cases"


def plans_digest(plans: dict) -> str:
    return hashlib.sha1(json.dumps(plans, sort_keys=True).encode()).hexdigest()[:16]


def case_paths(out: Path, case_id: str) -> tuple[Path, Path, Path]:
    d = cases_dir(out)
    return d / f"{case_id}.npy", d / f"{case_id}_seg.npy", d / f"{case_id}.json"


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
    image = np.load(img, mmap_mode=mode)
    if image.dtype != np.float32 and not mmap:
        image = image.astype(np.float32)
    label = np.load(seg, mmap_mode=mode) if p.get("has_label") and seg.exists() else None
    return image, label, p


def load_plans(out: str | Path) -> dict:
    path = Path(out) / "plans.json"
    if not path.exists():
        raise CacheError(f"{path}: no plans yet; run `medvol plan` or `medvol preprocess`")
    return read_json(path)
