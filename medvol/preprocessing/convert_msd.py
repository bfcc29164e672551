"""``medvol convert-msd``: a Medical Segmentation Decathlon task folder -> nnU-Net v2 raw layout.

Behaves as nnU-Net's ``nnUNetv2_convert_MSD_dataset``: ``TaskNN_Name`` becomes
``DatasetNNN_Name`` (the id from the task number unless given), the ``.nii.gz`` files of
``imagesTr``/``imagesTs``/``labelsTr`` are taken from the folders (names starting with ``.`` or
``_``, e.g. macOS ``._`` forks, are skipped), a 4D image is split into one 3D file per channel
(``<case>_<cccc>.nii.gz``, the header and affine kept), a 3D image and every label are copied
byte for byte, and ``dataset.json`` keeps its keys, with ``labels`` turned to name -> value,
``modality`` renamed ``channel_names``, ``file_ending`` added, ``training``/``test`` dropped.
A dataset id already taken in OUT by another name is refused, as nnU-Net does; the target folder
is owned through its manifest (:mod:`medvol.manifest`): one holding files medvol did not write
is refused.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from medvol.errors import InputError
from medvol.io.dataset_json import DATASET_JSON, read_dataset_json
from medvol.io.nifti import nifti_values, open_nifti
from medvol.manifest import OutputFolder, refuse_overlap
from medvol.preprocessing.raw import open_raw_dataset
from medvol.utils import atomic_path, write_json

MSD_FOLDERS = ("imagesTr", "imagesTs", "labelsTr")
ENDING = ".nii.gz"
_TASK = re.compile(r"Task(\d+)_(.+)")


def msd_files(folder: Path) -> list[Path]:
    """The ``.nii.gz`` files of one MSD folder, as nnU-Net lists them (no ``.``/``_`` names)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(ENDING)
                  and not p.name.startswith((".", "_")))


def target_name(task: Path, dataset_id: int | None) -> str:
    """``DatasetNNN_Name`` for the task folder ``TaskNN_Name``."""
    m = _TASK.fullmatch(task.name)
    if m is None:
        raise InputError(task, "an MSD task folder is named TaskNN_Name (e.g. Task05_Prostate)")
    return f"Dataset{int(m.group(1)) if dataset_id is None else dataset_id:03d}_{m.group(2)}"


def v2_dataset_json(task: Path) -> dict:
    """The task's ``dataset.json`` in nnU-Net v2's dialect (checked as a Decathlon file first)."""
    ds = open_raw_dataset(task)
    if ds.layout != "decathlon":
        raise InputError(task / DATASET_JSON, "not a Decathlon dataset.json (it has no 'modality')")
    meta = read_dataset_json(task / DATASET_JSON)
    meta["labels"] = dict(ds.labels)
    meta["file_ending"] = ENDING
    meta["channel_names"] = meta.pop("modality")
    for key in ("training", "test"):
        meta.pop(key, None)
    return meta


def split_channels(src: Path, out_dir: Path) -> list[Path]:
    """``src`` as ``<case>_<cccc>.nii.gz`` in ``out_dir``: a 3D file copied, a 4D one split along
    its 4th axis with the header (affine, qform/sform, units, dtype) kept; values the header
    scales (scl_slope/scl_inter) are written as float32."""
    case = src.name[: -len(ENDING)]
    img = open_nifti(src)
    if img.ndim == 3:
        return [_copy(src, out_dir / f"{case}_0000{ENDING}")]
    if img.ndim != 4:
        raise InputError(src, f"expected a 3D or 4D image, got shape {img.shape}: cannot split into channels")
    out, values = [], _voxel_values(src, img)
    for c in range(img.shape[3]):
        part = type(img)(values[..., c], img.affine, img.header.copy())
        part.header.set_data_dtype(values.dtype)
        path = out_dir / f"{case}_{c:04d}{ENDING}"
        with atomic_path(path) as tmp:
            nib.save(part, str(tmp))
        out.append(path)
    return out


def _voxel_values(src: Path, img) -> np.ndarray:
    """The image's values in its stored dtype; float32 when the header scales them (scl_slope,
    scl_inter), as nnU-Net's SimpleITK reader gives them: a rescaled integer would lose them."""
    data = nifti_values(src, img)
    return data if data.dtype == img.get_data_dtype() else data.astype(np.float32)


def _copy(src: Path, dst: Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def _claim_target(out: Path, name: str, cases: list[str]) -> Path:
    """The target folder, claimed for medvol; refused when its id is taken by another dataset."""
    taken = sorted(p.name for p in out.glob(name.split("_", 1)[0] + "_*") if p.name != name) if out.is_dir() else []
    if taken:
        raise InputError(out / taken[0], f"dataset id of {name} is already taken: give another id with --id")
    target = out / name
    OutputFolder(target, "msd-conversion", (*MSD_FOLDERS, DATASET_JSON)).claim(cases)
    return target


def convert_msd(task: str | Path, out: str | Path, dataset_id: int | None = None) -> Path:
    """Convert the MSD task folder ``task`` into ``out/DatasetNNN_Name``; returns that folder."""
    task, out = Path(task), Path(out)
    for sub in MSD_FOLDERS:
        if not (task / sub).is_dir():
            raise InputError(task / sub, "missing: an MSD task folder holds imagesTr, imagesTs and labelsTr")
    name = target_name(task, dataset_id)
    meta = v2_dataset_json(task)
    files = {sub: msd_files(task / sub) for sub in MSD_FOLDERS}
    refuse_overlap(out / name, [task], "the MSD task folder")
    target = _claim_target(out, name, sorted({p.name[: -len(ENDING)] for fs in files.values() for p in fs}))
    for sub in ("imagesTr", "imagesTs"):
        for p in files[sub]:
            split_channels(p, target / sub)
    for p in files["labelsTr"]:
        _copy(p, target / "labelsTr" / p.name)
    for sub in MSD_FOLDERS:
        (target / sub).mkdir(exist_ok=True)
    write_json(target / DATASET_JSON, meta)
    return target

