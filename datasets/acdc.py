"""Adapters: ACDC (Automated Cardiac Diagnosis Challenge, cine MRI; labels 1 RV, 2 myocardium,
3 LV) -> medvol's raw layout (nnU-Net v2), in its two public forms.

**Volumes** (the challenge's release): ``<src>/[training/]patientXXX/patientXXX_frameYY.nii.gz``
with ``patientXXX_frameYY_gt.nii.gz`` beside it (``_4d`` files and ``Info.cfg`` are ignored;
a ``testing/`` folder next to ``training/`` goes to ``imagesTs``/``labelsTs``). One case per
patient and frame, ``patientXXX_frameYY``; files are copied as they are (geometry kept).

**HDF5 slices** (the semi-supervised benchmark's form that UGPCL uses):
``<src>/train_slices.list``, ``<src>/val.list`` (and optionally ``test.list``); each line names a
slice ``patientXXX_frameYY_slice_N`` stored in ``data/slices/<name>.h5``, or a volume
``patientXXX_frameYY`` stored in ``data/<name>.h5``, each with ``image`` (float) and ``label``
(0..3), slices ``(H, W)`` and volumes ``(Z, H, W)``. The files carry no geometry. A frame's
listed slices are regrouped into one ``(H, W, S)`` case when they are slices 0..S-1 of one
shape; otherwise each slice is its own ``(H, W, 1)`` case named after it. Every case gets the
affine diag(1, 1, 999, 1) (nnU-Net's convention for 2D data: axis 2 is the slice axis and
nothing is resampled across it).

Both: ``labelled_cases`` are the cases of the first ``labelled`` training patients (7 = the
paper's 10 %: 136 slices in the slice form), or of the patients listed; the other training
labels stay on disk (for evaluation) but are not used for training. The validation patients
(``val.list`` / ``val_patients``) are training cases too (labelled, since validation needs the
labels), and ``splits_final.json`` beside ``dataset.json`` names them as fold 0's validation
set (without a validation list: nnU-Net's 5-fold split over *patients*, so that no patient's
frames are on both sides). Images are channel ``MRI`` (z-scored per image by preprocessing).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.io import Volume, write_volume
from medvol.io.slices2d import read_h5_slice, read_slice_list
from medvol.utils import write_json

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
SLICE_AFFINE = np.diag([1.0, 1.0, 999.0, 1.0])
PAPER_LABELLED_PATIENTS = 7  # UGPCL's 10 % of ACDC: 7 patients, 136 slices
_SLICE_NAME = re.compile(r"^(?P<frame>(?P<patient>patient\d+)_frame\d+)_slice_(?P<index>\d+)$")
_FRAME_NAME = re.compile(r"^(?P<patient>patient\d+)_frame\d+$")


def patient_of(name: str) -> str:
    """``patient012`` of ``patient012_frame01`` or ``patient012_frame01_slice_3``."""
    m = _SLICE_NAME.match(name) or _FRAME_NAME.match(name)
    if not m:
        raise ValueError(f"{name!r} is not an ACDC frame or slice name (patientXXX_frameYY[_slice_N])")
    return m.group("patient")


# ------------------------------------------------------------------ shared writing


def _labelled_cases(cases: list[str], labelled: int | list[str], where: Path) -> list[str]:
    """The cases of the first ``labelled`` patients (in the order the cases come) or of the
    listed patients."""
    patients = list(dict.fromkeys(patient_of(c) for c in cases))
    chosen = set(patients[:labelled]) if isinstance(labelled, int) else set(labelled)
    if isinstance(labelled, int) and labelled > len(patients):
        raise InputError(where, f"labelled={labelled} patients asked for, but the training cases hold {len(patients)}")
    unknown = sorted(chosen - set(patients))
    if unknown:
        raise InputError(where, f"labelled patients {unknown} are not among the training patients")
    return [c for c in cases if patient_of(c) in chosen]


def _splits(train: list[str], val: list[str]) -> list[dict]:
    """Fold 0 = (train, val) when a validation list is given, else nnU-Net's 5 folds over patients."""
    if val:
        return [{"train": sorted(train), "val": sorted(val)}]
    from medvol.data.splits import nnunet_splits

    patients = sorted({patient_of(c) for c in train})
    folds = nnunet_splits(patients) if len(patients) >= 5 else [{"train": patients, "val": []}]
    return [{k: sorted(c for c in train if patient_of(c) in set(f[k])) for k in ("train", "val")} for f in folds]


