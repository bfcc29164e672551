"""MRNet: calibrated segmentation from several raters' labels (CVPR 2021; ``docs/methods/mrnet.md``).

The cache holds one label channel per rater (``dataset.json`` ``raters``); a 2D sample's
label is ``(R, H, W)``. Each step follows the authors' trainer (jiwei0921/MRNet,
``trainer_cvpr.py``): every image is seen under three expertise vectors, drawn per sample
from a generator of ``(seed, step, slot)`` (so resume is exact): equal weights, random
integer weights 1..10 normalised, and one-hot on a random rater. The target under ``w`` is
the expertise-weighted soft label ``sum_k w_k onehot(rater k)``. Three updates, in the
authors' order, each with its own optimiser:

1. ``recon``: the reconstruction module rebuilds every rater's map from the image and the
   (detached) coarse prediction; cross-entropy against each rater's label;
2. ``model``: the coarse segmenter (with the EIM): soft cross-entropy of the three
   predictions against their soft labels, weighted 3:2:1 (equal : random : one-hot), times
   0.7, plus 0.3 times the reconstruction consistency (squared distances between the
   reconstruction encoder's features of the equal-weight prediction and of its soft label, / 1000);
3. ``perception``: the MPM on the detached rebuilt maps, features and coarse logits, with
   the same 3:2:1 soft cross-entropy.

Validation: soft Dice (:func:`medvol.evaluation.metrics.soft_dice`) of the equal-weight
prediction against the raters' mean, per foreground class, and its ECE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from medvol import validation
from medvol.errors import ConfigError
from medvol.evaluation.metrics import expected_calibration_error, soft_dice
from medvol.networks.slice.mrnet import MRNet
from medvol.training.engine import Trainer, unwrap
from medvol.training.schedules import make_optimizer
from medvol.utils import read_json

_EXPERTISE_STREAM = 0x3E7A1  # keeps the expertise draws apart from the data sampling's (seed, step, slot)


@dataclass
class MRNetOptions:
    """The ``method:`` section of ``trainer.name: mrnet`` (defaults: the authors' code)."""

    main_weight: float = 0.7  # weight of the coarse segmenter's soft-label loss
    consistency_weight: float = 0.3  # weight of the reconstruction consistency ...
    consistency_scale: float = 1.0e-3  # ... whose feature distances the authors divide by 1000
    expertise_mix: tuple[float, float, float] = (3.0, 2.0, 1.0)  # equal : random : one-hot loss weights
    random_weight_max: int = 10  # random expertise: integers 1..this, normalised

    def __post_init__(self) -> None:
        for key in ("main_weight", "consistency_weight", "consistency_scale"):
            validation.non_negative(getattr(self, key), f"method.{key}")
        validation.positive_int(self.random_weight_max, "method.random_weight_max")
        if len(self.expertise_mix) != 3 or min(self.expertise_mix) < 0 or sum(self.expertise_mix) <= 0:
            raise ConfigError(f"method.expertise_mix: three non-negative weights (equal, random, one-hot), "
                              f"not all zero; got {list(self.expertise_mix)}")


def draw_expertise(num_raters: int, batch: int, rng: np.random.Generator, high: int = 10) -> dict[str, torch.Tensor]:
    """The authors' three expertise vectors per sample, each ``(batch, R)`` summing to 1:
    ``equal``, ``random`` (integers 1..high normalised) and ``onehot`` (a random rater)."""
    rand = rng.integers(1, high + 1, size=(batch, num_raters)).astype(np.float32)
    onehot = np.eye(num_raters, dtype=np.float32)[rng.integers(num_raters, size=batch)]
    return {"equal": torch.full((batch, num_raters), 1.0 / num_raters),
            "random": torch.from_numpy(rand / rand.sum(1, keepdims=True)), "onehot": torch.from_numpy(onehot)}


def rater_onehot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, R, H, W)`` labels (negative: background) as ``(B, R, K, H, W)`` float one-hot."""
    return F.one_hot(label.clamp(min=0).long(), num_classes).movedim(-1, 2).float()


def soft_label(onehot: torch.Tensor, expertise: torch.Tensor) -> torch.Tensor:
    """The expertise-weighted soft label ``(B, K, H, W)``: sum over raters of w_k times rater k's one-hot."""
    return torch.einsum("br,brkhw->bkhw", expertise.to(onehot.dtype), onehot)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class ``logits`` against a soft target distribution (both ``(B, K, ...)``)."""
    return -(target * torch.log_softmax(logits.float(), 1)).sum(1).mean()


class MRNetTrainer(Trainer):
    """MRNet on 2D slices of a multi-rater cache (see the module docstring)."""

    name = "mrnet"
    Options = MRNetOptions
    requires_model = "mrnet"
    primary_metric = "val/soft_dice_mean"
    scan_validation = False  # the end-of-run validation scores one label file per case, not raters

    def after_source(self) -> None:
        if self.slice_axis is None:
            raise ConfigError("trainer 'mrnet' is a 2D method: set data.configuration: 2d")
        if self.dist.distributed:
            raise ConfigError("trainer 'mrnet' runs in one process (its three updates call the parts of one model)")
        dj = self.cache_dir / "dataset.json"
        raters = read_json(dj).get("raters") if dj.exists() else None
        if not raters:
            raise ConfigError(f"{dj}: no 'raters'; MRNet trains on several raters' labels per case "
                              "(labelsTr/<case>_r<k><ending>, and 'raters' in the raw dataset.json)")
        self.raters = list(raters)
        given = self.recipe.model.options.get("num_raters")
        if given is not None and int(given) != len(self.raters):
            raise ConfigError(f"model.options.num_raters is {given} but the cache has {len(self.raters)} raters")
        self.recipe.model.options["num_raters"] = len(self.raters)  # saved with the run's recipe for predict

    def _net(self) -> MRNet:
        return cast(MRNet, unwrap(self.models["model"]))

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        m = self._net()
        parts: dict[str, list[torch.nn.Module]] = {"model": [m.segmenter, m.coarse_head],
                                                   "recon": [m.reconstructor, m.rater_heads],
                                                   "perception": [m.perception]}
        return {k: make_optimizer(self.recipe.optimizer, [p for mod in mods for p in mod.parameters()])
                for k, mods in parts.items()}

    def update_steps(self, batch: dict, step: int):
        state: dict = {}
        return [("recon", lambda: self._reconstruction_step(batch, step, state)),
                ("model", lambda: self._segmenter_step(batch, state)),
                ("perception", lambda: self._perception_step(state))]

    def _expertise(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.recipe.trainer.seed, _EXPERTISE_STREAM, step, int(batch["slot"][0])])
        draws = draw_expertise(len(self.raters), batch["image"].shape[0], rng, self.options.random_weight_max)
        return {k: v.to(self.device) for k, v in draws.items()}

    def _reconstruction_step(self, batch: dict, step: int, state: dict) -> dict:
        """The coarse predictions under the three expertise vectors (kept, with their graphs, for
        the segmenter's update), and the reconstruction loss on their detached probabilities."""
        m, x = self._net(), batch["image"]
        onehot = rater_onehot(batch["label"], self.num_classes)
        state.update(x=x, onehot=onehot, expertise=self._expertise(batch, step), coarse={}, rebuilt={})
        losses = []
        for kind, w in state["expertise"].items():
            logits, features = m.coarse(x, w)
            rebuilt = m.reconstruct(x, torch.softmax(logits.detach().float(), 1), w)
            losses.append(torch.stack([soft_cross_entropy(rebuilt[:, k], onehot[:, k])
                                       for k in range(len(self.raters))]).mean())
            state["coarse"][kind] = (logits, features)
            state["rebuilt"][kind] = rebuilt.detach()
        loss = torch.stack(losses).mean()
        return {"loss": loss, "loss_recon": loss.detach()}

    def _mixed(self, per_kind: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b, c = self.options.expertise_mix
        return (a * per_kind["equal"] + b * per_kind["random"] + c * per_kind["onehot"]) / (a + b + c)

    def _segmenter_step(self, batch: dict, state: dict) -> dict:
        m, x, onehot = self._net(), state["x"], state["onehot"]
        targets = {k: soft_label(onehot, w) for k, w in state["expertise"].items()}
        state["targets"] = targets
        main = self._mixed({k: soft_cross_entropy(state["coarse"][k][0], targets[k]) for k in targets})
        predicted = m.reconstruction_features(x, torch.softmax(state["coarse"]["equal"][0].float(), 1))
        drawn = m.reconstruction_features(x, targets["equal"])
        consistency = torch.stack([((a - b) ** 2).sum(-1).mean() for a, b in zip(predicted, drawn)]).sum()
        o = self.options
        loss = o.main_weight * main + o.consistency_weight * o.consistency_scale * consistency
        return {"loss": loss, "loss_main": main.detach(), "loss_consistency": consistency.detach()}

    def _perception_step(self, state: dict) -> dict:
        m = self._net()
        finals = {k: m.perceive(state["rebuilt"][k], f.detach(), logits.detach())
                  for k, (logits, f) in state["coarse"].items()}
        loss = self._mixed({k: soft_cross_entropy(finals[k], state["targets"][k]) for k in finals})
        return {"loss": loss, "loss_final": loss.detach()}

    # ------------------------------------------------------------------ validation
    def score_case(self, case: str, image: np.ndarray, label: np.ndarray | None, props: dict) -> dict:
        """Soft Dice and ECE per foreground class of the equal-weight prediction against the raters' mean."""
        if label is None:
            return {}
        probs = self.validation_probabilities(image, props).float().numpy()
        ref = np.asarray(label)
        names = self.plans.label_names
        out = {}
        for c in range(1, self.num_classes):
            soft_ref = (ref == c).mean(0)
            out[f"val/soft_dice_{names.get(c, c)}"] = soft_dice(probs[c], soft_ref)
            out[f"val/ece_{names.get(c, c)}"] = expected_calibration_error(probs[c], soft_ref)
        return out

    def reduce(self, scores: dict[str, list]) -> dict[str, float]:
        out = {k: float(np.mean(v)) for k, v in scores.items()}
        dices = [v for k, v in out.items() if k.startswith("val/soft_dice_")]
        if dices:
            out["val/soft_dice_mean"] = float(np.mean(dices))
        return out
