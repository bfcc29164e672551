"""DC-MT: dual-consistency mean teacher on 2D slices (DC-MT, Huo et al., MedIA 2022;
``docs/methods/dcmt.md``), on the mean-teacher base.

Data (recipe ``data.configuration: 2d``): slices of the cache, each with its ``class`` (the
grade, from the cache's ``slice_labels.csv``; -1 for none and for the unlabelled stream) and
the cache's segmentation label as the region mask (label > 0, or ``method.mask_labels``): the
attention target. ``data.unlabelled_per_batch`` makes the two-stream batches (paper: 40 = 10
labelled + 30 unlabelled). A slice counts as labelled when it comes from the labelled stream
and has a grade.

One step: the batch is prepared as published by the network's own :meth:`DCMTNet.prepare`
(``model.options``: ``input_percentiles`` 0.1/99.9 clip + min-max per slice and channel,
``trunk_channels`` 3: grey repeated); the student and the teacher each see their own perturbed
view of the prepared batch (:mod:`medvol.data.perturb`); the region
masks are carried into the student's frame (nearest) and the teacher's CAMs too (bilinear), so
every pixel-wise term compares maps of the same place; :class:`medvol.losses.dcmt.DCMTLoss`
gives CE + attention MSE + bound loss on the labelled slices and, from the warm-up epoch on,
class and attention consistency, the unlabelled slices' CAM channel being the teacher's argmax.

Epochs: an epoch is ``method.steps_per_epoch`` steps; when unset, as published: the unlabelled
training slices divided by the unlabelled samples of a (global) batch (one pass over the
unlabelled data), or the labelled slices by the batch without an unlabelled stream. The epoch
of a step is ``step // steps_per_epoch`` (0-based, whole epochs as published). With
``method.epochs`` the run is that many epochs and with ``method.val_every_epochs`` it validates
that often (``trainer.steps``/``trainer.val_every`` are replaced; the run's ``recipe.yaml``
records the values used); with ``method.lr_decay_every`` the learning rate is multiplied by
``lr_decay`` every that many epochs (``schedule.name`` must then be ``constant``).

Validation (the teacher, eval mode) on every slice of the validation cases that has a grade:
``val/accuracy``, ``val/balanced_accuracy`` (the primary metric: the published code keeps the
checkpoint of best mean per-class recall; here of the teacher, where it keeps the better of
student and teacher) (and ``val/auc`` for two grades), and on those whose region mask is not empty the CAM of
the true grade against the mask: ``val/cam_iou`` (soft IoU, sum min / sum max) and
``val/cam_inside`` (the share of the CAM's mass inside the mask, 1 - the bound loss); with
``method.validate_student`` the student's too (``val/student_*``), as the published code reports.
The checkpoint records ``num_classes`` (the grades), so ``medvol extract-features`` rebuilds the
teacher from the run folder and hands its 512-d slice features to the slice aggregator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from monai.networks import eval_mode

from medvol.cache import load_case
from medvol.errors import ConfigError
from medvol.evaluation.classification import classification_metrics
from medvol.losses.dcmt import DCMTLoss, DCMTLossConfig, select_cams
from medvol.networks.slice.dcmt import DCMTNet
from medvol.training import register_trainer
from medvol.training.mean_teacher import MeanTeacherOptions, MeanTeacherTrainer
from medvol.training.schedules import epoch_step_decay, recipe_in_epochs
from medvol.training.sources import GradedSlices

log = logging.getLogger(__name__)


@dataclass
class DCMTOptions(MeanTeacherOptions):
    """The recipe's ``method`` section for DC-MT: the mean-teacher settings, the region mask's
    labels, the loss weights with their warm-up and ramp-up (:class:`DCMTLossConfig`, in
    epochs), the epoch clock (``steps_per_epoch``, ``epochs``, ``val_every_epochs``) and its
    step decay of the learning rate, and how validation runs (``val_slices`` per pass,
    ``validate_student``)."""

    mask_labels: list | None = None  # label values forming the region mask (None: every label > 0)
    loss: DCMTLossConfig = field(default_factory=DCMTLossConfig)  # weights, warm-up and ramp-up (epochs)
    steps_per_epoch: int | None = None  # None: one pass over the unlabelled slices (published)
    epochs: float | None = None  # when set: trainer.steps = epochs * steps_per_epoch
    val_every_epochs: float | None = None  # when set: trainer.val_every = that many epochs (published: 1)
    lr_decay_every: float | None = None  # epochs; needs schedule.name constant
    lr_decay: float = 0.5
    val_slices: int = 32  # slices per forward pass at validation
    validate_student: bool = False  # also report the student's scores (val/student_*), as published

    def __post_init__(self) -> None:
        """Checked when the recipe is loaded (before ``--nproc`` spawns processes)."""
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"method.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")


@register_trainer
class DCMTTrainer(MeanTeacherTrainer):
    """DC-MT (``trainer.name: dcmt``): a mean teacher on graded cache slices
    (:class:`GradedSlices`) whose student learns the grades, their attention inside the
    region mask and, after the warm-up, class and attention consistency with the teacher; the
    teacher predicts and is validated (slice accuracy, balanced accuracy, CAM overlap)."""

    name = "dcmt"
    requires_model = "dcmt"
    Options = DCMTOptions
    primary_metric = "val/balanced_accuracy"  # the published selection: mean per-class recall
    scan_validation = False  # slice grades: no label map to score against the scans
    source: GradedSlices

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = DCMTLoss(self.options.loss)

    # ------------------------------------------------------------------ setup
    def make_source(self) -> GradedSlices:
        return GradedSlices.from_recipe(self.cache_dir, self.recipe)

    def after_source(self) -> None:
        """The epoch clock: steps per epoch, and ``method.epochs`` as steps."""
        o = self.options
        self.steps_per_epoch = o.steps_per_epoch or self._published_epoch_steps()
        self.recipe = recipe_in_epochs(self.recipe, self.steps_per_epoch, o.epochs, o.val_every_epochs)
        log.info("dcmt: %d steps per epoch, %d steps (%.1f epochs)", self.steps_per_epoch,
                 self.recipe.trainer.steps, self.recipe.trainer.steps / self.steps_per_epoch)

    def _published_epoch_steps(self) -> int:
        """One pass over the unlabelled slices (or the labelled ones without an unlabelled stream)."""
        u, src = self.recipe.data.unlabelled_per_batch * self.dist.world_size, self.source
        cases, per_step = (src.unlabelled, u) if u else (src.labelled, src.batch_size * self.dist.world_size)
        n = sum(load_case(src.root, c, mmap=True)[0].shape[1 + self.axis] for c in cases)
        return max(1, n // per_step)

    @property
    def axis(self) -> int:
        """The slice axis (a :class:`GradedSlices` source always has one)."""
        assert self.source.slice_axis is not None
        return self.source.slice_axis

    def make_schedulers(self) -> dict:
        o = self.options
        if o.lr_decay_every is None:
            return super().make_schedulers()
        return epoch_step_decay(self.recipe.schedule, self.optimizers, self.recipe.trainer.steps, self.steps_per_epoch,
                                o.lr_decay_every, o.lr_decay)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def region(self, label: torch.Tensor) -> torch.Tensor:
        """The region mask (float 0/1) of a label map; -1 (unknown) counts as outside."""
        fg = self.options.mask_labels
        if fg is None:
            return (label > 0).float()
        return torch.isin(label, torch.as_tensor(fg, device=label.device)).float()

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        terms = self.loss_terms(batch, step)
        out = {"loss": terms["total"], **{k: terms[k] for k in ("ce", "mask", "bound", "consistency_cls",
                                                                "consistency_att")}}
        return {**out, "w_cls": torch.tensor(terms["w_cls"]), "w_att": torch.tensor(terms["w_att"])}

    def loss_terms(self, batch: dict, step: int) -> dict:
        """Every DC-MT term of one batch (and ``classes``, the CAM channel used per slice)."""
        net = self.student
        assert isinstance(net, DCMTNet)
        x = net.prepare(batch["image"])
        grades = batch["class"].long()
        labelled = self.labelled_mask(batch) & (grades >= 0)
        masks = self.region(batch["label"])
        student_view, teacher_view = self.views(x, step)
        out_s = self.models["model"](student_view.image, prepared=True)
        out_t = self.teacher_forward(teacher_view.image, prepared=True)
        teacher = {"logits": out_t["logits"].float(),
                   "cams": student_view.from_frame(out_t["cams"].float(), teacher_view)}
        student = {"logits": out_s["logits"].float(), "cams": out_s["cams"].float()}
        masks = student_view.from_frame(masks, mode="nearest")
        terms = self.loss_fn(student, teacher, grades.clamp_min(0), masks, labelled, self.epoch(step))
        terms["classes"] = torch.where(labelled, grades, teacher["logits"].argmax(1))
        return terms

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        with eval_mode(*self.models.values()):
            out = self._scores(self.teacher, "val/")
            if self.options.validate_student:
                out.update(self._scores(self.student, "val/student_"))
        return out

    def _scores(self, net: nn.Module, prefix: str) -> dict[str, float]:
        """Slice accuracy, balanced accuracy (and AUC for two grades) and CAM overlap of ``net``
        over the validation cases' graded slices."""
        probs: list = []
        grades: list = []
        iou: list[float] = []
        inside: list[float] = []
        for case in self.source.val_cases:
            p, g, i, s = self._validate_case(case, net)
            probs, grades, iou, inside = probs + p, grades + g, iou + i, inside + s
        if not grades:
            raise ConfigError("validation: no graded slice in the validation cases (see slice_labels.csv)")
        out = classification_metrics(np.concatenate(probs), np.concatenate(grades), prefix)
        out[f"{prefix}graded_slices"] = float(sum(len(g) for g in grades))
        if iou:
            out[f"{prefix}cam_iou"], out[f"{prefix}cam_inside"] = float(np.mean(iou)), float(np.mean(inside))
        return out

    def _validate_case(self, case: str, net: nn.Module) -> tuple[list, list, list[float], list[float]]:
        """``([probabilities (n, K)], [grades (n,)], IoUs, inside shares)`` of a case's graded slices."""
        image, label, props = load_case(self.source.root, case, mmap=True)
        grades = self.source.cached_grades(props)
        graded = np.flatnonzero(grades >= 0)
        probs: list = []
        iou: list[float] = []
        inside: list[float] = []
        for start in range(0, len(graded), self.options.val_slices):
            idx = graded[start:start + self.options.val_slices]
            y = torch.from_numpy(grades[idx]).to(self.device)
            with torch.no_grad(), self.autocast():
                out = net(self._slices(image, idx).to(self.device))
            probs.append(out["logits"].float().softmax(1).cpu().numpy())
            if label is not None:
                masks = self.region(self._slices(label, idx).long().to(self.device))
                cams = select_cams(out["cams"].float(), y)
                keep = masks.flatten(1).sum(1) > 0
                lo = torch.minimum(masks, cams)[keep].flatten(1).sum(1)
                iou += (lo / torch.maximum(masks, cams)[keep].flatten(1).sum(1).clamp_min(1e-5)).tolist()
                inside += (lo / cams[keep].flatten(1).sum(1).clamp_min(1e-5)).tolist()
        return probs, [grades[graded]] if len(graded) else [], iou, inside

    def _slices(self, array: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """Slices ``idx`` across the slice axis of a cached ``(C, X, Y, Z)`` array: ``(n, C, H, W)``."""
        picked = np.moveaxis(np.take(array, idx, 1 + self.axis), 1 + self.axis, 0)
        return torch.from_numpy(np.ascontiguousarray(picked, np.float32))


__all__ = ["DCMTOptions", "DCMTTrainer"]
