"""Planning rules: target spacing, topology, VRAM proxy, patch/batch size.

Reference values marked "nnU-Net" were produced by nnunetv2 2.8.1's own functions
(get_pool_and_conv_props, PlainConvUNet.compute_conv_feature_map_size, and full
nnUNetv2_plan_and_preprocess runs on the real brain datasets of the benchmark).
"""

from __future__ import annotations

import numpy as np
import pytest

from medvol.preprocessing.planning import (
    fullres_target_spacing,
    plan_configuration,
    plan_experiment,
    pool_and_conv_props,
    unet_feature_map_size,
)

# (spacing, patch in) -> pools per axis, strides, kernels, patch out, feature-map voxels (nnU-Net)
TOPOLOGY_REFERENCE = [
    ((3.0, 0.8, 0.8), (40, 192, 160), [3, 5, 5],
     [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
     [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], [40, 192, 160], 331427400),
    ((1.0, 1.0, 1.0), (128, 128, 128), [5, 5, 5],
     [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
     [[3, 3, 3]] * 6, [128, 128, 128], 453694976),
    ((5.0, 0.7, 0.7), (20, 320, 256), [2, 6, 6],
     [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]],
     [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], [20, 320, 256], 484895600),
    ((2.1, 2.0, 2.0), (74.0, 91.0, 72.5), [4, 4, 4],
     [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 5, [80, 96, 80], 132762000),
]


@pytest.mark.parametrize("spacing, patch, pools, strides, kernels, padded, fmap", TOPOLOGY_REFERENCE)
def test_topology_and_vram_proxy_match_nnunet(spacing, patch, pools, strides, kernels, padded, fmap):
    num_pool, s, k, p, div = pool_and_conv_props(spacing, patch)
    assert num_pool == pools and s == strides and k == kernels and p == padded
    assert div == [2 ** n for n in pools]
    features = [min(320, 32 * 2 ** i) for i in range(len(s))]
    assert unet_feature_map_size(p, s, features, num_classes=3) == fmap


def test_target_spacing_is_the_median():
    sp = np.array([[1.0, 1.0, 1.2], [0.8, 0.8, 1.0], [1.0, 1.0, 1.5]])
    sz = np.array([[100, 100, 90]] * 3)
    np.testing.assert_allclose(fullres_target_spacing(sp, sz), [1.0, 1.0, 1.2])


def test_anisotropic_axis_takes_its_10th_percentile():
    # z median 5 > 3 x 0.8, and 40 slices x 3 < 512: both anisotropic
    sp = np.array([[0.8, 0.8, 5.0], [0.8, 0.8, 5.0], [0.8, 0.8, 2.4], [0.8, 0.8, 5.0]])
    sz = np.array([[512, 512, 40]] * 4)
    np.testing.assert_allclose(fullres_target_spacing(sp, sz), [0.8, 0.8, 2.4 + 0.3 * 2.6])
    # ...but never finer than the largest other spacing
    sp = np.array([[1, 1, 0.5], [1, 1, 0.6], [1, 1, 7.0], [1, 1, 7.0], [1, 1, 7.0]])
    np.testing.assert_allclose(fullres_target_spacing(sp, np.array([[300, 300, 30]] * 5)), [1, 1, 1 + 1e-5])
    # spacing anisotropic but enough slices: plain median
    sz = np.array([[200, 200, 150]] * 5)
    np.testing.assert_allclose(fullres_target_spacing(sp, sz), [1, 1, 7.0])


@pytest.mark.parametrize("spacing, median, n_cases, patch, batch, strides", [
    # nnU-Net 3d_fullres plans of the benchmark's real brain datasets (planning axis order)
    ((4.021276473999023, 0.8996139168739319, 0.8995434045791626), (39.0, 203.0, 163.0), 6, [40, 224, 192], 2,
     [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
    ((1.098101258277893, 1.0, 1.0), (141.0, 181.5, 145.5), 6, [112, 160, 128], 2,
     [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]),
])
def test_patch_and_batch_size_match_nnunet(spacing, median, n_cases, patch, batch, strides):
    cfg = plan_configuration(spacing, median, num_classes=3, n_voxels_dataset=float(np.prod(median) * n_cases))
    assert cfg["patch_size"] == patch and cfg["batch_size"] == batch and cfg["strides"] == strides


def test_batch_size_grows_with_memory_and_is_capped_by_dataset_size():
    small = plan_configuration((1.0, 1.0, 1.0), (40.0, 40.0, 40.0), 2, n_voxels_dataset=40.0 ** 3 * 1000)
    assert small["patch_size"] == [40, 40, 40] and small["batch_size"] > 2
    capped = plan_configuration((1.0, 1.0, 1.0), (40.0, 40.0, 40.0), 2, n_voxels_dataset=40.0 ** 3 * 10)
    assert capped["batch_size"] == 2  # 5 % of 10 cases' voxels is less than one patch: minimum 2


def test_plan_experiment_maps_axes_back_to_xyz():
    # thick axis stored first in the file (X): nnU-Net transposes it, medvol reports it in X
    fp = {"spacings": [[4.0, 0.9, 0.9]] * 6, "shapes_after_crop": [[39, 163, 203]] * 6,
          "median_relative_size_after_cropping": 0.9,
          "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}
    plans = plan_experiment(fp, {"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2}})
    assert plans["target_spacing"] == [4.0, 0.9, 0.9]
    assert plans["patch_size"][0] < plans["patch_size"][1]
    assert plans["network"]["kernel_sizes"][0] == [1, 3, 3]
    assert plans["normalization"][0]["use_mask_for_norm"] is False
