"""CANet's segmenter: a V-Net whose bottleneck is replaced by a Transformer, with a
segmentation head and a tanh signed-distance head (CANet, ESWA 2023; ``docs/methods/canet.md``).

V-Net (base 16, BatchNorm): encoder stages 16 (1 conv) -> 32 (2) -> 64 (3) -> 128 (3) ->
256 (3), 2x2x2 stride-2 convolutions between them; decoder: 2x2x2 transposed convolutions
*added* to the skip, blocks of 3/3/2/1 convolutions. The bottleneck feature goes through
a 1x1x1 projection to tokens (one per bottleneck voxel), a learned position embedding
(zero-initialised, sized from the patch and interpolated when the token grid changes),
12 pre-LayerNorm Transformer blocks (MONAI ``TransformerBlock``) and a final LayerNorm, and
back through a 3x3x3 convolution: it replaces the bottleneck. Every width and depth is a
parameter, so tests can build a tiny variant.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.networks import keyword_names, model_options, register
from medvol.plans import Plans


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, k, stride, pad), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class ConvStage(nn.Sequential):
    def __init__(self, n_convs: int, cin: int, cout: int):
        super().__init__(*[_conv_bn_relu(cin if i == 0 else cout, cout) for i in range(n_convs)])


class UpStage(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.ConvTranspose3d(cin, cout, 2, 2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class TransformerBottleneck(nn.Module):
    def __init__(self, channels: int, hidden: int = 168, layers: int = 12, heads: int = 12, mlp_dim: int = 3072,
                 dropout: float = 0.1, grid: Sequence[int] = (7, 7, 5)):
        super().__init__()
        from monai.networks.blocks import TransformerBlock

        self.grid = tuple(int(g) for g in grid)
        self.to_tokens = nn.Conv3d(channels, hidden, 1)
        self.pos = nn.Parameter(torch.zeros(1, hidden, *self.grid))  # learned, zero-initialised
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, mlp_dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.back = _conv_bn_relu(hidden, channels)

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return self.pos
        return F.interpolate(self.pos, size=tuple(grid), mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.to_tokens(x)
        grid = t.shape[2:]
        t = t + self.position_embedding(grid)
        t = self.drop(t.flatten(2).transpose(1, 2))  # (B, tokens, hidden)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t).transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return self.back(t)


class VNetTransformer(nn.Module):
    """forward(x) -> segmentation logits; forward(x, return_sdf=True) -> (logits, tanh SDF)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base: int = 16, patch_size=(112, 112, 80),
                 hidden: int = 168, layers: int = 12, heads: int = 12, mlp_dim: int = 3072,
                 transformer_dropout: float = 0.1, dropout: bool = True, stages=(1, 2, 3, 3, 3),
                 decoder_stages=(3, 3, 2, 1)):
        super().__init__()
        w = [base * 2 ** i for i in range(5)]
        self.enc = nn.ModuleList(ConvStage(stages[i], in_channels if i == 0 else w[i], w[i]) for i in range(5))
        self.down = nn.ModuleList(_conv_bn_relu(w[i], w[i + 1], k=2, stride=2, pad=0) for i in range(4))
        grid = [int(p) // 16 for p in patch_size]
        self.transformer = TransformerBottleneck(w[4], hidden, layers, heads, mlp_dim, transformer_dropout, grid)
        self.up = nn.ModuleList(UpStage(w[4 - i], w[3 - i]) for i in range(4))
        self.dec = nn.ModuleList(ConvStage(decoder_stages[i], w[3 - i], w[3 - i]) for i in range(4))
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()
        self.seg_head = nn.Conv3d(w[0], out_channels, 1)
        self.sdf_head = nn.Conv3d(w[0], out_channels, 1)

    def forward(self, x: torch.Tensor, return_sdf: bool = False):
        skips = []
        for i in range(4):
            x = self.enc[i](x)
            skips.append(x)
            x = self.down[i](x)
        x = self.dropout(self.enc[4](x))
        x = self.transformer(x)
        for i in range(4):
            x = self.dec[i](self.up[i](x) + skips[3 - i])
        x = self.dropout(x)
        seg = self.seg_head(x)
        if return_sdf:
            return seg, torch.tanh(self.sdf_head(x))
        return seg


@register("vnet_transformer")
def build_vnet_transformer(model_cfg, plans: Plans | None, in_channels: int, num_classes: int) -> nn.Module:
    opts = model_options(model_cfg, "vnet_transformer", keyword_names(VNetTransformer, "in_channels", "out_channels",
                                                                         "base"))
    patch = opts.pop("patch_size", None) or (plans.patch_size if plans else None)
    # binary tasks use one sigmoid channel, as the paper does
    out = 1 if num_classes == 2 else num_classes
    return VNetTransformer(in_channels, out, base=model_cfg.base_features, patch_size=patch, **opts)
