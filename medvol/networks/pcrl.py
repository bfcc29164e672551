"""PCRL (PCRL, ICCV 2021; ``docs/methods/pcrl.md``): the Models-Genesis 3D U-Net and the parts PCRL adds to it.

Backbone (widths for ``base`` = 32, the paper's): encoder stages of two conv 3³ + BN + ReLU,
1->32->64 | pool | 64->128 | pool | 128->256 | pool | 256->512; decoder stages of a 2³
transposed conv, concatenation with the skip and two convs back to 256, 128, 64; a 1³
convolution to the output. Every width scales with ``base`` (tests use tiny ones).

PCRL's additions, all in :class:`PCRLNet`, as the published ``pytorch/models/pcrl_model_3d.py``
(``PCRLModel3d``) has them:
- a projection head GAP(512) -> 512->128 -> ReLU -> 128->128 on the *ungated* bottleneck,
  returned raw (the trainer L2-normalises, as the published ``Normalize`` does);
- transformation-conditioned attention: the indicator of the flips/rot90 applied to a target
  (3 flip flags + a one-hot of 4 rotations = 7 numbers) -> FC 7->256 -> ReLU -> FC 256->512
  -> sigmoid, a channel-wise gate on a bottleneck and nowhere else; one MLP gates the
  student's bottleneck with its indicator and the momentum bottleneck with the other's;
- the hybrid path: student and momentum features mixed, ``alpha * student + (1 - alpha) *
  momentum``, at the bottleneck and at every skip, decoded by the (student) decoder;
  :meth:`PCRLNet.branch` is one published student pass (gated, or ungated for the mixup
  pass), :meth:`PCRLNet.forward` runs both passes of a step in one call.

The segmentation network fine-tuned from a pretraining (:class:`PCRLSegNet`, registered as
``pcrl_unet``) holds an encoder of the very same class under the same name, so the tensors
of ``encoder.pt`` load into it by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.networks import model_options, register
from medvol.plans import Plans

N_INDICATOR = 7  # 3 flip flags + one-hot of rot90 k in {0, 1, 2, 3}


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Four stages; returns the features of every stage, the last being the bottleneck."""

    def __init__(self, in_channels: int = 1, base: int = 32):
        super().__init__()
        c = base
        widths = [(in_channels, c, 2 * c), (2 * c, 2 * c, 4 * c), (4 * c, 4 * c, 8 * c), (8 * c, 8 * c, 16 * c)]
        self.stages = nn.ModuleList(nn.Sequential(ConvBNReLU(a, b), ConvBNReLU(b, o)) for a, b, o in widths)
        self.channels = [o for _, _, o in widths]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else F.max_pool3d(x, 2))
            feats.append(x)
        return feats


class UpStage(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cin, 2, stride=2)
        self.convs = nn.Sequential(ConvBNReLU(cin + cskip, cout), ConvBNReLU(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[2:] != skip.shape[2:]:  # odd sizes: pad the upsampled map to the skip's size
            pad = [p for d in (4, 3, 2) for p in (0, skip.shape[d] - x.shape[d])]
            x = F.pad(x, pad)
        return self.convs(torch.cat([x, skip], 1))


class Decoder(nn.Module):
    def __init__(self, channels: list[int], out_channels: int):
        super().__init__()
        c64, c128, c256, c512 = channels
        self.stages = nn.ModuleList([UpStage(c512, c256, c256), UpStage(c256, c128, c128), UpStage(c128, c64, c64)])
        self.out = nn.Conv3d(c64, out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for stage, skip in zip(self.stages, reversed(feats[:-1])):
            x = stage(x, skip)
        return self.out(x)


class ProjectionHead(nn.Module):
    """GAP -> FC -> ReLU -> FC; the raw vector (callers L2-normalise it where they compare)."""

    def __init__(self, cin: int, dim: int = 128, hidden: int = 128):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cin, hidden), nn.Linear(hidden, dim)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(bottleneck.mean((2, 3, 4)))))


class TransformAttention(nn.Module):
    """Indicator (B, 7) -> channel gate (B, C) in (0, 1)."""

    def __init__(self, channels: int, hidden: int = 256):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(N_INDICATOR, hidden), nn.Linear(hidden, channels)

    def forward(self, indicator: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(indicator))))


class KeyEncoder(nn.Module):
    """What the momentum (key) encoder holds: the encoder and the projection head, under the
    same names as in :class:`PCRLNet` so that EMA pairs tensors by name. ``forward`` returns
    the feature maps of every stage (bottleneck last) and the raw projection."""

    def __init__(self, in_channels: int = 1, base: int = 32, proj_dim: int = 128, proj_hidden: int = 128):
        super().__init__()
        self.encoder = Encoder(in_channels, base)
        self.projector = ProjectionHead(self.encoder.channels[-1], proj_dim, proj_hidden)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = self.encoder(x)
        return feats, self.projector(feats[-1])

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.encode(x)


