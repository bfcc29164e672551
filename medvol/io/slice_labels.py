"""Classification labels of slices and subjects: a CSV beside the raw dataset.

``slice_labels.csv`` (the name :data:`SLICE_LABELS_FILE`), one row per labelled slice::

    subject,slice_index,label,mask
    knee01,12,2,masks/knee01_012.png
    knee01,13,0,
    knee01,,1

- ``slice_index``: 0-based index of the slice in the subject's raw scan (or slice stack),
  along the axis the dataset is sliced across; blank = the row is the subject's own class;
- ``label``: a class index (whole number >= 0), e.g. a grade;
- ``mask`` (optional column, may be blank): an attention/region mask for that slice, a 2D
  image or NIfTI file, relative to the CSV's folder.

Everything is checked when read, against the subjects and their slice counts given by the
caller: unknown subject, slice index out of range or not a whole number, label not a whole
number >= 0, a duplicate row, a missing mask file, unknown or missing columns. Each problem is
one :class:`medvol.errors.InputError` naming the CSV and the line.

The indices refer to the raw slices; the 3D cache is cropped and resampled:
:func:`medvol.data.slices.raw_slice_of` maps cached slices back to raw ones.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from medvol.errors import InputError

SLICE_LABELS_FILE = "slice_labels.csv"
REQUIRED_COLUMNS = ("subject", "slice_index", "label")
OPTIONAL_COLUMNS = ("mask",)


@dataclass
class SliceLabels:
    """Per subject: ``{slice index: class}``, the subject's own class, and slice masks (paths)."""

    slices: dict[str, dict[int, int]] = field(default_factory=dict)
    subjects: dict[str, int] = field(default_factory=dict)
    masks: dict[tuple[str, int], Path] = field(default_factory=dict)

    def slice_targets(self, subject: str, n_slices: int) -> np.ndarray:
        """``(n_slices,)`` int64 classes, -1 where a slice has no label."""
        out = np.full(n_slices, -1, np.int64)
        for index, label in self.slices.get(subject, {}).items():
            out[index] = label
        return out

    def read_mask(self, subject: str, index: int) -> np.ndarray | None:
        """The slice's mask ``(H, W)``, or None when it has none."""
        from medvol.io.slices2d import read_mask_2d

        path = self.masks.get((subject, index))
        return None if path is None else read_mask_2d(path)


def read_slice_labels(path: str | Path, slice_counts: Mapping[str, int]) -> SliceLabels:
    """Read and check ``path`` against ``slice_counts`` (``{subject: number of slices}``)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM (Excel's "CSV UTF-8") is no column
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(path, f"cannot read the slice-label CSV ({type(e).__name__}: {e})") from None
    if not rows:
        raise InputError(path, f"empty; expected a header line '{','.join(REQUIRED_COLUMNS)}[,mask]'")
    columns = _columns(path, rows[0])
    out = SliceLabels()
    seen: dict[tuple[str, int | None], int] = {}
    for line, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            raise InputError(path, f"line {line}: {len(row)} fields, the header has {len(columns)}")
        _add_row(path, line, dict(zip(columns, (c.strip() for c in row))), slice_counts, out, seen)
    return out


def _columns(path: Path, header: list[str]) -> list[str]:
    columns = [c.strip() for c in header]
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if unknown or missing or len(set(columns)) != len(columns):
        raise InputError(path, f"line 1: expected the columns {', '.join(REQUIRED_COLUMNS)} (and optionally mask), "
                               f"got {', '.join(columns)}")
    return columns


def _add_row(path: Path, line: int, row: dict, slice_counts: Mapping[str, int], out: SliceLabels,
             seen: dict) -> None:
    subject = row["subject"]
    if subject not in slice_counts:
        raise InputError(path, f"line {line}: unknown subject '{subject}'")
    label = _whole(path, line, "label", row["label"])
    index = None if row["slice_index"] == "" else _whole(path, line, "slice_index", row["slice_index"])
    if index is not None and index >= slice_counts[subject]:
        raise InputError(path, f"line {line}: slice_index {index} is out of range: '{subject}' has "
                               f"{slice_counts[subject]} slices (0-{slice_counts[subject] - 1})")
    key = (subject, index)
    if key in seen:
        what = f"slice {index} of '{subject}'" if index is not None else f"subject '{subject}' (no slice_index)"
        raise InputError(path, f"line {line}: duplicate row for {what}, first given on line {seen[key]}")
    seen[key] = line
    mask = row.get("mask", "")
    if index is None:
        if mask:
            raise InputError(path, f"line {line}: a mask needs a slice_index")
        out.subjects[subject] = label
        return
    out.slices.setdefault(subject, {})[index] = label
    if mask:
        mask_path = path.parent / mask
        if not mask_path.is_file():
            raise InputError(path, f"line {line}: mask file not found: {mask_path}")
        out.masks[(subject, index)] = mask_path


def write_slice_labels(labels: SliceLabels, path: str | Path) -> None:
    """Write ``labels`` as a ``slice_labels.csv`` (mask paths absolute, so the copy reads from
    anywhere), atomically."""
    from medvol.utils import atomic_path

    rows = [["subject", "slice_index", "label", "mask"]]
    for subject, slices in sorted(labels.slices.items()):
        for index, label in sorted(slices.items()):
            mask = labels.masks.get((subject, index))
            rows.append([subject, str(index), str(label), str(Path(mask).resolve()) if mask else ""])
    rows += [[subject, "", str(label), ""] for subject, label in sorted(labels.subjects.items())]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)


def _whole(path: Path, line: int, column: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(path, f"line {line}: {column} must be a whole number >= 0, got '{text}'") from None
    if value < 0:
        raise InputError(path, f"line {line}: {column} must be a whole number >= 0, got {value}")
    return value


__all__ = ["SLICE_LABELS_FILE", "SliceLabels", "read_slice_labels", "write_slice_labels"]
