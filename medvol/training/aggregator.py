"""The GRU slice aggregator's trainer (``trainer.name: slice_aggregator``, METHODS.md §7).

Stage two of the two-stage subject pipeline: ``medvol extract-features`` ran a trained slice
classifier over every subject and wrote per-slice features with the subjects' classes
(:mod:`medvol.io.slice_features`); this trainer learns subject classes from them with
:class:`medvol.networks.aggregator.GRUSliceAggregator`. ``--data`` is that features file (or
its folder); the 3D cache and plans are not used (``self.plans`` is None).

- A batch holds whole subjects: ``features`` ``(B, S, F)`` zero-padded to the longest subject
  and ``mask`` ``(B, S)`` (True = real slice); the model takes any length under its mask, or
  crops/pads to ``model.options.fixed_slices`` (24, DC-MT) itself.
- Supervised: cross-entropy on the labelled subjects' classes.
- Mean teacher (``method.mean_teacher: true``): the teacher is the student's EMA (decay
  ``min(1 - 1/(step + 1), ema_decay)``, keyed to steps) and gets no gradient; each network
  sees its own perturbed view of the features (element-wise feature dropout, Gaussian noise
  scaled by each feature's spread over the training slices) and the student is pulled towards
  the teacher by the MSE of their softmaxes, on every subject of the batch, weighted by
  ``consistency * sigmoid_rampup(step, rampup_steps)``. ``data.unlabelled_per_batch`` puts
  unlabelled subjects (no subject class, or left unlabelled by ``data.labelled``) in each batch.
  Prediction uses the teacher.
- Validation: subject accuracy (primary), balanced accuracy, and AUC for two classes, on the
  held-out labelled subjects (``data.val_cases``, or a seeded ``data.val_fraction``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.data.dataset import StepDataset, Streams, split_cases
from medvol.errors import ConfigError
from medvol.evaluation.classification import classification_metrics
from medvol.io.slice_features import AGGREGATOR_RUN_FILE, SliceFeatures, features_path, read_features
from medvol.training import register_trainer
from medvol.training.engine import Trainer, unwrap
from medvol.training.mean_teacher import teacher_decay
from medvol.training.schedules import ema_update, sigmoid_rampup
from medvol.utils import write_json

DEFAULT_BATCH = 8  # subjects per batch when the recipe gives no data.batch_size


@dataclass
class AggregatorOptions:
    mean_teacher: bool = False  # train a mean teacher (semi-supervised) instead of the student alone
    ema_decay: float = 0.99  # the teacher's EMA decay (reached after 1 / (1 - decay) steps)
    consistency: float = 1.0  # weight of the softmax-MSE consistency after the ramp-up
    rampup_steps: int = 200  # sigmoid ramp-up length of the consistency weight, in steps
    feature_dropout: float = 0.1  # element-wise dropout on the input features of each view
    feature_noise: float = 0.1  # Gaussian noise on each view, in units of each feature's std


def check_options(o: AggregatorOptions) -> None:
    for key, ok, want in (("ema_decay", 0 <= o.ema_decay < 1, "in [0, 1)"),
                          ("consistency", o.consistency >= 0, ">= 0"),
                          ("rampup_steps", o.rampup_steps >= 0, ">= 0"),
                          ("feature_dropout", 0 <= o.feature_dropout < 1, "in [0, 1)"),
                          ("feature_noise", o.feature_noise >= 0, ">= 0")):
        if not ok:
            raise ConfigError(f"method.{key} must be {want}, got {getattr(o, key)!r}")


def subject_split(data: SliceFeatures, d, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(labelled train, unlabelled train, validation) subjects: validation from the labelled
    ones (``data.val_cases`` or a seeded ``data.val_fraction``); ``data.labelled`` (a count or a
    list) keeps labels on that many / those training subjects only, the rest become unlabelled."""
    if d.fold is not None:
        raise ConfigError("data.fold: the slice aggregator splits subjects by data.val_cases or data.val_fraction")
    labelled = [s.subject for s in data.items if s.subject_class >= 0]
    unlabelled = [s.subject for s in data.items if s.subject_class < 0]
    if not labelled:
        raise ConfigError("the features file holds no subject class (slice_labels.csv rows with an empty "
                          "slice_index): nothing to train on")
    bad = sorted(set(d.val_cases or []) - set(labelled))
    if bad:
        raise ConfigError(f"data.val_cases: {bad} are not labelled subjects of the features file")
    train, val = split_cases(labelled, d.val_fraction, d.val_cases, seed)
    wanted = d.labelled
    if isinstance(wanted, int):
        wanted = train[:wanted]
    if wanted is not None:
        unlabelled += [c for c in train if c not in wanted]
        train = [c for c in train if c in wanted]
    return train, unlabelled, val


