"""Metrics against hand-computed values (spacing-aware distances), and the empty-mask rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medvol.evaluation import case_metrics, evaluate_folders
from medvol.io import Volume, write_volume


def test_overlap_counts_and_volumes():
    ref = np.zeros((10, 10, 10), np.int64)
    pred = np.zeros_like(ref)
    ref[2:5, 2:6, 2:3] = 1  # 12 voxels
    pred[3:5, 2:6, 2:3] = 1  # 8 voxels, all inside ref
    m = case_metrics(pred, ref, (2.0, 1.0, 1.5), [1])[1]
    assert m["dice"] == pytest.approx(2 * 8 / 20)
    assert m["jaccard"] == pytest.approx(8 / 12)
    assert m["volume_ref_ml"] == pytest.approx(12 * 3.0 / 1000)
    assert m["volume_diff_ml"] == pytest.approx(-4 * 3.0 / 1000)


def test_surface_distances_in_mm():
    # two one-voxel-thick plates, one voxel apart along axis 0 whose spacing is 3 mm:
    # every surface voxel of each lies exactly 3 mm from the other
    ref = np.zeros((8, 12, 12), np.int64)
    pred = np.zeros_like(ref)
    ref[3, 2:10, 2:10] = 1
    pred[4, 2:10, 2:10] = 1
    m = case_metrics(pred, ref, (3.0, 0.5, 0.5), [1])[1]
    assert m["dice"] == 0.0
    assert m["hd95"] == pytest.approx(3.0) and m["asd"] == pytest.approx(3.0)
    # single voxels offset by (1, 2, 2) voxels at spacing (3, 0.5, 2): distance sqrt(9 + 1 + 16)
    a, b = np.zeros((6, 6, 6), np.int64), np.zeros((6, 6, 6), np.int64)
    a[1, 1, 1], b[2, 3, 3] = 1, 1
    m = case_metrics(b, a, (3.0, 0.5, 2.0), [1])[1]
    assert m["hd95"] == pytest.approx(math.sqrt(26)) and m["asd"] == pytest.approx(math.sqrt(26))
    same = case_metrics(a, a, (1, 1, 1), [1])[1]
    assert same["dice"] == 1.0 and same["hd95"] == 0.0 and same["asd"] == 0.0


def test_empty_mask_rule():
    z = np.zeros((5, 5, 5), np.int64)
    one = z.copy()
    one[2, 2, 2] = 1
    both_empty = case_metrics(z, z, (1, 1, 1), [1])[1]
    assert both_empty["dice"] == 1.0 and both_empty["hd95"] == 0.0
    missed = case_metrics(z, one, (1, 1, 1), [1])[1]
    assert missed["dice"] == 0.0 and math.isnan(missed["hd95"]) and math.isnan(missed["asd"])


def test_folder_evaluation_summary_and_files(tmp_path):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for i, shift in enumerate([0, 1]):
        ref = np.zeros((12, 12, 12), np.uint8)
        ref[3:9, 3:9, 3:9] = 1
        pred = np.roll(ref, shift, axis=0)
        write_volume(Volume(ref, aff), tmp_path / "ref" / f"c{i}.nii.gz")
        write_volume(Volume(pred, aff), tmp_path / "pred" / f"c{i}.nii.gz")
    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "m")
    d = [res["cases"]["c0"]["class_1"]["dice"], res["cases"]["c1"]["class_1"]["dice"]]
    assert d == pytest.approx([1.0, 2 * 180 / 432])  # shift by one: overlap 5x6x6 of 6x6x6 each
    assert res["summary"]["class_1"]["dice"]["mean"] == pytest.approx(np.mean(d))
    assert res["missing_predictions"] == []
    assert json.loads((tmp_path / "m.json").read_text())["summary"]
    assert (tmp_path / "m.csv").read_text().count("\n") == 3


def test_prediction_on_another_grid_is_refused(tmp_path):
    from medvol.errors import InputError

    write_volume(Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "ref" / "a.nii.gz")
    write_volume(Volume(np.zeros((4, 4, 5), np.uint8), np.eye(4)), tmp_path / "pred" / "a.nii.gz")
    with pytest.raises(InputError, match="a.nii.gz: not on the reference's grid"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")


def test_missing_predictions_are_an_error_naming_them(tmp_path):
    from medvol.errors import InputError

    aff = np.eye(4)
    for c in ("c0", "c1", "c9"):
        write_volume(Volume(np.zeros((4, 4, 4), np.uint8), aff), tmp_path / "ref" / f"{c}.nii.gz")
    write_volume(Volume(np.zeros((4, 4, 4), np.uint8), aff), tmp_path / "pred" / "c0.nii.gz")
    with pytest.raises(InputError, match="no prediction for 2 of the 3 reference case.*: c1, c9"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "m")
    assert not (tmp_path / "m.json").exists()


def test_affine_mismatch_quotes_both_affines(tmp_path):
    from medvol.errors import InputError

    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    write_volume(Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "ref" / "a.nii.gz")
    write_volume(Volume(np.zeros((4, 4, 4), np.uint8), shifted), tmp_path / "pred" / "a.nii.gz")
    with pytest.raises(InputError, match=r"affine \[\[1.0, 0.0, 0.0, 5.0\].* vs \[\[1.0, 0.0, 0.0, 0.0\]"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
