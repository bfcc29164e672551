"""DC-MT slice classifier: SE-ResNeXt50 + foreground attention + LSE pooling + CAMs (DC-MT, Huo et
al., MedIA 2022; ``docs/methods/dcmt.md``).

After Huo et al., "Automatic grading assessments for knee MRI cartilage defects via
self-ensembling semi-supervised learning with dual-consistency", MedIA 2022.

Input ``(N, C, H, W)`` slices (the paper: 3 channels, 256 x 256). The network:

1. MONAI's 2D ``SEResNeXt50`` (32x4d) trunk, stem to ``layer4``, with ``layer4`` at stride 1,
   so the feature map is 1/16 of the input (256 -> 16) with 2048 channels. Its ImageNet
   classifier is dropped (never used, and unused parameters break DDP).
2. :class:`ForegroundAttention`: 3x3 conv 2048 -> 512 + BN; channel attention (a spatial
   softmax over a 1x1 score map pools each channel, FC 512 -> 64 -> 512, sigmoid); position
   attention (1x1 -> one map, 3x3 conv + BN, sigmoid gate on that map); the gated map is added
   to the features through a zero-initialised scale gamma; 3x3 conv 512 -> 512 + BN.
3. Head: concat(trunk, attention) 2560 -> 3x3 conv -> 512 + BN + ReLU + Dropout2d(0.1);
   :func:`lse_pool` (r = 6) -> the 512-d slice feature; linear 512 -> classes.
4. Class activation maps: ReLU of the head features through a 1x1 conv whose weights are the
   classifier's, detached (no bias), then :func:`refine_cams` to the input size.

With ``input_percentiles`` and ``trunk_channels`` the network prepares its input as DC-MT
does (per-slice percentile clip + min-max, grey repeated to 3 channels: :meth:`DCMTNet.prepare`),
so a saved model takes the cache's slices as they are; ``forward(x, prepared=True)`` skips
that for a trainer that perturbs prepared slices.

``forward`` returns a dict ``{"logits" (N, K), "cams" (N, K, H, W), "features" (N, 512),
"attention" (N, 1, h, w)}``; :class:`~medvol.networks.slice_adapter.SliceAdapter` in
classification mode reads ``logits`` and ``features`` from it.

``width``/``layers``/``groups`` shrink the trunk for tests; the defaults are the paper's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.squeeze_and_excitation import SEResNeXtBottleneck
from monai.networks.nets import SEResNeXt50
from monai.networks.nets.senet import SENet

from medvol.networks import model_options, register
from medvol.networks.weights import load_local_weights

PAPER_LAYERS = (3, 4, 6, 3)
STAGE_PLANES = (64, 128, 256, 512)  # MONAI's SENet fixes these; ``width`` scales them


def lse_pool(x: torch.Tensor, r: float = 6.0) -> torch.Tensor:
    """Log-sum-exp pooling over the spatial positions: ``(B, C, H, W)`` -> ``(B, C)``,
    ``(logsumexp(r * x) - log(H * W)) / r``. Tends to the max as r -> inf and to the mean as r -> 0."""
    if r <= 0:
        raise ValueError(f"LSE pooling needs r > 0, got {r}")
    flat = x.flatten(2)
    return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r


def refine_cams(cams: torch.Tensor, size: Sequence[int] | None = None, w: float = 100.0,
                sigma: float = 0.4) -> torch.Tensor:
    """``(B, K, h, w)`` maps -> ``(B, K, H, W)`` soft masks: bilinear upsampling to ``size``
    (``align_corners=True``, as published), min-max normalisation of each map to [0, 1] (a
    constant map becomes 0), then ``sigmoid(w * (cam - sigma))`` (0.5 where the normalised
    value is ``sigma``)."""
    if size is not None and tuple(cams.shape[-2:]) != tuple(size):
        cams = F.interpolate(cams, size=tuple(size), mode="bilinear", align_corners=True)
    flat = cams.flatten(2)
    lo = flat.amin(2, keepdim=True)
    span = flat.amax(2, keepdim=True) - lo
    span = torch.where(span > 0, span, torch.full_like(span, 1e-5))
    norm = ((flat - lo) / span).view_as(cams)
    return torch.sigmoid(w * (norm - sigma))


def normalise_slices(x: torch.Tensor, percentiles: Sequence[float] = (0.1, 99.9)) -> torch.Tensor:
    """DC-MT's intensity preparation of ``(N, C, H, W)`` slices, per slice and channel: clip to
    the ``percentiles`` of its own values (linear interpolation, as numpy), then min-max to
    [0, 1] (a constant slice becomes 0)."""
    flat = x.float().flatten(2)
    q = torch.tensor([p / 100 for p in percentiles], dtype=flat.dtype, device=flat.device)
    bounds = torch.quantile(flat, q, dim=2, keepdim=True)  # (2, N, C, 1)
    lo, hi = bounds[0], bounds[1]
    span = hi - lo
    out = (flat.clamp(lo, hi) - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.zeros_like(out)).view_as(x)


class _ScaledSENet(SENet):
    """MONAI's SENet with every stage's ``planes`` multiplied by ``width`` (for tests; MONAI
    fixes them at 64/128/256/512)."""

    def __init__(self, width: float, **kwargs):
        object.__setattr__(self, "_width", width)  # read by _make_layer inside SENet.__init__
        super().__init__(**kwargs)

    def _make_layer(self, block, planes, *args, **kwargs):
        return super()._make_layer(block, int(round(planes * self._width)), *args, **kwargs)


def se_resnext_trunk(in_channels: int = 3, layers: Sequence[int] = PAPER_LAYERS, groups: int = 32,
                     width: float = 1.0, reduction: int = 16) -> tuple[nn.Sequential, int]:
    """MONAI's 2D SE-ResNeXt (stem ``layer0`` to ``layer4``) with ``layer4`` at stride 1, and its
    output channels. ``width == 1`` is exactly ``monai.networks.nets.SEResNeXt50(spatial_dims=2,
    layers=layers, groups=groups)``; ``width < 1`` narrows every stage and the stem."""
    layers = tuple(int(n) for n in layers)
    if len(layers) != 4 or min(layers) < 1:
        raise ValueError(f"layers must be four block counts >= 1, got {layers}")
    planes = [int(round(p * width)) for p in STAGE_PLANES]
    if min(planes) * 4 // 64 < 1:  # SEResNeXtBottleneck's grouped width: floor(planes * 4 / 64) * groups
        raise ValueError(f"width {width} makes the first stage's bottleneck empty; use width >= 0.25")
    kwargs: dict[str, Any] = dict(
        spatial_dims=2, in_channels=in_channels, layers=layers, groups=groups, reduction=reduction,
        dropout_prob=None, inplanes=int(round(64 * width)), downsample_kernel_size=1, input_3x3=False,
        num_classes=1)
    net: nn.Module
    if width == 1.0:
        net = SEResNeXt50(pretrained=False, **kwargs)
    else:
        net = _ScaledSENet(width, block=SEResNeXtBottleneck, **kwargs)
    first: Any = net.layer4[0]
    # layer4 at stride 1 (256 -> 16): its first block's strided 3x3 conv and its projection.
    # MONAI's 'same' padding for these kernels does not depend on the stride.
    first.conv2.conv.stride = (1, 1)
    first.project.conv.stride = (1, 1)
    trunk = nn.Sequential(OrderedDict((f"layer{i}", getattr(net, f"layer{i}")) for i in range(5)))
    return trunk, planes[3] * SEResNeXtBottleneck.expansion


def _conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class ForegroundAttention(nn.Module):
    """DC-MT's foreground-attention module: ``(B, C, h, w)`` -> ``(features (B, inner, h, w),
    attention (B, 1, h, w))``, the attention being the gamma-scaled gated position map that is
    added (broadcast over channels) to the reduced features."""

    def __init__(self, in_channels: int, inner: int, reduction: int = 8):
        super().__init__()
        self.reduce = _conv_bn(in_channels, inner)
        self.pool_score = nn.Conv2d(inner, 1, 1, bias=False)  # spatial-softmax pooling weights
        self.channel_fc = nn.Sequential(nn.Linear(inner, inner // reduction, bias=False), nn.ReLU(inplace=True),
                                        nn.Linear(inner // reduction, inner, bias=False))
        self.value = nn.Conv2d(inner, inner, 1, bias=False)
        self.to_map = nn.Conv2d(inner, 1, 1, bias=False)
        self.position_gate = _conv_bn(1, 1)
        self.gamma = nn.Parameter(torch.zeros(1))  # zero-init: the module starts as the identity
        self.out = _conv_bn(inner, inner)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.reduce(x)
        weights = self.pool_score(f).flatten(2).softmax(-1)  # (B, 1, hw)
        pooled = (f.flatten(2) * weights).sum(-1)  # (B, inner)
        channel = torch.sigmoid(self.channel_fc(pooled))[..., None, None]
        fmap = self.to_map(self.value(f) * channel)  # (B, 1, h, w)
        attention = self.gamma * fmap * torch.sigmoid(self.position_gate(fmap))
        return self.out(f + attention), attention


class DCMTNet(nn.Module):
    """DC-MT slice classifier (see the module docstring).

    Args:
        num_classes: classes (3 cartilage-defect grades in the paper).
        in_channels: input channels (3 in the paper).
        lse_r: LSE pooling sharpness r (6).
        cam_w, cam_sigma: CAM refinement ``sigmoid(w * (cam - sigma))`` (100, 0.4).
        head_channels: width of the head and of the slice feature (512).
        layers, groups, width: trunk block counts (3, 4, 6, 3), ResNeXt cardinality (32) and a
            stage-width factor (1) -- smaller values only for tests.
        dropout: the head's Dropout2d probability (0.1).
        input_percentiles: when given (DC-MT: (0.1, 99.9)), :meth:`prepare` clips each slice and
            channel to these percentiles of its own values and min-maxes it to [0, 1].
        trunk_channels: the trunk's input channels when they differ from ``in_channels``: a
            single input channel is repeated to them (DC-MT: grey slices -> 3 channels).
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 3, lse_r: float = 6.0, cam_w: float = 100.0,
                 cam_sigma: float = 0.4, head_channels: int = 512, layers: Sequence[int] = PAPER_LAYERS,
                 groups: int = 32, width: float = 1.0, dropout: float = 0.1,
                 input_percentiles: Sequence[float] | None = None, trunk_channels: int | None = None):
        super().__init__()
        if lse_r <= 0:
            raise ValueError(f"lse_r must be > 0, got {lse_r}")
        trunk_in = int(trunk_channels or in_channels)
        if in_channels not in (1, trunk_in):
            raise ValueError(f"trunk_channels {trunk_in}: the input needs 1 channel (repeated) or {trunk_in}, "
                             f"got in_channels {in_channels}")
        self.lse_r, self.cam_w, self.cam_sigma = float(lse_r), float(cam_w), float(cam_sigma)
        self.input_percentiles = None if input_percentiles is None else tuple(float(p) for p in input_percentiles)
        self.trunk_in = trunk_in
        self.trunk, trunk_channels = se_resnext_trunk(trunk_in, layers, groups, width)
        inner = trunk_channels // 4  # 2048 -> 512
        self.attention = ForegroundAttention(trunk_channels, inner)
        self.head = nn.Sequential(nn.Conv2d(trunk_channels + inner, head_channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True), nn.Dropout2d(dropout))
        self.classifier = nn.Linear(head_channels, num_classes)
        self.feature_dim = head_channels

    def class_maps(self, head: torch.Tensor) -> torch.Tensor:
        """The classifier applied at every position of ``head`` ``(B, F, h, w)`` with its weights
        detached and without bias: ``(B, K, h, w)``, before the ReLU."""
        return F.conv2d(head, self.classifier.weight.detach()[:, :, None, None])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input preparation: :func:`normalise_slices` when ``input_percentiles`` is set,
        then single-channel slices repeated to the trunk's channels (DC-MT: grey -> 3)."""
        if self.input_percentiles is not None:
            x = normalise_slices(x, self.input_percentiles)
        if x.shape[1] != self.trunk_in:
            x = x.expand(-1, self.trunk_in, *x.shape[2:])
        return x

    def forward(self, x: torch.Tensor, prepared: bool = False) -> dict[str, torch.Tensor]:
        """``x`` ``(N, in_channels, H, W)``; ``prepared=True``: ``x`` is already :meth:`prepare`'s
        output (a trainer that perturbs the prepared slices, as DC-MT's views do)."""
        if not prepared:
            x = self.prepare(x)
        feats = self.trunk(x)
        attended, attention = self.attention(feats)
        head = self.head(torch.cat([feats, attended], 1))
        pooled = lse_pool(head, self.lse_r)
        cams = refine_cams(F.relu(self.class_maps(head)), x.shape[-2:], self.cam_w, self.cam_sigma)
        return {"logits": self.classifier(pooled), "cams": cams, "features": pooled, "attention": attention}


_OPTIONS = {"lse_r", "cam_w", "cam_sigma", "head_channels", "layers", "groups", "width", "dropout", "input_percentiles",
            "trunk_channels", "backbone_weights"}


@register("dcmt")
def build_dcmt(model_cfg, plans: dict, in_channels: int, num_classes: int) -> nn.Module:
    """A 2D :class:`DCMTNet` (wrap it in a ``SliceAdapter`` for volumes); ``model.options`` may
    set the keyword arguments above and ``backbone_weights`` (a local SE-ResNeXt50 32x4d state
    dict, MONAI/Cadene names) for the trunk (``model.base_features`` is not used)."""
    opts = model_options(model_cfg, "dcmt", _OPTIONS)
    weights = opts.pop("backbone_weights", None)
    model = DCMTNet(num_classes, in_channels, **opts)
    if weights:
        load_local_weights(model.trunk, weights, "SE-ResNeXt50 trunk")
    return model