class SubjectDataset(StepDataset):
    """Whole subjects, drawn as a pure function of ``(seed, step, slot)`` from the labelled or
    the unlabelled stream, each padded to the longest subject of the file."""

    def __init__(self, data: SliceFeatures, streams: Streams, seed: int = 0):
        self.subjects = data.by_subject()
        self.streams, self.seed = streams, seed
        self.length = max(len(s.features) for s in data.items)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict:
        step, slot = divmod(int(index), self.streams.global_batch)
        rng = np.random.default_rng([self.seed, step, slot])
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
    name = "slice_aggregator"
    Options = AggregatorOptions
    primary_metric = "val/accuracy"
    scan_validation = False  # subject classes from features: no label map to score against the scans

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.options.mean_teacher:
            self.inference_key = "teacher"
        train = [self.data.by_subject()[c].features for c in self.labelled + self.unlabelled]
        scale = np.concatenate(train).std(0) if train else np.ones(self.in_channels)
        self.feature_scale = torch.as_tensor(scale, dtype=torch.float32, device=self.device)

    def setup_data(self) -> None:
        check_options(self.options)
        d = self.recipe.data
        self.plans = None
        self.data = read_features(features_path(self.cache_dir))
        self.in_channels, self.num_classes = self.data.feature_dim, self.data.num_subject_classes
        self.patch_size = []
        self.batch_size = int(d.batch_size or DEFAULT_BATCH)
        self.labelled, self.unlabelled, self.val_cases = subject_split(self.data, d, self.recipe.trainer.seed)
        if not self.labelled:
            raise ConfigError(f"{self.cache_dir}: no labelled training subject left after the validation split")
        if d.unlabelled_per_batch and not self.options.mean_teacher:
            raise ConfigError("data.unlabelled_per_batch > 0 needs method.mean_teacher: true (only the mean "
                              "teacher learns from unlabelled subjects)")

    def build_models(self) -> dict[str, nn.Module]:
        models = super().build_models()
        if self.options.mean_teacher:
            teacher = copy.deepcopy(models["model"])
            teacher.requires_grad_(False)
            models["teacher"] = teacher
        return models

    def make_dataset(self) -> StepDataset:
        return SubjectDataset(self.data, self.streams(), seed=self.recipe.trainer.seed)

    def before_training(self, start_step: int) -> None:
        """The run folder records where its features came from: ``medvol predict`` finds the
        slice classifier there."""
        if self.dist.is_main:
            meta = self.data.meta
            write_json(self.run_dir / AGGREGATOR_RUN_FILE, {
                "features": str(features_path(self.cache_dir).resolve()), "feature_dim": self.in_channels,
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
        weight = self.options.consistency * sigmoid_rampup(step, self.options.rampup_steps)
        return {"loss": ce + weight * consistency, "ce": ce, "consistency": consistency}

    def optimization_step(self, batch: dict, step: int) -> dict[str, float]:
        losses = super().optimization_step(batch, step)
        if self.options.mean_teacher:
            decay = teacher_decay(step, self.options.ema_decay)
            ema_update(self.models["teacher"], unwrap(self.models["model"]), decay)
        return losses

    def validate(self) -> dict[str, float]:
        """Subject accuracy, balanced accuracy (and AUC for two classes) on the validation subjects."""
        from medvol.inference.subjects import subject_probabilities

        if not self.val_cases:
            return {}
        items = [self.data.by_subject()[c] for c in self.val_cases]
        probs = subject_probabilities(self.inference_model(), [s.features for s in items], self.device)
        return classification_metrics(probs, np.array([s.subject_class for s in items]))
