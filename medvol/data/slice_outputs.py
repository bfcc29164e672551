"""What a slice classifier and a slice aggregator say about cached volumes and subjects: the
forward passes that training's validation and the two-stage subject pipeline
(:mod:`medvol.inference.subjects`) share, below both stages.

- :func:`slice_outputs`: per-slice logits and features of a preprocessed ``(C, X, Y, Z)``
  image across its slice axis, by a 2D classifier in eval mode.
- :func:`subject_probabilities`: class probabilities of subjects given as per-slice feature
  sequences, by an aggregator in eval mode.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.networks import eval_mode

from medvol.errors import ConfigError
from medvol.networks.aggregator import pad_slices
from medvol.networks.slice_adapter import SliceAdapter
from medvol.precision import Precision

SLICE_BATCH = 16  # slices per forward pass of the classifier


def pad_in_plane(x: torch.Tensor, slice_axis: int, patch: Sequence[int]) -> torch.Tensor:
    """``x`` ``(B, C, X, Y, Z)`` zero-padded on the in-plane axes (the two other than
    ``slice_axis``) up to the 2D ``patch`` where smaller, centred as training pads a slice
    smaller than its patch (:func:`medvol.data.sampling.patch_bounds`: the odd voxel after)."""
    pads = [0] * 6  # F.pad order: Z low, Z high, Y low, Y high, X low, X high
    for a, p in zip([a for a in range(3) if a != slice_axis], patch):
        need = max(int(p) - x.shape[2 + a], 0)
        pads[2 * (2 - a)], pads[2 * (2 - a) + 1] = need // 2, need - need // 2
    return torch.nn.functional.pad(x, pads) if any(pads) else x


@torch.no_grad()
def slice_outputs(model: nn.Module, image, slice_axis: int, context: int, device: torch.device,
                  patch: Sequence[int] = (), slice_batch: int = SLICE_BATCH, features: bool = True,
                  precision: Precision | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-slice logits ``(S, K)`` and features ``(S, F)`` (float32) of a preprocessed image
    ``(C, X, Y, Z)`` across ``slice_axis`` (0-2), by a 2D classifier in eval mode, whole slices
    ``slice_batch`` at a time, with ``context`` neighbours per side as channels (2.5D). Slices
    smaller than the training ``patch`` are padded to it as training padded them: a classifier
    with a few-pixel feature map answers differently for a few pixels more or less.
    ``features=False`` allows a model that returns logits only (features None); ``precision``:
    the autocast the model runs under (default fp32)."""
    adapter = SliceAdapter(model, axis=slice_axis + 2, slice_batch=slice_batch, context=context,
                           mode="classification")
    x = pad_in_plane(torch.from_numpy(np.array(image, np.float32))[None], slice_axis, patch)
    with eval_mode(model), precision.autocast() if precision else nullcontext():
        out = adapter(x.to(device))
    if features and out.features is None:
        raise ConfigError("the slice classifier returns logits only: the two-stage pipeline needs a model that "
                          "also returns per-slice features (a (logits, features) pair or a dict, e.g. dcmt)")
    feats = None if out.features is None else out.features[0].float().cpu().numpy()
    return out.logits[0].float().cpu().numpy(), feats


@torch.no_grad()
def subject_probabilities(model: nn.Module, sequences: Sequence, device: torch.device,
                          batch_size: int = 16) -> np.ndarray:
    """Class probabilities ``(n, K)`` of subjects given as per-slice features ``[(S_i, F)]``,
    from ``model`` (an aggregator) in eval mode, ``batch_size`` subjects padded together."""
    out = []
    with eval_mode(model):
        for i in range(0, len(sequences), batch_size):
            x, mask = pad_slices(sequences[i:i + batch_size])
            out.append(model(x.to(device), mask.to(device)).float().softmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


__all__ = ["SLICE_BATCH", "pad_in_plane", "slice_outputs", "subject_probabilities"]
