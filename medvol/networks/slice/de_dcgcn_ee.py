"""DE-DCGCN-EE (Li et al., IEEE TMI 2022; ``docs/methods/de_dcgcn_ee.md``): a U-Net for retinal
vessels with an edge-detection-based dual encoder, a dynamic-channel graph convolution at the
bottleneck and edge enhancement blocks on the skip connections. 2D: images ``(B, C, H, W)``,
``H`` and ``W`` multiples of ``2 ** (len(widths) - 1)``; one output channel (the vessel logit).

Behaviour matched to the authors' released network (github.com/YangLibuaa/DE-DCGCN-EE):
- image encoder: residual blocks (two 3x3 conv-BN-ReLU plus a 1x1 shortcut), max-pool between;
- edge encoder: the same blocks on the image's edge map (the sum of the absolute responses of
  four directional Sobel kernels, 0/90/45/135 degrees); at every level but the deepest, the
  Sobel edge map of the image encoder's feature at that level is added to the edge encoder's;
- fusion: the two deepest features are summed and passed to the dynamic-channel GCN;
- dynamic-channel GCN: channels are nodes; the adjacency is computed per input from the
  channels' global means ``m``: ``A_ij = 1 - 2 |sigmoid(m_j - m_i) - 1/2|`` (1 for equal
  channels, towards 0 for distant ones), weighted elementwise by a learned ``C x C`` matrix;
  the output ``ReLU(((W * A) X) * s)``;
- edge enhancement: on each skip, the image feature ``x`` and the edge feature ``y`` go through
  the same 1x3 and 3x1 convolutions; the channel gates ``sigmoid(GAP(conv31(y)))`` and
  ``sigmoid(GAP(conv13(y)))`` weight ``conv13(x)`` and ``conv31(x)``; ``x`` is added back;
- decoder: nearest x2 upsampling + 3x3 conv-BN-ReLU, concatenation with the enhanced skip, two
  3x3 conv-BN-ReLU; a 1x1 convolution to one logit.

Changed: the published scale ``s`` of the GCN output is a ``(1, 512, 64, 64)`` parameter (one
input size only); here it is per channel, ``(1, C, 1, 1)``, so any input size works. The
published code builds its Sobel convolutions inside ``forward`` and moves them to the GPU there;
here they are fixed buffers (:class:`SobelEdges`) that follow the module to its device.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.errors import ConfigError
from medvol.networks import model_options, register

# the four directional Sobel kernels of the published edge detector: 0, 90, 45 and 135 degrees
SOBEL_KERNELS = (
    ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0)),
    ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0)),
    ((2.0, 1.0, 0.0), (1.0, 0.0, -1.0), (0.0, -1.0, -2.0)),
    ((0.0, -1.0, -2.0), (1.0, 0.0, -1.0), (2.0, 1.0, 0.0)),
)


class SobelEdges(nn.Module):
    """Fixed edge detector: the sum over the four directions of ``|Sobel_k * x|`` (zero padding).
    ``per_channel``: each channel on its own (the image's edge map, one per colour channel);
    otherwise the channels are summed first and the one map is repeated over them (as the
    published ``edge_conv2d*`` do with their all-ones channel mixing)."""

    kernels: torch.Tensor

    def __init__(self, per_channel: bool = True):
        super().__init__()
        self.per_channel = per_channel
        self.register_buffer("kernels", torch.tensor(SOBEL_KERNELS).unsqueeze(1), persistent=False)  # (4, 1, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        src = x.reshape(b * c, 1, h, w) if self.per_channel else x.sum(1, keepdim=True)
        edges = F.conv2d(src, self.kernels.to(x.dtype), padding=1).abs().sum(1, keepdim=True)
        return edges.reshape(b, c, h, w) if self.per_channel else edges.expand(b, c, h, w)


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU with a 1x1 convolution shortcut, ReLU after the sum (published)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.body(x))


class DynamicChannelGCN(nn.Module):
    """Graph convolution over channels with an adjacency computed from each input (see the
    module docstring). ``adjacency(x)`` is ``(B, C, C)``; ``weight`` (``C x C``, ones at start,
    as published) is learned; ``scale`` (per channel) multiplies the output."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, channels))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    @staticmethod
    def adjacency(x: torch.Tensor) -> torch.Tensor:
        m = x.mean((2, 3))  # (B, C): each channel node's descriptor
        s = torch.sigmoid(m[:, None, :] - m[:, :, None])  # [b, i, j] = sigmoid(m_j - m_i)
        return 1.0 - 2.0 * (s - 0.5).abs()  # symmetric, 1 on the diagonal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        a = self.weight * self.adjacency(x)
        y = torch.bmm(a, x.reshape(b, c, h * w)).reshape(b, c, h, w)
        return F.relu(y * self.scale)


class EdgeEnhancement(nn.Module):
    """The EE block: image feature ``x`` enhanced by channel gates from the edge feature ``y``
    (the 1x3 and 3x1 convolutions shared by both, as published)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv13 = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1))
        self.conv31 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate13 = torch.sigmoid(self.conv13(y).mean((2, 3), keepdim=True))
        gate31 = torch.sigmoid(self.conv31(y).mean((2, 3), keepdim=True))
        return self.conv13(x) * gate31 + self.conv31(x) * gate13 + x


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DecoderStage(nn.Module):
    """Nearest x2 upsampling + conv-BN-ReLU to ``cout``, concatenated with the enhanced skip
    (``cout`` channels), then two conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), *_conv_bn_relu(cin, cout))
        self.fuse = nn.Sequential(*_conv_bn_relu(2 * cout, cout), *_conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([skip, self.up(x)], 1))


