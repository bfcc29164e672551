"""DC-MT's losses (DC-MT, Huo et al., MedIA 2022; ``docs/methods/dcmt.md``): supervised
classification + attention terms on labelled
slices, class and attention consistency between student and teacher.

Inputs are the outputs of :class:`medvol.networks.slice.dcmt.DCMTNet` for one batch of
slices: the student on its view, the teacher (the student's EMA) on an independently
perturbed view. Which slices are labelled is a boolean vector ``labelled`` ``(B,)``, so
batches need not put the labelled slices first; the labels and masks of unlabelled slices
are never read.

- CE on the labelled slices' logits (weight 1).
- Attention MSE ``sum (mask - cam)^2 / max(sum (mask + cam), 1e-5)`` over the labelled slices
  (sums over every pixel of every labelled slice, as published), between the cartilage mask
  and the refined CAM of the slice's true grade (weight 0.5).
- Bound loss ``1 - sum min(mask, cam) / max(sum cam, 1e-5)`` per labelled slice, averaged
  (weight 0.001).
- From the warm-up epoch (20) on: class consistency ``MSE(softmax(student), softmax(teacher))``
  over all slices, weight ``5 * ramp(epoch)``; attention consistency, the attention MSE between
  the student's and the teacher's CAMs of the unlabelled slices, weight ``1 * ramp(epoch - 20)``;
  ``ramp`` is :func:`medvol.ramps.sigmoid_rampup` (``exp(-5 (1 - t)^2)``, 40 epochs).

The CAM channel of a slice (:func:`select_cams`): a labelled slice's true grade; an unlabelled
slice's **teacher argmax**, for the student and the teacher alike. The published code takes the
true label for every slice, unlabelled ones included, which leaks the labels of the
"unlabelled" data into training.

``official_compat=True`` reproduces two published details that change loss values: the bound
loss summed over labelled slices but divided by the whole batch size, and the attention
ramp-up whose phase is clipped at the ramp length instead of warm-up + ramp length (so it
stops at ``t = 0.5``, weight ``exp(-1.25)``, from epoch 40 on). It never reproduces the label leak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.ramps import sigmoid_rampup

EPS = 1e-5


def attention_mse(target: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """``sum (target - cam)^2 / max(sum (target + cam), 1e-5)``, both sums over every element
    (all maps of the batch pooled, not a mean of per-map ratios)."""
    if target.shape != cam.shape:
        raise ValueError(f"attention maps differ in shape: {tuple(target.shape)} vs {tuple(cam.shape)}")
    return (target - cam).pow(2).sum() / (target + cam).sum().clamp_min(EPS)


def bound_loss(mask: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Per map ``(B,)``: ``1 - sum min(mask, cam) / max(sum cam, 1e-5)``, sums over the last two
    axes of ``(B, 1, H, W)`` maps: the share of the CAM's mass that falls outside the mask."""
    if mask.shape != cam.shape:
        raise ValueError(f"mask and CAM differ in shape: {tuple(mask.shape)} vs {tuple(cam.shape)}")
    inside = torch.minimum(mask, cam).flatten(1).sum(1)
    return 1 - inside / cam.flatten(1).sum(1).clamp_min(EPS)


def class_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the softmaxes (mean over slices and classes); no gradient to
    the teacher."""
    return F.mse_loss(student_logits.softmax(1), teacher_logits.detach().softmax(1))


def cam_classes(labels: torch.Tensor, teacher_logits: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """The CAM channel per slice ``(B,)``: the label where ``labelled``, else the teacher's argmax
    (the label of an unlabelled slice is never read)."""
    return torch.where(labelled, labels.long(), teacher_logits.detach().argmax(1))


def select_cams(cams: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Channel ``classes[b]`` of each slice's ``(B, K, H, W)`` maps -> ``(B, 1, H, W)``."""
    idx = classes.view(-1, 1, 1, 1).expand(-1, 1, *cams.shape[-2:])
    return cams.gather(1, idx)


