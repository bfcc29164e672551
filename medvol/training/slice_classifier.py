"""Supervised slice classification (``trainer.name: slice_classifier``): stage one of the
two-stage subject pipeline, and the plain baseline of the 2D classification methods.

Needs ``data.configuration: 2d`` and a ``slice_labels.csv`` in the cache: each 2D sample
carries its slice's ``class`` (-1: none), and the loss is the cross-entropy of the model's
slice logits on the samples that have one. The model is any 2D classifier whose output
:func:`medvol.networks.slice_adapter.split_classifier_output` reads (logits, a ``(logits,
features)`` pair or a dict, e.g. ``dcmt``); ``medvol extract-features`` takes its features.

Its classes are the slice classes (the largest in the CSV + 1), not the plan's labels: the
checkpoint records ``num_classes`` so that :func:`medvol.checkpoint.load_run` rebuilds it.
Validation: slice accuracy, balanced accuracy (primary: most slices usually hold no finding)
and AUC for two classes over every labelled slice of the validation cases, each case's slices
classified whole (padded to the patch size where smaller, as in training).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medvol.data.slices import cached_slice_labels, raw_slice_of
from medvol.errors import ConfigError
from medvol.evaluation.classification import classification_metrics
from medvol.networks.slice_adapter import split_classifier_output
from medvol.training import register_trainer
from medvol.training.engine import Trainer


@register_trainer
class SliceClassifierTrainer(Trainer):
    name = "slice_classifier"
    primary_metric = "val/balanced_accuracy"  # slice classes are rarely balanced (most slices hold no finding)
    scan_validation = False  # a slice classifier: no label map to score against the scans

    def setup_data(self) -> None:
        super().setup_data()
        if self.slice_axis is None:
            raise ConfigError("trainer slice_classifier classifies slices: set data.configuration: 2d")
        labels = cached_slice_labels(self.cache_dir, self.slice_axis)
        if labels is None or not labels.slices:
            raise ConfigError(f"{self.cache_dir}: no slice classes (a slice_labels.csv beside the raw dataset.json "
                              "with slice rows is copied into the cache by medvol preprocess)")
        self.slice_labels = labels
        self.num_classes = max(2, 1 + max(c for s in labels.slices.values() for c in s.values()))

    def state(self, step: int, best: float) -> dict:
        return {**super().state(step, best), "num_classes": self.num_classes}

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        logits, _ = split_classifier_output(self.models["model"](batch["image"]))
        y = batch["class"]
        known = y >= 0
        loss = F.cross_entropy(logits[known].float(), y[known]) if bool(known.any()) else logits.sum() * 0
        return {"loss": loss}

    def score_case(self, case: str, image, label, props: dict) -> dict:
        """Class probabilities and classes of the case's labelled slices (``(n, K)``, ``(n,)``)."""
        from medvol.data.slice_outputs import slice_outputs

        axis = self.slice_axis
        assert axis is not None  # setup_data checked it
        raw_targets = self.slice_labels.slice_targets(case, int(props["original_shape"][axis]))
        target = raw_targets[raw_slice_of(props, axis)]
        logits, _ = slice_outputs(self.inference_model(), image, axis, self.recipe.data.context, self.device,
                                  self.patch_size, features=False)
        return {"probs": torch.from_numpy(logits).softmax(1).numpy()[target >= 0], "targets": target[target >= 0]}

    def reduce(self, scores: dict[str, list]) -> dict[str, float]:
        """Slice metrics over the labelled slices of the validation cases."""
        probs, targets = scores.get("probs", []), scores.get("targets", [])
        if not probs or not sum(map(len, targets)):
            return {}
        return classification_metrics(np.concatenate(probs), np.concatenate(targets))
