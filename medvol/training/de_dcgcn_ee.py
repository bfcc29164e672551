"""DE-DCGCN-EE trainer (Li et al., IEEE TMI 2022; ``docs/methods/de_dcgcn_ee.md``): binary
retinal-vessel segmentation of 2D fundus images (RGB as three channels) by
:class:`medvol.networks.slice.de_dcgcn_ee.DEDCGCNEE`.

Loss: binary cross-entropy of the one vessel logit per pixel (the authors' release has the
network only; the network has no edge output, so there is no edge supervision: its edge
branch is driven by fixed Sobel filters). ``method.pos_weight`` weighs vessel pixels in the BCE
(1: plain BCE); ``method.dice_weight`` adds a soft Dice term (0: off). Both are departures
offered for thin-vessel data, off in the paper recipe.

Validation: the vessel metrics of :func:`medvol.evaluation.metrics.vessel_metrics` on each
validation case, counted inside the cached crop (the label is -1 outside it), averaged over
cases: ``val/auc``, ``val/accuracy``, ``val/sensitivity``, ``val/specificity``, ``val/f1``
(the primary metric).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medvol.errors import ConfigError
from medvol.evaluation.metrics import VESSEL_METRICS, vessel_metrics
from medvol.training import register_trainer
from medvol.training.engine import Trainer


@dataclass
class DEDCGCNEEOptions:
    """The ``method:`` section of ``trainer.name: de_dcgcn_ee``."""

    pos_weight: float = 1.0  # weight of vessel pixels in the BCE (1: the plain BCE)
    dice_weight: float = 0.0  # weight of an added soft Dice term (0: BCE only)
    threshold: float = 0.5  # validation: vessel where the probability >= this

    def __post_init__(self) -> None:
        if not (isinstance(self.pos_weight, (int, float)) and math.isfinite(self.pos_weight) and self.pos_weight > 0):
            raise ConfigError(f"'method.pos_weight' must be a positive number, got {self.pos_weight!r}")
        if not (isinstance(self.dice_weight, (int, float)) and math.isfinite(self.dice_weight)
                and self.dice_weight >= 0):
            raise ConfigError(f"'method.dice_weight' must be >= 0, got {self.dice_weight!r}")
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold < 1):
            raise ConfigError(f"'method.threshold' must lie in (0, 1), got {self.threshold!r}")


def vessel_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, pos_weight: float = 1.0,
                dice_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """BCE of the logits ``(B, 1, H, W)`` against the 0/1 ``target`` over the ``valid`` pixels
    (mean), plus ``dice_weight`` x (1 - soft Dice over the batch). Returns ``loss`` and parts."""
    valid = valid.float()
    weight = valid * (1.0 + (pos_weight - 1.0) * target)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (per_pixel * weight).sum() / weight.sum().clamp_min(1.0)
    parts = {"bce": bce}
    loss = bce
    if dice_weight > 0:
        p = torch.sigmoid(logits) * valid
        t = target * valid
        soft_dice = (2 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
        parts["dice"] = 1.0 - soft_dice
        loss = loss + dice_weight * parts["dice"]
    return {"loss": loss, **parts}


@register_trainer
class DEDCGCNEETrainer(Trainer):
    """``trainer.name: de_dcgcn_ee``: DE-DCGCN-EE (``model.name: de_dcgcn_ee``) on the 2D images
    of the plan's ``2d`` configuration; BCE on the vessel logit; vessel metrics in validation."""

    name = "de_dcgcn_ee"
    requires_model = "de_dcgcn_ee"
    Options = DEDCGCNEEOptions
    primary_metric = "val/f1"

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        label = batch["label"]
        logits = self.models["model"](batch["image"])
        return vessel_loss(logits.float(), (label > 0).float(), label >= 0, self.options.pos_weight,
                           self.options.dice_weight)

    def score_case(self, case: str, image, label, props: dict) -> dict:
        """The vessel metrics of one validation case inside its crop; unlabelled: nothing."""
        if label is None:
            return {}
        prob = self.validation_probabilities(image, props)[-1].float().numpy()
        ref = np.asarray(label[0])
        m = vessel_metrics(prob, ref > 0, ref >= 0, self.options.threshold)
        return {f"val/{k}": m[k] for k in VESSEL_METRICS}

    def reduce(self, scores: dict[str, list]) -> dict[str, float]:
        """Each metric's mean over the cases where it is defined."""
        return {k: float(np.nanmean(v)) for k, v in scores.items() if not all(math.isnan(x) for x in v)}
