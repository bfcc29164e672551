"""Partial labels (DoDNet): which labels of a task's dataset form the organ and tumour targets.

Every case of a partially labelled dataset carries a task id; a task's rule says which label
values make the target of each of the two output channels (organ, tumour), or that its
dataset does not annotate that channel. The rules come from the dataset's ``dataset.json``
(``tasks``: {id: {name, organ, tumour}}) or, by default, from MOTS (DoDNet, CVPR 2021; ``docs/methods/dodnet.md``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medvol.utils import read_json

Rule = tuple[int, ...] | None
TaskRules = dict[int, tuple[str, Rule, Rule]]

# task id -> (name, organ rule, tumour rule); a rule is the set of label values forming the
# channel's target, None when the task's dataset does not annotate that channel.
TASK_RULES: TaskRules = {
    0: ("liver", (1, 2), (2,)),
    1: ("kidney", (1, 2), (2,)),
    2: ("hepatic_vessel", (1,), (2,)),
    3: ("pancreas", (1, 2), (2,)),
    4: ("colon", None, (1,)),
    5: ("lung", None, (1,)),
    6: ("spleen", (1,), None),
}


def task_rules(dataset_json: dict | None) -> TaskRules:
    """The dataset's own rules (dataset.json ``tasks``: {id: {name, organ, tumour}}) when it
    declares them as mappings, else MOTS's."""
    tasks = (dataset_json or {}).get("tasks")
    if isinstance(tasks, dict) and tasks and all(isinstance(v, dict) for v in tasks.values()):
        return {int(k): (v["name"], tuple(v["organ"]) if v.get("organ") else None,
                         tuple(v["tumour"]) if v.get("tumour") else None) for k, v in tasks.items()}
    return TASK_RULES


def rules_of_folder(folder: str | Path | None) -> TaskRules:
    """The task rules of a cache or run folder (its ``dataset.json``, else MOTS's)."""
    dj = Path(folder) / "dataset.json" if folder is not None else None
    return task_rules(read_json(dj) if dj is not None and dj.exists() else None)


def channel_targets(label: np.ndarray, task_id: int, rules: TaskRules | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(targets (2, ...) float32 for organ and tumour, annotated (2,) bool) of one sample."""
    _, organ, tumour = (rules or TASK_RULES)[int(task_id)]
    out = np.zeros((2,) + label.shape, np.float32)
    for i, rule in enumerate((organ, tumour)):
        if rule is not None:
            out[i] = np.isin(label, rule)
    return out, np.array([organ is not None, tumour is not None])


def channel_targets_torch(label: torch.Tensor, task_id: torch.Tensor, rules: TaskRules
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`channel_targets` on ``label``'s device: (B, 2, ...) organ/tumour targets
    and (B, 2) annotated flags from labels (B, 1, ...) and task ids (B,)."""
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
