"""nnU-Net's batch_dice per configuration: the Dice pooled over the batch or one per sample,
as the plan says (2d and a 3d_fullres beside a 3d_lowres: pooled; 3d_lowres and a 3d_fullres
alone: per sample), `trainer.batch_dice` overriding it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvol.losses import segmentation_loss
from medvol.losses.dice import BatchDiceLoss
from medvol.plans import batch_dice


def _case():
    """Two samples, two classes (background + fg), 1 x 1 x 4 voxels, hand-chosen probabilities."""
    p_fg = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.3, 0.1, 0.1, 0.6]])
    logits = torch.stack([torch.zeros_like(p_fg), torch.log(p_fg / (1 - p_fg))], 1).reshape(2, 2, 1, 1, 4)
    target = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]]).reshape(2, 1, 1, 1, 4)
    return p_fg.double(), target.reshape(2, 4).double(), logits, target


def test_per_sample_dice_is_the_mean_of_each_samples_dice_and_the_batch_dice_pools_them():
    p, g, logits, target = _case()
    s = 1e-5
    per = [(2 * (p[i] * g[i]).sum() + s) / (p[i].sum() + g[i].sum() + s) for i in range(2)]
    pooled = (2 * (p * g).sum() + s) / (p.sum() + g.sum() + s)
    assert BatchDiceLoss(batch=False)(logits, target).item() == pytest.approx(1 - float(np.mean(per)), abs=1e-6)
    assert BatchDiceLoss()(logits, target).item() == pytest.approx(1 - float(pooled), abs=1e-6)
    assert abs(float(np.mean(per)) - float(pooled)) > 0.01  # the two differ on this case


def test_the_loss_passes_batch_dice_through_deep_supervision():
    _, _, logits, target = _case()
    plain = segmentation_loss("dice", False, batch_dice=False)(logits, target)
    assert plain.item() == pytest.approx(BatchDiceLoss(batch=False)(logits, target).item())
    assert segmentation_loss("dice", False)(logits, target).item() != pytest.approx(plain.item())


def test_batch_dice_of_each_configuration_follows_the_plan():
    plans = {"configurations": {"2d": {"batch_dice": True}, "3d_fullres": {"batch_dice": False},
                                "3d_lowres": {"batch_dice": False},
                                "3d_cascade_fullres": {"inherits_from": "3d_fullres"}}}
    assert [batch_dice(plans, c) for c in ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")] == \
        [True, False, False, False]
    assert batch_dice({}, "3d_fullres") is True  # plans of an older medvol: the batch Dice as before


def test_the_supervised_trainer_takes_the_plans_choice_unless_the_recipe_sets_it(brain_pre, tmp_path):
    """The demo's plan has no 3d_lowres, so its 3d_fullres trains per sample (nnU-Net's rule)
    and its 2d configuration pools; trainer.batch_dice overrides either."""
    import json

    from medvol.config import load_recipe
    from medvol.training import get_trainer
    from medvol.training.distributed import DistInfo

    plans = json.loads((brain_pre / "plans.json").read_text())
    assert "3d_lowres" not in plans["configurations"] and plans["configurations"]["3d_fullres"]["batch_dice"] is False

    def dice_of(recipe, sets):
        r = load_recipe(recipe, ["model.base_features=4", "model.max_features=8", *sets])
        t = get_trainer("supervised")(r, brain_pre, tmp_path / f"run{len(sets)}{recipe}", DistInfo())
        return t.loss_fn.loss.dice.batch  # DeepSupervisionLoss around Dice + CE

    assert dice_of("quickstart", []) is False
    assert dice_of("quickstart", ["trainer.batch_dice=true"]) is True
    assert dice_of("quickstart_2d", []) is True
