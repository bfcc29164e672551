"""Supervised segmentation (the nnU-Net recipe): Dice + CE with deep supervision."""

from __future__ import annotations

import torch

from medvol.losses import segmentation_loss
from medvol.plans import batch_dice
from medvol.training import register_trainer
from medvol.training.engine import Trainer


@register_trainer
class SupervisedTrainer(Trainer):
    """``trainer.name: supervised``: the nnU-Net recipe. Any segmentation model of the
    registry (DynUNet by default) on labelled patches, ``trainer.loss`` (Dice + CE by default)
    on every deep-supervision head when ``model.deep_supervision`` is on; no ``method:`` options.
    Validation is the engine's per-class Dice by the sliding window. nnU-Net's label modes
    (:mod:`medvol.labels`): regions train sigmoid Dice + BCE per region and validate per
    region; an ignore label is left out of the loss and of the validation Dice."""

    name = "supervised"
    label_modes = True  # nnU-Net's regions and ignore label: see medvol.labels

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        batch = self.recipe.trainer.batch_dice
        if batch is None:  # nnU-Net's rule, recorded in plans.json per configuration
            batch = batch_dice(self.plans.raw, self.recipe.data.configuration)
        self.loss_fn = segmentation_loss(self.recipe.trainer.loss, self.recipe.model.deep_supervision,
                                         self.plans.labels, batch)

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        out = self.models["model"](batch["image"])
        if self.recipe.model.deep_supervision and out.dim() == batch["image"].dim() + 1:
            out = list(out.unbind(1))  # DynUNet stacks the deep-supervision heads on dim 1
        return {"loss": self.loss_fn(out, batch["label"])}
