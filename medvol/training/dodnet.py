"""DoDNet: one network for many partially labelled tasks (METHODS.md §2).

Each sample carries its task id and which output channels (organ, tumour) its dataset
annotates; the controller turns the task into the dynamic head's weights; the loss is Dice +
BCE per channel on annotated channels only (:func:`medvol.losses.partial.partial_dice_bce`).
Validation reports Dice per task and channel, and their mean.
"""

from __future__ import annotations

import numpy as np
import torch

from medvol.errors import ConfigError
from medvol.losses.partial import partial_dice_bce
from medvol.training import register_trainer
from medvol.training.engine import Trainer, unwrap


def _rules(cache_dir):
    from medvol.datasets.mots import task_rules
    from medvol.utils import read_json

    dj = cache_dir / "dataset.json"
    return task_rules(read_json(dj) if dj.exists() else None)


def targets_for(label: torch.Tensor, task_id: torch.Tensor, rules) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, ...) organ/tumour targets and (B, 2) annotated flags from labels (B, 1, ...)."""
    b = label.shape[0]
    out = torch.zeros((b, 2) + tuple(label.shape[2:]), device=label.device)
    annotated = torch.zeros((b, 2), device=label.device)
    for s in range(b):  # building targets: a handful of isin calls, not the network
        _, organ, tumour = rules[int(task_id[s])]
        for c, rule in enumerate((organ, tumour)):
            if rule is not None:
                out[s, c] = torch.isin(label[s, 0], torch.as_tensor(rule, device=label.device)).float()
                annotated[s, c] = 1
    return out, annotated


@register_trainer
class DoDNetTrainer(Trainer):
    name = "dodnet"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.recipe.model.name != "dodnet":
            raise ConfigError(f"trainer 'dodnet' needs model.name dodnet, got '{self.recipe.model.name}'")
        self.rules = _rules(self.cache_dir)

    def training_step(self, batch, step):
        if "task_id" not in batch:
            raise ConfigError(f"{self.cache_dir}: cases carry no task_id (build the dataset with "
                              "medvol.datasets.mots or declare case_tasks in dataset.json)")
        logits = self.models["model"](batch["image"], batch["task_id"])
        target, annotated = targets_for(batch["label"], batch["task_id"], self.rules)
        return {"loss": partial_dice_bce(logits.float(), target, annotated)}

    @torch.no_grad()
    def validate(self):
        from monai.inferers import sliding_window_inference

        from medvol.preprocessing.cache import load_case

        if not self.val_cases:
            return {}
        model = unwrap(self.models["model"])
        model.eval()
        scores: dict[str, list[float]] = {}
        for case in self.val_cases:
            image, label, props = load_case(self.cache_dir, case)
            if "task_id" not in props:
                continue
            task = torch.tensor([props["task_id"]], device=self.device)
            x = torch.from_numpy(np.array(image, np.float32))[None].to(self.device)
            with self.autocast():
                logits = sliding_window_inference(x, self.patch_size, 2, lambda w: model(w, task.expand(w.shape[0])),
                                                  overlap=self.recipe.trainer.val_overlap, mode="gaussian")
            pred = torch.sigmoid(logits.float()) > 0.5
            lab = torch.from_numpy(np.clip(np.asarray(label, np.int64), 0, None))[None].to(self.device)
            target, annotated = targets_for(lab, task, self.rules)
            name = self.rules[int(props["task_id"])][0]
            for c, chan in enumerate(("organ", "tumour")):
                if annotated[0, c]:
                    p, t = pred[0, c], target[0, c] > 0
                    s = float(p.sum() + t.sum())
                    scores.setdefault(f"val/dice_{name}_{chan}", []).append(1.0 if s == 0 else
                                                                            float(2 * (p & t).sum()) / s)
        model.train()
        out = {k: float(np.mean(v)) for k, v in scores.items()}
        if out:
            out["val/dice_mean"] = float(np.mean(list(out.values())))
        return out
