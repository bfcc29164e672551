"""nnU-Net's label modes (medvol.labels): regions with regions_class_order, the ignore label.
Losses against hand-computed values, conversion order, parsing errors naming the file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medvol.errors import InputError
from medvol.inference.postprocess import to_labels
from medvol.io import read_volume
from medvol.labels import LabelScheme
from medvol.losses import segmentation_loss
from medvol.losses.dice import BatchDiceCELoss, BatchDiceLoss, cross_entropy
from medvol.training.supervised import SupervisedTrainer

S = 1e-5  # the losses' smoothing


def scheme(labels, order=None):
    return LabelScheme.parse("dataset.json", labels, order)


def volume(values):
    """A (1, C, 1, 1, N) logit tensor or a (1, 1, 1, 1, N) target from per-voxel lists."""
    a = torch.tensor(values, dtype=torch.float32)
    return a.T[None, :, None, None, :] if a.ndim == 2 else a[None, None, None, None, :].long()


IGNORE = {"background": 0, "fg": 1, "ignore": 2}
REGIONS = {"background": 0, "a": [1, 2], "b": 2}


def test_ignore_label_dice_and_ce_by_hand():
    labels = scheme(IGNORE)
    logits = volume([[0.0, math.log(3)], [0.0, 0.0], [0.0, 5.0]])  # fg softmax 0.75, 0.5, (ignored)
    target = volume([1, 0, 2])
    dice = (2 * 0.75 + S) / (1.25 + 1 + S)  # annotated voxels only: tp .75, sum p 1.25, sum g 1
    ce = (math.log(4 / 3) + math.log(2)) / 2  # mean over the 2 annotated voxels
    assert BatchDiceLoss(labels=labels)(logits, target).item() == pytest.approx(1 - dice, abs=1e-6)
    assert cross_entropy(logits, target, labels).item() == pytest.approx(ce, abs=1e-6)
    assert BatchDiceCELoss(labels=labels)(logits, target).item() == pytest.approx(1 - dice + ce, abs=1e-6)
    # the ignored voxel's logits get no gradient
    logits.requires_grad_(True)
    BatchDiceCELoss(labels=labels)(logits, target).backward()
    assert logits.grad[..., 2].abs().max() == 0 and logits.grad[..., :2].abs().max() > 0


def test_ignore_label_everything_ignored_gives_a_finite_loss():
    labels = scheme(IGNORE)
    logits = torch.zeros(1, 2, 1, 1, 3, requires_grad=True)
    loss = BatchDiceCELoss(labels=labels)(logits, torch.full((1, 1, 1, 1, 3), 2))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)  # smoothing: Dice 1, no CE


def test_region_dice_and_bce_by_hand():
    labels = scheme(REGIONS, [1, 2])
    l3 = math.log(3)
    logits = volume([[l3, l3], [0.0, -l3], [-l3, 0.0]])  # sigmoids: a .75 .5 .25, b .75 .25 .5
    target = volume([2, 1, 0])  # region a = {1, 2}: 1 1 0; region b = {2}: 1 0 0
    da = (2 * 1.25 + S) / (1.5 + 2 + S)
    db = (2 * 0.75 + S) / (1.5 + 1 + S)
    bce = (4 * math.log(4 / 3) + 2 * math.log(2)) / 6  # the mean over 2 regions x 3 voxels
    assert BatchDiceCELoss(labels=labels)(logits, target).item() == pytest.approx(1 - (da + db) / 2 + bce, abs=1e-6)
    assert cross_entropy(logits, target, labels).item() == pytest.approx(bce, abs=1e-6)
    assert torch.equal(labels.region_targets(target)[0, :, 0, 0], torch.tensor([[1.0, 1, 0], [1, 0, 0]]))


def test_regions_with_ignore_label_by_hand():
    labels = scheme({**REGIONS, "ignore": 3}, [1, 2])
    logits = torch.zeros(1, 2, 1, 1, 3)
    target = volume([2, 1, 3])  # last voxel ignored
    da = (2 * 1.0 + S) / (1.0 + 2 + S)
    db = (2 * 0.5 + S) / (1.0 + 1 + S)
    bce = 4 * math.log(2) / 2  # nnU-Net: sum over 2 regions x 2 annotated voxels / 2 annotated voxels
    assert BatchDiceCELoss(labels=labels)(logits, target).item() == pytest.approx(1 - (da + db) / 2 + bce, abs=1e-6)


def test_deep_supervision_targets_are_regions_of_the_downsampled_labels():
    labels = scheme(REGIONS, [1, 2])
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=g).float()  # MONAI interpolates float maps
    full, half = torch.randn(2, 2, 4, 4, 4, generator=g), torch.randn(2, 2, 2, 2, 2, generator=g)
    loss = segmentation_loss("dice_ce", True, labels)([full, half], target)
    small = target[:, :, 1::2, 1::2, 1::2]  # nearest-exact to half size: voxel centres 1, 3
    base = BatchDiceCELoss(labels=labels)
    assert loss.item() == pytest.approx((base(full, target) + 0.5 * base(half, small)).item(), abs=1e-6)


def test_region_conversion_places_labels_in_order():
    labels = scheme(REGIONS, [1, 2])
    # voxels: both regions, only a, only b, none
    probs = np.array([[0.9, 0.9, 0.1, 0.2], [0.8, 0.3, 0.7, 0.4]], np.float32)[:, None, None, :]
    assert to_labels(probs, labels)[0, 0].tolist() == [2, 1, 2, 0]  # b placed last overwrites a
    backwards = scheme({"background": 0, "b": 2, "a": [1, 2]}, [2, 1])
    assert to_labels(probs[::-1].copy(), backwards)[0, 0].tolist() == [1, 1, 2, 0]  # a placed last wins


def test_class_conversion_is_the_argmax():
    probs = np.array([[0.2, 0.7], [0.5, 0.1], [0.3, 0.2]], np.float32)[:, None, None, :]
    assert to_labels(probs, scheme(IGNORE))[0, 0].tolist() == [1, 0]


def test_scheme_outputs_and_values():
    r = scheme({**REGIONS, "ignore": 3}, [1, 2])
    assert r.has_regions and r.num_outputs == 2 and r.regions == [(1, 2), (2,)]
    assert r.label_values == [0, 1, 2] and r.file_values == [0, 1, 2, 3]
    assert scheme(IGNORE).outputs == {0: "background", 1: "fg"}  # no output for the ignore label
    assert scheme(IGNORE).scored() == {"fg": (1,)}


@pytest.mark.parametrize("labels, order, message", [
    ({"background": 0, "fg": 1, "ignore": 5}, None, "ignore label must be the highest label value, one above"),
    ({"background": 0, "fg": 1, "ignore": 1}, None, "ignore label must be the highest"),
    ({"background": 0, "fg": 1, "ignore": [2]}, None, "must be one integer, not a region"),
    (REGIONS, None, "'regions_class_order' is required"),
    (REGIONS, [1], "one label value per foreground region"),
    (REGIONS, [1, 7], r"'regions_class_order' holds \[7\]"),
    ({"background": 0, "a": [1, 3]}, [1], "consecutive from 0"),
    ({"background": 1, "a": 0}, None, "background as 0"),
    ({"a": 1, "b": 2}, None, "background as 0"),
])
def test_bad_label_declarations_name_the_file(labels, order, message):
    with pytest.raises(InputError, match=message) as e:
        scheme(labels, order)
    assert "dataset.json" in str(e.value)


def test_metrics_skip_ignore_voxels_and_score_regions_by_hand(tmp_path):
    from medvol.evaluation.metrics import evaluate_pairs
    from medvol.io import Volume, write_volume

    pred = np.array([1, 1, 0, 2, 2], np.uint8).reshape(5, 1, 1)
    ref = np.array([1, 0, 0, 2, 3], np.uint8).reshape(5, 1, 1)  # 3: ignore (the prediction's 2 there is no FP)
    pairs = {"a": (write_volume(Volume(pred, np.eye(4), {}), tmp_path / "p.nii.gz"),
                   write_volume(Volume(ref, np.eye(4), {}), tmp_path / "r.nii.gz"))}
    classes = evaluate_pairs(pairs, {"background": 0, "one": 1, "two": 2, "ignore": 3})["cases"]["a"]
    assert classes["one"]["dice"] == pytest.approx(2 / 3)  # P {0,1}, R {0}
    assert classes["two"]["dice"] == pytest.approx(1.0)  # without the ignore rule: 2/3
    assert classes["two"]["volume_pred_ml"] == pytest.approx(0.001)  # the ignored voxel is not counted
    assert set(classes) == {"one", "two"}
    regions = evaluate_pairs(pairs, {"background": 0, "any": [1, 2], "two": 2, "ignore": 3})["cases"]["a"]
    assert regions["any"]["dice"] == pytest.approx(2 * 2 / (3 + 2))  # P {0,1,3}, R {0,3}
    assert regions["two"]["dice"] == pytest.approx(1.0)


def test_sampling_with_an_ignore_label_centres_patches_on_annotated_voxels():
    from medvol.cache import ANNOTATED, label_locations
    from medvol.data.sampling import choose_patch_start

    seg = np.full((1, 40, 40, 40), 2, np.int8)  # all ignored but one annotated slab, class 1 in a corner
    seg[0, :, :, 30:32] = 0
    seg[0, 2:4, 2:4, 30:32] = 1
    locs = label_locations(seg, scheme({"background": 0, "fg": 1, "ignore": 2}))
    assert set(locs) == {"1", ANNOTATED} and len(locs[ANNOTATED]) == 3200  # all 3200 (< 10,000)
    assert (seg[0][tuple(locs[ANNOTATED].T)] != 2).all()
    rng = np.random.default_rng(0)
    patch = np.array([8, 8, 8])
    for force_fg in (False, True):
        for _ in range(50):
            start, cls = choose_patch_start(seg.shape[1:], patch, rng, locs, force_fg)
            window = seg[0][tuple(slice(a, a + p) for a, p in zip(start, patch))]
            assert (window != 2).any()  # never a patch of ignored voxels only
            assert cls == (1 if force_fg else None)  # foreground picks the class, never 'annotated'
            if force_fg:
                assert (window == 1).any()
    without = label_locations(seg, scheme({"background": 0, "a": 1, "b": 2}))
    assert ANNOTATED not in without  # no ignore label: the sampler as before


def test_region_decoder_blends_logits_and_takes_sigmoids():
    from medvol.inference.sliding_window import RegionSigmoid, sliding_window_probabilities

    class Fixed(torch.nn.Module):  # two region logits, +2 and -1 everywhere, from one input channel
        def forward(self, x):
            return torch.cat([x * 0 + 2.0, x * 0 - 1.0], 1)

    probs = sliding_window_probabilities(Fixed(), torch.zeros(1, 12, 12, 12).half(), [8, 8, 8], torch.device("cpu"),
                                         RegionSigmoid(), n_channels=2)
    assert probs.shape == (2, 12, 12, 12)
    assert torch.allclose(probs[0].float(), torch.sigmoid(torch.tensor(2.0)), atol=1e-3)
    assert torch.allclose(probs[1].float(), torch.sigmoid(torch.tensor(-1.0)), atol=1e-3)
    one = sliding_window_probabilities(torch.nn.Conv3d(1, 1, 1), torch.zeros(1, 8, 8, 8).half(), [8, 8, 8],
                                       torch.device("cpu"), RegionSigmoid(), n_channels=1)
    assert one.shape[0] == 1  # one region stays one sigmoid channel (no binary-softmax expansion)


def test_ignore_label_cache_trains_with_supervised_and_is_refused_by_other_trainers(tmp_path):
    from medvol.config import load_recipe
    from medvol.errors import ConfigError
    from medvol.preprocessing import preprocess_dataset
    from medvol.training import train

    from conftest import sphere_case, write_v2_dataset

    cases = {}
    for i in range(2):
        img, lab, _ = sphere_case(seed=i)
        lab = lab.copy()
        lab[:, :, ::2] = 2  # every other slice unannotated
        cases[f"s{i}"] = ([img], lab, np.eye(4))
    root = write_v2_dataset(tmp_path / "Dataset045_Sparse", cases, labels={"background": 0, "fg": 1, "ignore": 2})
    assert not preprocess_dataset(root, tmp_path / "pre", num_workers=1, quiet=True).failures
    tiny = ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
            "data.num_workers=0", "trainer.steps=2", "trainer.val_every=2", "data.val_cases=[s1]"]
    metrics = train(load_recipe("quickstart", tiny), tmp_path / "pre", tmp_path / "run", device="cpu", quiet=True)
    assert set(metrics) >= {"val/dice_fg"} and not any(k.endswith("_ignore") for k in metrics)
    plain = load_recipe("quickstart", tiny + ["trainer.name=test_label_schemes:PlainLossTrainer"])
    with pytest.raises(ConfigError, match="declares an ignore label, which trainer 'plain_loss' does not support"):
        train(plain, tmp_path / "pre", tmp_path / "run_plain", device="cpu", quiet=True)


class PlainLossTrainer(SupervisedTrainer):
    """A trainer whose loss does not know nnU-Net's label modes (as every method but supervised)."""

    name = "plain_loss"
    label_modes = False


