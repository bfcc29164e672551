"""ACDC adapters (datasets/acdc.py) on tiny files written in the two public layouts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medvol.datasets.acdc import convert_acdc_slices, convert_acdc_volumes, patient_of
from medvol.errors import InputError
from medvol.preprocessing.raw import open_raw_dataset

h5py = pytest.importorskip("h5py")


def _h5(path, image, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label


def _slice_layout(root, patients=range(1, 10), slices=3, val=(9,), shape=(8, 6)):
    """patient p, frames 01 and 12, ``slices`` slices each; slice values encode (p, frame, z)."""
    train, vals = [], []
    for p in patients:
        for fr in (1, 12):
            frame = f"patient{p:03d}_frame{fr:02d}"
            if p in val:
                vol = np.stack([np.full(shape, 100 * p + 10 * fr + z, np.float32) for z in range(slices)])
                _h5(root / "data" / f"{frame}.h5", vol, (np.arange(vol.size).reshape(vol.shape) % 4).astype(np.uint8))
                vals.append(frame)
                continue
            for z in range(slices):
                name = f"{frame}_slice_{z}"
                lab = np.zeros(shape, np.uint8)
                lab[z % shape[0], :] = 1 + z % 3
                _h5(root / "data" / "slices" / f"{name}.h5", np.full(shape, 100 * p + 10 * fr + z, np.float32), lab)
                train.append(name)
    (root / "train_slices.list").write_text("\n".join(train) + "\n")
    (root / "val.list").write_text("\n".join(vals) + "\n")
    return train, vals


def test_patient_names():
    assert patient_of("patient012_frame01") == "patient012" == patient_of("patient012_frame01_slice_11")
    with pytest.raises(ValueError, match="not an ACDC"):
        patient_of("case_01")


def test_slices_regrouped_into_volumes_with_a_seven_patient_split(tmp_path):
    _slice_layout(tmp_path / "src")
    out = convert_acdc_slices(tmp_path / "src", tmp_path / "raw" / "Dataset027_ACDC")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3} and meta["numTraining"] == 18
    # 7 labelled patients (the paper's 10 %), each with both frames, by patient
    assert meta["labelled_cases"] == [f"patient{p:03d}_frame{f:02d}" for p in range(1, 8) for f in (1, 12)]
    img = nib.load(str(out / "imagesTr" / "patient002_frame12_0000.nii.gz"))
    lab = np.asarray(nib.load(str(out / "labelsTr" / "patient002_frame12.nii.gz")).dataobj)
    assert img.shape == (8, 6, 3) and np.allclose(img.affine, np.diag([1, 1, 999, 1]))
    assert [float(img.dataobj[0, 0, z]) for z in range(3)] == [320.0, 321.0, 322.0]  # slice order kept
    assert lab[2, 0, 2] == 3 and lab[0, 0, 0] == 1  # slice z's label row z carries 1 + z % 3
    # validation volumes (Z, H, W) become (H, W, Z); fold 0 validates on them, trains on the rest
    val = nib.load(str(out / "imagesTr" / "patient009_frame01_0000.nii.gz"))
    assert val.shape == (8, 6, 3) and float(val.dataobj[0, 0, 2]) == 912.0
    splits = json.loads((out / "splits_final.json").read_text())
    assert splits[0]["val"] == ["patient009_frame01", "patient009_frame12"] and len(splits[0]["train"]) == 16
    assert meta["source_ids"]["patient002_frame12"] == ",".join(f"patient002_frame12_slice_{z}" for z in range(3))
    raw = open_raw_dataset(out)  # medvol reads it as a semi-supervised raw dataset
    assert len(raw.training) == 18 and raw.labelled_cases == meta["labelled_cases"]


def test_slices_that_do_not_form_a_volume_stay_single_slice_cases(tmp_path):
    train, _ = _slice_layout(tmp_path / "src", patients=[1, 2, 3], val=(3,))
    # patient002_frame01 lists slices 0 and 2 only: not a whole frame
    kept = [n for n in train if n != "patient002_frame01_slice_1"]
    (tmp_path / "src" / "train_slices.list").write_text("\n".join(kept))
    out = convert_acdc_slices(tmp_path / "src", tmp_path / "raw", labelled=1)
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (out / "imagesTr").glob("*.nii.gz"))
    assert "patient002_frame01_slice_0" in cases and "patient002_frame01_slice_2" in cases
    assert "patient001_frame01" in cases and "patient002_frame12" in cases
    one = nib.load(str(out / "imagesTr" / "patient002_frame01_slice_2_0000.nii.gz"))
    assert one.shape == (8, 6, 1) and float(one.dataobj[0, 0, 0]) == 212.0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labelled_cases"] == ["patient001_frame01", "patient001_frame12"]
    # regroup=False: every slice its own case, the paper's 10 % of slices then follows by patient
    flat = convert_acdc_slices(tmp_path / "src", tmp_path / "flat", labelled=1, regroup=False)
    assert len(json.loads((flat / "dataset.json").read_text())["labelled_cases"]) == 6


def test_slice_layout_errors_name_the_file(tmp_path):
    src = tmp_path / "src"
    _slice_layout(src, patients=[1, 2], val=(2,))
    (src / "data" / "slices" / "patient001_frame01_slice_1.h5").unlink()
    with pytest.raises(InputError, match="patient001_frame01_slice_1.h5"):
        convert_acdc_slices(src, tmp_path / "out", labelled=1)
    _h5(src / "data" / "slices" / "patient001_frame01_slice_1.h5", np.zeros((8, 6), np.float32),
        np.full((8, 6), 7, np.uint8))
    with pytest.raises(InputError, match="ACDC has 0..3"):
        convert_acdc_slices(src, tmp_path / "out", labelled=1)
    (src / "val.list").write_text("patient001_frame01\n")
    with pytest.raises(InputError, match="in train_slices.list too"):
        convert_acdc_slices(src, tmp_path / "out", labelled=1)
    (src / "val.list").unlink()
    with pytest.raises(InputError, match="val.list"):
        convert_acdc_slices(src, tmp_path / "out", labelled=1)


def _volume_layout(root, patients=range(1, 10), shape=(6, 5, 4)):
    aff = np.diag([1.5, 1.5, 10.0, 1.0])
    for p in patients:
        d = root / "training" / f"patient{p:03d}"
        d.mkdir(parents=True)
        for fr in (1, 10):
            stem = d / f"patient{p:03d}_frame{fr:02d}"
            nib.save(nib.Nifti1Image(np.full(shape, p, np.int16), aff), f"{stem}.nii.gz")
            nib.save(nib.Nifti1Image((np.arange(np.prod(shape)).reshape(shape) % 4).astype(np.uint8), aff),
                     f"{stem}_gt.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros(shape + (2,), np.int16), aff), str(d / f"patient{p:03d}_4d.nii.gz"))
        (d / "Info.cfg").write_text("ED: 1\nES: 10\n")


def test_volumes_per_patient_and_frame_with_geometry_kept(tmp_path):
    _volume_layout(tmp_path / "ACDC")
    out = convert_acdc_volumes(tmp_path / "ACDC", tmp_path / "raw", val_patients=["patient009"])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 18 and len(meta["labelled_cases"]) == 14
    assert meta["labelled_cases"][:2] == ["patient001_frame01", "patient001_frame10"]
    img = nib.load(str(out / "imagesTr" / "patient003_frame10_0000.nii.gz"))
    assert img.shape == (6, 5, 4) and np.allclose(img.affine, np.diag([1.5, 1.5, 10.0, 1.0]))
    assert not list((out / "imagesTr").glob("*4d*"))
    assert json.loads((out / "splits_final.json").read_text())[0]["val"] == ["patient009_frame01", "patient009_frame10"]
    # no validation list: nnU-Net's 5 folds over patients, both frames of a patient on one side
    out2 = convert_acdc_volumes(tmp_path / "ACDC", tmp_path / "raw2", labelled=["patient002"])
    assert json.loads((out2 / "dataset.json").read_text())["labelled_cases"] == ["patient002_frame01",
                                                                                 "patient002_frame10"]
    folds = json.loads((out2 / "splits_final.json").read_text())
    assert len(folds) == 5
    for f in folds:
        assert not {patient_of(c) for c in f["train"]} & {patient_of(c) for c in f["val"]}
    assert len(open_raw_dataset(out2).training) == 18


def test_volume_layout_errors(tmp_path):
    with pytest.raises(InputError, match="no patientXXX"):
        convert_acdc_volumes(tmp_path, tmp_path / "out")
    _volume_layout(tmp_path / "ACDC", patients=[1, 2])
    (tmp_path / "ACDC" / "training" / "patient001" / "patient001_frame01_gt.nii.gz").unlink()
    with pytest.raises(InputError, match="patient001_frame01.nii.gz: no patient001_frame01_gt"):
        convert_acdc_volumes(tmp_path / "ACDC", tmp_path / "out", labelled=1)
    with pytest.raises(InputError, match="labelled=7 patients"):
        convert_acdc_volumes(tmp_path / "ACDC", tmp_path / "out", labelled=7)
    with pytest.raises(InputError, match="patient077"):
        convert_acdc_volumes(tmp_path / "ACDC", tmp_path / "out", val_patients=["patient077"])


def test_converted_slices_preprocess_for_2d_with_the_papers_split(tmp_path):
    """The adapter's output through `medvol preprocess`: sliced across axis 2, nothing
    resampled; with its splits_final.json in the cache, fold 0 trains on the 7 labelled
    patients + the unlabelled rest and validates on val.list."""
    import shutil

    from medvol.config import DataConfig
    from medvol.data import training_cases
    from medvol.plans import Plans
    from medvol.preprocessing import load_case, load_plans, preprocess_dataset

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    _slice_layout(src, shape=(32, 24))
    for f in (src / "data").rglob("*.h5"):  # textured images (z-scoring needs some spread)
        with h5py.File(f, "r+") as h:
            h["image"][...] = h["image"][...] + rng.normal(0, 5, h["image"].shape)
    raw = convert_acdc_slices(src, tmp_path / "raw")
    preprocess_dataset(raw, tmp_path / "pre", num_workers=1, quiet=True)
    plans = Plans.from_dict(load_plans(tmp_path / "pre")).for_2d()
    assert plans.slice_axis == 2 and plans.patch_size == [32, 24]
    image, label, _ = load_case(tmp_path / "pre", "patient002_frame12")
    assert image.shape == (1, 32, 24, 3) and sorted(np.unique(label).tolist()) == [0, 1, 2, 3]
    shutil.copy(raw / "splits_final.json", tmp_path / "pre")
    labelled, unlabelled, val = training_cases(tmp_path / "pre", DataConfig(fold=0), seed=0)
    assert {patient_of(c) for c in labelled} == {f"patient{p:03d}" for p in range(1, 8)}
    assert {patient_of(c) for c in unlabelled} == {"patient008"}
    assert val == ["patient009_frame01", "patient009_frame12"]