def _write_meta(out: Path, name: str, train: list[str], val: list[str], labelled: list[str], source: dict) -> None:
    meta = {"name": name, "description": "ACDC cine MRI (RV, myocardium, LV), semi-supervised split",
            "channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": len(train) + len(val),
            "file_ending": ".nii.gz", "labelled_cases": labelled, "source_ids": source}
    write_json(out / "splits_final.json", _splits(train, val))
    write_json(out / "dataset.json", meta)


# ------------------------------------------------------------------ NIfTI volumes


@dataclass
class _Frame:
    case: str
    image: Path
    label: Path | None


def _frames(folder: Path) -> list[_Frame]:
    out = []
    for img in sorted(folder.glob("patient*/patient*_frame*.nii.gz")):
        case = img.name[: -len(".nii.gz")]
        if not _FRAME_NAME.match(case):
            continue  # *_gt, *_4d
        gt = img.with_name(f"{case}_gt.nii.gz")
        out.append(_Frame(case, img, gt if gt.exists() else None))
    return out


def _check_pair(frame: _Frame) -> None:
    import nibabel as nib

    try:
        shapes = [nib.load(str(p)).shape for p in (frame.image, frame.label) if p is not None]
    except Exception as e:  # nibabel raises several kinds for a damaged file
        raise InputError(frame.image, f"not a readable NIfTI pair ({e})") from None
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        raise InputError(frame.label, f"label shape {shapes[1]} differs from its image's {shapes[0]}")


def convert_acdc_volumes(src: str | Path, out: str | Path, labelled: int | list[str] = PAPER_LABELLED_PATIENTS,
                         val_patients: list[str] | None = None) -> Path:
    """Write ``out`` (nnU-Net v2 layout) from the ACDC NIfTI release at ``src`` (its root with
    ``training/`` [+ ``testing/``], or a folder of patient folders)."""
    src, out = Path(src), Path(out)
    train_dir = src / "training" if (src / "training").is_dir() else src
    frames = _frames(train_dir)
    if not frames:
        raise InputError(train_dir, "no patientXXX/patientXXX_frameYY.nii.gz files (the ACDC layout)")
    val_set = set(val_patients or [])
    missing = sorted(val_set - {patient_of(f.case) for f in frames})
    if missing:
        raise InputError(train_dir, f"validation patients {missing} are not there")
    train = [f.case for f in frames if patient_of(f.case) not in val_set]
    val = [f.case for f in frames if patient_of(f.case) in val_set]
    chosen = _labelled_cases(train, labelled, train_dir)
    tests = _frames(src / "testing") if train_dir != src and (src / "testing").is_dir() else []
    for f in frames + tests:
        needs_label = f.case in chosen or f.case in val
        if f.label is None and needs_label:
            raise InputError(f.image, f"no {f.case}_gt.nii.gz: labelled and validation frames need their labels")
        _check_pair(f)
        test = f in tests
        _copy(f.image, out / ("imagesTs" if test else "imagesTr") / f"{f.case}_0000.nii.gz")
        if f.label is not None:
            _copy(f.label, out / ("labelsTs" if test else "labelsTr") / f"{f.case}.nii.gz")
    _write_meta(out, "ACDC", train, val, chosen, {f.case: str(f.image.relative_to(src)) for f in frames})
    return out


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


# ------------------------------------------------------------------ HDF5 slices


def _h5_path(src: Path, name: str) -> Path:
    sub = ("data/slices", "slices", "data", ".") if _SLICE_NAME.match(name) else ("data", ".", "data/slices")
    for s in sub:
        if (src / s / f"{name}.h5").exists():
            return src / s / f"{name}.h5"
    raise InputError(src / sub[0] / f"{name}.h5", "missing: every listed name needs its h5 file")


def _check_labels(path: Path, label: np.ndarray | None) -> np.ndarray:
    if label is None:
        raise InputError(path, "no 'label' dataset: ACDC slices and volumes carry their labels")
    if not set(np.unique(label).tolist()) <= set(LABELS.values()):
        raise InputError(path, f"label values {sorted(np.unique(label).tolist())}: ACDC has 0..3")
    return label.astype(np.uint8)


def _read_slice_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One slice file's ``(H, W)`` image and label (:func:`medvol.io.slices2d.read_h5_slice`)."""
    s = read_h5_slice(path)
    if s["image"].shape[0] != 1:
        raise InputError(path, f"'image' of shape {s['image'].shape}: ACDC slices are one-channel (H, W)")
    return s["image"][0], _check_labels(path, s["label"])


