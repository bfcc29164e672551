"""nnU-Net v2's Residual Encoder presets (nnUNetPlannerResEncM/L/XL) and their network.

Expected plans are derived by hand from nnU-Net's rules (nnunetv2 2.8.1,
experiment_planners/residual_unets/residual_encoder_unet_planners.py and
default_experiment_planner.py), written out beside each case, and were checked against
nnU-Net's own planners on the same fingerprints (benchmarks/resenc_plans.py; this test does
not need nnU-Net).

The rules, per configuration (3d: reference batch 2, features 32*2^i capped at 320; 2d: batch
12, cap 512): reference = REF * gpu_memory / preset_gb (M 680e6 / 135e6 at 8 GB, L 2.1e9 /
380e6 at 24 GB, XL 3.6e9 / 560e6 at 40 GB; 3d / 2d); the patch shrinks while the network's
feature-map sum (ResidualEncoderUNet's) exceeds the reference; batch = round(reference /
estimate * reference batch), capped at round(dataset voxels / patch voxels) (max_dataset_covered
= 1), at least 2. Blocks per encoder stage (1, 3, 4, 6, 6, 6, ...), one conv per decoder stage.
"""

from __future__ import annotations

import numpy as np
import pytest

from medvol.preprocessing.planners import PLANNERS
from medvol.preprocessing.planning import plan_configuration, plan_experiment, resenc_unet_feature_map_size

from conftest import sphere_case, write_v2_dataset

LABELS3 = {"background": 0, "grey_matter": 1, "white_matter": 2}
STATS = {"0": {"mean": 182.1, "median": 183.1, "std": 43.7, "min": 53.7, "max": 306.8, "percentile_99_5": 288.7,
               "percentile_00_5": 80.5}}


def _fingerprint(spacings, shapes, relative=0.9):
    return ({"spacings": spacings, "shapes_after_crop": shapes, "median_relative_size_after_cropping": relative,
             "foreground_intensity_properties_per_channel": STATS},
            {"channel_names": {"0": "T1"}, "labels": LABELS3, "numTraining": len(spacings)})


# (fingerprint, dataset.json) in medvol's X, Y, Z order. "demo": the demo data's (medvol.datasets.brain's
# default build: 8 brain-tissue cases, ~2 mm, merged by `medvol plan`); "iso": 10 cases of
# 192 x 224 x 176 at 1 mm; "aniso": 20 cases of 320 x 288 x 32 at 0.75 x 0.75 x 5 mm; "wide": 30
# cases of 704 x 704 x 64 at 0.7 x 0.7 x 2.5 mm (a 2d patch too large for the presets).
FINGERPRINTS = {
    "demo": _fingerprint(
        [[2.0102040767669678, 2.0086207389831543, 2.0106382369995117],
         [2.0102040767669678, 2.0086207389831543, 2.0106382369995117],
         [1.6016260385513306, 1.5958904027938843, 2.589040994644165],
         [2.4024391140050874, 2.4020618048154687, 2.3924050331115723],
         [2.0102040767669678, 2.0086207389831543, 3.0],
         [1.8073394298553467, 2.198113203048706, 2.0106382369995117],
         [2.0102040449489835, 2.0086206764824532, 2.0106382369995117],
         [2.1888887882232666, 2.198113203048706, 2.197674512863159]],
        [[72, 91, 77], [72, 91, 77], [91, 114, 60], [60, 76, 65], [72, 87, 39], [81, 83, 77], [72, 75, 77],
         [66, 83, 71]], relative=0.4744333861732108),
    "iso": _fingerprint([[1.0, 1.0, 1.0]] * 10, [[192, 224, 176]] * 10),
    "aniso": _fingerprint([[0.75, 0.75, 5.0]] * 20, [[320, 288, 32]] * 20),
    "wide": _fingerprint([[0.7, 0.7, 2.5]] * 30, [[704, 704, 64]] * 30),
}

