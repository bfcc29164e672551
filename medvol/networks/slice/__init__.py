"""2D slice networks (run over volumes with :class:`medvol.networks.slice_adapter.SliceAdapter`)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def scaled_size(size: Sequence[int], scale: float, multiple: int = 1, minimum: int = 32) -> list[int]:
    """The working size of an input of ``size`` under ``input_scale`` ``scale``: each side times
    ``scale``, rounded to a multiple of ``multiple``, at least ``minimum`` (``size`` itself at 1)."""
    if scale == 1.0:
        return [int(s) for s in size]
    return [max(minimum, multiple * round(s * scale / multiple)) for s in size]


def resize2d(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` resized bilinearly to ``size`` (``x`` itself when it has that size):
    the working resolution of networks with an ``input_scale``, and maps brought back from it."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(
        x, size=tuple(size), mode="bilinear", align_corners=align_corners)