def _read_volume_h5(src: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A listed volume's ``(H, W, Z)`` image and label (stored ``(Z, H, W)``)."""
    from medvol.io.slices2d import read_h5_volume

    path = _h5_path(src, name)
    image, label = read_h5_volume(path)
    return np.moveaxis(image, 0, -1), np.moveaxis(_check_labels(path, label), 0, -1)


def _group_slices(names: list[str]) -> dict[str, list[str]]:
    """Case id -> its slice names in slice order: a frame whose listed slices are 0..S-1 is
    one case; any other name is a case of its own."""
    frames: dict[str, dict[int, str]] = {}
    for n in names:
        m = _SLICE_NAME.match(n)
        if m:
            frames.setdefault(m.group("frame"), {})[int(m.group("index"))] = n
    cases: dict[str, list[str]] = {}
    for n in names:
        m = _SLICE_NAME.match(n)
        whole = m is not None and sorted(frames[m.group("frame")]) == list(range(len(frames[m.group("frame")])))
        if not whole:
            cases[n] = [n]
        elif m is not None and m.group("frame") not in cases:
            idx = frames[m.group("frame")]
            cases[m.group("frame")] = [idx[i] for i in range(len(idx))]
    return cases


def _write_case(out: Path, test: bool, case: str, image: np.ndarray, label: np.ndarray) -> None:
    write_volume(Volume(image, SLICE_AFFINE), out / ("imagesTs" if test else "imagesTr") / f"{case}_0000.nii.gz")
    write_volume(Volume(label, SLICE_AFFINE), out / ("labelsTs" if test else "labelsTr") / f"{case}.nii.gz")


def _write_group(src: Path, out: Path, test: bool, case: str, names: list[str]) -> dict[str, str]:
    """Write one case (a volume, or a frame's slices stacked ``(H, W, S)``), or each slice
    alone when they differ in shape; returns {case written: its source names}."""
    if not _SLICE_NAME.match(names[0]):
        _write_case(out, test, case, *_read_volume_h5(src, names[0]))
        return {case: names[0]}
    pairs = [_read_slice_h5(_h5_path(src, n)) for n in names]
    if len({p[0].shape for p in pairs}) == 1:
        _write_case(out, test, case, np.stack([p[0] for p in pairs], -1), np.stack([p[1] for p in pairs], -1))
        return {case: ",".join(names)}
    for n, (image, label) in zip(names, pairs):
        _write_case(out, test, n, image[..., None], label[..., None])
    return {n: n for n in names}


def convert_acdc_slices(src: str | Path, out: str | Path, labelled: int | list[str] = PAPER_LABELLED_PATIENTS,
                        regroup: bool = True) -> Path:
    """Write ``out`` (nnU-Net v2 layout) from the ACDC HDF5 slice layout at ``src``.
    ``regroup=False`` keeps every listed slice a case of its own."""
    src, out = Path(src), Path(out)
    lists = {k: read_slice_list(src / f"{k}.list") for k in ("train_slices", "val")}
    if (src / "test.list").exists():
        lists["test"] = read_slice_list(src / "test.list")
    for k, names in lists.items():
        bad = [n for n in names if not (_SLICE_NAME.match(n) or _FRAME_NAME.match(n))]
        if bad:
            raise InputError(src / f"{k}.list", f"names {bad[:3]} are not patientXXX_frameYY[_slice_N]")
    overlap = sorted({patient_of(n) for n in lists["train_slices"]} & {patient_of(n) for n in lists["val"]})
    if overlap:
        raise InputError(src / "val.list", f"patients {overlap[:5]} are in train_slices.list too")
    written: dict[str, dict[str, str]] = {}
    for k, names in lists.items():
        groups = _group_slices(names) if regroup else {n: [n] for n in names}
        written[k] = {}
        for case, members in groups.items():
            written[k].update(_write_group(src, out, k == "test", case, members))
    train, val = list(written["train_slices"]), list(written["val"])
    source = {c: n for part in written.values() for c, n in part.items()}
    _write_meta(out, "ACDC_slices", train, val, _labelled_cases(train, labelled, src / "train_slices.list"), source)
    return out


__all__ = ["LABELS", "PAPER_LABELLED_PATIENTS", "convert_acdc_slices", "convert_acdc_volumes", "patient_of"]
