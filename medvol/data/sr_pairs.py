"""Low-/high-resolution 2D slice pairs for super-resolution (SERAN, ``docs/methods/seran.md``).

The high-resolution (HR) image is a square patch of one slice of a cached (normalised) volume;
its low-resolution (LR) partner is made by one of the two degradations of the MR
super-resolution literature (SERAN's "BD" and "TD" settings):

- ``bicubic``: bicubic downsampling by ``scale`` with antialiasing (torch's
  ``interpolate(..., mode="bicubic", antialias=True)``, which follows MATLAB's ``imresize``,
  the literature's tool); half-pixel convention: LR pixel ``i`` is centred on HR coordinate
  ``(i + 0.5) * scale - 0.5``.
- ``kspace``: k-space truncation: the 2D Fourier transform keeps its central ``1/scale`` of
  frequencies along each axis (what a lower-resolution acquisition measures), then the inverse
  transform on the smaller grid, scaled so that a constant image keeps its value. A phase ramp
  first shifts the image by ``(scale - 1) / 2`` pixels so that LR samples sit at the same
  half-pixel centres as the bicubic ones.

Both take ``(N, C, H, W)`` tensors with ``H`` and ``W`` multiples of ``scale``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medvol.cache import load_case
from medvol.data.dataset import StepDataset
from medvol.errors import ConfigError

DEGRADATIONS = ("bicubic", "kspace")


def bicubic_downsample(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H/scale, W/scale)``, antialiased bicubic."""
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    return F.interpolate(hr, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def kspace_truncate(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H/scale, W/scale)``: the central k-space block, shifted
    to half-pixel centres (module docstring); the real part of the small inverse transform."""
    big_h, big_w = hr.shape[-2:]
    h, w = big_h // scale, big_w // scale
    shift = (scale - 1) / 2
    fy = torch.fft.fftfreq(big_h, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(big_w, dtype=torch.float64)[None, :]
    k = torch.fft.fft2(hr.double()) * torch.exp(2j * torch.pi * shift * (fy + fx))
    k = torch.fft.fftshift(k, dim=(-2, -1))
    y0, x0 = big_h // 2 - h // 2, big_w // 2 - w // 2
    block = torch.fft.ifftshift(k[..., y0:y0 + h, x0:x0 + w], dim=(-2, -1))
    return (torch.fft.ifft2(block).real * (h * w) / (big_h * big_w)).to(hr.dtype)


def degrade(hr: torch.Tensor, scale: int, kind: str = "bicubic") -> torch.Tensor:
    """The LR partner of ``hr`` ``(N, C, H, W)`` by the degradation ``kind``."""
    if kind not in DEGRADATIONS:
        raise ConfigError(f"degradation must be one of {DEGRADATIONS}, got {kind!r}")
    if hr.shape[-2] % scale or hr.shape[-1] % scale:
        raise ValueError(f"the HR size {tuple(hr.shape[-2:])} must be a multiple of the scale {scale}")
    return bicubic_downsample(hr, scale) if kind == "bicubic" else kspace_truncate(hr, scale)


def crop_to_multiple(image: np.ndarray, scale: int) -> np.ndarray:
    """``(..., H, W)`` cropped at the far end to multiples of ``scale``."""
    h, w = image.shape[-2] // scale * scale, image.shape[-1] // scale * scale
    return image[..., :h, :w]


def slice_of(image: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` of a cached image ``(C, X, Y, Z)`` across spatial ``axis`` (0-2): ``(C, H, W)``."""
    return np.take(image, index, axis=axis + 1)


class SRPairDataset(StepDataset):
    """LR/HR pairs from slices of cached cases: ``{"image": LR (C, p, p), "target": HR
    (C, p*scale, p*scale)}``, a pure function of ``(seed, step, slot)``. A case, then a slice
    across ``slice_axis``, then an HR patch (zero-padded where the slice is smaller), then, with
    ``flips``, a random flip and 90-degree turn (RCAN/SERAN's augmentation), then the degradation."""

    def __init__(self, cache_dir, cases: list[str], lr_patch: int, scale: int, degradation: str, slice_axis: int,
                 global_batch: int, seed: int = 0, flips: bool = True):
        super().__init__(global_batch, seed)
        if not cases:
            raise ConfigError(f"{cache_dir}: no training case for super-resolution pairs")
        self.cache_dir, self.cases = str(cache_dir), list(cases)
        self.hr_patch, self.scale, self.degradation = int(lr_patch) * int(scale), int(scale), degradation
        self.slice_axis, self.flips = int(slice_axis), flips
        self._images: dict[str, np.ndarray] = {}

    def _image(self, case: str) -> np.ndarray:
        if case not in self._images:
            self._images[case] = load_case(self.cache_dir, case, mmap=True)[0]
        return self._images[case]

    def hr_patch_of(self, rng: np.random.Generator) -> np.ndarray:
        """An HR patch ``(C, p, p)`` of a random slice of a random case."""
        image = self._image(self.cases[int(rng.integers(len(self.cases)))])
        sl = slice_of(image, self.slice_axis, int(rng.integers(image.shape[self.slice_axis + 1])))
        p = self.hr_patch
        pad = [(0, 0)] + [(0, max(0, p - s)) for s in sl.shape[1:]]
        sl = np.pad(np.asarray(sl, np.float32), pad)
        y, x = (int(rng.integers(s - p + 1)) for s in sl.shape[1:])
        return sl[:, y:y + p, x:x + p]

    def sample(self, step: int, slot: int, rng: np.random.Generator) -> dict:
        hr = self.hr_patch_of(rng)
        if self.flips:
            if rng.random() < 0.5:
                hr = hr[:, :, ::-1]
            hr = np.rot90(hr, int(rng.integers(4)), axes=(1, 2))
        target = torch.from_numpy(np.ascontiguousarray(hr, np.float32))
        lr = degrade(target[None], self.scale, self.degradation)[0]
        return {"image": lr.contiguous(), "target": target}
