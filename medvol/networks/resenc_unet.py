"""nnU-Net's ResidualEncoderUNet (dynamic-network-architectures), the network of the ResEnc
planners (``medvol plan --planner resenc-m|l|xl``), built from MONAI blocks and the plan.

Layout, as nnU-Net's: a stem (one conv-norm-LeakyReLU, stride 1, the first stage's features);
per encoder stage ``n_blocks_per_stage[s]`` residual basic blocks, the first of which carries
the stage's stride in its first conv (no pooling layers); a basic block is conv-norm-act,
conv-norm, plus the skip, then act; its skip is ResNet-D's: average pooling over the stride,
then a 1x1 conv-norm where the features change (MONAI's ``UnetResBlock`` uses a strided 1x1
conv instead, so the block is assembled here from MONAI's ``Convolution``). The decoder is the
plain U-Net decoder: per stage a transposed conv (kernel = stride), concatenation with the skip
and ``n_conv_per_stage_decoder[s]`` conv-norm-act (one in the presets), and a 1x1 segmentation
head at every decoder resolution. Instance norm (affine, eps 1e-5), LeakyReLU 0.01, conv
bias on, He initialisation (a = 0.01) and each block's last norm starting at zero (the block
starts as its skip), as nnU-Net initialises it.

Deep supervision as medvol's ``dynunet``: in training the heads of all decoder resolutions,
upsampled to the patch and stacked on dim 1 (highest resolution first); in eval the top head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.errors import ConfigError
from medvol.networks import model_options, register
from medvol.networks.dynunet import features_per_stage
from medvol.plans import Plans

NORM = ("INSTANCE", {"affine": True, "eps": 1e-5})
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def _conv(dim: int, cin: int, cout: int, kernel, stride=1, act=ACT, norm=NORM, bias: bool = True) -> nn.Module:
    """Conv (same padding) -> norm -> act (act None: conv -> norm)."""
    from monai.networks.blocks import Convolution

    return Convolution(dim, cin, cout, strides=stride, kernel_size=kernel, adn_ordering="NDA", act=act, norm=norm,
                       bias=bias)


class BasicBlockD(nn.Module):
    """Residual basic block with ResNet-D's skip (average pool over the stride, 1x1 conv-norm
    where the features change); the stride sits in the first conv."""

    def __init__(self, dim: int, cin: int, cout: int, kernel, stride):
        super().__init__()
        self.conv1 = _conv(dim, cin, cout, kernel, stride)
        self.conv2 = _conv(dim, cout, cout, kernel, 1, act=None)
        strided = any(s != 1 for s in _as_list(stride, dim))
        skip: list[nn.Module] = []
        if strided:
            skip.append((nn.AvgPool3d if dim == 3 else nn.AvgPool2d)(stride, stride))
        if cin != cout:
            skip.append(_conv(dim, cin, cout, 1, 1, act=None, bias=False))
        self.skip = nn.Sequential(*skip)  # empty: identity
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


def _as_list(v, dim: int) -> list[int]:
    return [int(v)] * dim if isinstance(v, int) else [int(i) for i in v]


class ResEncUNet(nn.Module):
    def __init__(self, dim: int, in_channels: int, num_classes: int, features, kernels, strides,
                 n_blocks_per_stage, n_conv_per_stage_decoder, deep_supervision: bool = True):
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetOutBlock, get_conv_layer

        n = len(strides)
        if len(n_blocks_per_stage) != n or len(n_conv_per_stage_decoder) != n - 1 or len(kernels) != n:
            raise ConfigError(f"resenc_unet: {n} stages need {n} kernels and encoder block counts and {n - 1} "
                              f"decoder conv counts; got {len(kernels)}, {len(n_blocks_per_stage)}, "
                              f"{len(n_conv_per_stage_decoder)}")
        self.deep_supervision = deep_supervision
        self.stem = _conv(dim, in_channels, features[0], kernels[0])
        stages, prev = [], features[0]
        for s in range(n):
            blocks = [BasicBlockD(dim, prev if b == 0 else features[s], features[s], kernels[s],
                                  strides[s] if b == 0 else 1) for b in range(n_blocks_per_stage[s])]
            stages.append(nn.Sequential(*blocks))
            prev = features[s]
        self.stages = nn.ModuleList(stages)
        self.transpconvs, self.decoder, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(1, n):  # from the bottleneck up
            below, skip = features[-s], features[-(s + 1)]
            self.transpconvs.append(get_conv_layer(dim, below, skip, strides[-s], strides[-s], conv_only=True,
                                                   is_transposed=True, bias=True))
            convs = [_conv(dim, 2 * skip if c == 0 else skip, skip, kernels[-(s + 1)])
                     for c in range(n_conv_per_stage_decoder[s - 1])]
            self.decoder.append(nn.Sequential(*convs))
            self.heads.append(UnetOutBlock(dim, skip, num_classes))
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        supervise = self.deep_supervision and self.training
        outs = []
        for s, (up, convs, head) in enumerate(zip(self.transpconvs, self.decoder, self.heads)):
            x = convs(torch.cat([up(x), skips[-(s + 2)]], 1))
            if supervise or s == len(self.heads) - 1:
                outs.append(head(x))
        if not supervise:
            return outs[-1]
        top = outs[-1]
        return torch.stack([top] + [F.interpolate(o, top.shape[2:]) for o in reversed(outs[:-1])], 1)


def _init(module: nn.Module) -> None:
    """nnU-Net's initialisation: He normal (a = 0.01) for convs, zero bias; a basic block's
    second norm starts at zero, so that each block starts as its skip."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, BasicBlockD):
        for p in module.conv2.get_submodule("adn.N").parameters():  # MONAI Convolution: conv, adn (N: the norm)
            nn.init.zeros_(p)


@register("resenc_unet")
def build_resenc_unet(model_cfg, plans: Plans | None, in_channels: int, num_classes: int) -> nn.Module:
    model_options(model_cfg, "resenc_unet", ())
    if plans is None:
        raise ConfigError("model resenc_unet is configured from a plan: train it on a preprocessing cache")
    net = plans.topology
    if "n_blocks_per_stage" not in net:
        raise ConfigError("model resenc_unet needs a Residual Encoder plan, and plans.json was made by the default "
                          "planner: rerun `medvol plan PRE --planner resenc-m` (or resenc-l, resenc-xl)")
    strides = net["strides"]
    return ResEncUNet(len(plans.patch_size), in_channels, num_classes,
                      features_per_stage(len(strides), model_cfg.base_features, model_cfg.max_features),
                      net["kernel_sizes"], strides, net["n_blocks_per_stage"], net["n_conv_per_stage_decoder"],
                      model_cfg.deep_supervision)
