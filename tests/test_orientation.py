"""--orientation RAS: one voxel order for datasets that mix storage orders (KiTS19 vs LiTS)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from medvol.cli import main
from medvol.io import read_volume
from medvol.preprocessing import list_cases, load_case, preprocess_dataset

from conftest import sphere_case, write_v2_dataset


def _lits_and_kits(root, seed):
    """The same physical scan stored LiTS-style (H, W, slices) and KiTS-style (slices, H, W)."""
    img, lab, _ = sphere_case(shape=(24, 22, 12), radius=5.0, seed=seed)
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    aff[:3, 3] = [-10, 4, 30]
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1  # (k, i, j) -> (i, j, k)
    kits_aff = aff @ perm
    kits_aff[:3, 0] *= -1  # and stored with the slice axis running the other way
    kits_aff[:3, 3] = aff[:3, :3] @ [0, 0, img.shape[2] - 1] + aff[:3, 3]
    flip_k = np.transpose(img, (2, 0, 1))[::-1]
    return {f"lits{seed}": ([img], lab, aff),
            f"kits{seed}": ([flip_k.copy()], np.transpose(lab, (2, 0, 1))[::-1].copy(), kits_aff)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orient")
    cases = {**_lits_and_kits(tmp, 0), **_lits_and_kits(tmp, 1)}
    raw = write_v2_dataset(tmp / "Dataset030_Mixed", cases)
    # same world positions: voxel (1, 2, 3) of lits0 is voxel (12 - 1 - 3, 1, 2) of kits0
    a, b = read_volume(raw / "imagesTr" / "lits0_0000.nii.gz"), read_volume(raw / "imagesTr" / "kits0_0000.nii.gz")
    np.testing.assert_allclose(a.affine @ [1, 2, 3, 1], b.affine @ [8, 1, 2, 1])
    assert a.array[1, 2, 3] == b.array[8, 1, 2]
    return raw, tmp


def test_stored_order_differs_and_the_fingerprint_warns(mixed, caplog):
    raw, tmp = mixed
    with caplog.at_level(logging.WARNING):
        preprocess_dataset(raw, tmp / "stored", num_workers=1, quiet=True)
    assert "coarse (through-plane) axis is not the same array axis" in caplog.text and "kits0" in caplog.text
    shapes = {c: load_case(tmp / "stored", c)[0].shape for c in list_cases(tmp / "stored")}
    assert shapes["kits0"] != shapes["lits0"]


def test_ras_gives_one_shape_and_predictions_return_to_each_files_geometry(mixed, tmp_path):
    raw, tmp = mixed
    pre = tmp / "ras"
    assert main(["preprocess", str(raw), "-o", str(pre), "-j", "1", "--quiet", "--orientation", "RAS"]) == 0
    assert json.loads((pre / "plans.json").read_text())["orientation"] == "RAS"
    k_img, k_lab, k_props = load_case(pre, "kits0")
    l_img, l_lab, l_props = load_case(pre, "lits0")
    assert k_img.shape == l_img.shape and k_props["orientation"] == "RAS"
    np.testing.assert_allclose(k_img, l_img, atol=1e-5)  # the same scan, the same cached array
    np.testing.assert_array_equal(k_lab, l_lab)
    assert k_props["original_shape"] == [12, 24, 22] and k_props["oriented_shape"] == [24, 22, 12]
    run = tmp_path / "run"
    assert main(["train", "quickstart", "--data", str(pre), "--out", str(run), "--device", "cpu", "--quiet",
                 "--set", "model.base_features=4", "--set", "model.max_features=8", "--set", "trainer.steps=1",
                 "--set", "trainer.val_every=1", "--set", "data.patch_size=[16, 16, 8]", "--set", "data.batch_size=2",
                 "--set", "data.num_workers=0", "--set", "data.val_cases=[lits1]"]) == 0
    out = tmp_path / "pred"
    assert main(["predict", "-m", str(run), "-i", str(raw / "imagesTr"), "-o", str(out), "--device", "cpu",
                 "--quiet", "--no-pictures", "--no-tta"]) == 0
    for case in ("kits0", "lits0"):
        src, pred = read_volume(raw / "imagesTr" / f"{case}_0000.nii.gz"), read_volume(out / f"{case}.nii.gz")
        assert pred.spatial_shape == src.spatial_shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    k = np.asarray(read_volume(out / "kits0.nii.gz").array)
    lits = np.asarray(read_volume(out / "lits0.nii.gz").array)
    np.testing.assert_array_equal(np.transpose(k[::-1], (1, 2, 0)), lits)  # one prediction, two storage orders