# Per fingerprint and preset: 3d patch (X, Y, Z), 3d batch, 3d stages, 3d estimate, 2d patch, 2d batch.
#
# demo: target spacing (2.010, 2.009, 2.104) mm, median resampled shape (72, 91, 74), 8 cases:
#   dataset 3,878,784 voxels. 3d: the 256^3 initial patch is clipped to the median; each axis
#   pools 4 times (74 -> 37 -> 19 -> 10 -> 5 and alike; the next would go below 8), so sizes round
#   up to multiples of 16: (80, 96, 80), 5 stages. ResidualEncoderUNet estimate 163,132,800 is
#   below every preset's reference (M 680e6, L 2.1e9, XL 3.6e9): no shrinking. batch =
#   round(ref / est * 2) = 8 / 26 / 44, capped at round(3,878,784 / 614,400 = 6.31) = 6 for all.
#   2d (in-plane X, Y): (80, 96), 5 stages, estimate 3,694,080; batch round(ref / est * 12):
#   M 135e6 -> 438.54 -> 439; L 380e6 -> 1234 and XL 560e6 -> 1819, both capped at
#   round(3,878,784 / 7,680 = 505.05) = 505. (default planner: batch 2 / 25.)
# iso: 1 mm, median (192, 224, 176), 10 cases: 75,694,080 voxels. 3d in nnU-Net's order (z, y, x)
#   = (176, 224, 192): 5 pools per axis, so multiples of 32: (192, 224, 192), 6 stages, estimate
#   2,194,843,392. XL (3.6e9): fits; batch round(3.28) = 3 (cap round(9.17) = 9). L (2.1e9): too
#   large; shrink the axis largest relative to the median, z (192/176), by 32: (160, 224, 192),
#   estimate 1,829,036,160 fits; batch round(2.1e9 / 1.829e9 * 2 = 2.30) = 2. M (680e6): seven
#   shrinks, each of the axis largest relative to the median, (160,224,192) -> (160,224,160) ->
#   (160,192,160) -> (128,192,160) -> (128,160,160) -> (128,160,128): 696,775,680 still > 680e6
#   -> (112,160,128): 609,969,920 fits (z loses 16, not 32: nnU-Net subtracts the divisor of the
#   patch one step smaller, 96, which pools 4 times); batch round(680e6 / 609,969,920 * 2 = 2.23) = 2.
#   2d (x, y in plane): (192, 224), 6 stages, estimate 21,138,432: batch round(ref / est * 12) =
#   M 76.64 -> 77, L 215.72 -> 216, XL 317.90 -> 318 (cap 1760).
# aniso: 0.75 x 0.75 x 5 mm, median (320, 288, 32), 20 cases: 58,982,400 voxels. z is coarse
#   (5 > 3 x 0.75) and has few voxels (32 x 3 < 288): the target takes z's 10th percentile, 5.
#   3d (z, y, x): initial (72, 482, 482) clipped to (32, 288, 320); z pools only once x, y are
#   within 2x of its spacing: (32, 320, 320), 7 stages, strides (1,1,1), (1,2,2), (1,2,2),
#   (2,2,2), (2,2,2), (2,2,2), (1,2,2); estimate 1,410,336,000. L: batch round(2.98) = 3; XL:
#   round(5.11) = 5 (cap round(18.0) = 18). M: shrinks y, x, x, z (28), y: (28, 224, 256) with 6
#   stages, 691,550,720 > 680e6, then z: (24, 224, 256), 592,757,760 fits; batch round(2.29) = 2.
#   2d: (320, 320), 7 stages, estimate 50,598,400: M 32.02 -> 32, L 90.12 -> 90, XL 132.81 -> 133.
# wide: 0.7 x 0.7 x 2.5 mm (z: 2.5 > 3 x 0.7 and 64 x 3 < 704, so its 10th percentile, 2.5),
#   median (704, 704, 64), 30 cases: 951,582,720 voxels. 3d (z, y, x): initial (64, 448, 448)
#   (256^3 voxels shaped by 1/spacing), 7 stages, estimate 4,735,974,656; every preset shrinks:
#   XL down to (48, 448, 448), 3,555,414,912 <= 3.6e9, batch round(2.03) = 2; L on to
#   (32, 384, 384), 1,741,427,712 <= 2.1e9, round(2.41) = 2; M on to (24, 256, 256),
#   585,283,584 <= 680e6, round(2.32) = 2.
#   2d: the in-plane median 704 pools 7 times (704 -> ... -> 11 -> 6), so (768, 768), 8 stages,
#   estimate 291,833,856. L (380e6) and XL (560e6) take it: batch round(15.63) = 16 and
#   round(23.03) = 23. M (135e6) shrinks while estimate > 135e6 (the default planner would test
#   estimate / 12 * 2 and keep 768^2): (768, 640) 243,194,880, (640, 640) 202,662,400, (640, 512)
#   162,129,920, (512, 512) 129,703,936 fits; batch round(135e6 / 129,703,936 * 12 = 12.49) = 12.
EXPECTED = {
    ("demo", "resenc-m"): ([80, 96, 80], 6, 5, 163_132_800, [80, 96], 439),
    ("demo", "resenc-l"): ([80, 96, 80], 6, 5, 163_132_800, [80, 96], 505),
    ("demo", "resenc-xl"): ([80, 96, 80], 6, 5, 163_132_800, [80, 96], 505),
    ("iso", "resenc-m"): ([128, 160, 112], 2, 6, 609_969_920, [192, 224], 77),
    ("iso", "resenc-l"): ([192, 224, 160], 2, 6, 1_829_036_160, [192, 224], 216),
    ("iso", "resenc-xl"): ([192, 224, 192], 3, 6, 2_194_843_392, [192, 224], 318),
    ("aniso", "resenc-m"): ([256, 224, 24], 2, 6, 592_757_760, [320, 320], 32),
    ("aniso", "resenc-l"): ([320, 320, 32], 3, 7, 1_410_336_000, [320, 320], 90),
    ("aniso", "resenc-xl"): ([320, 320, 32], 5, 7, 1_410_336_000, [320, 320], 133),
    ("wide", "resenc-m"): ([256, 256, 24], 2, 7, 585_283_584, [512, 512], 12),
    ("wide", "resenc-l"): ([384, 384, 32], 2, 7, 1_741_427_712, [768, 768], 16),
    ("wide", "resenc-xl"): ([448, 448, 48], 2, 7, 3_555_414_912, [768, 768], 23),
}


