"""Other raw layouts (plain NIfTI folder, DICOM tree), dataset.json as people write it, CT normalisation
and anisotropic data."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from medvol.datasets.brain import Acquisition, build_brain_dataset, make_case
from medvol.datasets.dicom import write_dicom_series
from medvol.errors import InputError
from medvol.io import Volume
from medvol.preprocessing import list_cases, load_case, load_plans, open_raw_dataset, preprocess_dataset

from conftest import sphere_case, write_nifti, write_v2_dataset


def test_plain_nifti_folder_is_one_case_per_file(tmp_path):
    for i in range(2):
        img, _ = make_case(Acquisition((6.0, 6.0, 6.0), seed=i, noise=0.01))
        write_nifti(tmp_path / "scans" / f"subject{i}.nii.gz", img.array, img.affine)
    ds = open_raw_dataset(tmp_path / "scans")
    assert ds.layout == "nifti_folder" and [c.case_id for c in ds.training] == ["subject0", "subject1"]
    rep = preprocess_dataset(tmp_path / "scans", tmp_path / "out", num_workers=1, quiet=True)
    assert rep.done and not rep.failures
    image, label, props = load_case(tmp_path / "out", "subject0")
    assert label is None and not props["has_label"]


def test_dicom_tree_is_one_case_per_series(tmp_path):
    img, _ = make_case(Acquisition((6.0, 6.0, 6.0)))
    hu = Volume(np.round(img.array / img.array.max() * 1000 - 1000).astype(np.float32), img.affine)
    write_dicom_series(hu, tmp_path / "tree" / "patientA" / "ct1")
    write_dicom_series(hu, tmp_path / "tree" / "patientB" / "ct1")
    ds = open_raw_dataset(tmp_path / "tree")
    assert ds.layout == "dicom_tree"
    assert [c.case_id for c in ds.training] == ["patientA__ct1", "patientB__ct1"]
    rep = preprocess_dataset(tmp_path / "tree", tmp_path / "out", num_workers=1, quiet=True)
    assert sorted(rep.done) == ["patientA__ct1", "patientB__ct1"]
    names = [f"x{k}.dcm" for k in range(hu.array.shape[2])]
    write_dicom_series(hu, tmp_path / "tree" / "patientB" / "ct1", file_names=names)
    with pytest.raises(InputError, match="patientB/ct1.*2 series mixed"):
        open_raw_dataset(tmp_path / "tree")


def test_ct_normalisation_uses_dataset_foreground_statistics(tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(3):
        hu = rng.normal(-800, 50, (20, 20, 16)).astype(np.float32)  # "air/lung" everywhere: no crop
        lab = np.zeros(hu.shape, np.uint8)
        lab[6:14, 6:14, 5:11] = 1
        hu[lab > 0] = rng.normal(60 + 10 * i, 15, int(lab.sum()))
        hu[0, 0, 0] = 3000  # metal: far outside the foreground range, must be clipped
        cases[f"ct{i}"] = ([hu], lab, np.eye(4))
    root = write_v2_dataset(tmp_path / "Dataset005_CT", cases, channel_names={"0": "CT"})
    out = tmp_path / "out"
    preprocess_dataset(root, out, num_workers=1, quiet=True)
    plans = load_plans(out)
    norm = plans["normalization"][0]
    assert norm["scheme"] == "CTNormalization" and not norm["use_mask_for_norm"]
    fg = np.concatenate([c[0][0][c[1] > 0] for c in cases.values()]).astype(np.float64)
    st = norm["statistics"]
    assert st["mean"] == pytest.approx(fg.mean(), rel=1e-6)
    assert st["std"] == pytest.approx(fg.std(), rel=1e-6)
    assert st["percentile_99_5"] == pytest.approx(np.percentile(fg, 99.5), abs=0.5)
    image, _, props = load_case(out, "ct1")
    assert props["shape_after_resampling"] == [20, 20, 16]  # 1 mm already: no resampling
    hu = cases["ct1"][0][0]
    expect = (np.clip(hu, st["percentile_00_5"], st["percentile_99_5"]) - st["mean"]) / st["std"]
    np.testing.assert_allclose(image[0], expect, rtol=1e-5, atol=1e-5)
    assert image[0, 0, 0, 0] == pytest.approx((st["percentile_99_5"] - st["mean"]) / st["std"], rel=1e-5)
    # inference-time preprocessing of the same scan gives the same array (CT: no mask needed)
    from medvol.io import read_volume
    from medvol.preprocessing import preprocess_case

    again, _ = preprocess_case(read_volume(root / "imagesTr" / "ct1_0000.nii.gz"), plans)
    np.testing.assert_allclose(again, image, rtol=1e-6, atol=1e-6)


def test_anisotropic_real_data_plans_separate_z(tmp_path):
    acqs = [Acquisition((1.5, 1.5, 6.0), seed=i, noise=0.02) for i in range(3)] + [Acquisition((1.5, 1.5, 4.0))]
    root = build_brain_dataset(tmp_path / "Dataset006_Thick", n_train=4, n_test=0, acquisitions=acqs)
    out = tmp_path / "out"
    preprocess_dataset(root, out, num_workers=2, quiet=True)
    plans = load_plans(out)
    fp = json.loads((out / "fingerprint.json").read_text())
    sp = np.array(fp["spacings"])
    # coarse axis: median 6.0 > 3 x 1.5 and ~31 slices x 3 < ~130 voxels in-plane: 10th percentile
    assert plans["target_spacing"][2] == pytest.approx(np.percentile(sp[:, 2], 10))
    assert plans["target_spacing"][:2] == pytest.approx(list(np.median(sp[:, :2], 0)), rel=1e-6)
    first_kernel = plans["network"]["kernel_sizes"][0]
    assert first_kernel[2] == 1 and first_kernel[:2] == [3, 3]  # no 3-wide kernel across thick slices
    for case in list_cases(out):
        _, _, props = load_case(out, case)
        assert props["separate_z_axis"] == 2


def test_fixed_target_spacing_and_ct_window(tmp_path):
    from medvol.cli import main

    rng = np.random.default_rng(1)
    cases = {}
    for i in range(2):
        hu = rng.normal(-200, 300, (24, 24, 10)).astype(np.float32)
        lab = np.zeros(hu.shape, np.uint8)
        lab[8:16, 8:16, 3:7] = 1
        cases[f"ct{i}"] = ([hu], lab, np.diag([0.7, 0.7, 2.5, 1.0]))
    root = write_v2_dataset(tmp_path / "Dataset030_Win", cases, channel_names={"0": "CT"})
    out = tmp_path / "out"
    assert main(["preprocess", str(root), "-o", str(out), "-j", "1", "--quiet", "--target-spacing", "0.8", "0.8",
                 "1.5", "--ct-window", "-325", "325"]) == 0
    plans = load_plans(out)
    assert plans["target_spacing"] == [0.8, 0.8, 1.5]
    assert plans["normalization"][0]["scheme"] == "CTWindowNormalization"
    image, _, props = load_case(out, "ct0")
    assert props["shape_after_resampling"] == [21, 21, 17]  # 24*0.7/0.8, 10*2.5/1.5
    assert float(image.min()) >= -1.0 - 1e-6 and float(image.max()) <= 1.0 + 1e-6
    assert (np.abs(np.asarray(image)) > 0.999).mean() > 0.05  # values beyond the window were clipped


def _v2_with(root, **extra):
    img, lab, aff = sphere_case(shape=(12, 12, 10), radius=3.0)
    return write_v2_dataset(root, {"a": ([img], lab, aff)}, extra_json=extra)


def test_unknown_dataset_json_keys_warn_once_each_and_the_dataset_opens(tmp_path, caplog):
    informative = {"description": "d", "reference": "r", "licence": "CC-BY", "release": "1.0",
                   "tensorImageSize": "3D"}
    root = _v2_with(tmp_path / "Dataset040_Keys", chanel_names={"0": "T1"}, cases=[{"id": "a", "age": 40}],
                    myTool_version="2.1", **informative)
    with caplog.at_level(logging.WARNING, logger="medvol.preprocessing.raw"):
        ds = open_raw_dataset(root)
        open_raw_dataset(root)  # commands open a dataset more than once: still one line per key
    assert ds.channel_names == {0: "MRI"} and [c.case_id for c in ds.training] == ["a"]
    lines = sorted(r.getMessage() for r in caplog.records)
    jpath = root / "dataset.json"
    assert lines == [f"{jpath}: unknown key 'cases' ignored",
                     f"{jpath}: unknown key 'chanel_names' ignored (did you mean 'channel_names'?)",
                     f"{jpath}: unknown key 'myTool_version' ignored"]


def test_missing_dataset_json_key_suggests_the_near_miss(tmp_path):
    root = _v2_with(tmp_path / "Dataset041_Typo", chanel_names={"0": "T1"})
    meta = json.loads((root / "dataset.json").read_text())
    del meta["channel_names"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"dataset.json: missing key\(s\) \['channel_names'\] required by the "
                                         r"nnU-Net v2 layout; found 'chanel_names': did you mean 'channel_names'\?"):
        open_raw_dataset(root)


def test_reader_key_is_honoured_where_medvol_reads_alike_else_refused(tmp_path):
    for i, reader in enumerate(["None", "SimpleITKIO", "NibabelIO"]):
        ds = open_raw_dataset(_v2_with(tmp_path / f"ok{i}", overwrite_image_reader_writer=reader))
        assert [c.case_id for c in ds.training] == ["a"]
    refused = [("NibabelIOWithReorient", ".nii.gz", "'NibabelIOWithReorient' is not supported: medvol keeps each "
                                                    "scan's own voxel order and does not reorient it to RAS"),
               ("Tiff3DIO", ".nii.gz", "'Tiff3DIO' is not supported: medvol reads NIfTI"),
               ("NibabelIO", ".nrrd", "'NibabelIO' reads .nii and .nii.gz files, but file_ending is '.nrrd'"),
               (3, ".nii.gz", "must be a reader class name")]
    for i, (reader, ending, message) in enumerate(refused):
        root = _v2_with(tmp_path / f"bad{i}", overwrite_image_reader_writer=reader, file_ending=ending)
        with pytest.raises(InputError, match=r"dataset.json: 'overwrite_image_reader_writer'.*" + re.escape(message)):
            open_raw_dataset(root)


def test_nnunet_ignore_label_opens_and_must_be_the_highest_value(tmp_path):
    root = _v2_with(tmp_path / "Dataset043_Ignore")
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "fg": 1, "ignore": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = open_raw_dataset(root)
    assert ds.labels["ignore"] == 2 and ds.label_values == [0, 1, 2]  # label files may hold the ignore value
    meta["labels"] = {"background": 0, "fg": 1, "ignore": 3}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"dataset.json: label 'ignore' is 3, but the ignore label must be the "
                                         r"highest label value, one above the others: 2"):
        open_raw_dataset(root)


def test_nnunet_regions_open_with_their_class_order(tmp_path):
    root = _v2_with(tmp_path / "Dataset044_Regions", regions_class_order=[1])
    meta = json.loads((root / "dataset.json").read_text())
    ds = open_raw_dataset(root)  # a class order without regions is not used (as nnU-Net)
    assert ds.regions_class_order is None
    meta["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    meta["regions_class_order"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = open_raw_dataset(root)
    assert ds.labels == {"background": 0, "whole": [1, 2], "core": 2} and ds.regions_class_order == [1, 2]
    assert ds.dataset_json()["regions_class_order"] == [1, 2]
    del meta["regions_class_order"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"dataset.json: labels declare regions .*'regions_class_order' is required"):
        open_raw_dataset(root)


@pytest.mark.parametrize("key, value, message", [
    ("dataset", {"a": {"images": ["x.nii.gz"], "label": "y.nii.gz"}}, "put the files in imagesTr/ and labelsTr/"),
])
def test_keys_that_change_the_meaning_are_refused(tmp_path, key, value, message):
    with pytest.raises(InputError, match=rf"dataset.json: '{key}': .*{message}"):
        open_raw_dataset(_v2_with(tmp_path / "Dataset042_Meaning", **{key: value}))
