"""Normalisation schemes with hand-computed numbers, and cropping."""

from __future__ import annotations

import numpy as np
import pytest

from medvol.preprocessing.cropping import crop_to_nonzero
from medvol.preprocessing.normalization import normalize_channel, scheme_for_channel


def test_scheme_names_follow_channel_names():
    assert scheme_for_channel("CT") == "CTNormalization"
    assert scheme_for_channel("ct") == "CTNormalization"
    assert scheme_for_channel("noNorm") == "NoNormalization"
    assert scheme_for_channel("rescale_to_0_1") == "RescaleTo01Normalization"
    assert scheme_for_channel("T2") == "ZScoreNormalization"


def test_ct_clip_then_zscore_with_dataset_statistics():
    img = np.array([-1000.0, -100.0, 0.0, 40.0, 80.0, 3000.0], np.float32).reshape(6, 1, 1)
    stats = {"mean": 40.0, "std": 20.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0}
    out = normalize_channel(img.copy(), "CTNormalization", stats=stats)
    # clip to [-100, 200], then (x - 40) / 20
    expect = np.array([-7.0, -7.0, -2.0, 0.0, 2.0, 8.0]).reshape(6, 1, 1)
    np.testing.assert_allclose(out, expect)


def test_zscore_whole_image_and_inside_mask():
    img = np.array([0.0, 0.0, 2.0, 4.0, 6.0], np.float32).reshape(5, 1, 1)
    seg = np.array([-1, -1, 0, 1, 0]).reshape(5, 1, 1)
    whole = normalize_channel(img.copy(), "ZScoreNormalization")
    m, s = img.mean(), img.std()
    np.testing.assert_allclose(whole, (img - m) / s, rtol=1e-6)
    masked = normalize_channel(img.copy(), "ZScoreNormalization", seg=seg, use_mask=True)
    # inside: values 2, 4, 6 -> mean 4, std sqrt(8/3); outside stays 0
    np.testing.assert_allclose(masked.ravel(), [0, 0, -2 / np.sqrt(8 / 3), 0, 2 / np.sqrt(8 / 3)], rtol=1e-6)


def test_rescale_and_nonorm():
    img = np.array([2.0, 4.0, 6.0], np.float32).reshape(3, 1, 1)
    np.testing.assert_allclose(normalize_channel(img.copy(), "RescaleTo01Normalization").ravel(), [0, 0.5, 1])
    np.testing.assert_array_equal(normalize_channel(img.copy(), "NoNormalization"), img)
    with pytest.raises(ValueError):
        normalize_channel(img.copy(), "Nope")


def test_crop_box_hole_filling_and_outside_marker():
    img = np.zeros((2, 10, 12, 8), np.float32)
    img[0, 2:7, 3:9, 1:6] = 5.0
    img[0, 4, 5, 3] = 0.0  # a hole inside: filled, so still "inside"
    img[1, 8, 10, 6] = 1.0  # only channel 1 is nonzero here: extends the box
    lab = np.zeros((1, 10, 12, 8), np.int16)
    lab[0, 3, 4, 2] = 1
    cimg, seg, bbox = crop_to_nonzero(img, lab)
    assert bbox == [[2, 9], [3, 11], [1, 7]]
    assert cimg.shape == (2, 7, 8, 6) and seg.shape == (1, 7, 8, 6)
    assert seg[0, 4 - 2, 5 - 3, 3 - 1] == 0  # filled hole: background, not outside
    assert seg[0, 3 - 2, 4 - 3, 2 - 1] == 1  # label kept
    assert seg[0, 8 - 2, 3 - 3, 1 - 1] == -1  # zero voxel outside the mask
    _, seg_nolabel, _ = crop_to_nonzero(img, None)
    assert set(np.unique(seg_nolabel)) == {-1, 0}
