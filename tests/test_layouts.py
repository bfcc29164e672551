"""Other raw layouts (plain NIfTI folder, DICOM tree), CT normalisation and anisotropic data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvol.datasets.brain import Acquisition, build_brain_dataset, make_case
from medvol.datasets.dicom import write_dicom_series
from medvol.errors import InputError
from medvol.io import Volume
from medvol.preprocessing import list_cases, load_case, load_plans, open_raw_dataset, preprocess_dataset

from conftest import write_nifti, write_v2_dataset


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