@pytest.mark.parametrize("fingerprint, planner", list(EXPECTED))
def test_preset_plans_equal_nnunets(fingerprint, planner):
    patch, batch, stages, estimate, patch_2d, batch_2d = EXPECTED[fingerprint, planner]
    plans = plan_experiment(*FINGERPRINTS[fingerprint], planner=planner)
    net = plans["network"]
    assert (plans["patch_size"], plans["batch_size"], net["n_stages"], net["vram_estimate"]) == \
        (patch, batch, stages, estimate)
    c2 = plans["configurations"]["2d"]
    assert (c2["patch_size"], c2["batch_size"]) == (patch_2d, batch_2d)
    assert net["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6, 6][:stages]
    assert net["n_conv_per_stage_decoder"] == [1] * (stages - 1)
    assert net["architecture"] == "ResidualEncoderUNet" and "n_conv_per_stage" not in net
    assert plans["planner"]["nnunet_planner"] == PLANNERS[planner].nnunet_class


def test_aniso_strides_keep_z_until_the_in_plane_axes_catch_up():
    plans = plan_experiment(*FINGERPRINTS["aniso"], planner="resenc-l")
    assert [s[2] for s in plans["network"]["strides"]] == [1, 1, 1, 2, 2, 2, 1]
    assert plans["network"]["kernel_sizes"][0] == [3, 3, 1]


def test_gpu_memory_scales_the_preset_reference():
    # resenc-l at 40 GB: reference 2.1e9 * 40 / 24 = 3.5e9 >= 2,194,843,392: XL's patch, batch
    # round(3.5e9 / 2,194,843,392 * 2 = 3.19) = 3 (nnU-Net's way of scaling a preset)
    plans = plan_experiment(*FINGERPRINTS["iso"], gpu_memory_gb=40, planner="resenc-l")
    assert plans["patch_size"] == [192, 224, 192] and plans["batch_size"] == 3
    assert plans["network"]["gpu_memory_gb"] == 40
    assert plan_experiment(*FINGERPRINTS["iso"], planner="resenc-xl")["network"]["gpu_memory_gb"] == 40


def test_presets_lift_the_5_percent_batch_cap():
    # 40^3 median, 10 cases: the default planner caps a batch at 5 % of 640,000 voxels (0.5
    # patches: minimum 2); ResEnc M allows a batch as large as the dataset: round(10) = 10
    # (the VRAM alone would allow round(680e6 / estimate * 2), far more)
    default = plan_configuration((1.0, 1.0, 1.0), (40.0, 40.0, 40.0), 3, n_voxels_dataset=40.0 ** 3 * 10)
    m = plan_configuration((1.0, 1.0, 1.0), (40.0, 40.0, 40.0), 3, 40.0 ** 3 * 10, 8.0, PLANNERS["resenc-m"])
    assert default["batch_size"] == 2 and m["batch_size"] == 10


def test_default_planner_plans_stay_as_before():
    fp, dj = FINGERPRINTS["demo"]
    plans = plan_experiment(fp, dj)
    assert plans == plan_experiment(fp, dj, 8.0, planner="default")
    assert "planner" not in plans and "n_blocks_per_stage" not in plans["network"]
    assert plans["network"]["n_conv_per_stage"] == 2 and plans["batch_size"] == 2


def test_unknown_planner_is_one_config_error():
    from medvol.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--planner: unknown planner 'resenc-s'; known: default, resenc-m, "
                                          r"resenc-l, resenc-xl"):
        plan_experiment(*FINGERPRINTS["demo"], planner="resenc-s")


