"""nnU-Net v2's ``2d`` configuration (ExperimentPlanner.get_plans_for_configuration with two
spacings), checked against expectations computed by hand from its rules.

The 2D constants: reference 85e6 feature-map voxels for batch 12 at 8 GB; a configuration
fits while ``estimate / 12 * 2 <= 85e6 * gb / 8``; batch = round(reference / estimate * 12),
capped at round(5 % of the 3d dataset's voxels / patch voxels), never below 2; features
32 * 2^i capped at 512; initial patch 2048^2 voxels shaped by 1/spacing, clipped to the
median shape; the VRAM estimate is PlainConvUNet's feature-map sum (2 convs per stage).
"""

from __future__ import annotations

from medvol.cache import plans_digest
from medvol.preprocessing.planning import plan_configuration, plan_experiment

# Feature-map sum of a 4-stage 2D U-Net (features 32/64/128/256) on a 48 x 40 patch, 2 classes:
#   encoder: 2 convs x f x voxels: 2*32*1920 + 2*64*480 + 2*128*120 + 2*256*30 = 230,400
#   decoder stage on skip of v voxels with f features: 2 convs (2*f*v) + transposed conv (f*v)
#   and, as nnU-Net 2.8.1 estimates (network built without deep supervision), the one
#   segmentation head on the last stage (2*v): v=120,f=128: 46,080; v=480,f=64: 92,160;
#   v=1920,f=32: 184,320 + 3,840 = 188,160; total 230,400 + 326,400 = 556,800
FMAP_48x40 = 556_800


def test_2d_patch_topology_and_batch_from_the_vram_budget():
    # spacing 1 x 1: the 2048 x 2048 initial patch is clipped to the median 48 x 40. Pooling
    # halves both axes while both stay >= 8 (2 x the minimal edge 4): 48x40 -> 24x20 -> 12x10
    # -> 6x5: 3 pools each, 4 stages, kernel 3 everywhere (isotropic), 48 and 40 divisible by 8.
    cfg = plan_configuration((1.0, 1.0), (48.0, 40.0), num_classes=2, n_voxels_dataset=1e12)
    assert cfg["patch_size"] == [48, 40]
    assert cfg["strides"] == [[1, 1], [2, 2], [2, 2], [2, 2]]
    assert cfg["kernel_sizes"] == [[3, 3]] * 4
    assert cfg["features_per_stage"] == [32, 64, 128, 256]
    assert cfg["vram_estimate"] == FMAP_48x40
    # 556,800 / 12 * 2 = 92,800 <= 85e6: fits; batch = round(85e6 / 556,800 * 12) = round(1831.9)
    assert cfg["batch_size"] == 1832


def test_2d_patch_shrinks_the_axis_largest_relative_to_the_median():
    # 0.008 GB: reference 85e6 * 0.008 / 8 = 85,000 < 92,800, so the patch shrinks. Both axes are
    # at 100 % of the median; argsort keeps the later one last, so axis 1 loses its divisor 8:
    # 48 x 32 (6 x 4 at the bottom, still 3 pools each). Feature maps: encoder 2*32*1536 +
    # 2*64*384 + 2*128*96 + 2*256*24 = 184,320; decoder 96*3*128 + 384*3*64 + 1536*(3*32+2)
    # (one head) = 261,120; total 445,440; 445,440 / 6 = 74,240 <= 85,000: stop.
    # batch = round(85,000 / 445,440 * 12) = round(2.29) = 2.
    cfg = plan_configuration((1.0, 1.0), (48.0, 40.0), num_classes=2, n_voxels_dataset=1e12, gpu_memory_gb=0.008)
    assert cfg["patch_size"] == [48, 32]
    assert cfg["vram_estimate"] == 445_440
    assert cfg["batch_size"] == 2


def test_2d_features_cap_at_512_and_3d_at_320():
    cfg2 = plan_configuration((1.0, 1.0), (512.0, 512.0), num_classes=2, n_voxels_dataset=1e12)
    # 512 -> 4 at the bottom: 7 pools, 8 stages; 32 * 2^i reaches 512 at stage 4 and stays there
    assert cfg2["features_per_stage"] == [32, 64, 128, 256, 512, 512, 512, 512]
    cfg3 = plan_configuration((1.0, 1.0, 1.0), (128.0, 128.0, 128.0), num_classes=2, n_voxels_dataset=1e12)
    assert max(cfg3["features_per_stage"]) == 320


def _fingerprint(n_cases: int) -> dict:
    # the thick axis is X (3 mm, 10 voxels), Y has 48 voxels and Z 40, all at 1 mm
    return {"spacings": [[3.0, 1.0, 1.0]] * n_cases, "shapes_after_crop": [[10, 48, 40]] * n_cases,
            "median_relative_size_after_cropping": 0.9,
            "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}


DATASET = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1}}


def test_plans_gain_a_2d_configuration_in_xyz_order():
    plans = plan_experiment(_fingerprint(12), DATASET)
    # top level: today's 3d_fullres plan (target spacing = the median, 3 <= 3 x 1 is not anisotropic)
    assert plans["target_spacing"] == [3.0, 1.0, 1.0] and plans["patch_size"] == [10, 48, 40]
    c2 = plans["configurations"]["2d"]
    # nnU-Net transposes the coarsest axis (X) first and slices across it; the slice plane is Y, Z
    assert c2["slice_axis"] == 0 and c2["in_plane_axes"] == [1, 2]
    assert c2["spacing"] == [1.0, 1.0] and c2["median_shape"] == [48.0, 40.0]
    # nnU-Net plans (Z, Y) = (40, 48): 3 pools each -> 40 x 48, reported in Y, Z order as 48 x 40
    assert c2["patch_size"] == [48, 40]
    assert c2["network"]["vram_estimate"] == FMAP_48x40
    assert c2["network"]["strides"] == [[1, 1], [2, 2], [2, 2], [2, 2]]
    # the VRAM allows 1828, but 5 % of the dataset (12 cases x 10*48*40 voxels x 0.05 = 11,520)
    # is round(11,520 / 1920) = 6 patches
    assert c2["batch_size"] == 6
    # with 4 cases the cap is round(3840 / 1920) = 2, which is also the minimum
    assert plan_experiment(_fingerprint(4), DATASET)["configurations"]["2d"]["batch_size"] == 2


def test_the_2d_block_leaves_the_cache_digest_alone():
    plans = plan_experiment(_fingerprint(4), DATASET)
    without = {k: v for k, v in plans.items() if k != "configurations"}
    assert plans_digest(plans) == plans_digest(without)
    changed = dict(without, batch_size=without["batch_size"] + 1)
    assert plans_digest(changed) != plans_digest(without)


def test_isotropic_data_is_sliced_across_z():
    # all spacings equal: nnU-Net's argmax over its (z, y, x) order picks z first, medvol's Z (axis 2)
    fp = dict(_fingerprint(4), spacings=[[1.0, 1.0, 1.0]] * 4, shapes_after_crop=[[40, 48, 10]] * 4)
    c2 = plan_experiment(fp, DATASET)["configurations"]["2d"]
    assert c2["slice_axis"] == 2 and c2["in_plane_axes"] == [0, 1] and c2["patch_size"] == [40, 48]
