"""CANet's attention discriminator (DAM, CANet, ESWA 2023; ``docs/methods/canet.md``): does this
signed-distance map come
from a labelled or an unlabelled sample?

conv0 on the map and conv1 on the image (each 1 -> 64, k4 s2 p1) are summed, LeakyReLU 0.2,
Dropout3d 0.5; convolutions 64 -> 128 -> 256 -> 512 (k4 s2 p1, LeakyReLU; dropout after the
first two); squeeze-excitation channel attention on the 512 maps (reduction 8, a registered
module: the published one builds it inside forward and discards its output); global average
pooling (not a fixed 7x7x5 pool, so any patch size works); linear 512 -> 2.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SqueezeExcitation3d(nn.Module):
    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3, 4)))
        return x * w[:, :, None, None, None]


class AttentionDiscriminator(nn.Module):
    def __init__(self, map_channels: int = 1, image_channels: int = 1, base: int = 64, n_classes: int = 2,
                 reduction: int = 8):
        super().__init__()
        w = [base, base * 2, base * 4, base * 8]
        self.conv0 = nn.Conv3d(map_channels, w[0], 4, 2, 1)
        self.conv1 = nn.Conv3d(image_channels, w[0], 4, 2, 1)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.drop = nn.Dropout3d(0.5)
        self.conv2 = nn.Conv3d(w[0], w[1], 4, 2, 1)
        self.conv3 = nn.Conv3d(w[1], w[2], 4, 2, 1)
        self.conv4 = nn.Conv3d(w[2], w[3], 4, 2, 1)
        self.attention = SqueezeExcitation3d(w[3], reduction)
        self.classifier = nn.Linear(w[3], n_classes)

    def forward(self, sdf_map: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.conv0(sdf_map) + self.conv1(image)))
        x = self.drop(self.act(self.conv2(x)))
        x = self.drop(self.act(self.conv3(x)))
        x = self.act(self.conv4(x))
        x = self.attention(x)
        return self.classifier(x.mean(dim=(2, 3, 4)))
