"""nnU-Net v2's 3d_lowres rule (ExperimentPlanner.plan_experiment) against numbers derived by hand.

The rule: while the last patch holds < 25 % of the median resampled shape's voxels, grow the
spacing by 1.03 (only the axes more than 2x finer than the coarsest while there are such, else
all), shrink the median shape by fullres / lowres spacing and plan again; drop the lowres
configuration when the fullres median has < 2x its voxels. batch_dice: 3d_lowres off,
3d_fullres on only when a 3d_lowres exists.
"""

from __future__ import annotations

import math

import pytest

from medvol.cache import plans_digest
from medvol.plans import Plans, lowres_plans
from medvol.preprocessing.planning import lowres_spacings, plan_experiment

DATASET = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1}}


def _fingerprint(shape, spacing=(1.0, 1.0, 1.0), n_cases: int = 1) -> dict:
    return {"spacings": [list(spacing)] * n_cases, "shapes_after_crop": [list(shape)] * n_cases,
            "median_relative_size_after_cropping": 0.9,
            "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}


def test_the_rule_grows_the_fine_axes_first_then_all():
    # A fixed 20 x 160 x 160 patch (planning order: the coarse axis first) on a 100 x 400 x 400
    # median at 2 x 0.5 x 0.5 mm: 512,000 / 16e6 = 0.032 of the voxels.
    # Phase 1: only the two 0.5-mm axes grow (2 / s > 2) until 0.5 * 1.03^k >= 1: k = 24
    # (1.03^23 = 1.974, 1.03^24 = 2.033). The median then has 16e6 / 1.03^48 voxels: ratio
    # 0.032 * 1.03^48 = 0.132 < 0.25, so phase 2 grows every axis: after j more steps the ratio is
    # 0.032 * 1.03^(48 + 3j) >= 0.25 once 48 + 3j >= ln(7.8125) / ln(1.03) = 69.55: j = 8.
    calls = []

    def fixed_patch(spacing, shape, median_voxels):
        calls.append((list(spacing), shape, median_voxels))
        return {"patch_size": [20, 160, 160]}

    spacing, cfg, voxels = lowres_spacings([2.0, 0.5, 0.5], [100.0, 400.0, 400.0], [20, 160, 160], fixed_patch)
    assert len(calls) == 32
    assert spacing == pytest.approx([2.0 * 1.03**8, 0.5 * 1.03**32, 0.5 * 1.03**32], rel=1e-12)
    assert calls[23][0] == pytest.approx([2.0, 0.5 * 1.03**24, 0.5 * 1.03**24], rel=1e-12)  # phase 1 ends
    assert calls[24][0] == pytest.approx([2.0 * 1.03, 0.5 * 1.03**25, 0.5 * 1.03**25], rel=1e-12)
    assert voxels == pytest.approx(16e6 / 1.03**72, rel=1e-12)
    # the shape handed to the planner is the median shrunk by fullres / lowres, rounded
    assert calls[-1][1] == [round(100 / 1.03**8), round(400 / 1.03**32), round(400 / 1.03**32)] == [79, 155, 155]
    assert cfg == {"patch_size": [20, 160, 160]}


def test_no_search_when_the_fullres_patch_covers_a_quarter():
    spacing, cfg, voxels = lowres_spacings([1.0, 1.0, 1.0], [64.0, 64.0, 64.0], [64, 40, 40],
                                           lambda *a: pytest.fail("planned"))
    assert cfg is None and list(spacing) == [1.0, 1.0, 1.0] and voxels == 64.0**3  # 25,600 / 65,536 = 0.39


def test_a_large_median_shape_gets_a_lowres_plan_derived_by_hand():
    # 600^3 voxels at 1 mm, and a memory target large enough that the patch is never shrunk: the
    # initial 256^3 patch (pooled 6 times: 256 -> 4, divisible by 64) holds 256^3 / 600^3 = 7.8 %
    # of the median. Every axis grows by 1.03 (isotropic); the median becomes 600 / 1.03^k while
    # the patch stays 256^3 (the rounded median >= 256). Ratio (256 / (600 / 1.03^k))^3 >= 0.25
    # once 1.03^k >= 600 / (256 / 0.25^(1/3)) = 1.4765: k = 14 (1.03^13 = 1.4685 gives 0.2460,
    # 1.03^14 = 1.5126 gives 0.2688). Kept: 600^3 / 396.67^3 = 1.03^42 = 3.46 >= 2.
    # Batch: the VRAM allows far more, the 5 % cap round(0.05 * 396.67^3 / 256^3) = 0 -> minimum 2.
    plans = plan_experiment(_fingerprint([600, 600, 600]), DATASET, gpu_memory_gb=1e6)
    assert plans["patch_size"] == [256, 256, 256] and plans["batch_size"] == 2
    c = plans["configurations"]
    low = c["3d_lowres"]
    assert low["spacing"] == pytest.approx([1.03**14] * 3, rel=1e-12)
    assert low["median_shape"] == pytest.approx([600 / 1.03**14] * 3, rel=1e-12)
    assert math.isclose(600 / 1.03**14, 396.67, abs_tol=0.01)
    assert low["patch_size"] == [256, 256, 256] and low["batch_size"] == 2
    assert low["network"]["n_stages"] == 7 and low["network"]["num_pool_per_axis"] == [6, 6, 6]
    assert low["batch_dice"] is False and low["next_stage"] == "3d_cascade_fullres"
    assert c["3d_fullres"] == {"batch_dice": True}
    assert c["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}


def test_lowres_is_dropped_when_it_would_not_halve_the_voxels():
    # 300^3 at 1 mm: patch 256^3 holds 62 % of the median: no search, no lowres, batch Dice off
    plans = plan_experiment(_fingerprint([300, 300, 300]), DATASET, gpu_memory_gb=1e6)
    assert plans["configurations"]["3d_fullres"] == {"batch_dice": False}
    assert "3d_lowres" not in plans["configurations"] and "3d_cascade_fullres" not in plans["configurations"]


def test_the_lowres_plan_is_a_cache_plan_of_its_own():
    plans = plan_experiment(_fingerprint([600, 600, 600]), DATASET, gpu_memory_gb=1e6)
    low = lowres_plans(plans)
    assert low["configuration"] == "3d_lowres" and lowres_plans(low) is low
    assert low["target_spacing"] == plans["configurations"]["3d_lowres"]["spacing"]
    assert plans_digest(low) != plans_digest(plans)  # its own cache: another plan digest
    p = Plans.from_dict(plans)
    assert p.for_configuration("3d_lowres").patch_size == [256, 256, 256]
    assert p.for_configuration("3d_lowres").target_spacing == pytest.approx([1.03**14] * 3)
    assert p.for_configuration("3d_cascade_fullres") is p


def test_the_demo_data_gets_no_lowres():
    # the demo's fingerprint (`medvol demo`, datasets/brain.py at ~2 mm, 8 cases): its median
    # resampled shape is 72 x 91 x 74 voxels, the fullres patch 80 x 96 x 80 covers all of it
    # (ratio > 1 >= 0.25): nnU-Net plans no 3d_lowres and no batch Dice for 3d_fullres
    fp = _fingerprint([72, 91, 77], (2.0102, 2.0086, 2.0106), 1)
    fp["spacings"] = [[2.0102, 2.0086, 2.0106]] * 2 + [[1.6016, 1.5959, 2.5890], [2.4024, 2.4021, 2.3924],
                                                       [2.0102, 2.0086, 3.0], [1.8073, 2.1981, 2.0106],
                                                       [2.0102, 2.0086, 2.0106], [2.1889, 2.1981, 2.1977]]
    fp["shapes_after_crop"] = [[72, 91, 77], [72, 91, 77], [91, 114, 60], [60, 76, 65], [72, 87, 39], [81, 83, 77],
                               [72, 75, 77], [66, 83, 71]]
    plans = plan_experiment(fp, DATASET)
    assert plans["median_shape_after_resampling"] == [72.0, 91.0, 74.0] and plans["patch_size"] == [80, 96, 80]
    assert sorted(plans["configurations"]) == ["2d", "3d_fullres"]
    assert plans["configurations"]["3d_fullres"] == {"batch_dice": False}