@dataclass
class DCMTLossConfig:
    """Weights and schedule (the paper's values; ``epoch`` counted as the trainer counts it)."""

    ce: float = 1.0
    mask: float = 0.5
    bound: float = 0.001
    consistency_cls: float = 5.0
    consistency_att: float = 1.0
    warmup_epoch: float = 20
    rampup_epochs: float = 40
    official_compat: bool = False


def consistency_weights(epoch: float, cfg: DCMTLossConfig) -> tuple[float, float]:
    """``(class, attention)`` consistency weights at ``epoch``: 0 before ``warmup_epoch``, then
    ``consistency_cls * ramp(epoch)`` and ``consistency_att * ramp(epoch - warmup_epoch)``."""
    if epoch < cfg.warmup_epoch:
        return 0.0, 0.0
    w_cls = cfg.consistency_cls * sigmoid_rampup(epoch, cfg.rampup_epochs)
    att_epoch = min(epoch, cfg.rampup_epochs) if cfg.official_compat else epoch
    w_att = cfg.consistency_att * sigmoid_rampup(att_epoch - cfg.warmup_epoch, cfg.rampup_epochs)
    return w_cls, w_att


class DCMTLoss(nn.Module):
    """All DC-MT terms for one batch; returns a dict of the weighted ``total`` and every raw
    term (``ce``, ``mask``, ``bound``, ``consistency_cls``, ``consistency_att``) and the two
    consistency weights used."""

    def __init__(self, cfg: DCMTLossConfig | None = None):
        super().__init__()
        self.cfg = cfg or DCMTLossConfig()

    def forward(self, student: dict, teacher: dict, labels: torch.Tensor, masks: torch.Tensor,
                labelled: torch.Tensor, epoch: float) -> dict:
        """``student``/``teacher``: dicts with ``logits`` ``(B, K)`` and ``cams`` ``(B, K, H, W)``;
        ``labels`` ``(B,)`` class indices (any value on unlabelled slices); ``masks`` ``(B, 1, H, W)``
        or ``(B, H, W)`` cartilage masks in [0, 1] (read on labelled slices only); ``labelled``
        ``(B,)`` bool."""
        cfg = self.cfg
        logits_s, cams_s = student["logits"], student["cams"]
        logits_t, cams_t = teacher["logits"].detach(), teacher["cams"].detach()
        labelled = labelled.to(device=logits_s.device, dtype=torch.bool)
        if masks.ndim == 3:
            masks = masks[:, None]
        classes = cam_classes(labels.to(logits_s.device), logits_t, labelled)
        cam_s, cam_t = select_cams(cams_s, classes), select_cams(cams_t, classes)
        zero = logits_s.sum() * 0  # keeps the graph when a batch has no labelled/unlabelled slice
        lab, unl = labelled.nonzero().squeeze(1), (~labelled).nonzero().squeeze(1)

        if lab.numel():
            ce = F.cross_entropy(logits_s[lab], labels.to(logits_s.device)[lab].long())
            m = masks[lab].to(cam_s.dtype)
            mask = attention_mse(m, cam_s[lab])
            bounds = bound_loss(m, cam_s[lab])
            bound = bounds.sum() / labelled.numel() if cfg.official_compat else bounds.mean()
        else:
            ce = mask = bound = zero
        cons_cls = class_consistency(logits_s, logits_t)
        cons_att = attention_mse(cam_t[unl], cam_s[unl]) if unl.numel() else zero

        w_cls, w_att = consistency_weights(epoch, cfg)
        total = cfg.ce * ce + cfg.mask * mask + cfg.bound * bound + w_cls * cons_cls + w_att * cons_att
        return {"total": total, "ce": ce, "mask": mask, "bound": bound, "consistency_cls": cons_cls,
                "consistency_att": cons_att, "w_cls": w_cls, "w_att": w_att}
