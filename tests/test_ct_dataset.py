"""The CT-sized benchmark dataset (medvol.datasets.ct): real Hounsfield units, labels, geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvol.datasets.realdata import available

pytestmark = pytest.mark.skipif(not available("pydicom-data"), reason="pydicom-data not installed")


def test_ct_cases_keep_the_real_slice_units_and_preprocess_as_ct(tmp_path):
    from medvol.datasets.ct import build_ct_dataset
    from medvol.io import read_volume
    from medvol.preprocessing import load_plans, preprocess_dataset

    raw = build_ct_dataset(tmp_path / "Dataset002_HeadCT", cases=2, slices=12)
    image = read_volume(raw / "imagesTr" / "ct_001_0000.nii.gz")
    label = np.asarray(read_volume(raw / "labelsTr" / "ct_001.nii.gz").array)
    hu = np.asarray(image.array)
    assert hu.shape == label.shape == (512, 512, 12)
    np.testing.assert_allclose(np.diag(image.affine)[:3], [0.6, 0.6, 1.25])
    assert np.median(hu[label == 0]) == pytest.approx(-1000, abs=30)  # air, not zero
    assert 0 < np.median(hu[label == 1]) < 80  # brain
    assert np.median(hu[label == 2]) > 500  # skull
    mid, end = (label[..., 6] > 0).sum(), (label[..., 0] > 0).sum()
    assert mid > 2 * end  # the head is widest mid-volume
    assert json.loads((raw / "dataset.json").read_text())["channel_names"] == {"0": "CT"}

    out = tmp_path / "pre"
    preprocess_dataset(raw, out, num_workers=1, quiet=True)
    plans = load_plans(out)
    assert plans["normalization"][0]["scheme"] == "CTNormalization"  # nnU-Net's name
    props = json.loads((out / "cases" / "ct_001.json").read_text())
    assert props["crop_bbox"][0] == [0, 512]  # no zero background: the crop keeps the field of view


def test_prediction_body_mask_of_a_ct_leaves_out_the_air(tmp_path):
    """preprocess_case on a CT plan: the body mask (windows outside it are skipped) is the head,
    not the whole field of view that the nonzero crop keeps."""
    from medvol.datasets.ct import build_ct_dataset
    from medvol.io import read_volume
    from medvol.preprocessing import load_plans, preprocess_case, preprocess_dataset

    raw = build_ct_dataset(tmp_path / "Dataset002_HeadCT", cases=2, slices=12)
    preprocess_dataset(raw, tmp_path / "pre", num_workers=1, quiet=True)
    scan = read_volume(raw / "imagesTr" / "ct_000_0000.nii.gz")
    label = np.asarray(read_volume(raw / "labelsTr" / "ct_000.nii.gz").array)
    image, props = preprocess_case(scan, load_plans(tmp_path / "pre"), body_mask=True)
    mask = props["body_mask"]
    assert mask.shape == image.shape[1:]
    assert 0.05 < mask.mean() < 0.6  # the head and the head rest, not the air around them
    assert mask.mean() >= (label > 0).mean()  # at least the labelled head
    head = np.argwhere(label[..., 6] > 0).mean(0) * np.array(mask.shape[:2]) / label.shape[:2]
    assert mask[int(head[0]), int(head[1]), mask.shape[2] // 2]  # the head's centre is body
    assert not mask[:5, :5].any() and not mask[-5:, -5:].any()  # the corners are air
