"""DoDNet (CVPR 2021): one encoder-decoder whose last layers are a dynamic head whose
weights a task-conditioned controller generates per sample (DoDNet, CVPR 2021; ``docs/methods/dodnet.md``).

Encoder: weight-standardised 3x3x3 convolutions, GroupNorm(16), pre-activation residual
blocks; conv 1 -> 32, stages 32 (1 block, stride 1), 64 (2, s2), 128 (2, s2), 256 (2, s2),
256 (2, s2); fusion GN-ReLU-1x1x1 conv. Controller: GN-ReLU-global average pool of the
fusion feature, concatenated with the task one-hot, 1x1x1 conv -> the head's parameters
(their count derived from the head widths: 162 for 8 -> 8 -> 8 -> 2). Decoder: trilinear x2,
add the skip, residual block, 256 -> 128 -> 64 -> 32 -> 32, then GN-ReLU-1x1x1 conv -> 8.
Dynamic head: per sample three 1x1x1 convolutions with that sample's parameters, for the
whole batch at once as batched matrix products, never a per-sample loop.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.networks import keyword_names, model_options, register
from medvol.plans import Plans


class WSConv3d(nn.Conv3d):
    """Convolution with weight standardisation (zero mean, unit std per output channel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3, 4), keepdim=True)
        std = w.reshape(w.shape[0], -1).std(dim=1, unbiased=False).view(-1, 1, 1, 1, 1)
        return F.conv3d(x, (w - mean) / (std + 1e-5), self.bias, self.stride, self.padding, self.dilation, self.groups)


def _gn(c: int, groups: int = 16) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, c), c)


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 16):
        super().__init__()
        self.n1, self.c1 = _gn(cin, groups), WSConv3d(cin, cout, 3, stride, 1, bias=False)
        self.n2, self.c2 = _gn(cout, groups), WSConv3d(cout, cout, 3, 1, 1, bias=False)
        self.skip = WSConv3d(cin, cout, 1, stride, 0, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(x))
        skip = self.skip(h) if self.skip is not None else x
        h = self.c1(h)
        h = self.c2(F.relu(self.n2(h)))
        return h + skip


def head_param_count(widths: Sequence[int]) -> int:
    """Weights and biases of the 1x1x1 layers widths[0] -> widths[1] -> ... (8,8,8,2 -> 162)."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def dynamic_head(features: torch.Tensor, params: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """Apply per-sample 1x1x1 layers to ``features`` (B, widths[0], ...) with ``params``
    (B, head_param_count(widths)), ReLU between layers.

    A 1x1x1 convolution is a matrix product over channels, so each layer is one batched
    matrix multiply (``baddbmm``) for the whole batch: no per-sample loop, and faster than a
    grouped convolution (groups = batch) on both CPU and GPU.
    """
    b = features.shape[0]
    spatial = features.shape[2:]
    x = features.reshape(b, widths[0], -1)
    offset = sum(cin * cout for cin, cout in zip(widths[:-1], widths[1:]))  # biases follow the weights
    w_off, layers = 0, list(zip(widths[:-1], widths[1:]))
    for i, (cin, cout) in enumerate(layers):
        w = params[:, w_off:w_off + cin * cout].reshape(b, cout, cin)
        bias = params[:, offset:offset + cout]
        w_off += cin * cout
        offset += cout
        x = torch.baddbmm(bias[:, :, None], w, x)
        if i < len(layers) - 1:
            x = F.relu(x)
    return x.reshape(b, widths[-1], *spatial)


class DoDNet(nn.Module):
    """forward(x, task_id) -> logits (B, 2, ...) for (organ, tumour); sigmoid per channel."""

    def __init__(self, in_channels: int = 1, num_tasks: int = 7, widths=(32, 64, 128, 256, 256),
                 blocks=(1, 2, 2, 2, 2), head_widths=(8, 8, 8, 2), groups: int = 16):
        super().__init__()
        self.num_tasks, self.head_widths = num_tasks, tuple(head_widths)
        self.stem = WSConv3d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[PreActBlock(cin if j == 0 else w, w, stride if j == 0 else 1, groups)
                                          for j in range(n)]))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.fusion = nn.Sequential(_gn(widths[-1], groups), nn.ReLU(inplace=True),
                                    nn.Conv3d(widths[-1], widths[-1], 1))
        self.controller_pre = nn.Sequential(_gn(widths[-1], groups), nn.ReLU(inplace=True))
        self.controller = nn.Conv3d(widths[-1] + num_tasks, head_param_count(head_widths), 1)
        # after the upsampling the skip is added, so each block takes the skip's width:
        # 256 -> 128, 128 -> 64, 64 -> 32, 32 -> 32 for the paper's widths
        skips = list(widths[-2::-1])
        outs = skips[1:] + [widths[0]]
        self.decoder = nn.ModuleList(PreActBlock(a, b, 1, groups) for a, b in zip(skips, outs))
        self.pre_head = nn.Sequential(_gn(widths[0], groups), nn.ReLU(inplace=True),
                                      nn.Conv3d(widths[0], head_widths[0], 1))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
            feats.append(x)
        return feats

    def head_parameters(self, bottleneck: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        g = self.controller_pre(bottleneck).mean(dim=(2, 3, 4), keepdim=True)
        onehot = F.one_hot(task_id.long(), self.num_tasks).float()[:, :, None, None, None]
        return self.controller(torch.cat([g, onehot.to(g.dtype)], 1)).flatten(1)

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        feats = self.encode(x)
        h = self.fusion(feats[-1])
        params = self.head_parameters(h, task_id)
        for blk, skip in zip(self.decoder, feats[-2::-1]):
            h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = blk(h + skip)
        return dynamic_head(self.pre_head(h), params, self.head_widths)


@register("dodnet")
def build_dodnet(model_cfg, plans: Plans | None, in_channels: int, num_classes: int) -> nn.Module:
    opts = model_options(model_cfg, "dodnet", keyword_names(DoDNet, "in_channels"))
    base = model_cfg.base_features
    widths = opts.pop("widths", [base, 2 * base, 4 * base, 8 * base, 8 * base])
    return DoDNet(in_channels, widths=widths, **opts)