def mix_features(student: list[torch.Tensor], momentum: list[torch.Tensor], alpha: torch.Tensor | float
                 ) -> list[torch.Tensor]:
    """Cross-model mixup at every skip and the bottleneck, ``alpha * student + (1 - alpha) *
    momentum``; ``alpha`` a number, or one per sample (shape (B,))."""
    a = torch.as_tensor(alpha, dtype=student[0].dtype, device=student[0].device).reshape(-1, 1, 1, 1, 1)
    return [a * s + (1 - a) * m for s, m in zip(student, momentum)]


class PCRLNet(KeyEncoder):
    """The student: encoder + projection head + attention + decoder (sigmoid output)."""

    def __init__(self, in_channels: int = 1, base: int = 32, proj_dim: int = 128, proj_hidden: int = 128,
                 attention_hidden: int = 256):
        super().__init__(in_channels, base, proj_dim, proj_hidden)
        self.attention = TransformAttention(self.encoder.channels[-1], attention_hidden)
        self.decoder = Decoder(self.encoder.channels, in_channels)

    def gate(self, feats: list[torch.Tensor], indicator: torch.Tensor) -> list[torch.Tensor]:
        """Transformation-conditioned attention: ``feats`` with the bottleneck multiplied
        channel-wise by the gate of ``indicator`` (the skips untouched)."""
        g = self.attention(indicator).to(feats[-1].dtype)
        return [*feats[:-1], feats[-1] * g[:, :, None, None, None]]

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.decoder(feats))

    def branch(self, x: torch.Tensor, key_feats: list[torch.Tensor], alpha: torch.Tensor | float,
               ind1: torch.Tensor | None = None, ind2: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass of the published student (``PCRLModel3d.forward`` with ``student=True``):
        the raw projection ``z`` of the ungated bottleneck; with indicators, the student's
        bottleneck gated by ``ind1`` and the momentum bottleneck by ``ind2`` (one shared
        attention MLP), none in the mixup pass; the hybrid ``alpha * student + (1 - alpha) *
        momentum`` at every skip and the bottleneck decoded -> ``out_alpha``; the student's own
        (gated) features decoded -> ``out``. Returns ``(z, out_alpha, out)``."""
        feats, z = self.encode(x)
        if ind1 is not None:
            if ind2 is None:
                raise ValueError("branch: the gates come in pairs (ind1 for the student, ind2 for the momentum side)")
            feats, key_feats = self.gate(feats, ind1), self.gate(key_feats, ind2)
        return z, self.decode(mix_features(feats, key_feats, alpha)), self.decode(feats)

    def forward(self, x1: torch.Tensor, key_feats: list[torch.Tensor],  # type: ignore[override]  # the student
                ind1: torch.Tensor, ind2: torch.Tensor, alpha1: torch.Tensor | float,  # takes both passes
                x1_mix: torch.Tensor, key_feats_mix: list[torch.Tensor], alpha2: torch.Tensor | float,
                ) -> dict[str, torch.Tensor]:
        """Both student passes of a PCRL step in one call (as DDP wants): the gated pass on
        ``x1`` with the momentum features ``key_feats`` of ``x2``, and the ungated pass on the
        batch-mixed ``x1_mix`` with ``key_feats_mix`` of the mixed ``x2``. Returns the raw
        projections ``q``, ``q_mix`` and the decoder outputs ``out``, ``out_alpha``,
        ``out_mix``, ``out_alpha_mix``."""
        q, out_alpha, out = self.branch(x1, key_feats, alpha1, ind1, ind2)
        q_mix, out_alpha_mix, out_mix = self.branch(x1_mix, key_feats_mix, alpha2)
        return {"q": q, "out": out, "out_alpha": out_alpha, "q_mix": q_mix, "out_mix": out_mix,
                "out_alpha_mix": out_alpha_mix}


class PCRLSegNet(nn.Module):
    """The same U-Net for segmentation: encoder (named as in pretraining) + decoder -> logits."""

    def __init__(self, in_channels: int, num_classes: int, base: int = 32):
        super().__init__()
        self.encoder = Encoder(in_channels, base)
        self.decoder = Decoder(self.encoder.channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register("pcrl_unet")
def build_pcrl_unet(model_cfg, plans: Plans | None, in_channels: int, num_classes: int) -> nn.Module:
    """``model.base_features`` sets the width (32 in the paper); one logit per class."""
    model_options(model_cfg, "pcrl_unet", ())
    return PCRLSegNet(in_channels, num_classes, model_cfg.base_features)
