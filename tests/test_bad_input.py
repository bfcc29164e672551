"""The bad-input catalogue: one clear message naming the file, valid cases carry on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvol.cli import main
from medvol.errors import InputError
from medvol.preprocessing import list_cases, open_raw_dataset, preprocess_dataset

from conftest import sphere_case, write_nifti, write_v2_dataset


@pytest.fixture()
def messy_dataset(tmp_path):
    """Two good cases and one of each kind of broken case."""
    good = {f"good{i}": ([sphere_case(seed=i)[0]], sphere_case(seed=i)[1], np.eye(4)) for i in range(2)}
    img, lab, aff = sphere_case(seed=5)
    nan_img = img.copy()
    nan_img[5, 5, 5] = np.nan
    bad_label = lab.copy()
    bad_label[12, 12, 10] = 3  # not declared
    shifted = aff.copy()
    shifted[0, 3] = 7.0
    cases = {
        **good,
        "nan": ([nan_img], lab, aff),
        "undeclared": ([img], bad_label, aff),
        "shape": ([img], lab[:-2], aff),
    }
    root = write_v2_dataset(tmp_path / "Dataset002_Messy", cases)
    # label on another grid than its image
    write_nifti(root / "imagesTr" / "affine_0000.nii.gz", img, aff)
    write_nifti(root / "labelsTr" / "affine.nii.gz", lab, shifted)
    # truncated image file
    write_nifti(root / "imagesTr" / "trunc_0000.nii.gz", img, aff)
    data = (root / "imagesTr" / "trunc_0000.nii.gz").read_bytes()
    (root / "imagesTr" / "trunc_0000.nii.gz").write_bytes(data[: len(data) // 3])
    write_nifti(root / "labelsTr" / "trunc.nii.gz", lab, aff)
    # label missing entirely
    write_nifti(root / "imagesTr" / "nolabel_0000.nii.gz", img, aff)
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] = 8
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_each_broken_case_is_reported_by_file_and_good_cases_are_processed(messy_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["preprocess", str(messy_dataset), "-o", str(out), "-j", "2", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    failures = json.loads((out / "failures.json").read_text())
    assert sorted(failures) == ["affine", "nan", "nolabel", "shape", "trunc", "undeclared"]
    assert "nan_0000.nii.gz" in failures["nan"] and "NaN" in failures["nan"]
    assert "undeclared.nii.gz" in failures["undeclared"] and "[3]" in failures["undeclared"]
    assert "shape.nii.gz" in failures["shape"] and "shape" in failures["shape"]
    assert "affine.nii.gz" in failures["affine"] and "affine differs" in failures["affine"]
    assert "trunc_0000.nii.gz" in failures["trunc"] and "truncated or corrupt" in failures["trunc"]
    assert "nolabel.nii.gz" in failures["nolabel"] and "missing" in failures["nolabel"]
    for case in failures:
        assert case in err
    assert list_cases(out) == ["good0", "good1"]
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["case_ids"] == ["good0", "good1"] and len(fp["failed_cases"]) == 6


def test_missing_channel_file_is_a_case_failure(tmp_path):
    img, lab, aff = sphere_case()
    cases = {"a": ([img, img], lab, aff), "b": ([img, img], lab, aff)}
    root = write_v2_dataset(tmp_path / "Dataset003_TwoCh", cases, channel_names={"0": "T1", "1": "T2"})
    (root / "imagesTr" / "b_0001.nii.gz").unlink()
    rep = preprocess_dataset(root, tmp_path / "out", num_workers=1, quiet=True)
    assert rep.done == ["a"]
    assert "b_0001.nii.gz" in rep.failures["b"] and "missing channel" in rep.failures["b"]


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(labels={"background": 0, "a": [1, 2], "b": 2}), "'regions_class_order' is required"),
    (lambda m: m.pop("labels"), r"missing key.*labels"),
    (lambda m: m.update(labels={"background": 0, "x": "one"}), "not an integer"),
    (lambda m: m.update(channel_names={"1": "T1"}), "channel_names keys"),
])
def test_bad_dataset_json_is_one_error_naming_it(tmp_path, change, message, capsys):
    img, lab, aff = sphere_case()
    root = write_v2_dataset(tmp_path / "Dataset004_Json", {"a": ([img], lab, aff)})
    meta = json.loads((root / "dataset.json").read_text())
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=message):
        open_raw_dataset(root)
    assert main(["preprocess", str(root), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "dataset.json" in capsys.readouterr().err


def test_decathlon_path_escaping_the_dataset_is_refused(tmp_path):
    img, lab, aff = sphere_case()
    root = tmp_path / "Task01_Escape"
    write_nifti(root / "imagesTr" / "a.nii.gz", img, aff)
    write_nifti(root / "labelsTr" / "a.nii.gz", lab, aff)
    meta = {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "ball"},
            "training": [{"image": "../../etc/passwd", "label": "./labelsTr/a.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="escapes the dataset folder"):
        open_raw_dataset(root)


def test_decathlon_layout_with_4d_images(tmp_path):
    img, lab, aff = sphere_case()
    root = tmp_path / "Task02_Two"
    write_nifti(root / "imagesTr" / "a.nii.gz", np.stack([img, img * 2], -1), aff)
    write_nifti(root / "labelsTr" / "a.nii.gz", lab, aff)
    meta = {"name": "two", "modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "ball"},
            "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}], "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = open_raw_dataset(root)
    assert ds.layout == "decathlon" and ds.labels == {"background": 0, "ball": 1}
    rep = preprocess_dataset(root, tmp_path / "out", num_workers=1, quiet=True)
    assert rep.done == ["a"]
    from medvol.preprocessing import load_case

    assert load_case(tmp_path / "out", "a")[0].shape[0] == 2


def test_empty_and_missing_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["preprocess", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "no scans found" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


def test_input_error_survives_pickling_to_worker_processes():
    import pickle

    e = pickle.loads(pickle.dumps(InputError("/data/x.nii.gz", "truncated")))
    assert isinstance(e, InputError) and e.path == "/data/x.nii.gz" and str(e) == "/data/x.nii.gz: truncated"
