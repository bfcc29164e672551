"""Adapter: MOTS, DoDNet's union of seven partially labelled CT datasets -> one raw dataset.

Sources, each in its original layout:
- LiTS (task 0, liver): ``volume-<n>.nii`` + ``segmentation-<n>.nii`` (0 bg, 1 liver, 2 tumour),
  in one folder or its "Training Batch" subfolders;
- KiTS19 (task 1, kidney): ``case_<nnnnn>/imaging.nii.gz`` + ``segmentation.nii.gz``
  (0 bg, 1 kidney, 2 tumour);
- Medical Segmentation Decathlon ``TaskXX_*`` folders (``imagesTr``, ``labelsTr``): hepatic
  vessel (task 2: 1 vessel, 2 tumour), pancreas (3: 1 pancreas, 2 tumour), colon (4: 1 tumour),
  lung (5: 1 tumour), spleen (6: 1 spleen).

Label values stay as their datasets define them; every case carries its task id and which
of the two output channels (organ, tumour) its dataset annotates (``case_tasks`` in
dataset.json, copied into the cache properties), and
:data:`medvol.data.partial_labels.TASK_RULES` says how a task's labels become the two channel
targets (METHODS.md §2). Files are linked, not copied, when the
file system allows. The published train/test lists are not distributed with the data: a
seeded split keeps each task's test share (e.g. LiTS 27 of 131).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvol.data.partial_labels import TASK_RULES
from medvol.errors import InputError
from medvol.utils import write_json

DECATHLON_TASKS = {"HepaticVessel": 2, "Pancreas": 3, "Colon": 4, "Lung": 5, "Spleen": 6}
TEST_SHARE = {0: 27 / 131, 1: 42 / 210, 2: 61 / 303, 3: 57 / 281, 4: 26 / 126, 5: 13 / 63, 6: 9 / 41}


@dataclass
class _Source:
    task_id: int
    image: Path
    label: Path
    source_id: str


def _lits(root: Path) -> list[_Source]:
    vols = sorted(root.rglob("volume-*.nii*"))
    out = []
    for v in vols:
        n = v.name.split("-", 1)[1].split(".")[0]
        seg = next(iter(sorted(v.parent.glob(f"segmentation-{n}.nii*"))), None)
        if seg is None:
            raise InputError(v, f"LiTS volume without segmentation-{n}.nii in its folder")
        out.append(_Source(0, v, seg, f"lits/{n}"))
    if not out:
        raise InputError(root, "no LiTS volume-*.nii files here")
    return out


def _kits(root: Path) -> list[_Source]:
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("case_")):
        img, seg = d / "imaging.nii.gz", d / "segmentation.nii.gz"
        if not img.exists():
            raise InputError(img, "KiTS19 case folder without imaging.nii.gz")
        if not seg.exists():  # KiTS19's test cases have no segmentation: not part of MOTS training
            continue
        out.append(_Source(1, img, seg, f"kits19/{d.name}"))
    if not out:
        raise InputError(root, "no KiTS19 case_*/ folders with segmentations here")
    return out


def _decathlon(root: Path) -> list[_Source]:
    name = root.name.split("_", 1)[-1]
    if name not in DECATHLON_TASKS:
        raise InputError(root, f"not one of the Decathlon tasks in MOTS ({', '.join(DECATHLON_TASKS)})")
    tid = DECATHLON_TASKS[name]
    out = []
    for img in sorted((root / "imagesTr").glob("*.nii.gz")):
        if img.name.startswith("._"):  # macOS resource forks ship inside the Decathlon tarballs
            continue
        seg = root / "labelsTr" / img.name
        if not seg.exists():
            raise InputError(seg, "Decathlon image without its label")
        out.append(_Source(tid, img, seg, f"{root.name}/{img.name[:-7]}"))
    if not out:
        raise InputError(root / "imagesTr", "no images")
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def build_mots(out: str | Path, lits: str | Path | None = None, kits19: str | Path | None = None,
               decathlon: list[str | Path] = (), seed: int = 0) -> Path:
    """Write the MOTS union (nnU-Net v2 layout, NIfTI links) from whichever sources are given."""
    sources: list[_Source] = []
    if lits:
        sources += _lits(Path(lits))
    if kits19:
        sources += _kits(Path(kits19))
    for d in decathlon:
        sources += _decathlon(Path(d))
    if not sources:
        raise InputError(None, "build_mots needs at least one source folder")
    out = Path(out)
    rng = np.random.default_rng(seed)
    case_tasks, ids, n_train = {}, {}, 0
    for tid in sorted({s.task_id for s in sources}):
        group = [s for s in sources if s.task_id == tid]
        order = rng.permutation(len(group))
        n_test = int(round(len(group) * TEST_SHARE[tid])) if len(group) > 1 else 0
        name = TASK_RULES[tid][0]
        for rank, i in enumerate(order):
            s = group[i]
            test = rank < n_test
            case = f"{name}_{i:04d}"
            img_ext = ".nii.gz" if s.image.name.endswith(".gz") else ".nii"
            if img_ext != ".nii.gz":  # nnU-Net layouts have one file ending: re-save plain .nii as .nii.gz
                from medvol.io import read_volume, write_volume

                write_volume(read_volume(s.image), out / ("imagesTs" if test else "imagesTr") / f"{case}_0000.nii.gz")
                write_volume(read_volume(s.label), out / ("labelsTs" if test else "labelsTr") / f"{case}.nii.gz")
            else:
                _link(s.image, out / ("imagesTs" if test else "imagesTr") / f"{case}_0000.nii.gz")
                _link(s.label, out / ("labelsTs" if test else "labelsTr") / f"{case}.nii.gz")
            _, organ, tumour = TASK_RULES[tid]
            case_tasks[case] = {"task_id": tid, "annotated": [int(organ is not None), int(tumour is not None)]}
            ids[case] = s.source_id
            n_train += not test
    meta = {"name": "MOTS", "description": "DoDNet's union of partially labelled CT datasets",
            "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "tumour": 2},
            "numTraining": n_train, "file_ending": ".nii.gz", "case_tasks": case_tasks, "source_ids": ids,
            "tasks": {str(t): TASK_RULES[t][0] for t in TASK_RULES}}
    write_json(out / "dataset.json", meta)
    return out
