"""SERAN trainer (CVPR 2021; ``docs/methods/seran.md``): single-image super-resolution of 2D
MR slices, ``trainer.name: seran`` with ``model.name: seran``.

Data (:class:`SRSlices`): every case of a preprocessing cache (normalised images; labels are
never read), split into training and validation cases by ``data.val_fraction`` /
``data.val_cases``; each sample an LR/HR pair of one slice across ``method.slice_axis``
(:class:`medvol.data.sr_pairs.SRPairDataset`), the LR patch ``method.lr_patch`` pixels wide,
degraded by ``method.degradation`` (``bicubic`` or ``kspace``, recorded in the run's recipe and
in every checkpoint). The scale is the network's, ``model.options.scale``.

Loss: L1 between the super-resolved patch and the HR patch. Optimiser and schedule are the
recipe's (the paper's: Adam, lr 1e-4, halved every ``method.lr_halve_every`` steps).

Validation: ``method.val_slices`` slices evenly spread over each validation case, cropped to
multiples of the scale, degraded, super-resolved in fp32; PSNR and SSIM against the HR slice
(:mod:`medvol.evaluation.image`, data range = the HR slice's), with bicubic interpolation of
the same LR slice as a reference line (``val/psnr_bicubic``, ``val/ssim_bicubic``). The
primary metric is ``val/psnr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from medvol.cache import list_cases, load_plans
from medvol.data import split_cases
from medvol.data.sr_pairs import DEGRADATIONS, SRPairDataset, crop_to_multiple, degrade, slice_of
from medvol.errors import ConfigError
from medvol.evaluation.image import image_scores
from medvol.plans import Plans
from medvol.training import register_trainer
from medvol.training.engine import Trainer, unwrap
from medvol.training.schedules import epoch_step_decay
from medvol.training.sources import DataSource


@dataclass
class SERANOptions:
    """The ``method:`` section of ``trainer.name: seran``."""

    degradation: str = "bicubic"  # bicubic | kspace (k-space truncation)
    lr_patch: int = 48  # LR training patch side (HR: lr_patch * scale)
    slice_axis: int = 2  # slices across this axis of the cached (X, Y, Z) volumes; the other two are upsampled
    flips: bool = True  # random flips and 90-degree turns of the patches
    lr_halve_every: int | None = None  # halve the learning rate every this many steps (schedule.name: constant)
    val_slices: int = 8  # validation slices per case

    def __post_init__(self) -> None:
        if self.degradation not in DEGRADATIONS:
            raise ConfigError(f"'method.degradation' must be one of {DEGRADATIONS}, got {self.degradation!r}")
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"'method.slice_axis' must be 0, 1 or 2, got {self.slice_axis!r}")
        if self.lr_patch < 4 or self.val_slices < 1:
            raise ConfigError("'method.lr_patch' must be >= 4 and 'method.val_slices' >= 1")
        if self.lr_halve_every is not None and self.lr_halve_every < 1:
            raise ConfigError(f"'method.lr_halve_every' must be >= 1, got {self.lr_halve_every!r}")


def model_scale(recipe) -> int:
    """The network's upscaling factor (``model.options.scale``, 2 when unset)."""
    return int((recipe.model.options or {}).get("scale", 2))


@dataclass(kw_only=True)
class SRSlices(DataSource):
    """Slices of every case of a preprocessing cache as LR/HR pairs: no labels, the outputs are
    the image channels; ``plans`` (the cache's), ``scale``, ``degradation``, ``slice_axis``."""

    kind: ClassVar[str] = "super-resolution slices"
    plans: Plans
    scale: int
    degradation: str
    slice_axis: int

    def find_plans(self) -> Plans:
        return self.plans

    def checkpoint_fields(self) -> dict:
        # the network's output channels are the image channels (load_run reads num_classes)
        return {"num_classes": self.num_outputs, "degradation": self.degradation, "scale": self.scale}

    @classmethod
    def from_recipe(cls, cache_dir: str | Path, recipe, options: SERANOptions) -> SRSlices:
        d, cache_dir = recipe.data, Path(cache_dir)
        if d.fold is not None or d.labelled is not None or d.unlabelled_per_batch:
            raise ConfigError("trainer 'seran' trains on every case without labels: leave data.fold, data.labelled "
                              "and data.unlabelled_per_batch unset (split by data.val_fraction or data.val_cases)")
        plans = Plans.from_dict(load_plans(cache_dir))
        cases = list_cases(cache_dir)
        train, val = split_cases(cases, d.val_fraction, d.val_cases, recipe.trainer.seed)
        if not train:
            raise ConfigError(f"{cache_dir}: no case left for super-resolution training after the validation split")
        return cls(root=cache_dir, plans=plans, scale=model_scale(recipe), degradation=options.degradation,
                   slice_axis=options.slice_axis, in_channels=plans.num_channels, num_outputs=plans.num_channels,
                   batch_size=int(d.batch_size or 16), labelled=train, unlabelled=[], val_cases=val)


