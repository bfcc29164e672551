"""CANet: semi-supervised segmentation with a signed-distance head and an attention
discriminator (CANet, ESWA 2023; ``docs/methods/canet.md``).

Segmenter step: soft Dice on sigmoid(seg) and beta * MSE(tanh SDF, ground-truth SDF) on the
labelled samples, plus lambda(t) * CE(D(SDF_unlabelled, image_unlabelled), "labelled") so
that unlabelled predictions look like labelled ones; lambda(t) = w * exp(-5 (1 - min(t // 150,
40) / 40)^2). Discriminator step, segmenter outputs detached: CE with labelled -> 1 and
unlabelled -> 0, on the SDF maps of the just-updated segmenter re-run in eval mode without
gradient (the published order; D judges the segmenter's adversarial term in eval mode too).
Two optimisers (SGD for the segmenter from the recipe, Adam for D), each with its own
schedule; every batch holds labelled and unlabelled samples in fixed numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks import eval_mode

from medvol import validation
from medvol.config import ScheduleConfig
from medvol.errors import ConfigError
from medvol.losses.sdf import signed_distance, soft_dice_loss
from medvol.networks.discriminators import AttentionDiscriminator
from medvol.training import register_trainer
from medvol.training.engine import Trainer, unwrap
from medvol.training.schedules import make_scheduler


@dataclass
class CANetOptions:
    """The ``method:`` section of ``trainer.name: canet``: ``beta`` (the SDF regression's
    weight), the adversarial weight's ramp ``adv_weight`` · exp(-5 (1 - min(t // adv_ramp_div,
    adv_ramp_len) / adv_ramp_len)²), the discriminator's Adam (``d_lr``, ``d_betas``) and width
    (``d_base``), and which label values form the ``foreground``."""

    beta: float = 0.3  # weight of the SDF regression
    adv_weight: float = 0.01  # w in lambda(t)
    adv_ramp_div: int = 150  # t // this ...
    adv_ramp_len: int = 40  # ... reaches full weight at this value
    d_lr: float = 1e-4
    d_betas: tuple = (0.9, 0.99)
    d_base: int = 64
    foreground: list | None = None  # label values forming the foreground (None: every label > 0)

    def __post_init__(self) -> None:  # checked when the recipe is loaded
        validation.non_negative(self.beta, "method.beta")
        validation.non_negative(self.adv_weight, "method.adv_weight")
        for key in ("adv_ramp_div", "adv_ramp_len", "d_base"):
            validation.positive_int(getattr(self, key), f"method.{key}")
        validation.positive(self.d_lr, "method.d_lr")
        if not isinstance(self.d_betas, (list, tuple)) or len(self.d_betas) != 2:
            raise ConfigError(f"method.d_betas: expected two numbers in [0, 1), got {self.d_betas!r}")
        self.d_betas = tuple(validation.fraction(b, "method.d_betas") for b in self.d_betas)
        if self.foreground is not None and not (
                isinstance(self.foreground, list) and self.foreground
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.foreground)):
            raise ConfigError(f"method.foreground: expected a list of label values > 0, got {self.foreground!r}")


def adversarial_weight(step: int, o: CANetOptions) -> float:
    t = min(step // o.adv_ramp_div, o.adv_ramp_len) / o.adv_ramp_len
    return o.adv_weight * math.exp(-5.0 * (1.0 - t) ** 2)


@register_trainer
class CANetTrainer(Trainer):
    """``trainer.name: canet``: CANet (``model.name: vnet_transformer``, segmentation + signed
    distance heads) with an attention discriminator (``models["discriminator"]``, its own Adam
    and constant schedule). Every batch holds labelled and unlabelled samples
    (``data.unlabelled_per_batch``); each step updates the segmenter (Dice + β·SDF + λ(t)·
    adversarial) and then the discriminator (:meth:`update_steps`). Validation is the engine's
    per-class Dice of the segmentation head."""

    name = "canet"
    requires_model = "vnet_transformer"
    Options = CANetOptions
    # MONAI's TransformerBlock always builds a cross-attention branch that self-attention never uses
    ddp_find_unused = True

    def build_models(self) -> dict[str, nn.Module]:
        models = super().build_models()
        o = self.options
        models["discriminator"] = AttentionDiscriminator(1, self.in_channels, o.d_base)
        return models

    def build_optimizers(self):
        opts = super().build_optimizers()
        o = self.options
        opts["discriminator"] = torch.optim.Adam(self.models["discriminator"].parameters(), lr=o.d_lr,
                                                 betas=tuple(o.d_betas))
        return opts

    def make_schedulers(self):
        scheds = super().make_schedulers()  # the recipe's schedule for the segmenter
        scheds["discriminator"] = make_scheduler(ScheduleConfig("constant"), self.optimizers["discriminator"],
                                                 self.recipe.trainer.steps, self.options.d_lr)
        return scheds

    def _foreground(self, label: torch.Tensor) -> torch.Tensor:
        fg = self.options.foreground
        if fg is None:
            return (label > 0).float()
        return torch.isin(label, torch.as_tensor(fg, device=label.device)).float()

    def update_steps(self, batch: dict, step: int) -> list:
        """The segmenter's update, then the discriminator's (the published order)."""
        o = self.options
        model, disc = self.models["model"], self.models["discriminator"]
        image, lab_mask = batch["image"], batch["labelled"].bool()
        if lab_mask.all() or not lab_mask.any():
            raise ConfigError("canet needs labelled and unlabelled samples in every batch "
                              "(data.labelled and data.unlabelled_per_batch)")
        target = self._foreground(batch["label"][lab_mask])
        gt_sdf = torch.from_numpy(signed_distance(target[:, 0].cpu().numpy().astype(bool)))[:, None]
        gt_sdf = gt_sdf.to(image.device)
        raw_d = unwrap(disc)

        def segmenter() -> dict:
            # the discriminator judges in eval mode (no dropout), as published, with the gradient
            # flowing through it to the segmenter (eval_mode turns gradients off: enable_grad
            # turns them back on); its own gradients from this term are zeroed before its step
            with eval_mode(raw_d), torch.enable_grad():
                seg, sdf = model(image, return_sdf=True)
                prob = torch.sigmoid(seg.float())
                l_dice = soft_dice_loss(prob[lab_mask], target)
                l_sdf = F.mse_loss(sdf[lab_mask].float(), gt_sdf)
                d_out = raw_d(sdf[~lab_mask], image[~lab_mask])
                l_adv = F.cross_entropy(d_out.float(),
                                        torch.ones(d_out.shape[0], dtype=torch.long, device=image.device))
                lam = adversarial_weight(step, o)
                loss = l_dice + o.beta * l_sdf + lam * l_adv
            return {"loss": loss, "dice": l_dice, "sdf": l_sdf, "adv": l_adv, "adv_weight": lam}

        def discriminator() -> dict:
            # D learns from the updated segmenter's maps, made in eval mode without gradient
            # (published order); d_eval is what it has learned so far (eval, before its update)
            with eval_mode(unwrap(model), raw_d):
                sdf_new = unwrap(model)(image, return_sdf=True)[1]
                d_eval = raw_d(sdf_new, image)
            d_all = disc(sdf_new, image)
            d_target = lab_mask.long()
            l_d = F.cross_entropy(d_all.float(), d_target)
            return {"loss": l_d, "d_loss": l_d, "d_acc": (d_eval.argmax(1) == d_target).float().mean()}

        return [("model", segmenter), ("discriminator", discriminator)]