# Hand count of ResidualEncoderUNet's feature maps on an 8^3 patch, 3 stages, strides 1, 2, 2,
# blocks (1, 3, 4), one decoder conv per stage, 3 classes; stage voxels 512, 64, 8:
#   stem 4 x 512 = 2,048; stage 0 (4 -> 4 features, stride 1: no projection) 2 x 4 x 512 = 4,096;
#   stage 1 (4 -> 8, strided: the first block's skip output counts too) (2 x 3 + 1) x 8 x 64 = 3,584;
#   stage 2 with features 16: (2 x 4 + 1) x 16 x 8 = 1,152, or with 8 (no projection conv but a
#   pooled skip, counted the same) 9 x 8 x 8 = 576.
#   decoder on stage 1 (8 features, 64 voxels): conv 512 + transposed conv 512 + head 3 x 64 = 192;
#   on stage 0 (4 features, 512 voxels): conv 2,048 + transposed conv 2,048 + head 1,536.
#   features (4, 8, 16): 10,880 + 1,216 + 5,632 = 17,728 (17,536 with only the top head)
#   features (4, 8, 8):  10,304 + 1,216 + 5,632 = 17,152 (16,960 with only the top head)
FMAP_CASES = [((4, 8, 16), 17_728, 17_536), ((4, 8, 8), 17_152, 16_960)]
STRIDES3 = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]


@pytest.mark.parametrize("features, with_heads, top_head", FMAP_CASES)
def test_resenc_feature_map_size_by_hand(features, with_heads, top_head):
    def fmap(ds):
        return resenc_unet_feature_map_size([8, 8, 8], STRIDES3, list(features), 3, (1, 3, 4), (1, 1), ds)

    assert (fmap(True), fmap(False)) == (with_heads, top_head)


@pytest.mark.parametrize("features, with_heads, top_head", FMAP_CASES)
def test_the_network_computes_the_feature_maps_the_estimate_counts(features, with_heads, top_head):
    # every conv, transposed conv and non-identity skip output of one forward pass in training
    # (all heads): the estimate counts exactly these
    import torch
    import torch.nn as nn

    from medvol.networks.resenc_unet import BasicBlockD, ResEncUNet

    net = ResEncUNet(3, 1, 3, list(features), [[3, 3, 3]] * 3, STRIDES3, [1, 3, 4], [1, 1]).train()
    counted = []
    for name, m in net.named_modules():
        if (isinstance(m, BasicBlockD) and len(m.skip)) or (
                isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and ".skip." not in name):
            (m.skip if isinstance(m, BasicBlockD) else m).register_forward_hook(
                lambda mod, i, o: counted.append(o.numel()))
    net(torch.zeros(1, 1, 8, 8, 8))
    assert sum(counted) == with_heads


