"""UGPCL's network (IJCAI 2022; ``docs/methods/ugpcl.md``): a shared ResNet-50 encoder feeding a
U-Net CNN decoder and a Swin Transformer decoder, a projection head on the stride-8 feature for
pixel contrast, and a 4-way rotation head. 2D: images ``(B, C, H, W)``.

Changed from the published code (``docs/methods/ugpcl.md``): the Transformer decoder's absolute
position embeddings are ``nn.Parameter``\\ s (the published ones sit in a plain Python list, so
they are neither trained nor saved), sized from ``input_size``; the per-class memory queue of
the pixel contrast lives in the model's buffers (``memory``), so checkpoints carry it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.errors import ConfigError
from medvol.losses.pixel_contrast import ClassMemoryQueue
from medvol.networks import model_options, register
from medvol.networks.slice import resize2d, scaled_size
from medvol.networks.weights import load_local_weights
from medvol.plans import Plans

STRIDE = 32  # the encoder's total downsampling: H and W must be multiples of it


def working_size(size: Sequence[int], input_scale: float) -> tuple[int, ...]:
    """The side lengths UGPCL's encoder sees for an input of ``size``: ``size × input_scale``,
    rounded to a multiple of 32 (the input itself when ``input_scale`` is 1)."""
    return tuple(scaled_size(size, input_scale, STRIDE, STRIDE))


class ResNetEncoder(nn.Module):
    """MONAI's 2D ResNet with bottleneck blocks, without its classifier. ``width`` 64 and
    ``layers`` (3, 4, 6, 3) are ResNet-50. Returns the features at strides 2, 4, 8, 16, 32 with
    ``channels`` = (w, 4w, 8w, 16w, 32w)."""

    def __init__(self, in_channels: int, width: int = 64, layers: Sequence[int] = (3, 4, 6, 3)):
        super().__init__()
        from monai.networks.nets import ResNet

        net = ResNet("bottleneck", list(layers), [width, 2 * width, 4 * width, 8 * width], spatial_dims=2,
                     n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, feed_forward=False,
                     bias_downsample=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act)
        self.pool = net.maxpool
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.channels = (width, 4 * width, 8 * width, 16 * width, 32 * width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = [x]
        x = self.pool(x)
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class UNetDecoder(nn.Module):
    """U-Net decoder: five ×2 upsamplings (bilinear, or ``nearest`` as segmentation-models-pytorch's
    ``UnetDecoder``), each followed (where the encoder has one) by concatenation with the skip
    feature and two 3×3 conv-BN-ReLU; a ``head_kernel`` conv (1, or the published 3) to the classes."""

    def __init__(self, enc_channels: Sequence[int], widths: Sequence[int], num_classes: int,
                 upsample: str = "bilinear", head_kernel: int = 1):
        super().__init__()
        self.upsample = upsample
        self._align = None if upsample == "nearest" else False  # interpolate takes align_corners for bilinear only
        skips = list(enc_channels[3::-1]) + [0]  # strides 16, 8, 4, 2, then none at full size
        blocks, cin = [], enc_channels[4]
        for skip, cout in zip(skips, widths):
            blocks.append(nn.Sequential(*_conv_bn_relu(cin + skip, cout), *_conv_bn_relu(cout, cout)))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, num_classes, head_kernel, padding=head_kernel // 2)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[4]
        for i, block in enumerate(self.blocks):
            x = F.interpolate(x, scale_factor=2.0, mode=self.upsample, align_corners=self._align)
            if i < 4:
                x = torch.cat([x, feats[3 - i]], 1)
            x = block(x)
        return self.head(x)


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchExpand(nn.Module):
    """Swin-UNet's patch expanding: a linear map ``dim -> out_dim * scale²`` per token, the
    result rearranged into ``scale × scale`` tokens of ``out_dim`` (pixel shuffle), LayerNorm."""

    def __init__(self, dim: int, out_dim: int, scale: int = 2):
        super().__init__()
        self.expand = nn.Conv2d(dim, out_dim * scale * scale, 1, bias=False)  # a per-token linear map
        self.scale = scale
        self.norm = _ChannelNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.pixel_shuffle(self.expand(x), self.scale))


class SwinDecoderStage(nn.Module):
    """The upsampled tokens fused with the encoder's skip feature (each to ``dim``, concatenated,
    linear back to ``dim``), plus a learned absolute position embedding for a ``grid``-sized map,
    then ``depth`` Swin blocks (MONAI's, windowed attention with shifts) with stochastic depth
    ``drop_path`` (one rate a block). ``skip_norm``: LayerNorm after the skip's projection (published)."""

    def __init__(self, dim: int, skip_channels: int, heads: int, depth: int, window: int, grid: Sequence[int],
                 drop_path: Sequence[float] | None = None, skip_norm: bool = False):
        super().__init__()
        from monai.networks.nets.swin_unetr import BasicLayer

        proj = nn.Conv2d(skip_channels, dim, 1)
        self.skip_proj = nn.Sequential(proj, _ChannelNorm(dim)) if skip_norm else proj
        self.fuse = nn.Conv2d(2 * dim, dim, 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = BasicLayer(dim=dim, depth=depth, num_heads=heads, window_size=(window, window),
                                 drop_path=list(drop_path or [0.0] * depth), qkv_bias=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([x, self.skip_proj(skip)], 1))
        pos: torch.Tensor = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:  # an input of another size than built for
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.blocks(x + pos)


class SwinDecoder(nn.Module):
    """Transformer decoder (Swin-UNet's up path): the stride-32 feature projected to 2·(4e),
    patch-expanded to stride 16; stages at strides 16, 8, 4 of widths 4e, 2e, e with ``heads``
    (12, 6, 3) and window 7, patch expanding between them; LayerNorm, ×4 patch expanding to the
    input size, 1×1 conv to the classes. ``input_size`` sizes the position embeddings.
    ``published``: the skips' LayerNorm and stochastic depth rising linearly to 0.1 with depth
    (the stride-16 stage's blocks last, as Swin-UNet's up path takes its encoder's rates)."""

    def __init__(self, enc_channels: Sequence[int], num_classes: int, input_size: Sequence[int],
                 embed_dim: int = 96, heads: Sequence[int] = (12, 6, 3), depths: Sequence[int] = (2, 2, 2),
                 window: int = 7, published: bool = False):
        super().__init__()
        dims = [embed_dim * 4, embed_dim * 2, embed_dim]
        strides = [16, 8, 4]
        rates = torch.linspace(0.0, 0.1 if published else 0.0, sum(depths)).tolist()  # shallowest block first
        self.bottleneck = nn.Sequential(nn.Conv2d(enc_channels[4], 2 * dims[0], 1), _ChannelNorm(2 * dims[0]))
        self.expands = nn.ModuleList([PatchExpand(2 * dims[0], dims[0]), PatchExpand(dims[0], dims[1]),
                                      PatchExpand(dims[1], dims[2])])
        self.stages = nn.ModuleList(
            SwinDecoderStage(d, enc_channels[3 - i], h, n, window, [s // st for s in input_size],
                             rates[sum(depths[i + 1:]):sum(depths[i:])], skip_norm=published)
            for i, (d, h, n, st) in enumerate(zip(dims, heads, depths, strides)))
        self.norm = _ChannelNorm(embed_dim)
        self.final_expand = PatchExpand(embed_dim, embed_dim, scale=4)
        self.head = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottleneck(feats[4])
        for i, stage in enumerate(self.stages):
            x = stage(self.expands[i](x), feats[3 - i])
        return self.head(self.final_expand(self.norm(x)))


class UGPCLNet(nn.Module):
    """UNet-R50 with a Swin Transformer decoder, a projection head and a rotation head.

    ``forward(x)`` in training mode (or with ``all_outputs=True``) returns a dict: ``seg_cnn``
    and ``seg_tf`` (logits ``(B, classes, H, W)``), ``proj`` (``(B, proj_dim, H/8, W/8)``,
    L2-normalised) and ``rot`` (``(B, 4)`` logits of k·90°). In eval mode it returns the CNN
    decoder's logits alone, as the published inference does (validation, ``medvol predict``).
    ``input_size`` (H, W) sizes the position embeddings (224² in the paper); another size of a
    multiple of 32 also runs, with the embeddings interpolated. ``input_scale`` resizes the
    input inside the network (bilinear, to the nearest multiple of 32) and returns the logits at
    the input's own size: the published loader zooms every slice to 224², so small slices reach
    the stride-2 stem enlarged (``proj`` stays on the working size's stride-8 grid; give
    ``input_size`` as the working size). ``memory`` is the per-class
    queue of class-mean embeddings used by :class:`medvol.losses.pixel_contrast.PixelContrastLoss`.
    Faithful: ``width`` 64, ``layers`` (3, 4, 6, 3), ``embed_dim`` 96; smaller ones for tests.
    ``published_decoders``: the published decoders' details medvol otherwise leaves out (nearest
    upsampling and a 3×3 head in the CNN decoder, the Swin skips' LayerNorm, stochastic depth to
    0.1, Kaiming-normal convolutions and truncated-normal (0.02) Swin linear layers).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 4, input_size: Sequence[int] = (224, 224),
                 width: int = 64, layers: Sequence[int] = (3, 4, 6, 3), decoder_widths: Sequence[int] | None = None,
                 embed_dim: int = 96, heads: Sequence[int] = (12, 6, 3), depths: Sequence[int] = (2, 2, 2),
                 window: int = 7, proj_dim: int = 256, queue_size: int = 500, input_scale: float = 1.0,
                 published_decoders: bool = False):
        super().__init__()
        if not input_scale > 0:
            raise ConfigError(f"model.options.input_scale must be positive, got {input_scale}")
        self.input_scale = float(input_scale)
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) != 2 or any(s % STRIDE or s <= 0 for s in input_size):
            raise ConfigError(f"UGPCL input_size {input_size}: give (H, W), both positive multiples of {STRIDE}")
        if any(d % h for d, h in zip((4 * embed_dim, 2 * embed_dim, embed_dim), heads)):
            raise ConfigError(f"UGPCL embed_dim {embed_dim}: 4e, 2e, e must divide by heads {tuple(heads)}")
        self.input_size = input_size
        self.encoder = ResNetEncoder(in_channels, width, layers)
        enc = self.encoder.channels
        widths = tuple(decoder_widths) if decoder_widths else (4 * width, 2 * width, width, width // 2, width // 4)
        pub = bool(published_decoders)
        self.cnn_decoder = UNetDecoder(enc, widths, num_classes, "nearest" if pub else "bilinear", 3 if pub else 1)
        self.tf_decoder = SwinDecoder(enc, num_classes, input_size, embed_dim, heads, depths, window, pub)
        c8 = enc[2]  # 512 for ResNet-50
        self.proj_head = nn.Sequential(nn.Conv2d(c8, c8, 1), nn.BatchNorm2d(c8), nn.ReLU(inplace=True),
                                       nn.Conv2d(c8, proj_dim, 1))
        self.rot_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(enc[4], 4))
        self.memory = ClassMemoryQueue(num_classes, proj_dim, queue_size)
        if pub:
            _published_init(self)

    def forward(self, x: torch.Tensor, all_outputs: bool | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        work = working_size(x.shape[-2:], self.input_scale)
        if x.ndim != 4 or work[0] % STRIDE or work[1] % STRIDE:
            raise ValueError(f"UGPCLNet takes (B, C, H, W) with H, W multiples of {STRIDE}; got {tuple(x.shape)}")
        size = x.shape[-2:]
        feats = self.encoder(resize2d(x, work))
        if not (self.training if all_outputs is None else all_outputs):
            return resize2d(self.cnn_decoder(feats), size)  # what prediction uses: the CNN decoder's logits
        return {
            "seg_cnn": resize2d(self.cnn_decoder(feats), size),
            "seg_tf": resize2d(self.tf_decoder(feats), size),
            "proj": F.normalize(self.proj_head(feats[2]), dim=1),
            "rot": self.rot_head(feats[4]),
        }


def _published_init(net: UGPCLNet) -> None:
    """The published initialisation of the decoders and heads: Kaiming-normal convolutions (zero
    bias) and truncated-normal (std 0.02) linear layers in the Transformer decoder."""
    for part in (net.cnn_decoder, net.tf_decoder, net.proj_head):
        for m in part.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)


_OPTIONS = {"input_size", "width", "layers", "decoder_widths", "embed_dim", "heads", "depths", "window",
            "proj_dim", "queue_size", "input_scale", "published_decoders", "backbone_weights"}


def resnet_names(key: str) -> str:
    """A torchvision/MONAI ResNet name -> :class:`ResNetEncoder`'s (``conv1``/``bn1`` -> ``stem``,
    ``layerN`` -> ``layers.N-1``; the blocks inside keep their names)."""
    head, _, rest = key.partition(".")
    if head in ("conv1", "bn1"):
        return f"stem.{0 if head == 'conv1' else 1}.{rest}"
    if head.startswith("layer") and head[5:].isdigit():
        return f"layers.{int(head[5:]) - 1}.{rest}"
    return key


@register("ugpcl")
def build_ugpcl(model_cfg, plans: Plans | dict | None, in_channels: int, num_classes: int) -> nn.Module:
    """``model.options``: any of :data:`_OPTIONS` (see :class:`UGPCLNet`); ``input_size``
    defaults to the working size of the plan's 2D ``patch_size`` (× ``input_scale``), else 224².
    ``model.base_features`` is not used."""
    opts = model_options(model_cfg, "ugpcl", _OPTIONS)
    weights = opts.pop("backbone_weights", None)  # a local ResNet-50 state dict for the encoder
    if "input_size" not in opts:
        patch = plans.patch_size if isinstance(plans, Plans) else (plans or {}).get("patch_size")
        opts["input_size"] = (working_size(patch, float(opts.get("input_scale", 1.0)))
                              if patch is not None and len(patch) == 2 else (224, 224))
    model = UGPCLNet(in_channels, num_classes, **opts)
    if weights:
        load_local_weights(model.encoder, weights, "ResNet-50 encoder", rename=resnet_names)
    return model
