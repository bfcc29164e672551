"""MRNet (Ji et al., "Learning Calibrated Medical Image Segmentation via Multi-rater Agreement
Modeling", CVPR 2021): a 2D segmenter conditioned on the raters' expertise.

Three parts, as the paper's Fig. 2 and the authors' code (jiwei0921/MRNet) have them:

- the coarse segmenter: a U-Net encoder-decoder whose bottleneck goes through the
  **Expertise-aware Inferring Module** (EIM): the expertise vector ``w`` (one weight per rater,
  summing to 1) is spread over the bottleneck grid, embedded by a 3x3 convolution and used as
  the hidden and cell state of one ConvLSTM step whose input is the high-level features;
- the **Multi-rater Reconstruction Module** (MRM): a second encoder-decoder that reads the
  image with the coarse prediction (and the expertise, through its own EIM) and rebuilds each
  rater's map, one head per rater;
- the **Multi-rater Perception Module** (MPM): the disagreement among the rebuilt maps (their
  standard deviation over raters) and the coarse prediction, each smoothed by a fixed Gaussian
  ("holistic") soft attention, re-weight the decoder's features; a convolution over them gives
  the final, calibrated prediction.

Arrays are ``(B, C, H, W)``; outputs are class logits (softmax over ``num_classes``; the
authors' sigmoid per structure is the two-class case). ``forward(x)`` runs all three parts with
the expertise in the non-persistent buffer ``expertise`` (equal weights unless
:meth:`MRNet.set_expertise` changed it), so the one sliding-window path predicts with it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.errors import ConfigError
from medvol.networks import keyword_names, model_options, register
from medvol.plans import Plans


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with batch norm and ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ExpertiseFusion(nn.Module):
    """The EIM: ``w`` (B, R) spread over the feature grid, embedded by a 3x3 convolution into the
    hidden and cell state of one ConvLSTM step on the features (B, C, h, w); returns the new hidden state."""

    def __init__(self, num_raters: int, channels: int):
        super().__init__()
        self.embed = nn.Conv2d(num_raters, channels, 3, padding=1)
        self.gates = nn.Conv2d(2 * channels, 4 * channels, 3, padding=1)

    def forward(self, features: torch.Tensor, expertise: torch.Tensor) -> torch.Tensor:
        state = self.embed(expertise[:, :, None, None].expand(-1, -1, *features.shape[2:]).to(features.dtype))
        i, f, o, g = self.gates(torch.cat([features, state], 1)).chunk(4, 1)
        cell = torch.sigmoid(f) * state + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cell)


class ConditionedUNet(nn.Module):
    """A U-Net whose bottleneck is fused with the expertise (EIM). ``forward`` returns the last
    decoder features (B, widths[0], H, W); ``encode`` the encoder's features per level."""

    def __init__(self, in_channels: int, widths: Sequence[int], num_raters: int):
        super().__init__()
        w = [int(v) for v in widths]
        self.down = nn.ModuleList([_block(in_channels, w[0])] + [_block(a, b) for a, b in zip(w, w[1:])])
        self.fusion = ExpertiseFusion(num_raters, w[-1])
        self.up = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(w, w[1:])])
        self.merge = nn.ModuleList([_block(2 * a, a) for a in w[:-1]])
        self.levels = len(w)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, expertise: torch.Tensor) -> torch.Tensor:
        n = 2 ** (self.levels - 1)
        if x.shape[-1] % n or x.shape[-2] % n:
            raise ValueError(f"MRNet: input {tuple(x.shape[-2:])} must be divisible by {n} in both axes "
                             f"({self.levels} levels); choose a patch size that is")
        feats = self.encode(x)
        y = self.fusion(feats[-1], expertise)
        for i in range(self.levels - 2, -1, -1):
            y = self.merge[i](torch.cat([self.up[i](y), feats[i]], 1))
        return y


def gaussian_kernel(size: int, nsig: float) -> np.ndarray:
    """The authors' ``gkern``: a ``size`` x ``size`` kernel from the normal CDF over +-``nsig``
    standard deviations (the square root of the outer product of the 1D weights), summing to 1."""
    from scipy.stats import norm

    interval = (2 * nsig + 1.0) / size
    edges = np.linspace(-nsig - interval / 2.0, nsig + interval / 2.0, size + 1)
    k1 = np.diff(norm.cdf(edges))
    k = np.sqrt(np.outer(k1, k1))
    return (k / k.sum()).astype(np.float32)