def super_resolve(model: torch.nn.Module, lr: np.ndarray, device: torch.device) -> np.ndarray:
    """``model`` on one LR slice ``(C, h, w)`` in fp32 without gradients -> ``(C, sh, sw)``."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(lr, np.float32))[None].to(device)
        return model(x)[0].float().cpu().numpy()


def bicubic_upsample(lr: np.ndarray, scale: int) -> np.ndarray:
    """The LR slice ``(C, h, w)`` upsampled by bicubic interpolation (half-pixel centres)."""
    x = torch.from_numpy(np.ascontiguousarray(lr, np.float32))[None]
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)[0].numpy()


def validation_slices(n_slices: int, wanted: int) -> list[int]:
    """``wanted`` slice indices evenly spread over ``n_slices``, the two ends left out."""
    return sorted({int(round(i)) for i in np.linspace(0, n_slices - 1, wanted + 2)[1:-1]})


@register_trainer
class SERANTrainer(Trainer):
    """``trainer.name: seran``: L1 super-resolution of LR/HR slice pairs (:class:`SRSlices`),
    validated by PSNR and SSIM (module docstring)."""

    name = "seran"
    requires_model = "seran"
    Options = SERANOptions
    primary_metric = "val/psnr"
    scan_validation = False  # no label maps to predict from the raw scans
    grad_clip_keys = ()  # the paper clips nothing

    source: SRSlices

    def make_source(self) -> SRSlices:
        return SRSlices.from_recipe(self.cache_dir, self.recipe, self.options)

    def make_dataset(self) -> SRPairDataset:
        o, src = self.options, self.source
        return SRPairDataset(src.root, src.labelled, o.lr_patch, src.scale, src.degradation, src.slice_axis,
                             self.global_batch, seed=self.recipe.trainer.seed, flips=o.flips)

    def make_schedulers(self) -> dict:
        every = self.options.lr_halve_every
        if every is None:
            return super().make_schedulers()
        return epoch_step_decay(self.recipe.schedule, self.optimizers, self.recipe.trainer.steps, 1, every, 0.5)

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        sr = self.models["model"](batch["image"])
        return {"loss": F.l1_loss(sr.float(), batch["target"].float())}

    def score_case(self, case: str, image, label, props: dict) -> dict:
        """PSNR/SSIM of the network and of bicubic interpolation on the case's validation slices."""
        src, model = self.source, unwrap(self.models["model"])
        axis, scale = src.slice_axis, src.scale
        was_training = model.training
        model.eval()
        scores: dict[str, list] = {}
        for i in validation_slices(image.shape[axis + 1], self.options.val_slices):
            hr = crop_to_multiple(np.asarray(slice_of(image, axis, i), np.float32), scale)
            if hr.max() == hr.min():
                continue  # an empty slice has no PSNR
            lr = degrade(torch.from_numpy(np.ascontiguousarray(hr))[None], scale, src.degradation)[0].numpy()
            for tag, out in (("", super_resolve(model, lr, self.device)), ("_bicubic", bicubic_upsample(lr, scale))):
                for c in range(hr.shape[0]):
                    for k, v in image_scores(out[c], hr[c]).items():
                        scores.setdefault(f"val/{k}{tag}", []).append(v)
        model.train(was_training)
        return {k: float(np.mean(v)) for k, v in scores.items()}

    def reduce(self, scores: dict[str, list]) -> dict[str, float]:
        """Each metric's mean over the validation cases."""
        return {k: float(np.mean(v)) for k, v in scores.items()}
