"""SERAN (Zhang, Li, Li, Fu, CVPR 2021; ``docs/methods/seran.md``): MR image super-resolution
with squeeze-and-excitation reasoning attention.

2D network over ``(N, C, H, W)`` slices -> ``(N, C_out, scale*H, scale*W)``:
a 3x3 head convolution, ``groups`` residual groups of ``blocks`` squeeze-and-excitation
reasoning attention blocks (each group ends in a 3x3 convolution and adds its input), a 3x3
convolution and the long skip from the head, then the pixel-shuffle upsampler (x2 and x4 as
steps of 2, x3 in one step) and a 3x3 reconstruction convolution.

The attention (:class:`ReasoningAttention`) of one feature map ``X`` (``C`` channels,
``P = H*W`` positions):

1. squeeze: ``M`` attention maps over the positions (1x1 convolution, softmax over ``P``) pool
   the features ``A = conv1x1(X)`` into ``M`` global descriptors, ``G = A softmax(B)^T``
   (``C x M``; second-order "bilinear" pooling);
2. reasoning: one graph convolution over the descriptors as nodes (a learned adjacency mixing
   nodes, ``G + G W_adj``, then a learned state update with ReLU);
3. excitation: at each position a softmax over the ``M`` descriptors (another 1x1
   convolution) picks the descriptors that complement it, ``Z = G' V`` (``C x P``);
4. ``excitation: add`` (default; A²-Nets' distribution step): residual scaling
   ``X + res_scale * conv1x1(Z)``; with ``zero_init`` that last 1x1 convolution starts at zero,
   so the attention starts as the identity and a block starts as the plain residual block.
   ``excitation: gate`` (SENet's and RCAN's recalibration, the other reading of the paper's
   "recalibrate feature responses"): ``X * sigmoid(conv1x1(Z))``, a gate per channel and
   position; ``res_scale`` and ``zero_init`` belong to the additive form and are refused here
   unless at their defaults.

``attention=False`` leaves the attention out: the plain residual CNN that the benchmark
compares against (same body, widths chosen for the same parameter count).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.errors import ConfigError
from medvol.networks import keyword_names, model_options, register

SCALES = (2, 3, 4)
EXCITATIONS = ("add", "gate")


class ReasoningAttention(nn.Module):
    """Squeeze (bilinear pooling into ``descriptors`` global descriptors), reasoning (a graph
    convolution over them), excitation (per-position softmax over them), residual scaling."""

    def __init__(self, channels: int, descriptors: int = 16, res_scale: float = 1.0, zero_init: bool = False,
                 excitation: str = "add"):
        super().__init__()
        if excitation not in EXCITATIONS:
            raise ConfigError(f"SERAN's excitation must be one of {EXCITATIONS}, got {excitation!r}")
        if excitation == "gate" and (res_scale != 1.0 or zero_init):
            raise ConfigError("SERAN's res_scale and zero_init apply to excitation 'add' only")
        self.gate = excitation == "gate"
        self.features = nn.Conv2d(channels, channels, 1)
        self.squeeze = nn.Conv2d(channels, descriptors, 1)
        self.adjacency = nn.Conv1d(descriptors, descriptors, 1)  # node mixing: G W_adj
        self.state = nn.Conv1d(channels, channels, 1)  # state update of every node
        self.excite = nn.Conv2d(channels, descriptors, 1)
        self.project = nn.Conv2d(channels, channels, 1)
        self.res_scale = float(res_scale)
        if zero_init:
            for p in self.project.parameters():
                nn.init.zeros_(p)

    def descriptors(self, x: torch.Tensor) -> torch.Tensor:
        """The reasoned global descriptors ``(N, C, M)`` of ``x`` ``(N, C, H, W)``."""
        a = self.features(x).flatten(2)  # (N, C, P)
        s = torch.softmax(self.squeeze(x).flatten(2), dim=-1)  # (N, M, P): each map sums to 1
        g = a @ s.transpose(1, 2)  # (N, C, M) global descriptors
        nodes = g.transpose(1, 2)  # (N, M, C)
        nodes = nodes + self.adjacency(nodes)
        return F.relu(self.state(nodes.transpose(1, 2)))

    def attention_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Per position, the weights of the ``M`` descriptors ``(N, M, P)`` (sum to 1 over M)."""
        return torch.softmax(self.excite(x).flatten(2), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        z = self.project((self.descriptors(x) @ self.attention_vectors(x)).view(n, c, h, w))
        return x * torch.sigmoid(z) if self.gate else x + self.res_scale * z


class AttentionBlock(nn.Module):
    """conv3x3-ReLU-conv3x3, the reasoning attention (or none), plus the block's input."""

    def __init__(self, channels: int, descriptors: int, res_scale: float, attention: bool, zero_init: bool = False,
                 excitation: str = "add"):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.attention = (ReasoningAttention(channels, descriptors, res_scale, zero_init, excitation) if attention
                          else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.body(x))


class ResidualGroup(nn.Module):
    """``blocks`` attention blocks and a 3x3 convolution, plus the group's input."""

    def __init__(self, channels: int, blocks: int, descriptors: int, res_scale: float, attention: bool,
                 zero_init: bool = False, excitation: str = "add"):
        super().__init__()
        self.body = nn.Sequential(*[AttentionBlock(channels, descriptors, res_scale, attention, zero_init, excitation)
                                    for _ in range(blocks)],
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def upsampler(channels: int, scale: int) -> nn.Sequential:
    """Pixel shuffle: x2 and x4 as steps of 2, x3 in one step (EDSR/RCAN's tail)."""
    if scale not in SCALES:
        raise ConfigError(f"SERAN's scale must be one of {SCALES}, got {scale!r}")
    factors = [3] if scale == 3 else [2] * int(math.log2(scale))
    layers: list[nn.Module] = []
    for f in factors:
        layers += [nn.Conv2d(channels, channels * f * f, 3, padding=1), nn.PixelShuffle(f)]
    return nn.Sequential(*layers)


class SERAN(nn.Module):
    """SERAN for ``scale`` x2/x3/x4: ``(N, in_channels, H, W)`` -> ``(N, out_channels, sH, sW)``.
    ``features`` wide, ``groups`` residual groups of ``blocks`` blocks, ``descriptors`` global
    descriptors per attention, ``res_scale`` its residual scaling, ``zero_init`` its output
    convolution zero at the start, ``excitation`` ``add`` or ``gate`` (:class:`ReasoningAttention`);
    ``attention=False``: the plain residual CNN of the same body."""

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, scale: int = 2, features: int = 64,
                 groups: int = 10, blocks: int = 20, descriptors: int = 16, res_scale: float = 1.0,
                 attention: bool = True, zero_init: bool = False, excitation: str = "add"):
        super().__init__()
        if min(features, groups, blocks, descriptors) < 1:
            raise ConfigError("SERAN's features, groups, blocks and descriptors must be >= 1")
        if scale not in SCALES:
            raise ConfigError(f"SERAN's scale must be one of {SCALES}, got {scale!r}")
        self.scale = int(scale)
        self.head = nn.Conv2d(in_channels, features, 3, padding=1)
        groups_ = [ResidualGroup(features, blocks, descriptors, res_scale, attention, zero_init, excitation)
                   for _ in range(groups)]
        self.body = nn.Sequential(*groups_, nn.Conv2d(features, features, 3, padding=1))
        self.tail = nn.Sequential(upsampler(features, self.scale),
                                  nn.Conv2d(features, out_channels or in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(h + self.body(h))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register("seran")
def _build_seran(model_cfg, plans, in_channels: int, num_classes: int) -> nn.Module:
    """``model.name: seran``: ``model.base_features`` is the width; ``model.options`` the rest
    (``scale``, ``groups``, ``blocks``, ``descriptors``, ``res_scale``, ``attention``,
    ``zero_init``, ``excitation``). The
    output has ``num_classes`` channels (the SR trainer records the image channels there)."""
    opts = model_options(model_cfg, "seran", keyword_names(SERAN, "in_channels", "out_channels", "features"))
    return SERAN(in_channels, num_classes, features=model_cfg.base_features, **opts)