class HolisticAttention(nn.Module):
    """Soft attention of a map (B, 1, H, W) on features: the map blurred by a fixed Gaussian,
    min-max normalised per image, the larger of it and the map, multiplied into the features."""

    kernel: torch.Tensor

    def __init__(self, size: int = 31, nsig: float = 4.0):
        super().__init__()
        self.register_buffer("kernel", torch.from_numpy(gaussian_kernel(size, nsig))[None, None], persistent=False)

    def forward(self, attention: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        k = self.kernel.to(attention.dtype)
        soft = F.conv2d(attention, k, padding=int(k.shape[-1]) // 2)
        lo = soft.amin((2, 3), keepdim=True)
        hi = soft.amax((2, 3), keepdim=True)
        soft = (soft - lo) / (hi - lo + 1e-8)
        return features * torch.maximum(soft, attention)


class PerceptionModule(nn.Module):
    """The MPM: per foreground class, the coarse probability and the raters' disagreement (std of
    the rebuilt probabilities over raters) each attend over the features (plus the features, a
    residual); a 3x3 convolution over all of them gives the final logits."""

    def __init__(self, in_width: int, width: int, num_classes: int, kernel_size: int = 31, kernel_sigma: float = 4.0):
        super().__init__()
        self.features = _block(in_width, width)
        self.attend = HolisticAttention(kernel_size, kernel_sigma)
        self.head = nn.Conv2d(2 * (num_classes - 1) * width, num_classes, 3, padding=1)

    def forward(self, rater_logits: torch.Tensor, features: torch.Tensor, coarse_logits: torch.Tensor) -> torch.Tensor:
        f = self.features(features)
        coarse = torch.softmax(coarse_logits.float(), 1).to(f.dtype)
        spread = torch.softmax(rater_logits.float(), 2).std(1, unbiased=False).to(f.dtype)  # (B, K, H, W)
        maps = [m[:, c:c + 1] for c in range(1, coarse.shape[1]) for m in (coarse, spread)]
        return self.head(torch.cat([self.attend(m, f) + f for m in maps], 1))


class MRNet(nn.Module):
    """MRNet (see the module docstring). ``widths``: the coarse U-Net's channels per level;
    ``recon_widths``: the reconstruction network's; ``perception_width``: the MPM's features."""

    expertise: torch.Tensor

    def __init__(self, in_channels: int, num_classes: int, num_raters: int,
                 widths: Sequence[int] = (32, 64, 128, 256), recon_widths: Sequence[int] = (16, 32, 64, 128),
                 perception_width: int = 32, kernel_size: int = 31, kernel_sigma: float = 4.0):
        super().__init__()
        if num_classes < 2 or num_raters < 2:
            raise ConfigError(f"MRNet needs at least 2 classes and 2 raters, got {num_classes} and {num_raters}")
        self.num_classes, self.num_raters = int(num_classes), int(num_raters)
        self.segmenter = ConditionedUNet(in_channels, widths, num_raters)
        self.coarse_head = nn.Conv2d(int(widths[0]), num_classes, 1)
        self.reconstructor = ConditionedUNet(in_channels + num_classes, recon_widths, num_raters)
        self.rater_heads = nn.Conv2d(int(recon_widths[0]), num_raters * num_classes, 1)
        self.perception = PerceptionModule(int(widths[0]), perception_width, num_classes, kernel_size, kernel_sigma)
        self.register_buffer("expertise", torch.full((num_raters,), 1.0 / num_raters), persistent=False)

    def set_expertise(self, weights: Sequence[float]) -> None:
        """The expertise ``forward`` uses: one non-negative weight per rater, normalised to sum 1."""
        w = torch.as_tensor([float(v) for v in weights], dtype=torch.float32)
        if w.numel() != self.num_raters or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"expertise {list(weights)}: give {self.num_raters} non-negative weights "
                              "(one per rater, not all zero)")
        self.expertise.copy_(w / w.sum())

    def coarse(self, x: torch.Tensor, expertise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coarse logits (B, K, H, W), decoder features (B, widths[0], H, W))."""
        features = self.segmenter(x, expertise)
        return self.coarse_head(features), features

    def reconstruct(self, x: torch.Tensor, coarse_probs: torch.Tensor, expertise: torch.Tensor) -> torch.Tensor:
        """Each rater's map rebuilt from the image and the coarse probabilities: logits (B, R, K, H, W)."""
        y = self.rater_heads(self.reconstructor(torch.cat([x, coarse_probs.to(x.dtype)], 1), expertise))
        return y.reshape(y.shape[0], self.num_raters, self.num_classes, *y.shape[2:])

    def reconstruction_features(self, x: torch.Tensor, probs: torch.Tensor) -> list[torch.Tensor]:
        """The reconstruction encoder's features of the image with class probabilities ``probs``."""
        return self.reconstructor.encode(torch.cat([x, probs.to(x.dtype)], 1))

    def perceive(self, rater_logits: torch.Tensor, features: torch.Tensor, coarse_logits: torch.Tensor) -> torch.Tensor:
        """The final logits (B, K, H, W) from the rebuilt maps' disagreement and the coarse prediction."""
        return self.perception(rater_logits, features, coarse_logits)

    def forward(self, x: torch.Tensor, expertise: torch.Tensor | None = None) -> torch.Tensor:
        w = self.expertise.expand(x.shape[0], -1) if expertise is None else expertise
        logits, features = self.coarse(x, w)
        rebuilt = self.reconstruct(x, torch.softmax(logits.float(), 1), w)
        return self.perceive(rebuilt, features, logits)


@register("mrnet")
def build_mrnet(model_cfg, plans: Plans | dict | None, in_channels: int, num_classes: int) -> nn.Module:
    """``model.options``: ``num_raters`` (the trainer sets it from the cache's ``dataset.json``),
    ``widths``, ``recon_widths``, ``perception_width``, ``kernel_size``, ``kernel_sigma``."""
    opts = model_options(model_cfg, "mrnet", keyword_names(MRNet, "in_channels", "num_classes"))
    if "num_raters" not in opts:
        raise ConfigError("model 'mrnet' needs model.options.num_raters (the mrnet trainer sets it from the "
                          "cache's dataset.json 'raters')")
    return MRNet(in_channels, num_classes, **opts)