class DEDCGCNEE(nn.Module):
    """DE-DCGCN-EE: ``(B, C, H, W)`` -> ``(B, 1, H, W)`` vessel logits. ``widths``: the
    features of each level (published (64, 128, 256, 512): four levels, three poolings)."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ConfigError(f"model.options.widths must list at least two positive widths, got {widths}")
        self.widths = widths
        self.image_edges = SobelEdges(per_channel=True)
        self.feature_edges = SobelEdges(per_channel=False)
        ins = [in_channels] + widths[:-1]
        self.image_encoder = nn.ModuleList(ResidualBlock(i, o) for i, o in zip(ins, widths))
        self.edge_encoder = nn.ModuleList(ResidualBlock(i, o) for i, o in zip(ins, widths))
        self.gcn = DynamicChannelGCN(widths[-1])
        self.enhance = nn.ModuleList(EdgeEnhancement(w) for w in widths[:-1])
        self.decoder = nn.ModuleList(DecoderStage(widths[i + 1], widths[i]) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], 1, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The image encoder's and the edge encoder's features, level by level."""
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        h, e = x, self.image_edges(x)
        last = len(self.widths) - 1
        for level, (img_block, edge_block) in enumerate(zip(self.image_encoder, self.edge_encoder)):
            if level:
                h, e = F.max_pool2d(h, 2), F.max_pool2d(e, 2)
            h = img_block(h)
            e = edge_block(e)
            if level < last:  # the image feature's own edges join the edge branch (not at the bottleneck)
                e = e + self.feature_edges(h)
            xs.append(h)
            ys.append(e)
        return xs, ys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2] % self.multiple or x.shape[-1] % self.multiple:
            raise ValueError(f"DE-DCGCN-EE takes (B, C, H, W) with H, W multiples of {self.multiple}; "
                             f"got {tuple(x.shape)}")
        xs, ys = self.encode(x)
        d = self.gcn(xs[-1] + ys[-1])
        for level in range(len(self.widths) - 2, -1, -1):
            d = self.decoder[level](d, self.enhance[level](ys[level], xs[level]))
        return self.head(d)


@register("de_dcgcn_ee")
def build_de_dcgcn_ee(model_cfg, plans, in_channels: int, num_classes: int) -> nn.Module:
    """Binary DE-DCGCN-EE (``num_classes`` 2 with background: one logit). ``model.options`` may
    set ``widths``; ``model.base_features`` is not used."""
    opts = model_options(model_cfg, "de_dcgcn_ee", {"widths"})
    if num_classes not in (1, 2):
        raise ConfigError(f"de_dcgcn_ee segments one foreground class (vessels); the dataset has {num_classes} "
                          "labels (background included)")
    return DEDCGCNEE(in_channels, **opts)
