"""Adapters: graded 2D slices with region masks (DC-MT's knee layout, and a generic one) -> a raw
nnU-Net v2 dataset of subject stacks that ``medvol preprocess`` caches for the 2D slice path.

Output (``write_subject_stacks``), one case per subject:

- ``imagesTr/<subject>_<cccc>.nii.gz``: the subject's slices stacked along the last axis, shape
  ``(H, W, S)`` (H the slices' rows), affine ``diag(1, 1, 999, 1)``: the 999 mm "slice spacing"
  is nnU-Net's mark of data that is not a volume, so axis 2 is the slice axis and nothing is
  resampled across it. Stacked slices need not be neighbours in the scan (DC-MT picks a few per
  knee): train them without 2.5D context. Channels are named ``rescale_to_0_1`` (a per-volume
  min-max, which DC-MT's per-slice percentile clip + min-max done by its trainer undoes
  exactly, while the float16 cache keeps its precision).
- ``labelsTr/<subject>.nii.gz``: the region mask (1 inside, the attention target; DC-MT: the
  femoral cartilage, dilated), for subjects whose slices have masks.
- ``slice_labels.csv`` (:mod:`medvol.io.slice_labels`): each graded slice's grade by its stack
  index, and each subject's grade (given, else the maximum of its slice grades).
- ``slice_sources.csv``: which source slice each stack index came from.
- ``dataset.json`` with ``labelled_cases`` (the semi-supervised split) when one is given, and
  ``splits_final.json`` (nnU-Net's cross-validation format) when the source has folds; copy the
  latter into the preprocessed folder to train with ``data.fold``.

DC-MT's layout (``convert_dcmt``): per-slice HDF5 files ``<root>/<Path>`` with ``image``
``(H, W)``, ``masks`` ``(H, W)`` (a knee segmentation: femoral cartilage is label 2) and
``label`` (the slice's grade); a fold CSV with columns ``Path,Fold`` whose file names are
``<subject>_<slice>.h5`` (e.g. ``class1/00003_7.h5``); optionally the subject-grade CSV
``SegID,subject_label[,Fold]`` (``SegID`` e.g. ``00003.nii.gz``). As published, the labelled
subjects are those of the first fold that is not the validation fold, the region is label 2
dilated by an 18-pixel disc, and every slice may be resized (published: 256 x 256).

Generic layout (``convert_graded_folder``): a folder of 2D images, optionally a folder of masks
paired by file stem, and a CSV ``name,subject,grade[,fold]`` (``name`` an image's stem, ``grade``
blank for an ungraded slice); slices are stacked in CSV order.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medvol.errors import InputError
from medvol.io import Volume, write_volume
from medvol.io.slices2d import IMAGE_SUFFIXES, read_h5_slice, read_image_2d, read_mask_2d
from medvol.utils import write_json, write_text

SLICE_SPACING = 999.0
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DCMT_REGION_LABELS = (2,)  # femur_cartilage in the published knee segmentation
DCMT_DILATION_PX = 18


@dataclass
class GradedSlice:
    """One source slice: ``image`` ``(C, H, W)``, ``region`` ``(H, W)`` uint8 or None, ``grade`` or None."""

    subject: str
    source: str
    image: np.ndarray
    region: np.ndarray | None
    grade: int | None


def region_mask(labels: np.ndarray, region_labels: Sequence[int] | None, dilate_px: float = 0) -> np.ndarray:
    """``(H, W)`` uint8: 1 where ``labels`` is one of ``region_labels`` (None: any value > 0),
    dilated by a disc of diameter ``dilate_px`` (published: cv2's 18 x 18 ellipse)."""
    from scipy import ndimage

    mask = labels > 0 if region_labels is None else np.isin(labels, list(region_labels))
    if dilate_px > 0 and mask.any():
        r = dilate_px / 2
        yy, xx = np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1]
        mask = ndimage.binary_dilation(mask, structure=(yy ** 2 + xx ** 2) <= r * r)
    return mask.astype(np.uint8)


