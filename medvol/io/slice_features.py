"""Per-slice features of subjects: the file between a slice classifier and the slice aggregator.

``medvol extract-features`` writes one ``features.npz`` (:data:`FEATURES_FILE`) into its output
folder; the aggregator trainer (``trainer.name: slice_aggregator``) reads it as ``--data``.
Arrays (no pickled objects; read with ``allow_pickle=False``):

- ``subjects`` ``(n,)`` str: subject (case) ids, in order;
- ``offsets`` ``(n + 1,)`` int64: subject ``i`` owns rows ``offsets[i]:offsets[i + 1]`` of the
  per-slice arrays, its slices in order along the slice axis;
- ``features`` ``(N, F)`` float32 and ``logits`` ``(N, K)`` float32: the classifier's per-slice
  feature vectors and logits;
- ``slice_index`` ``(N,)`` int64: the slice's index in the preprocessed grid;
- ``raw_slice`` ``(N,)`` int64: the raw scan's slice nearest it (-1 when unknown);
- ``subject_class`` ``(n,)`` int64: the subject's class, -1 = none (unlabelled);
- ``meta``: a JSON string: the classifier run, its checkpoint and hash, slice axis, context...
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.utils import atomic_path

FEATURES_FILE = "features.npz"
AGGREGATOR_RUN_FILE = "aggregator.json"  # in an aggregator's run folder: its features and their classifier
FORMAT = "medvol-slice-features-1"
_ARRAYS = ("subjects", "offsets", "features", "logits", "slice_index", "raw_slice", "subject_class", "meta")


@dataclass
class SubjectSlices:
    """One subject's per-slice outputs."""

    subject: str
    features: np.ndarray  # (S, F) float32
    logits: np.ndarray  # (S, K) float32
    slice_index: np.ndarray  # (S,) int64
    raw_slice: np.ndarray  # (S,) int64, -1 unknown
    subject_class: int = -1


@dataclass
class SliceFeatures:
    """Every subject's :class:`SubjectSlices` and the file's ``meta``."""

    items: list[SubjectSlices]
    meta: dict = field(default_factory=dict)

    @property
    def subjects(self) -> list[str]:
        return [s.subject for s in self.items]

    @property
    def feature_dim(self) -> int:
        return int(self.items[0].features.shape[1])

    @property
    def num_subject_classes(self) -> int:
        """Subject classes: the meta's ``subject_classes``, else the largest class seen + 1."""
        given = self.meta.get("subject_classes")
        return int(given) if given else max([s.subject_class for s in self.items] + [1]) + 1

    def by_subject(self) -> dict[str, SubjectSlices]:
        return {s.subject: s for s in self.items}


def features_path(path: str | Path) -> Path:
    """``path`` itself when it is a file, else ``path/features.npz``."""
    path = Path(path)
    return path / FEATURES_FILE if path.is_dir() else path


def write_features(path: str | Path, data: SliceFeatures) -> Path:
    """Write ``data`` to ``path`` atomically (a finished file or none)."""
    _check_items(Path(path), data.items)
    items = data.items
    arrays = {
        "subjects": np.array([s.subject for s in items], dtype=str),
        "offsets": np.cumsum([0] + [len(s.features) for s in items]).astype(np.int64),
        "features": np.concatenate([s.features for s in items]).astype(np.float32),
        "logits": np.concatenate([s.logits for s in items]).astype(np.float32),
        "slice_index": np.concatenate([s.slice_index for s in items]).astype(np.int64),
        "raw_slice": np.concatenate([s.raw_slice for s in items]).astype(np.int64),
        "subject_class": np.array([s.subject_class for s in items], np.int64),
        "meta": np.array(json.dumps({"format": FORMAT, **data.meta})),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
    return Path(path)


def _check_items(path: Path, items: list[SubjectSlices]) -> None:
    if not items:
        raise InputError(path, "no subjects to write")
    f, k = items[0].features.shape[1], items[0].logits.shape[1]
    for s in items:
        n = len(s.features)
        if n == 0 or s.features.shape != (n, f) or s.logits.shape != (n, k) or len(s.slice_index) != n \
                or len(s.raw_slice) != n:
            raise InputError(path, f"subject '{s.subject}': inconsistent per-slice arrays (features "
                                   f"{s.features.shape}, logits {s.logits.shape}, {len(s.slice_index)} slice indices)")
    if len({s.subject for s in items}) != len(items):
        raise InputError(path, "duplicate subject ids")


def read_features(path: str | Path) -> SliceFeatures:
    """Read and check a features file (or the ``features.npz`` of a folder)."""
    path = features_path(path)
    if not path.is_file():
        raise InputError(path, "no features file here; write one with `medvol extract-features RUN --data ... -o DIR`")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _ARRAYS if k not in z.files]
            if missing:
                raise InputError(path, f"not a medvol features file (no {', '.join(missing)})")
            a = {k: z[k] for k in _ARRAYS}
            meta = json.loads(str(a["meta"]))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(path, f"not a readable features file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise InputError(path, f"corrupt features file: 'meta' must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise InputError(path, f"format {meta.get('format')!r}, expected {FORMAT!r}")
    items = _split(path, a)
    _check_values(path, items, meta)
    return SliceFeatures(items, meta)


def _check_values(path: Path, items: list[SubjectSlices], meta: dict) -> None:
    """Finite features and logits, one entry per subject, subject classes in range: a file
    changed by hand (or by another tool) is named, not trained on."""
    if not items:
        raise InputError(path, "holds no subject; write it with `medvol extract-features RUN --data ... -o DIR`")
    seen: set[str] = set()
    for s in items:
        if s.subject in seen:
            raise InputError(path, f"subject '{s.subject}' appears twice")
        seen.add(s.subject)
    for key in ("features", "logits"):
        values = np.concatenate([getattr(s, key) for s in items])
        if values.shape[1] == 0:
            raise InputError(path, f"'{key}' has no columns (shape {values.shape})")
        if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
            raise InputError(path, f"'{key}' holds NaN or infinite (or non-numeric) values")
    k = meta.get("subject_classes")
    for s in items:
        if s.subject_class < -1 or (isinstance(k, int) and s.subject_class >= k):
            allowed = f"0-{k - 1}" if isinstance(k, int) else "a class >= 0"
            raise InputError(path, f"subject '{s.subject}': class {s.subject_class} is not {allowed} or -1 "
                                   "(unlabelled)")


def _split(path: Path, a: dict) -> list[SubjectSlices]:
    """The flat arrays cut into subjects, after checking that they fit together."""
    off, n_rows = a["offsets"], len(a["features"])
    n = len(a["subjects"])
    ok = (len(off) == n + 1 and off[0] == 0 and off[-1] == n_rows and bool(np.all(np.diff(off) > 0))
          and a["features"].ndim == 2 and a["logits"].ndim == 2 and len(a["logits"]) == n_rows
          and len(a["slice_index"]) == n_rows and len(a["raw_slice"]) == n_rows and len(a["subject_class"]) == n)
    if not ok:
        raise InputError(path, "corrupt features file: the per-slice arrays and the subject offsets disagree")
    return [SubjectSlices(str(a["subjects"][i]), a["features"][lo:hi], a["logits"][lo:hi], a["slice_index"][lo:hi],
                          a["raw_slice"][lo:hi], int(a["subject_class"][i]))
            for i, (lo, hi) in enumerate(zip(off[:-1], off[1:]))]


__all__ = ["AGGREGATOR_RUN_FILE", "FEATURES_FILE", "SliceFeatures", "SubjectSlices", "features_path", "read_features",
           "write_features"]
