"""The GRU slice aggregator's trainer (``trainer.name: slice_aggregator``, after DC-MT's
aggregation network, MedIA 2022; ``docs/methods/slice_aggregator.md``).

Stage two of the two-stage subject pipeline: ``medvol extract-features`` ran a trained slice
classifier over every subject and wrote per-slice features with the subjects' classes
(:mod:`medvol.io.slice_features`); this trainer learns subject classes from them with
:class:`medvol.networks.aggregator.GRUSliceAggregator`. ``--data`` is that features file (or
its folder, a :class:`medvol.training.sources.FeatureFile`); no cache and no plans.

- A batch holds whole subjects: ``features`` ``(B, S, F)`` zero-padded to the longest subject
  and ``mask`` ``(B, S)`` (True = real slice); the model takes any length under its mask, or
  crops/pads to ``model.options.fixed_slices`` (24, DC-MT) itself.
- Supervised: cross-entropy on the labelled subjects' classes.
- Mean teacher (``method.mean_teacher: true``): the teacher is the student's EMA (decay
  ``min(1 - 1/(t + 1), ema_decay)``, ``t`` the clock below) and gets no gradient; it runs in
  train mode (dropout, batch statistics) and keeps the student's BatchNorm statistics
  (``method.ema_buffers: true``) or its own (``false``, as published). Each network sees its own
  perturbed view of the features (element-wise feature dropout, Gaussian noise scaled by each
  feature's spread over the training slices; both 0 as published, where the networks' dropout
  is the only noise) and the student is pulled towards the teacher by the MSE of their
  softmaxes, on every subject of the batch, weighted by ``consistency * ramp(t)``: 0 while
  ``t < consistency_start``, then ``exp(-5 (1 - (min(t, L) - start) / L)^2)`` with ``L`` the
  ramp length (the published formula: with a start > 0 it stops at ``exp(-5 (start / L)^2)``,
  0.819 for 20 and 100). ``data.unlabelled_per_batch`` puts unlabelled subjects (no subject
  class, or left unlabelled by ``data.labelled`` / ``method.labelled_fraction``) in each
  batch. Prediction uses the teacher.
- The clock: the 0-based step (ramp length ``method.rampup_steps``), or with ``method.epochs``
  the published 1-based epoch ``step // steps_per_epoch + 1`` (ramp length
  ``method.rampup_epochs``). An epoch is ``method.steps_per_epoch`` steps, by default (as
  published) one pass over the unlabelled training subjects at ``data.unlabelled_per_batch``
  per batch (the labelled ones at the batch size without an unlabelled stream). With
  ``method.epochs`` the run is that many epochs (``trainer.steps`` is replaced, as
  ``trainer.val_every`` is by ``method.val_every_epochs``; the run's ``recipe.yaml`` records the
  values used); ``method.lr_decay_every`` multiplies the learning rate by ``method.lr_decay``
  every that many epochs (``schedule.name`` must be ``constant``).
- Validation: subject accuracy (primary), balanced accuracy, and AUC for two classes, on the
  held-out labelled subjects (``data.val_cases``, or a seeded ``data.val_fraction``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.data.dataset import StepDataset, Streams
from medvol.errors import ConfigError
from medvol.evaluation.classification import classification_metrics
from medvol.io.slice_features import AGGREGATOR_RUN_FILE, SliceFeatures
from medvol.training import register_trainer
from medvol.training.ema import frozen_copy, update_teacher
from medvol.training.engine import Trainer, unwrap
from medvol.training.schedules import epoch_step_decay, recipe_in_epochs
from medvol.training.sources import FeatureFile
from medvol.utils import write_json

log = logging.getLogger(__name__)

DEFAULT_BATCH = 8  # subjects per batch when the recipe gives no data.batch_size


@dataclass
class AggregatorOptions:
    """The recipe's ``method`` section for the slice aggregator: supervised or mean teacher
    (EMA decay, BatchNorm statistics, consistency weight with its start and ramp-up), the
    feature views' dropout and noise, the share of subjects that keep their class, and the
    epoch clock (steps per epoch, epochs, validation and learning-rate decay every so many
    epochs). Checked when the recipe is loaded (:meth:`__post_init__`)."""

    mean_teacher: bool = False  # train a mean teacher (semi-supervised) instead of the student alone
    ema_decay: float = 0.99  # the teacher's EMA decay (reached after 1 / (1 - decay) steps or epochs)
    ema_buffers: bool = True  # the teacher takes the student's BatchNorm statistics (false: its own, published)
    consistency: float = 1.0  # weight of the softmax-MSE consistency after the ramp-up
    consistency_start: float = 0  # no consistency before this step (epoch with method.epochs; published 20)
    rampup_steps: int = 200  # sigmoid ramp-up length of the consistency weight, in steps
    rampup_epochs: float = 100  # the same in epochs, with method.epochs (published 100)
    feature_dropout: float = 0.1  # element-wise dropout on the input features of each view
    feature_noise: float = 0.1  # Gaussian noise on each view, in units of each feature's std
    labelled_fraction: float | None = None  # the share of training subjects that keep their class (published 0.25)
    steps_per_epoch: int | None = None  # None: one pass over the unlabelled training subjects (published)
    epochs: float | None = None  # when set: trainer.steps = epochs * steps_per_epoch, the clock counts epochs
    val_every_epochs: float | None = None  # when set: trainer.val_every = that many epochs (published: 5)
    lr_decay_every: float | None = None  # epochs (published: 50); needs schedule.name constant
    lr_decay: float = 0.5  # the learning rate's factor every lr_decay_every epochs

    def __post_init__(self) -> None:
        """Each setting in its range, or one ConfigError line naming ``method.<key>``."""
        o = self
        for key, ok, want in (("ema_decay", 0 <= o.ema_decay < 1, "in [0, 1)"),
                              ("consistency", o.consistency >= 0, ">= 0"),
                              ("consistency_start", o.consistency_start >= 0, ">= 0"),
                              ("rampup_steps", o.rampup_steps >= 0, ">= 0"),
                              ("rampup_epochs", o.rampup_epochs >= 0, ">= 0"),
                              ("feature_dropout", 0 <= o.feature_dropout < 1, "in [0, 1)"),
                              ("feature_noise", o.feature_noise >= 0, ">= 0"),
                              ("labelled_fraction", o.labelled_fraction is None or 0 < o.labelled_fraction <= 1,
                               "in (0, 1] or null"),
                              ("steps_per_epoch", o.steps_per_epoch is None or o.steps_per_epoch >= 1,
                               ">= 1 or null"),
                              ("epochs", _positive(o.epochs), "> 0 or null"),
                              ("val_every_epochs", _positive(o.val_every_epochs), "> 0 or null"),
                              ("lr_decay_every", _positive(o.lr_decay_every), "> 0 or null"),
                              ("lr_decay", 0 < o.lr_decay <= 1, "in (0, 1]")):
            if not ok:
                raise ConfigError(f"method.{key} must be {want}, got {getattr(o, key)!r}")


def _positive(v) -> bool:
    return v is None or v > 0


def consistency_ramp(t: float, start: float, length: float) -> float:
    """DC-MT's consistency ramp at clock ``t``: 0 before ``start``, then
    ``exp(-5 (1 - (min(t, length) - start) / length)^2)`` (``sigmoid_rampup`` with ``type='att'``
    in the authors' ``utils/ramps.py``; with ``start`` 0 the plain sigmoid ramp-up); 1 for a
    ramp of length 0."""
    if t < start:
        return 0.0
    if length <= 0:
        return 1.0
    done = min(max(t, start), max(length, start)) - start
    return math.exp(-5.0 * (1.0 - done / length) ** 2)


class SubjectDataset(StepDataset):
    """Whole subjects, drawn as a pure function of ``(seed, step, slot)`` from the labelled or
    the unlabelled stream, each padded to the longest subject of the file."""

    def __init__(self, data: SliceFeatures, streams: Streams, seed: int = 0):
        super().__init__(streams.global_batch, seed)
        self.subjects = data.by_subject()
        self.streams = streams
        self.length = max(len(s.features) for s in data.items)

    def sample(self, step: int, slot: int, rng: np.random.Generator) -> dict:
        labelled = self.streams.labelled_index(slot) is not None
        pool = self.streams.labelled if labelled else self.streams.unlabelled
        s = self.subjects[pool[int(rng.integers(len(pool)))]]
        feats = np.zeros((self.length, s.features.shape[1]), np.float32)
        feats[:len(s.features)] = s.features
        return {"features": torch.from_numpy(feats), "mask": torch.arange(self.length) < len(s.features),
                "subject_class": torch.tensor(s.subject_class if labelled else -1),
                "labelled": torch.tensor(labelled), "slot": torch.tensor(slot)}


@register_trainer
class SliceAggregatorTrainer(Trainer):
    """The slice aggregator (``trainer.name: slice_aggregator``): a GRU over the per-slice
    features of each subject (:class:`FeatureFile`) learns the subject class, alone or as a
    mean teacher with consistency on the unlabelled subjects; validated by subject accuracy,
    balanced accuracy and AUC. No cache, no plans: the run records its features file instead."""

    name = "slice_aggregator"
    Options = AggregatorOptions
    primary_metric = "val/accuracy"
    scan_validation = False  # subject classes from features: no label map to score against the scans
    source: FeatureFile

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.options.mean_teacher:
            self.inference_key = "teacher"
        src = self.source
        train = [src.features.by_subject()[c].features for c in src.labelled + src.unlabelled]
        scale = np.concatenate(train).std(0) if train else np.ones(self.in_channels)
        self.feature_scale = torch.as_tensor(scale, dtype=torch.float32, device=self.device)

    def make_source(self) -> FeatureFile:
        return FeatureFile.from_recipe(self.cache_dir, self.recipe, DEFAULT_BATCH, self.options.labelled_fraction)

    def after_source(self) -> None:
        """The mean-teacher check, and the epoch clock (``method.epochs`` as steps)."""
        d, o = self.recipe.data, self.options
        if d.unlabelled_per_batch and not o.mean_teacher:
            raise ConfigError("data.unlabelled_per_batch > 0 needs method.mean_teacher: true (only the mean "
                              "teacher learns from unlabelled subjects)")
        self.steps_per_epoch = o.steps_per_epoch or self._published_epoch_steps()
        self.recipe = recipe_in_epochs(self.recipe, self.steps_per_epoch, o.epochs, o.val_every_epochs)
        if o.epochs is not None or o.lr_decay_every is not None:
            log.info("slice_aggregator: %d steps per epoch, %d steps (%.1f epochs)", self.steps_per_epoch,
                     self.recipe.trainer.steps, self.recipe.trainer.steps / self.steps_per_epoch)

    def _published_epoch_steps(self) -> int:
        """One pass over the unlabelled training subjects (the labelled ones without an
        unlabelled stream), the remainder dropped, as the published two-stream sampler does."""
        u = self.recipe.data.unlabelled_per_batch * self.dist.world_size
        src = self.source
        n, per_step = (len(src.unlabelled), u) if u else (len(src.labelled), src.batch_size * self.dist.world_size)
        return max(1, n // per_step)

    def clock(self, step: int) -> int:
        """The consistency ramp's and the teacher decay's time: the step, or with
        ``method.epochs`` the published 1-based epoch."""
        return step if self.options.epochs is None else step // self.steps_per_epoch + 1

    def consistency_weight(self, step: int) -> float:
        o = self.options
        length = o.rampup_steps if o.epochs is None else o.rampup_epochs
        return o.consistency * consistency_ramp(self.clock(step), o.consistency_start, length)

    def make_schedulers(self) -> dict:
        """The recipe's schedule, or with ``method.lr_decay_every`` x ``lr_decay`` every that many epochs."""
        o = self.options
        if o.lr_decay_every is None:
            return super().make_schedulers()
        return epoch_step_decay(self.recipe.schedule, self.optimizers, self.recipe.trainer.steps, self.steps_per_epoch,
                                o.lr_decay_every, o.lr_decay)

    def build_models(self) -> dict[str, nn.Module]:
        models = super().build_models()
        if self.options.mean_teacher:
            models["teacher"] = frozen_copy(models["model"])
        return models

    def make_dataset(self) -> StepDataset:
        return SubjectDataset(self.source.features, self.streams(), seed=self.recipe.trainer.seed)

    def before_training(self, start_step: int) -> None:
        """The run folder records where its features came from: ``medvol predict`` finds the
        slice classifier there."""
        if self.dist.is_main:
            meta = self.source.features.meta
            write_json(self.run_dir / AGGREGATOR_RUN_FILE, {
                "features": str(self.source.root.resolve()), "feature_dim": self.in_channels,
                "num_classes": self.num_classes, "classifier": meta.get("classifier"),
                "classifier_checkpoint": meta.get("checkpoint"), "classifier_sha256": meta.get("checkpoint_sha256"),
                "features_precision": meta.get("precision")})

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """One view of the features: element-wise dropout, then noise of ``feature_noise`` stds."""
        o = self.options
        if o.feature_dropout:
            x = F.dropout(x, o.feature_dropout, training=True)
        if o.feature_noise:
            x = x + o.feature_noise * self.feature_scale * torch.randn_like(x)
        return x

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        n = int(batch["mask"].sum(1).max())  # drop the padding no subject of this batch needs
        x, mask, y = batch["features"][:, :n], batch["mask"][:, :n], batch["subject_class"]
        logits = self.models["model"](self.perturb(x), mask)
        known = y >= 0
        ce = F.cross_entropy(logits[known], y[known]) if bool(known.any()) else logits.sum() * 0
        if not self.options.mean_teacher:
            return {"loss": ce, "ce": ce}
        with torch.no_grad():
            target = self.models["teacher"](self.perturb(x), mask).float().softmax(1)
        consistency = F.mse_loss(logits.float().softmax(1), target)
        weight = self.consistency_weight(step)
        return {"loss": ce + weight * consistency, "ce": ce, "consistency": consistency}

    def after_update(self, step: int) -> None:
        """The teacher's EMA update (decay from the clock: the step, or the published epoch)."""
        if self.options.mean_teacher:
            update_teacher(self.models["teacher"], unwrap(self.models["model"]), self.clock(step),
                           self.options.ema_decay, self.options.ema_buffers)

    def validate(self) -> dict[str, float]:
        """Subject accuracy, balanced accuracy (and AUC for two classes) on the validation subjects."""
        from medvol.data.slice_outputs import subject_probabilities

        if not self.source.val_cases:
            return {}
        items = [self.source.features.by_subject()[c] for c in self.source.val_cases]
        probs = subject_probabilities(self.inference_model(), [s.features for s in items], self.device)
        return classification_metrics(probs, np.array([s.subject_class for s in items]))