def _resize(arr: np.ndarray, size: Sequence[int] | None, order: int) -> np.ndarray:
    """``(..., H, W)`` -> ``(..., *size)`` (bilinear images, nearest masks); unchanged without ``size``."""
    if size is None or tuple(arr.shape[-2:]) == tuple(size):
        return arr
    from skimage.transform import resize

    out = resize(arr.astype(np.float32), (*arr.shape[:-2], *size), order=order, preserve_range=True,
                 anti_aliasing=False, mode="edge")
    return out.astype(arr.dtype)


def _csv_text(rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _by_subject(slices: list[GradedSlice]) -> dict[str, list[GradedSlice]]:
    out: dict[str, list[GradedSlice]] = {}
    for s in slices:
        out.setdefault(s.subject, []).append(s)
    return out


def _stack(subject: str, group: list[GradedSlice]) -> tuple[np.ndarray, np.ndarray | None]:
    """``(C, H, W, S)`` image and ``(H, W, S)`` region (None when no slice has one)."""
    shapes = {s.image.shape for s in group}
    if len(shapes) > 1:
        raise InputError(group[0].source, f"the slices of subject '{subject}' differ in shape {sorted(shapes)}; "
                                          "give a common size (size=(H, W))")
    with_mask = [s.region is not None for s in group]
    if any(with_mask) and not all(with_mask):
        missing = group[with_mask.index(False)].source
        raise InputError(missing, f"has no region mask although other slices of subject '{subject}' have one")
    image = np.stack([s.image for s in group], -1)
    region = np.stack([s.region for s in group], -1).astype(np.uint8) if all(with_mask) else None
    return image, region


def write_subject_stacks(slices: list[GradedSlice], out: str | Path, subject_grades: dict[str, int] | None = None,
                         labelled: Sequence[str] | None = None, folds: dict[str, int] | None = None,
                         name: str = "Dataset040_GradedSlices", description: str = "") -> Path:
    """Write the raw dataset described in the module docstring; returns ``out``."""
    out = Path(out)
    groups = _by_subject(slices)
    for subject in groups:
        if not CASE_ID.match(subject):
            raise InputError(groups[subject][0].source, f"subject name '{subject}' cannot be a case id "
                                                        "(letters, digits, '_', '.', '-')")
    grades = dict(subject_grades or {})
    labels_rows: list[tuple] = [("subject", "slice_index", "label")]
    sources: list[tuple] = [("subject", "slice_index", "source")]
    n_channels = {s.image.shape[0] for s in slices}
    if len(n_channels) != 1:
        raise InputError(out, f"slices have different channel counts {sorted(n_channels)}")
    affine = np.diag([1.0, 1.0, SLICE_SPACING, 1.0])
    for subject, group in groups.items():
        image, region = _stack(subject, group)
        for c in range(image.shape[0]):
            write_volume(Volume(image[c].astype(np.float32), affine), out / "imagesTr" / f"{subject}_{c:04d}.nii.gz")
        if region is not None:
            write_volume(Volume(region, affine), out / "labelsTr" / f"{subject}.nii.gz")
        graded = [(i, s.grade) for i, s in enumerate(group) if s.grade is not None]
        labels_rows += [(subject, i, g) for i, g in graded]
        sources += [(subject, i, s.source) for i, s in enumerate(group)]
        if subject not in grades and graded:
            grades[subject] = max(g for _, g in graded)
    labels_rows += [(subject, "", g) for subject, g in grades.items() if subject in groups]
    write_text(out / "slice_labels.csv", _csv_text(labels_rows))
    write_text(out / "slice_sources.csv", _csv_text(sources))
    _write_meta(out, groups, n_channels.pop(), labelled, name, description)
    if folds:
        write_json(out / "splits_final.json", fold_splits(folds))
    return out


def _write_meta(out: Path, groups: dict, n_channels: int, labelled, name: str, description: str) -> None:
    unknown = sorted(set(labelled or []) - set(groups))
    if unknown:
        raise InputError(out, f"labelled subjects {unknown[:5]} have no slices")
    no_mask = sorted(s for s in labelled or [] if not (out / "labelsTr" / f"{s}.nii.gz").exists())
    if no_mask:
        raise InputError(out, f"labelled subjects {no_mask[:5]} have no region masks")
    meta = {"name": name, "description": description,
            "channel_names": {str(c): "rescale_to_0_1" for c in range(n_channels)},
            "labels": {"background": 0, "region": 1}, "numTraining": len(groups), "file_ending": ".nii.gz"}
    if labelled is not None:
        meta["labelled_cases"] = sorted(labelled)
    write_json(out / "dataset.json", meta)


def fold_splits(folds: dict[str, int]) -> list[dict]:
    """nnU-Net's ``splits_final.json`` content: per fold (sorted) its subjects as ``val``."""
    subjects = sorted(folds)
    return [{"train": [s for s in subjects if folds[s] != k], "val": [s for s in subjects if folds[s] == k]}
            for k in sorted(set(folds.values()))]


def _read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a CSV with at least the ``required`` columns."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(path, f"cannot read the CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in required if c not in header]
    if not rows or missing:
        raise InputError(path, f"line 1: needs the columns {', '.join(required)} and at least one row"
                               + (f" (missing: {', '.join(missing)})" if rows else ""))
    return [(n, {k.strip(): (v or "").strip() for k, v in r.items() if k is not None}) for n, r in enumerate(rows, 2)]


