"""UGPCL: uncertainty-guided pixel contrastive learning, semi-supervised 2D segmentation with a
CNN and a Transformer decoder (IJCAI 2022; ``docs/methods/ugpcl.md``).

Each step: every image of the batch (labelled and unlabelled) is rotated by k·90° (k drawn in
{0..3}, the rotation head's target) plus a random angle in ±``rotate_deg`` (labels with it,
nearest neighbour); the network's outputs go to :class:`medvol.losses.pixel_contrast.UGPCLLoss`
(supervised Dice + CE on both decoders, decoder consistency on the unlabelled images, rotation
CE, and from ``contrast_start`` the pixel contrast against the per-class memory queue). By default
the anchors, the background queue and the Dice follow the published code (``method.anchor_sampling:
published``, ``background_queue: zeros``, ``dice: published``).

The queue lives in the model's buffers (``model.memory``), so checkpoints carry it and a resumed
run continues exactly. Under DDP every rank enqueues the class means of *all* ranks (gathered
with ``all_gather`` in :meth:`ClassMemoryQueue.enqueue_class_means`), so the queues stay
identical across ranks (and DDP's buffer broadcast from rank 0 changes nothing).

Random draws are pure functions of ``(seed, step, slot)`` (rotations, per sample slot of the
global batch) and ``(seed, step, rank)`` (anchor sampling), like the data sampling: resume is
exact and the rotations do not depend on the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medvol import validation
from medvol.errors import ConfigError
from medvol.losses.pixel_contrast import ANCHOR_SAMPLING, BACKGROUND_QUEUE, DICE, UGPCLLoss
from medvol.training import register_trainer
from medvol.training.engine import Trainer, mean_scores, unwrap

_ROTATION_STREAM = 0x0607C1  # keeps the rotation draws apart from the data sampling's (seed, step, slot)
_ANCHOR_STREAM = 0xA7C40


@dataclass
class UGPCLOptions:
    """The ``method:`` section of ``trainer.name: ugpcl``: the loss weights (``tf_weight``,
    ``consistency`` and its ramp-up, ``rotation_weight``, ``contrast_weight`` from
    ``contrast_start`` on), the rotation range, the contrast's ``temperature``, anchors and
    uncertainty-threshold ramp, the published-or-alternative choices (``anchor_sampling``,
    ``background_queue``, ``dice``) and ``val_slice_batch`` of the 2D batch-averaged Dice."""

    tf_weight: float = 0.4  # weight of the Transformer decoder's supervised loss
    consistency: float = 0.01  # weight of MSE(softmax_cnn, softmax_tf) on the unlabelled images...
    consistency_rampup: int | None = None  # ... times sigmoid_rampup over this many steps (None: trainer.steps)
    rotation_weight: float = 0.1  # rotation-prediction CE
    rotate_deg: float = 20.0  # random rotation in +-this many degrees on top of k * 90
    contrast_weight: float = 0.1
    contrast_start: int = 1000  # the pixel contrast joins from this step on
    threshold_rampup: int | None = None  # uncertainty threshold ramp length (None: trainer.steps)
    temperature: float = 0.07
    anchor_sampling: str = "published"  # one anchor per image and class, easy first; "random": up to...
    max_anchors_per_class: int = 256  # ... this many per class over the batch (per rank), at stride 8
    background_queue: str = "zeros"  # published: class 0's queue is zero vectors; "means": background means
    dice: str = "published"  # foreground Dice, squared denominators; "all_classes": background in, linear
    val_slice_batch: int = 16  # slices per batch of the paper's 2D batch-averaged validation Dice

    def __post_init__(self) -> None:  # checked when the recipe is loaded
        for key in ("tf_weight", "consistency", "rotation_weight", "contrast_weight", "rotate_deg"):
            validation.non_negative(getattr(self, key), f"method.{key}")
        validation.positive(self.temperature, "method.temperature")
        for key in ("max_anchors_per_class", "val_slice_batch"):
            validation.positive_int(getattr(self, key), f"method.{key}")
        for key in ("consistency_rampup", "threshold_rampup"):
            if getattr(self, key) is not None:
                validation.positive_int(getattr(self, key), f"method.{key}")
        for key, choices in (("anchor_sampling", ANCHOR_SAMPLING), ("background_queue", BACKGROUND_QUEUE),
                             ("dice", DICE)):
            validation.one_of(getattr(self, key), choices, f"method.{key}")


# ------------------------------------------------------------------ rotation


def rotation_theta(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, 2, 3)`` affine_grid matrices turning each image by ``degrees`` about its centre,
    in pixel units (so a non-square image is turned, not sheared), the same way as
    ``torch.rot90(x, 1, (-2, -1))`` for +90°."""
    a = torch.deg2rad(degrees.double())
    cos, sin = torch.cos(a), torch.sin(a)
    # output pixel offset (u, v) from the centre -> input offset, in affine_grid's normalised units
    theta = torch.zeros(len(a), 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width
    theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
    return theta.float()


def rotate_batch(image: torch.Tensor, label: torch.Tensor, degrees: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, C, H, W)`` turned bilinearly and labels ``(B, 1, H, W)`` by nearest
    neighbour, each by its own angle; what comes in from outside the image is 0 (background).
    Multiples of 90° on square images give ``torch.rot90`` (labels exactly, images to float
    precision)."""
    theta = rotation_theta(degrees.cpu(), image.shape[-2], image.shape[-1]).to(image.device)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    img = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(label.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img.to(image.dtype), lab.round().to(label.dtype)


def draw_rotations(seed: int, step: int, slots: range, max_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per global batch slot: the rotation target k in {0..3} and the total angle
    ``k * 90 + U(-max_deg, max_deg)`` degrees; a pure function of ``(seed, step, slot)``."""
    ks, angles = [], []
    for slot in slots:
        rng = np.random.default_rng([seed, step, slot, _ROTATION_STREAM])
        k = int(rng.integers(4))
        ks.append(k)
        angles.append(90.0 * k + float(rng.uniform(-max_deg, max_deg)))
    return torch.tensor(ks, dtype=torch.long), torch.tensor(angles, dtype=torch.float64)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, rank)`` (anchor sampling)."""
    state = np.random.SeedSequence([seed, step, rank, _ANCHOR_STREAM]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ------------------------------------------------------------------ trainer


@register_trainer
class UGPCLTrainer(Trainer):
    """``trainer.name: ugpcl``: UGPCL (``model.name: ugpcl``: a shared encoder, CNN and
    Transformer decoders, rotation and projection heads, the class memory queue in its buffers)
    on 2D slices, labelled and unlabelled ones in every batch. Each step rotates the batch
    (:meth:`prepare_batch`) and takes :class:`~medvol.losses.pixel_contrast.UGPCLLoss` with the
    weights of :class:`UGPCLOptions`. Validation: the engine's per-class Dice per case and the
    paper's 2D batch-averaged Dice over the slices (``val/dice2d_*``)."""

    name = "ugpcl"
    requires_model = "ugpcl"
    Options = UGPCLOptions
    ddp_find_unused = True  # the projection head takes no part in the loss before contrast_start

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o, steps = self.options, self.recipe.trainer.steps
        self.loss_fn = UGPCLLoss(
            tf_weight=o.tf_weight, consistency=o.consistency,
            consistency_rampup=float(steps if o.consistency_rampup is None else o.consistency_rampup),
            rotation_weight=o.rotation_weight, contrast_weight=o.contrast_weight, contrast_start=o.contrast_start,
            threshold_rampup=float(steps if o.threshold_rampup is None else o.threshold_rampup),
            temperature=o.temperature, max_anchors_per_class=o.max_anchors_per_class,
            anchor_sampling=o.anchor_sampling, background_queue=o.background_queue, dice=o.dice)

    def prepare_batch(self, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(rotated images, labelled first; their labels, only the labelled ones; rotation
        targets in the same order; number labelled)."""
        image, label = batch["image"], batch["label"]
        b = image.shape[0]
        k, degrees = draw_rotations(self.recipe.trainer.seed, step, range(self.dist.rank * b, (self.dist.rank + 1) * b),
                                    self.options.rotate_deg)
        image, label = rotate_batch(image, label, degrees)
        labelled = batch["labelled"].bool().cpu() if "labelled" in batch else torch.ones(b, dtype=torch.bool)
        order = torch.argsort((~labelled).to(torch.uint8), stable=True)  # labelled first, each in slot order
        n_l = int(labelled.sum())
        if n_l == 0:
            raise ConfigError("ugpcl: a batch without labelled samples (data.unlabelled_per_batch must be "
                              "below data.batch_size)")
        dev = image.device
        return image[order.to(dev)], label[order[:n_l].to(dev)], k[order].to(dev), n_l

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        image, label, k, _ = self.prepare_batch(batch, step)
        out = self.models["model"](image, all_outputs=True)
        terms = self.loss_fn(out, label, k, step, queue=unwrap(self.models["model"]).memory,
                             generator=step_generator(self.recipe.trainer.seed, step, self.dist.rank))
        return {"loss": terms.pop("total"), **terms}

    def score_case(self, case: str, image, label, props: dict) -> dict:
        """The engine's per-class Dice (``val/dice_*``), and the case's per-slice counts for the
        paper's 2D batch-averaged Dice (:meth:`reduce`)."""
        if label is None:
            return {}
        pred, ref = self.predicted_labels(image, props), np.asarray(label[0])
        axis = self.slice_axis if self.slice_axis is not None else 2
        return {**self.class_dice(pred, ref), "slice_counts": slice_counts(pred, ref, self.classes, axis)}

    @property
    def classes(self) -> list[int]:
        return list(range(1, self.num_classes))

    def reduce(self, scores: dict[str, list]) -> dict[str, float]:
        """Each Dice's mean over cases (mean ``val/dice_mean``), and the paper's 2D batch-averaged
        Dice over the validation slices, every case's one after the other (``val/dice2d_*``)."""
        counts = scores.pop("slice_counts", [])
        out = mean_scores(scores)
        if counts:
            d2 = batch_averaged_dice(np.concatenate(counts), self.options.val_slice_batch)
            names = self.plans.label_names if self.plans else {}
            out.update({f"val/dice2d_{names.get(c, c)}": float(v) for c, v in zip(self.classes, d2)})
            out["val/dice2d_mean"] = float(d2.mean())
        return out


def slice_counts(pred: np.ndarray, ref: np.ndarray, classes: list[int], axis: int) -> np.ndarray:
    """``(S, len(classes), 3)``: per slice across ``axis`` and class, |P∩R|, |P| and |R|."""
    p, r = np.moveaxis(pred, axis, 0), np.moveaxis(ref, axis, 0)
    sums = lambda m: m.reshape(m.shape[0], -1).sum(1)  # noqa: E731
    return np.stack([np.stack([sums((p == c) & (r == c)), sums(p == c), sums(r == c)], -1) for c in classes], 1)


def batch_averaged_dice(counts: np.ndarray, batch: int = 16) -> np.ndarray:
    """The published validation Dice per class: the slices (``counts`` from
    :func:`slice_counts`, all validation cases one after the other) cut into consecutive
    batches of ``batch``, each batch's Dice from its pooled pixels (1 when the class is in
    neither), averaged over the batches."""
    from medvol.evaluation.metrics import dice_from_counts

    n = max(1, math.ceil(len(counts) / batch))
    pooled = np.stack([counts[i * batch:(i + 1) * batch].sum(0) for i in range(n)])  # (n, classes, 3)
    return dice_from_counts(pooled[..., 0], pooled[..., 1], pooled[..., 2]).mean(0)


__all__ = ["UGPCLOptions", "UGPCLTrainer", "batch_averaged_dice", "draw_rotations", "rotate_batch",
           "rotation_theta", "slice_counts", "step_generator"]