def _resenc_plans(dim: int):
    from medvol.plans import Plans

    strides = [[1] * dim, [2] * dim, [2] * dim, [1] + [2] * (dim - 1)]
    topology = {"strides": strides, "kernel_sizes": [[3] * dim] * 4, "n_blocks_per_stage": [1, 3, 4, 6],
                "n_conv_per_stage_decoder": [1, 1, 1]}
    return Plans(num_channels=2, label_names={0: "bg", 1: "a", 2: "b"}, patch_size=[16] * dim, topology=topology)


@pytest.mark.parametrize("dim", [3, 2])
def test_tiny_resenc_unet_trains_with_deep_supervision(dim):
    import torch

    from medvol.config import ModelConfig
    from medvol.networks import build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(name="resenc_unet", base_features=4, max_features=8), _resenc_plans(dim), 2, 3)
    assert [len(s) for s in net.stages] == [1, 3, 4, 6] and [len(d) for d in net.decoder] == [1, 1, 1]
    x = torch.randn(2, 2, *[16] * dim)
    out = net.train()(x)  # the heads of the 3 decoder resolutions, upsampled to the patch, stacked on dim 1
    assert out.shape == (2, 3, 3, *[16] * dim)
    out.sum().backward()
    # the deepest block's last norm starts at zero (its conv gets no gradient yet), and learns
    assert net.stem.conv.weight.grad.abs().sum() > 0 and net.stages[3][5].conv2.adn.N.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 3, *[16] * dim)


def test_each_block_starts_as_its_skip():
    # nnU-Net zeroes the last norm of every basic block: a block without projection passes its
    # input through the final LeakyReLU unchanged (for inputs >= 0)
    import torch

    from medvol.networks.resenc_unet import ResEncUNet

    block = ResEncUNet(3, 1, 2, [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [2, 1], [1]).stages[0][1]
    x = torch.rand(1, 4, 6, 6, 6)
    torch.testing.assert_close(block(x.clone()), x)


def test_resenc_unet_refuses_a_plan_of_the_default_planner():
    from medvol.config import ModelConfig
    from medvol.errors import ConfigError
    from medvol.networks import build_model
    from medvol.plans import Plans

    plans = Plans.from_dict(plan_experiment(*FINGERPRINTS["demo"]))
    with pytest.raises(ConfigError, match="needs a Residual Encoder plan.*--planner resenc-m"):
        build_model(ModelConfig(name="resenc_unet"), plans, 1, 3)


def test_preprocess_with_a_preset_then_train_quickstart_resenc(tmp_path):
    from medvol import cli
    from medvol.cache import load_plans
    from medvol.config import load_recipe
    from medvol.training import train

    cases = {f"s{i}": ([sphere_case(seed=i)[0]], sphere_case(seed=i)[1], np.eye(4)) for i in range(2)}
    raw = write_v2_dataset(tmp_path / "Dataset005_Sphere", cases)
    pre = tmp_path / "pre"
    assert cli.main(["preprocess", str(raw), "-o", str(pre), "--planner", "resenc-m", "-j", "1", "-q"]) == 0
    plans = load_plans(pre)
    assert plans["planner"] == {"name": "resenc-m", "nnunet_planner": "nnUNetPlannerResEncM",
                                "nnunet_plans_name": "nnUNetResEncUNetMPlans"}
    # cropped 20 x 20 x 16 at 1 mm: 2 pools per axis (20 -> 10 -> 5), 3 stages; 2 cases cap the batch at
    # round(2 x 6,400 / 6,400) = 2
    assert plans["patch_size"] == [20, 20, 16] and plans["batch_size"] == 2
    assert plans["network"]["n_blocks_per_stage"] == [1, 3, 4]
    r = load_recipe("quickstart_resenc", ["model.base_features=4", "model.max_features=8", "data.num_workers=0",
                                          "trainer.steps=1", "trainer.val_every=1", "data.val_cases=[s1]",
                                          "trainer.final_validation=false"])
    train(r, pre, tmp_path / "run", device="cpu", quiet=True)
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").exists()


def test_cli_refuses_an_unknown_planner_in_one_line(tmp_path, capsys):
    from medvol import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["plan", str(tmp_path), "--planner", "resenc-s"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "--planner: invalid choice: 'resenc-s'" in err[0] and "resenc-xl" in err[0]
