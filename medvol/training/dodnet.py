"""DoDNet: one network for many partially labelled tasks (DoDNet, CVPR 2021; ``docs/methods/dodnet.md``).

Each sample carries its task id and which output channels (organ, tumour) its dataset
annotates; the controller turns the task into the dynamic head's weights; the loss is Dice +
BCE per channel on annotated channels only (:func:`medvol.losses.partial.partial_dice_bce`).
Validation reports Dice per task and channel, and their mean.
"""

from __future__ import annotations

import numpy as np

from medvol.data.partial_labels import channel_targets, channel_targets_torch, rules_of_folder
from medvol.errors import ConfigError
from medvol.evaluation.metrics import dice
from medvol.inference.sliding_window import TaskSigmoid
from medvol.losses.partial import partial_dice_bce
from medvol.training import register_trainer
from medvol.training.engine import Trainer


@register_trainer
class DoDNetTrainer(Trainer):
    """``trainer.name: dodnet``: DoDNet (``model.name: dodnet``) on a cache whose cases carry a
    ``task_id`` and whose tasks annotate organ and/or tumour (the rules of the cache's
    ``dataset.json``). Each step conditions the dynamic head on the samples' tasks and takes Dice
    + BCE on the annotated channels only; no ``method:`` options. Validation scores Dice per task
    and annotated channel (``val/dice_<task>_<channel>``) and their mean; there is no final
    validation from the raw scans (``scan_validation``: no class-label output to score)."""

    name = "dodnet"
    requires_model = "dodnet"
    scan_validation = False  # task-conditioned outputs against partial labels: per-task validation only

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rules = rules_of_folder(self.cache_dir)

    def training_step(self, batch, step):
        if "task_id" not in batch:
            raise ConfigError(f"{self.cache_dir}: cases carry no task_id (build the dataset with "
                              "medvol.datasets.mots or declare case_tasks in dataset.json)")
        logits = self.models["model"](batch["image"], batch["task_id"])
        target, annotated = channel_targets_torch(batch["label"], batch["task_id"], self.rules)
        return {"loss": partial_dice_bce(logits.float(), target, annotated)}

    def validation_decoder(self, props: dict):
        return TaskSigmoid(int(props["task_id"]))

    def score_case(self, case: str, image, label, props: dict) -> dict:
        """Dice per annotated channel (organ, tumour) of the case's task (``val/dice_<task>_<channel>``);
        a case without a task scores nothing. The mean over them is ``val/dice_mean``."""
        if "task_id" not in props:
            return {}
        pred = self.validation_probabilities(image, props).numpy() > 0.5
        target, annotated = channel_targets(np.asarray(label[0]), props["task_id"], self.rules)
        name = self.rules[int(props["task_id"])][0]
        return {f"val/dice_{name}_{chan}": dice(pred[c], target[c] > 0)
                for c, chan in enumerate(("organ", "tumour")) if annotated[c]}