def _whole(path: Path, line: int, column: str, text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise InputError(path, f"line {line}: {column} must be a whole number >= 0, got '{text}'")
    return int(text)


def _subject_folds(path: Path, entries: list[tuple[int, str, int | None]]) -> dict[str, int]:
    """``{subject: fold}`` from ``(line, subject, fold)``; a subject in two folds is an error."""
    folds: dict[str, int] = {}
    for line, subject, fold in entries:
        if fold is None:
            continue
        if folds.setdefault(subject, fold) != fold:
            raise InputError(path, f"line {line}: subject '{subject}' is in fold {fold} and fold {folds[subject]}")
    return folds


def read_subject_grades(path: str | Path) -> dict[str, int]:
    """DC-MT's ``subject_label.csv``: ``{subject: grade}`` (``SegID`` without its file suffix)."""
    path = Path(path)
    out: dict[str, int] = {}
    for line, row in _read_csv(path, ("SegID", "subject_label")):
        subject = re.sub(r"(\.nii\.gz|\.nii|\.mha|\.h5)$", "", row["SegID"])
        out[subject] = _whole(path, line, "subject_label", row["subject_label"])
    return out


def read_dcmt_h5(root: str | Path, fold_csv: str | Path, region_labels: Sequence[int] | None = DCMT_REGION_LABELS,
                 dilate_px: float = DCMT_DILATION_PX,
                 size: Sequence[int] | None = None) -> tuple[list[GradedSlice], dict[str, int]]:
    """DC-MT's slices in subject order, each subject's slices by slice number, and their folds."""
    root, fold_csv = Path(root), Path(fold_csv)
    entries = []
    for line, row in _read_csv(fold_csv, ("Path", "Fold")):
        m = re.fullmatch(r"(.+)_(\d+)\.h5", Path(row["Path"]).name)
        if not m:
            raise InputError(fold_csv, f"line {line}: '{row['Path']}' is not named <subject>_<slice>.h5")
        entries.append((line, m.group(1), int(m.group(2)), row["Path"], _whole(fold_csv, line, "Fold", row["Fold"])))
    folds = _subject_folds(fold_csv, [(e[0], e[1], e[4]) for e in entries])
    slices = []
    for _, subject, _, rel, _ in sorted(entries, key=lambda e: (e[1], e[2])):
        slices.append(_dcmt_slice(root / rel, subject, rel, region_labels, dilate_px, size))
    return slices, folds


def _dcmt_slice(path: Path, subject: str, rel: str, region_labels, dilate_px: float, size) -> GradedSlice:
    s = read_h5_slice(path)
    if s["masks"] is None or s["grade"] is None:
        raise InputError(path, "a DC-MT slice needs 'masks' and 'label' (the grade)")
    masks = s["masks"]
    if masks.ndim != 2 or not np.array_equal(masks, np.round(masks)):
        raise InputError(path, f"'masks' must be one (H, W) map of whole-number labels, got shape {masks.shape}")
    region = region_mask(masks.astype(np.int64), region_labels, dilate_px)
    return GradedSlice(subject, rel, _resize(s["image"], size, 1), _resize(region, size, 0), s["grade"])


def labelled_fold_subjects(folds: dict[str, int], valid_fold: int, labelled_fold: int | None = None) -> list[str]:
    """The subjects of ``labelled_fold`` (default: the first fold other than ``valid_fold``, as published)."""
    others = sorted(set(folds.values()) - {valid_fold})
    if not others:
        raise InputError("folds", f"no fold other than the validation fold {valid_fold}")
    k = others[0] if labelled_fold is None else labelled_fold
    return sorted(s for s, f in folds.items() if f == k)


def convert_dcmt(root: str | Path, fold_csv: str | Path, out: str | Path, subject_labels: str | Path | None = None,
                 valid_fold: int = 0, labelled_fold: int | None = None,
                 region_labels: Sequence[int] | None = DCMT_REGION_LABELS, dilate_px: float = DCMT_DILATION_PX,
                 size: Sequence[int] | None = None) -> Path:
    """DC-MT's HDF5 slice layout at ``root`` (listed by ``fold_csv``) -> the raw dataset ``out``."""
    slices, folds = read_dcmt_h5(root, fold_csv, region_labels, dilate_px, size)
    grades = read_subject_grades(subject_labels) if subject_labels else None
    labelled = labelled_fold_subjects(folds, valid_fold, labelled_fold)
    return write_subject_stacks(slices, out, grades, labelled, folds, name="Dataset041_KneeCartilageDCMT",
                                description="Knee MRI slices graded for cartilage defects (DC-MT layout); label "
                                            "1 = femoral cartilage, dilated (the attention target)")


def _stems(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    out = {}
    for p in sorted(folder.iterdir()):
        for suffix in suffixes:
            if p.name.lower().endswith(suffix) and not p.name.startswith("."):
                out[p.name[: -len(suffix)]] = p
    return out


def convert_graded_folder(images: str | Path, grades_csv: str | Path, out: str | Path,
                          masks: str | Path | None = None, subject_labels: str | Path | None = None,
                          labelled: Sequence[str] | None = None, region_labels: Sequence[int] | None = None,
                          dilate_px: float = 0, size: Sequence[int] | None = None) -> Path:
    """The generic layout (see the module docstring) -> the raw dataset ``out``; ``labelled``:
    the subjects that keep labels (None: all)."""
    images, grades_csv = Path(images), Path(grades_csv)
    suffixes = IMAGE_SUFFIXES + (".nii.gz", ".nii")
    found = _stems(images, suffixes)
    mask_files = _stems(Path(masks), suffixes) if masks is not None else {}
    slices, fold_entries = [], []
    for line, row in _read_csv(grades_csv, ("name", "subject", "grade")):
        name = row["name"]
        if name not in found:
            raise InputError(grades_csv, f"line {line}: no image named '{name}.*' in {images}")
        region = None
        if masks is not None:
            if name not in mask_files:
                raise InputError(grades_csv, f"line {line}: no mask named '{name}.*' in {masks}")
            region = _resize(region_mask(read_mask_2d(mask_files[name]), region_labels, dilate_px), size, 0)
        grade = _whole(grades_csv, line, "grade", row["grade"]) if row["grade"] else None
        slices.append(GradedSlice(row["subject"], name, _resize(read_image_2d(found[name]), size, 1), region, grade))
        fold = row.get("fold", "")
        fold_entries.append((line, row["subject"], _whole(grades_csv, line, "fold", fold) if fold else None))
    folds = _subject_folds(grades_csv, fold_entries)
    grades = read_subject_grades(subject_labels) if subject_labels else None
    return write_subject_stacks(slices, out, grades, labelled, folds or None)


__all__ = ["GradedSlice", "region_mask", "write_subject_stacks", "fold_splits", "read_subject_grades",
           "read_dcmt_h5", "labelled_fold_subjects", "convert_dcmt", "convert_graded_folder"]
