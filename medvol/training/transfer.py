"""Weights from another run or file to start a training from (``init_from``; nnU-Net's
``-pretrained_weights``), loaded by name and shape, with a report of what did not transfer
(``RUN/init_report.json``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from medvol.checkpoint import inference_weights, load_checkpoint
from medvol.errors import ConfigError

log = logging.getLogger(__name__)


def init_from(model: nn.Module, path: str | Path, labels: dict[str, int] | None = None) -> dict:
    """Load the tensors of ``path`` (a medvol checkpoint or a plain state dict, read with
    weights_only=True) whose names and shapes match ``model``'s; report what happened.

    Fine-tuning across datasets (nnU-Net's ``-pretrained_weights``): when the checkpoint's run
    folder names its labels (``RUN/plans.json`` beside ``RUN/checkpoints/``) and they differ
    from ``labels`` (this run's), the segmentation head is left as initialised even where the
    shapes match (its channels mean other classes there; nnU-Net never loads its seg layers).
    ``not_transferred`` names each part that did not load and why: the segmentation head,
    the input layer (another channel count), other widths or topology."""
    ckpt = load_checkpoint(path)
    sd = inference_weights(ckpt) if "models" in ckpt else ckpt.get("encoder", ckpt)
    own = model.state_dict()
    head = head_tensors(model)
    theirs = _checkpoint_labels(path)
    other_labels = labels is not None and theirs is not None and dict(theirs) != dict(labels)
    loaded = [k for k, v in sd.items() if k in own and own[k].shape == v.shape and not (other_labels and k in head)]
    skipped = sorted(k for k, v in sd.items() if k in own and own[k].shape != v.shape)
    unused = sorted(k for k in sd if k not in own)
    if not loaded:
        raise ConfigError(f"init_from {path}: none of its {len(sd)} tensors matches a tensor of the model by name "
                          f"and shape (is it weights for another architecture? e.g. PCRL's encoder.pt needs "
                          f"model.name pcrl_unet)")
    model.load_state_dict({k: sd[k] for k in loaded}, strict=False)
    report = {"loaded": sorted(loaded), "shape_mismatch": skipped, "not_in_model": unused,
              "missing_from_file": sorted(k for k in own if k not in sd),
              "not_transferred": _not_transferred(own, sd, set(loaded), head, theirs, labels)}
    log.info("init_from %s: %d tensors loaded, %d shape mismatches, %d not in the model, %d left as initialised",
             path, len(loaded), len(skipped), len(unused), len(report["missing_from_file"]))
    for part in report["not_transferred"]:
        log.info("init_from %s: not transferred: %s (%d tensors): %s", path, part["part"], len(part["tensors"]),
                 part["why"])
    return report


def head_tensors(model: nn.Module) -> set[str]:
    """Names of the segmentation head's tensors: those of the model's 1x1 output blocks
    (MONAI's ``UnetOutBlock``: the deep-supervision heads included)."""
    from monai.networks.blocks.dynunet_block import UnetOutBlock

    return {f"{name}.{k}" for name, m in model.named_modules(remove_duplicate=False)  # DynUNet aliases its heads
            if isinstance(m, UnetOutBlock) for k in m.state_dict()}


def _checkpoint_labels(path: str | Path) -> dict | None:
    """The labels of the run a checkpoint was saved in (``RUN/checkpoints/x.pt`` -> ``RUN/plans.json``)."""
    from medvol.utils import read_json

    plans = Path(path).resolve().parent.parent / "plans.json"
    try:
        labels = read_json(plans).get("labels") if plans.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return labels if isinstance(labels, dict) else None


def _not_transferred(own: dict, sd: dict, loaded: set[str], head: set[str], theirs: dict | None,
                     labels: dict | None) -> list[dict]:
    """The model's tensors the file has but that were not loaded, grouped by part, each with why."""
    left = sorted(k for k in own if k in sd and k not in loaded)
    head_left = [k for k in left if k in head]
    stem = [k for k in left if k not in head and own[k].ndim > 2 and sd[k].ndim == own[k].ndim
            and sd[k].shape[1] != own[k].shape[1] and sd[k].shape[:1] + sd[k].shape[2:] == own[k].shape[:1]
            + own[k].shape[2:]]
    rest = [k for k in left if k not in head_left and k not in stem]
    parts = []
    if head_left:
        n_there = next((int(sd[k].shape[0]) for k in head_left if k.endswith("weight")), None)
        n_here = next((int(own[k].shape[0]) for k in head_left if k.endswith("weight")), None)
        why = (f"{n_there} classes in the checkpoint, {n_here} here" if n_there != n_here else
               f"the checkpoint's labels {theirs} are not this dataset's {labels}")
        parts.append({"part": "segmentation head", "tensors": head_left, "why": why})
    if stem:
        parts.append({"part": "input layer", "tensors": stem,
                      "why": f"{int(sd[stem[0]].shape[1])} input channels in the checkpoint, "
                             f"{int(own[stem[0]].shape[1])} here"})
    if rest:
        parts.append({"part": "other layers", "tensors": rest,
                      "why": "other widths or topology (patch, spacing): transfer the plans with "
                             "`medvol plan --from-plans` so the networks match"})
    return parts
