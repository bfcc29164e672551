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

from medvol.evaluation.classification import classification_metrics
from medvol.networks.slice_adapter import split_classifier_output
from medvol.training import register_trainer
from medvol.training.engine import Trainer
from medvol.training.sources import GradedSlices


@register_trainer
class SliceClassifierTrainer(Trainer):
    """Supervised slice classification (``trainer.name: slice_classifier``): cross-entropy of
    the model's slice logits on the graded slices of the cache (:class:`GradedSlices`, the
    source DC-MT trains on too), validated by slice accuracy, balanced accuracy and AUC."""

    name = "slice_classifier"
    primary_metric = "val/balanced_accuracy"  # slice classes are rarely balanced (most slices hold no finding)
    scan_validation = False  # a slice classifier: no label map to score against the scans
    source: GradedSlices

    def make_source(self) -> GradedSlices:
        return GradedSlices.from_recipe(self.cache_dir, self.recipe)

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        logits, _ = split_classifier_output(self.models["model"](batch["image"]))
        y = batch["class"]
        known = y >= 0
        loss = F.cross_entropy(logits[known].float(), y[known]) if bool(known.any()) else logits.sum() * 0
        return {"loss": loss}

    def score_case(self, case: str, image, label, props: dict) -> dict:
        """Class probabilities and classes of the case's labelled slices (``(n, K)``, ``(n,)``)."""
        from medvol.data.slice_outputs import slice_outputs

        src = self.source
        assert src.slice_axis is not None  # a GradedSlices source has one
        target = src.cached_grades(props)
        logits, _ = slice_outputs(self.inference_model(), image, src.slice_axis, src.context, self.device,
                                  src.patch_size, features=False)
        return {"probs": torch.from_numpy(logits).softmax(1).numpy()[target >= 0], "targets": target[target >= 0]}

    def reduce(self, scores: dict[str, list]) -> dict[str, float]:
        """Slice metrics over the labelled slices of the validation cases."""
        probs, targets = scores.get("probs", []), scores.get("targets", [])
        if not probs or not sum(map(len, targets)):
            return {}
        return classification_metrics(np.concatenate(probs), np.concatenate(targets))
