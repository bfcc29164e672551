"""Resampling rules: new shape, separate-z choice, grids, label one-hot argmax."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medvol.preprocessing.resampling import (
    compute_new_shape,
    resample_image,
    resample_label,
    resample_probabilities,
    separate_z_axis,
)


def test_compute_new_shape_rounds_like_nnunet():
    assert compute_new_shape((100, 80, 30), (0.8, 0.8, 3.0), (1.0, 1.0, 1.5)) == (80, 64, 60)
    assert compute_new_shape((11, 11, 11), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == (6, 6, 6)  # round(5.5) -> 6


def test_separate_z_rule():
    assert separate_z_axis((0.7, 0.7, 5.0), (1.0, 1.0, 1.0)) == 2  # current spacing anisotropic
    assert separate_z_axis((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == 0  # target anisotropic
    assert separate_z_axis((1.0, 1.0, 2.9), (1.0, 1.0, 2.0)) is None  # ratio <= 3
    assert separate_z_axis((0.24, 1.25, 1.25), (1.0, 1.0, 1.0)) is None  # two coarse axes


def test_linear_resampling_matches_scipy_zoom_grid():
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.normal(size=(17, 13, 11)), 1.5).astype(np.float32)
    new = (25, 9, 16)
    ours = resample_image(x[None], new, (1, 1, 1), (0.68, 1.44, 0.69), order="linear")[0]
    ref = ndimage.zoom(x, np.array(new) / np.array(x.shape), order=1, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_cubic_option_is_skimage_cubic():
    from skimage.transform import resize

    x = np.random.default_rng(1).normal(size=(1, 8, 9, 10)).astype(np.float32)
    ours = resample_image(x, (12, 5, 10), (1, 1, 1), (0.7, 1.8, 1.0), order="cubic")
    ref = resize(x[0].astype(float), (12, 5, 10), order=3, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(ours[0], ref, atol=1e-5)


def test_separate_z_uses_nearest_along_the_coarse_axis():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 16, 16, 5)).astype(np.float32)
    for order in ("linear", "cubic"):
        out = resample_image(x, (32, 32, 15), (0.5, 0.5, 3.0), (0.25, 0.25, 1.0), order=order)  # z: 5 -> 15
        assert out.shape == (1, 32, 32, 15)
        # each output slice is exactly one in-plane-resampled input slice, 3 in a row
        inplane = resample_image(x, (32, 32, 5), (0.5, 0.5, 3.0), (0.25, 0.25, 3.0), order=order)
        for k in range(15):
            np.testing.assert_array_equal(out[0, :, :, k], inplane[0, :, :, k // 3])
        # the same volume without the rule would blend neighbouring slices
        blended = resample_image(x, (32, 32, 15), (0.5, 0.5, 3.0), (0.25, 0.25, 1.0), order=order, separate_z=None)
        assert not np.allclose(blended, out)


def test_label_resampling_one_hot_argmax():
    seg = np.zeros((1, 8, 8, 8), np.int16)
    seg[0, 2:6, 2:6, 2:6] = 1
    seg[0, 3:5, 3:5, 3:5] = 2
    seg[0, 0, 0, 0] = -1
    up = resample_label(seg, (16, 16, 16), (1, 1, 1), (0.5, 0.5, 0.5))
    assert up.dtype == np.int16 and set(np.unique(up)) == {-1, 0, 1, 2}
    expect = np.repeat(np.repeat(np.repeat(seg, 2, 1), 2, 2), 2, 3)
    # Faces of the blocks land exactly; only corner voxels, where linear weights of the
    # block fall below those of the surroundings (0.75^3 < 0.5), are given to the outside.
    assert (up == expect).mean() > 0.97
    np.testing.assert_array_equal(up[0, 7:9, 7:9, 7:9], 2)
    assert up[0, 4, 11, 4] == 0 and up[0, 5, 10, 5] == 1  # corner voxel vs one further in

    slab = np.zeros((1, 8, 6, 5), np.int16)
    slab[0, 2:6] = 1  # boundaries along one axis only: upsampling by 2 is exact
    up = resample_label(slab, (16, 12, 10), (1, 1, 1), (0.5, 0.5, 0.5))
    np.testing.assert_array_equal(up, np.repeat(np.repeat(np.repeat(slab, 2, 1), 2, 2), 2, 3))


def test_label_resampling_keeps_thin_structure_volume_roughly():
    seg = np.zeros((1, 40, 40, 40), np.int16)
    seg[0, 10:30, 10:30, 10:30] = 1
    out = resample_label(seg, (27, 27, 27), (1, 1, 1), (1.5, 1.5, 1.5))
    vol_before = seg.sum() * 1.0
    vol_after = (out == 1).sum() * 1.5 ** 3
    assert vol_after == pytest.approx(vol_before, rel=0.1)


def test_probabilities_resample_to_shape():
    p = np.random.default_rng(0).random((3, 6, 6, 4)).astype(np.float32)
    out = resample_probabilities(p, (12, 12, 8), (1, 1, 1), (0.5, 0.5, 0.5))
    assert tuple(out.shape) == (3, 12, 12, 8)


def _nnunet_cubic(x: np.ndarray, new_shape, axis):
    """nnU-Net's reference path: skimage per channel, or per slice in-plane + nearest along z."""
    from skimage.transform import resize

    if axis is None:
        return resize(x.astype(float), new_shape, order=3, mode="edge", anti_aliasing=False)
    moved = np.moveaxis(x, axis, 0)
    plane = [new_shape[a] for a in range(3) if a != axis]
    slices = np.stack([resize(s.astype(float), plane, order=3, mode="edge", anti_aliasing=False) for s in moved])
    coords = (moved.shape[0] / new_shape[axis]) * (np.arange(new_shape[axis]) + 0.5) - 0.5
    idx = np.clip(np.floor(coords + 0.5), 0, moved.shape[0] - 1).astype(int)
    return np.moveaxis(slices[idx], 0, axis)


@pytest.mark.parametrize("case", ["up", "down", "mixed", "separate_z_up", "separate_z_down"])
def test_fast_cubic_equals_skimage_on_a_real_volume(case):
    """The separable cubic path against nnU-Net's skimage calls on the real MNI152 T1 (with
    skull): within 1e-4 of the intensity range, isotropic and anisotropic (separate z)."""
    from medvol.datasets.realdata import package_file
    from medvol.io import read_volume

    t1 = np.asarray(read_volume(package_file("nilearn", "nilearn/datasets/data/"
                                            "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")).array)
    x = t1[60:124, 80:150, 60:110].astype(np.float32)  # 64 x 70 x 50 voxels at 1 mm
    spacing, new_shape = {"up": ((1, 1, 1), (83, 91, 65)), "down": ((1, 1, 1), (40, 44, 31)),
                          "mixed": ((1, 1, 1), (80, 50, 50)), "separate_z_up": ((1, 1, 4), (96, 105, 50)),
                          "separate_z_down": ((1, 1, 4), (40, 44, 120))}[case]
    target = tuple(s * n / m for s, n, m in zip(spacing, x.shape, new_shape))
    axis = separate_z_axis(spacing, target)
    assert (axis == 2) == case.startswith("separate_z")
    ours = resample_image(x[None], new_shape, spacing, target, order="cubic")[0]
    ref = _nnunet_cubic(x, new_shape, axis)
    assert ours.shape == ref.shape == new_shape
    assert np.abs(ours - ref).max() <= 1e-4 * (x.max() - x.min())