def test_region_run_predicts_region_sigmoids_and_no_region_outside_the_crop(tmp_path):
    from medvol.config import load_recipe
    from medvol.inference.predictor import predict
    from medvol.preprocessing import preprocess_dataset
    from medvol.training import train

    from conftest import sphere_case, write_v2_dataset

    cases = {}
    for i in range(2):
        img, lab, _ = sphere_case(seed=i)
        lab = lab.astype(np.uint8) + (lab > 0) * (np.indices(lab.shape)[0] > 11)  # sphere 1, its half 2
        cases[f"s{i}"] = ([img], lab, np.eye(4))
    regions = {"background": 0, "sphere": [1, 2], "half": 2}
    root = write_v2_dataset(tmp_path / "Dataset046_Halves", cases, labels=regions,
                            extra_json={"regions_class_order": [1, 2]})
    assert not preprocess_dataset(root, tmp_path / "pre", num_workers=1, quiet=True).failures
    tiny = ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
            "data.num_workers=0", "trainer.steps=2", "trainer.val_every=2", "data.val_cases=[s1]",
            "trainer.final_validation=false"]
    metrics = train(load_recipe("quickstart", tiny), tmp_path / "pre", tmp_path / "run", device="cpu", quiet=True)
    assert {"val/dice_sphere", "val/dice_half"} <= set(metrics)
    predict(tmp_path / "run", root / "imagesTr", tmp_path / "pred", device="cpu", save_probabilities=True, quiet=True)
    probs = np.load(tmp_path / "pred" / "s0.npz")["probabilities"].astype(np.float32)
    assert probs.shape == (2, 24, 24, 20)  # one sigmoid per region, in the scan's grid
    assert (probs[:, :2] == 0).all() and (probs[:, :, :, :2] == 0).all()  # outside the crop box: no region
    seg = np.asarray(read_volume(tmp_path / "pred" / "s0.nii.gz").array)
    plans = json.loads((tmp_path / "run" / "plans.json").read_text())
    assert np.array_equal(seg, to_labels(probs, LabelScheme.from_plans(plans)))
