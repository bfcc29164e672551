"""Inf-Net (Fan et al., IEEE TMI 2020): Res2Net backbone, edge attention, parallel partial
decoder and cascaded reverse attention, for binary segmentation of 2D slices (Inf-Net, IEEE TMI
2020; ``docs/methods/infnet.md``).

Tensors are ``(B, C, H, W)``. Every output is a logit map of one channel upsampled to the
input's size (:class:`InfNetOutput`); in eval mode the model returns only the final map (the
shallowest reverse-attention map), so the slice predictor sees a plain tensor.

Sizes follow the input: the published code resizes by fixed factors (×8, ×0.25, ×32, …) that
only fit sizes divisible by 32; here every resize targets the size of the tensor it meets.

Widths: ``width_mult`` scales every channel count of the backbone and the heads (1.0 gives
the paper's 256/512/1024/2048 features, 64-channel edge feature, 256/64/64 reverse-attention
convs), ``base_width`` is Res2Net's width per scale split (26), ``rfb_channels`` the RFB
output (32). Tiny values exist for tests only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.errors import ConfigError
from medvol.networks import model_options, register
from medvol.networks.slice import resize2d, scaled_size
from medvol.networks.weights import load_local_weights


class InfNetOutput(NamedTuple):
    """Logit maps at the input's size: ``global_map`` S_g from the partial decoder, the
    reverse-attention maps deepest first (``ra4`` stride 32, ``ra3`` 16, ``ra2`` 8), ``edge``."""

    global_map: torch.Tensor
    ra4: torch.Tensor
    ra3: torch.Tensor
    ra2: torch.Tensor
    edge: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.ra2

    @property
    def segmentation_maps(self) -> tuple[torch.Tensor, ...]:
        """The four maps the structure loss supervises."""
        return (self.global_map, self.ra4, self.ra3, self.ra2)


# ---------------------------------------------------------------- Res2Net-50 v1b 26w×4s
# Module names match the Res2Net authors' ImageNet state dict (conv1.0, bn1, layerN.i.convs.k,
# downsample.1, ...), so a local copy of those weights loads by name.

class Bottle2neck(nn.Module):
    """1×1 → ``scale`` splits, each 3×3 conv fed the previous split's output (hierarchical
    residual-like connections; in a stage's first block the splits are independent and the
    last split is average-pooled) → 1×1, plus the shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, base_width: int = 26, scale: int = 4,
                 first: bool = False):
        super().__init__()
        width = int(math.floor(planes * base_width / 64.0))
        if width < 1:
            raise ConfigError(f"Res2Net split width {planes}*{base_width}/64 < 1: raise width_mult or base_width")
        self.width, self.scale, self.first = width, scale, first
        self.conv1 = nn.Conv2d(cin, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, stride, 1, bias=False) for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, stride, 1) if first else None
        cout = planes * self.expansion
        self.conv3 = nn.Conv2d(width * scale, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:  # v1b: average-pool, then a stride-1 projection
            self.downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, 1)
        outs, y = [], splits[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            inp = splits[i] if (i == 0 or self.first) else y + splits[i]
            y = self.relu(bn(conv(inp)))
            outs.append(y)
        outs.append(self.pool(splits[-1]) if self.pool is not None else splits[-1])
        out = self.bn3(self.conv3(torch.cat(outs, 1)))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Res2NetV1b(nn.Module):
    """Res2Net-50 v1b: deep stem (three 3×3 convs), max-pool, layers [3, 4, 6, 3]; returns the
    four stage features at strides 4/8/16/32 (256/512/1024/2048 channels at ``width_mult=1``).
    No classifier: an ImageNet file's ``fc.*`` tensors are reported as unexpected."""

    def __init__(self, in_channels: int = 3, width_mult: float = 1.0, base_width: int = 26, scale: int = 4,
                 layers=(3, 4, 6, 3)):
        super().__init__()
        w = lambda c: max(1, int(round(c * width_mult)))  # noqa: E731
        stem, c0 = w(32), w(64)
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, c0, 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(c0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, self.channels = c0, []
        for i, (n, planes) in enumerate(zip(layers, (w(64), w(128), w(256), w(512)))):
            stride = 1 if i == 0 else 2
            blocks = [Bottle2neck(cin, planes, stride, base_width, scale, first=True)]
            cin = planes * Bottle2neck.expansion
            blocks += [Bottle2neck(cin, planes, 1, base_width, scale) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.channels.append(cin)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            feats.append(x)
        return feats

    def load_local_weights(self, path: str | Path) -> dict[str, list[str]]:
        """Load a local state dict (e.g. the Res2Net authors' ImageNet file) by name; nothing is
        downloaded (:func:`medvol.networks.weights.load_local_weights`: prefixes stripped, an RGB
        stem summed into a one-channel model, the report returned)."""
        return load_local_weights(self, path, "Res2Net backbone (width_mult=1)")


# ---------------------------------------------------------------- Inf-Net heads

class ConvBN(nn.Sequential):
    """Conv + BN without activation: the published network's conv unit (its ReLU is defined
    but never applied); ReLUs sit where the published forward puts them."""

    def __init__(self, cin: int, cout: int, k=1, padding=0, dilation: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, bias=False), nn.BatchNorm2d(cout))


class RFB(nn.Module):
    """Receptive-field block: four branches (1×1; 1×1 → 1×k → k×1 → 3×3 dilated k for k = 3,
    5, 7), concatenated and fused by a 3×3, plus a 1×1 shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.branch0 = ConvBN(cin, cout)
        self.branches = nn.ModuleList(nn.Sequential(
            ConvBN(cin, cout), ConvBN(cout, cout, (1, k), (0, k // 2)), ConvBN(cout, cout, (k, 1), (k // 2, 0)),
            ConvBN(cout, cout, 3, k, dilation=k)) for k in (3, 5, 7))
        self.fuse = ConvBN(4 * cout, cout, 3, 1)
        self.shortcut = ConvBN(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([self.branch0(x)] + [b(x) for b in self.branches], 1))
        return F.relu(y + self.shortcut(x))


class PartialDecoder(nn.Module):
    """Parallel partial decoder over the three deepest RFB features (f4 stride 32, f3 16, f2 8):
    multiplicative fusion after bilinear ×2 upsampling (align_corners=True, as published),
    then concatenation; returns the one-channel global map S_g at stride 8."""

    def __init__(self, c: int):
        super().__init__()
        self.up4_3, self.up4_2, self.up3_2, self.up4_cat = (ConvBN(c, c, 3, 1) for _ in range(4))
        self.up_cat2 = ConvBN(2 * c, 2 * c, 3, 1)
        self.cat3 = ConvBN(2 * c, 2 * c, 3, 1)
        self.cat2 = ConvBN(3 * c, 3 * c, 3, 1)
        self.conv = ConvBN(3 * c, 3 * c, 3, 1)
        self.out = nn.Conv2d(3 * c, 1, 1)

    def forward(self, f4: torch.Tensor, f3: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        s3, s2 = f3.shape[-2:], f2.shape[-2:]
        up = lambda x, s: resize2d(x, s, align_corners=True)  # noqa: E731
        f4_3 = up(f4, s3)
        m3 = self.up4_3(f4_3) * f3
        m2 = self.up4_2(up(f4_3, s2)) * self.up3_2(up(f3, s2)) * f2
        c3 = self.cat3(torch.cat([m3, self.up4_cat(f4_3)], 1))
        c2 = self.cat2(torch.cat([m2, self.up_cat2(up(c3, s2))], 1))
        return self.out(self.conv(c2))


class EdgeAttention(nn.Module):
    """On the stride-4 feature: 1×1 → 64, two 3×3 → the edge feature; a 3×3 → the edge map."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        self.feature = nn.Sequential(ConvBN(cin, c), ConvBN(c, c, 3, 1), ConvBN(c, c, 3, 1))
        self.head = ConvBN(c, 1, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.feature(x)
        return feat, self.head(feat)


class ReverseAttention(nn.Module):
    """weight = 1 − sigmoid(prior) (the prior resized to the feature), times the feature; a 1×1
    reduction concatenated with the resized edge feature; ``n_convs`` k×k convs with ReLU; a
    one-channel residual added to the prior. Returns the refined map at the feature's stride."""

    def __init__(self, cin: int, c_edge: int, mid: int, k: int, n_convs: int, out_k: int):
        super().__init__()
        self.reduce = ConvBN(cin, mid)
        self.convs = nn.ModuleList(ConvBN(mid + (c_edge if i == 0 else 0), mid, k, k // 2) for i in range(n_convs))
        self.out = ConvBN(mid, 1, out_k, out_k // 2)

    @staticmethod
    def weight(prior: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.sigmoid(prior)

    def forward(self, feat: torch.Tensor, prior: torch.Tensor, edge_feat: torch.Tensor) -> torch.Tensor:
        prior = resize2d(prior, feat.shape[-2:])
        x = self.reduce(self.weight(prior) * feat)
        x = torch.cat([x, resize2d(edge_feat, feat.shape[-2:])], 1)
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.out(x) + prior


class InfNet(nn.Module):
    """Inf-Net for one foreground class (one logit channel). ``forward(x)`` returns
    :class:`InfNetOutput` in training mode (or with ``all_outputs=True``), else the final map.

    Every map is predicted at 1/8 of the working resolution or coarser (the final one from the
    stride-8 features) and upsampled. The published loader resizes each whole slice to 352 x 352
    (512 px COVID-SemiSeg slices: 0.6875), so maps are 44 x 44; ``input_scale`` resizes the
    input by that factor inside the network and returns every map at the input's own size (the
    published test script's resize back). At native resolution a thin structure cannot be
    resolved: 128 px head-CT slices give 16 x 16 maps, whose best possible bone Dice is 0.65."""

    def __init__(self, in_channels: int = 3, width_mult: float = 1.0, base_width: int = 26,
                 rfb_channels: int = 32, input_scale: float = 1.0, device: torch.device | str | None = None):
        super().__init__()
        if not input_scale > 0:
            raise ConfigError(f"model.options.input_scale must be positive, got {input_scale}")
        self.input_scale = float(input_scale)
        w = lambda c: max(1, int(round(c * width_mult)))  # noqa: E731
        self.backbone = Res2NetV1b(in_channels, width_mult, base_width)
        c1, c2, c3, c4 = self.backbone.channels
        self.rfb2, self.rfb3, self.rfb4 = RFB(c2, rfb_channels), RFB(c3, rfb_channels), RFB(c4, rfb_channels)
        self.decoder = PartialDecoder(rfb_channels)
        ce = w(64)
        self.edge = EdgeAttention(c1, ce)
        self.ra4 = ReverseAttention(c4, ce, w(256), 5, 3, 1)
        self.ra3 = ReverseAttention(c3, ce, w(64), 3, 2, 3)
        self.ra2 = ReverseAttention(c2, ce, w(64), 3, 2, 3)
        if device is not None:
            self.to(device)

    def load_local_weights(self, path: str | Path) -> dict[str, list[str]]:
        """Backbone weights from a local file: see :meth:`Res2NetV1b.load_local_weights`."""
        return self.backbone.load_local_weights(path)

    def working_size(self, size) -> list[int]:
        """The side lengths the backbone sees for an input of ``size``: ``size × input_scale``."""
        return scaled_size(size, self.input_scale)

    def forward(self, x: torch.Tensor, all_outputs: bool | None = None, at_working_size: bool = False):
        """``at_working_size``: maps at the working resolution (``working_size``) instead of the
        input's, where the published loss compares them with the label resized to 352."""
        size = x.shape[-2:]
        if self.input_scale != 1.0:  # the working resolution; every map comes back at the input's size
            x = resize2d(x, self.working_size(size))
        if at_working_size:
            size = x.shape[-2:]
        f1, f2, f3, f4 = self.backbone(x)
        edge_feat, edge_map = self.edge(f1)
        s_g = self.decoder(self.rfb4(f4), self.rfb3(f3), self.rfb2(f2))
        r4 = self.ra4(f4, s_g, edge_feat)
        r3 = self.ra3(f3, r4, edge_feat)
        r2 = self.ra2(f2, r3, edge_feat)
        if not (self.training if all_outputs is None else all_outputs):
            return resize2d(r2, size)
        return InfNetOutput(*(resize2d(m, size) for m in (s_g, r4, r3, r2, edge_map)))


_OPTIONS = {"width_mult", "base_width", "rfb_channels", "input_scale", "backbone_weights"}


@register("infnet")
def build_infnet(model_cfg, plans: dict, in_channels: int, num_classes: int) -> nn.Module:
    """Binary Inf-Net (``num_classes`` 2 with background: one logit). ``model.options`` may set
    ``width_mult``, ``base_width``, ``rfb_channels``, ``input_scale`` and ``backbone_weights`` (a
    local Res2Net-50 v1b file); ``model.base_features`` is not used."""
    opts = model_options(model_cfg, "infnet", _OPTIONS)
    if num_classes not in (1, 2):
        raise ConfigError(f"infnet segments one foreground class; the dataset has {num_classes} labels "
                          "(background included)")
    weights = opts.pop("backbone_weights", None)
    model = InfNet(in_channels, **opts)
    if weights:
        model.load_local_weights(weights)
    return model
