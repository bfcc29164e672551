"""Backbone weights from a local file, matched by name and shape (``model.options.backbone_weights``).

The three 2D papers start from ImageNet backbones (Inf-Net: Res2Net-50 v1b; DC-MT: SE-ResNeXt50
32x4d; UGPCL: ResNet-50). medvol never downloads weights: a recipe names a file the user has
(the authors' release, a torchvision/Cadene state dict). Tensors load by name after stripping
wrapper prefixes (``module.``, ``resnet.``, ``backbone.``, ``encoder.``, ``trunk.``); a
3-channel stem loads into a one-channel model summed over its RGB kernels (``adapted``).
No wheel on the package registries ships these weights, so without a file the networks start
from their random initialisation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from medvol.errors import InputError

log = logging.getLogger(__name__)

PREFIXES = ("module.", "resnet.", "backbone.", "encoder.", "trunk.")


def _strip(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    return key


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(path, "weights file not found (medvol never downloads weights: give a local file)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects, truncated files
        raise InputError(path, f"not a plain tensor state dict loadable with weights_only=True ({e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise InputError(path, "expected a dict of tensors")
    return {_strip(k): v for k, v in sd.items() if torch.is_tensor(v)}


def _rgb_stem(v: torch.Tensor, own: torch.Tensor) -> bool:
    """A 3-channel conv kernel that fits a one-channel model's once summed over its inputs."""
    same_otherwise = v.shape[:1] + v.shape[2:] == own.shape[:1] + own.shape[2:]
    return v.ndim == 4 and v.shape[1] == 3 and own.shape[1] == 1 and same_otherwise


def load_local_weights(module: nn.Module, path: str | Path, what: str = "backbone",
                       rename=None) -> dict[str, list[str]]:
    """Load ``path`` into ``module`` by name and shape (``rename``: the file's names -> the
    module's, after the prefixes are stripped). Returns ``loaded``, ``adapted`` (RGB stems
    summed), ``shape_mismatch``, ``missing`` (module tensors the file lacks) and ``unexpected``;
    InputError when nothing matches (other widths, another architecture) or the file holds
    pickled objects."""
    path = Path(path)
    sd, own = _read_state_dict(path), module.state_dict()
    if rename is not None:
        sd = {rename(k): v for k, v in sd.items()}
    report: dict[str, list[str]] = {"loaded": [], "adapted": [], "shape_mismatch": [], "missing": [], "unexpected": []}
    new = {}
    for k, v in sd.items():
        if k not in own:
            report["unexpected"].append(k)
        elif v.shape == own[k].shape:
            new[k] = v
            report["loaded"].append(k)
        elif _rgb_stem(v, own[k]):
            new[k] = v.sum(1, keepdim=True)
            report["adapted"].append(k)
        else:
            report["shape_mismatch"].append(k)
    report["missing"] = sorted(set(own) - set(new))
    if not any(not k.endswith("num_batches_tracked") for k in new):  # BN counters always "match"
        raise InputError(path, f"no tensor matches the {what} by name and shape (e.g. {sorted(sd)[:3]}); "
                               "widths must be the paper's")
    module.load_state_dict(new, strict=False)
    log.info("%s: %d tensors loaded from %s (%d adapted, %d shape mismatch, %d missing, %d unexpected)", what,
             len(report["loaded"]), path, len(report["adapted"]), len(report["shape_mismatch"]),
             len(report["missing"]), len(report["unexpected"]))
    return report
