"""Random views of a batch on the device, for consistency training (mean teacher and kin).

A view of a batch ``x`` ``(B, C, *spatial)`` (2-D or 3-D) is ``x`` resampled through a random
per-sample affine map (flips, a small rotation, scaling and shift) and then perturbed in
intensity (brightness/contrast, Gaussian blur, Gaussian noise). The view remembers its affine
``theta``, so spatial maps can be carried between frames exactly: a student's targets into the
student's frame, a teacher's maps into the student's frame (:meth:`View.from_frame`), before a
loss compares them pixel by pixel. Logits of a whole image need no such care.

Conventions: ``theta`` is ``(B, n, n + 1)`` in ``torch.nn.functional.affine_grid``'s sense: it
maps a pixel of the view (normalised coordinates, ``align_corners=False``, last spatial axis
first) to the place in the source it is read from. Rotations are rigid in pixel units (the
normalised coordinates are rescaled by the image's aspect), in the plane of the first two
spatial axes. A flip alone resamples onto pixel centres, so it equals ``torch.flip`` up to
rounding. Everything is drawn from a ``torch.Generator`` on the batch's device, so a view is a
pure function of its seed (exact resume): the per-sample choices from a CPU generator (no
device synchronisation), the noise from a generator on the batch's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PerturbConfig:
    """What a view may do (probabilities per sample; ranges are drawn uniformly).

    The defaults are DC-MT's published augmentation: brightness/contrast +-0.05 (p 0.9), blur
    (p 0.5; published a 3x3 box or median blur, here Gaussian), Gaussian noise whose variance is
    drawn uniformly up to 0.1 on [0, 1] images (always; the std is its square root, so the mean
    noise power is 0.05, not the 0.033 of a uniformly drawn std) with the result clipped to
    ``clip`` ([0, 1]: DC-MT's prepared input), horizontal flip (p 0.5), shift/scale 1 % and
    rotation up to 3 degrees (p 0.5).
    """

    brightness_contrast_prob: float = 0.9
    brightness: float = 0.05  # added: U(-b, b) x the sample's intensity range
    contrast: float = 0.05  # multiplied: 1 + U(-c, c)
    blur_prob: float = 0.5
    blur_sigma: tuple = (0.5, 1.0)  # pixels
    noise_prob: float = 1.0
    noise_var: tuple = (0.0, 0.1)  # variance drawn uniformly, in the images' own units squared
    clip: tuple | None = (0.0, 1.0)  # the view's intensities clipped after the changes (None: not)
    flip_prob: float = 0.5
    flip_axes: tuple = (1,)  # spatial axes (0 = first); (1,) flips columns of (H, W) slices
    affine_prob: float = 0.5
    rotate_deg: float = 3.0
    scale: float = 0.01  # 1 + U(-s, s)
    shift: float = 0.01  # fraction of the image's extent per axis


@dataclass
class View:
    """A perturbed view: ``image`` and the affine ``theta`` it was resampled through."""

    image: torch.Tensor
    theta: torch.Tensor  # (B, n, n + 1): view pixel -> source position (affine_grid convention)
    identity: bool = field(default=False)  # no spatial change at all (skips resampling)

    def from_frame(self, x: torch.Tensor, other: "View | None" = None, mode: str = "bilinear",
                   fill: float = 0.0) -> torch.Tensor:
        """``x`` ``(B, K, *spatial)``, given in ``other``'s frame (None: the source batch's),
        resampled into this view's frame; places that fall outside ``x`` get ``fill`` (e.g. -1
        for label maps that mark unknown pixels). ``mode``: bilinear (maps) or nearest (labels)."""
        if self.identity and (other is None or other.identity):
            return x
        theta = self.theta if other is None else compose(invert(other.theta), self.theta)
        return warp(x, theta, mode, fill)


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    n = theta.shape[1]
    last = torch.zeros(theta.shape[0], 1, n + 1, dtype=theta.dtype, device=theta.device)
    last[:, 0, n] = 1
    return torch.cat([theta, last], 1)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The affine that reads through ``first`` then ``second``: pixel p -> first(second(p))."""
    return (_homogeneous(first) @ _homogeneous(second))[:, :-1]


def invert(theta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(_homogeneous(theta))[:, :-1]


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear", fill: float = 0.0) -> torch.Tensor:
    """``x`` resampled through ``theta`` (``grid_sample``, ``align_corners=False``); outside -> ``fill``."""
    grid = F.affine_grid(theta.to(torch.float32), list(x.shape), align_corners=False)
    src = x.float() - fill if fill else x.float()
    out = F.grid_sample(src, grid.to(src.dtype), mode=mode, padding_mode="zeros", align_corners=False)
    out = out + fill if fill else out
    return out.to(x.dtype)


def random_theta(batch: int, spatial: tuple[int, ...], cfg: PerturbConfig,
                 gen: torch.Generator) -> tuple[torch.Tensor, bool]:
    """Per-sample affines ``(B, n, n + 1)`` on the CPU (float64, so compositions stay exact; see
    the module docstring) and whether all of them are the identity."""
    n = len(spatial)
    size = torch.tensor(spatial[::-1], dtype=torch.float64)  # grid order: last axis first
    mats = torch.eye(n + 1, dtype=torch.float64).repeat(batch, 1, 1)
    any_change = False
    for b in range(batch):
        if cfg.affine_prob > 0 and _coin(cfg.affine_prob, gen):
            mats[b] = _small_affine(n, size, cfg, gen)
            any_change = True
        for axis in cfg.flip_axes if cfg.flip_prob > 0 else ():
            if _coin(cfg.flip_prob, gen):
                g = n - 1 - int(axis)  # spatial axis -> grid coordinate
                mats[b, g] = -mats[b, g]  # read from the mirrored place: flips the output along that axis
                any_change = True
    return mats[:, :n], not any_change


def _small_affine(n: int, size: torch.Tensor, cfg: PerturbConfig, gen: torch.Generator) -> torch.Tensor:
    """Rotation (in the plane of spatial axes 0 and 1, rigid in pixels), isotropic scale, shift."""
    m = torch.eye(n + 1, dtype=torch.float64)
    angle = math.radians(cfg.rotate_deg) * _uniform(-1, 1, gen)
    scale = 1 + cfg.scale * _uniform(-1, 1, gen)
    rot = torch.eye(n, dtype=torch.float64)
    i, j = n - 1, n - 2  # grid coordinates of spatial axes 0 and 1
    c, s = math.cos(angle), math.sin(angle)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    half = size / 2  # normalised -> pixel units, so the rotation is rigid on non-square images
    m[:n, :n] = torch.diag(1 / half) @ rot @ torch.diag(half) / scale
    m[:n, n] = torch.tensor([2 * cfg.shift * _uniform(-1, 1, gen) for _ in range(n)], dtype=torch.float64)
    return m


def _coin(p: float, gen: torch.Generator) -> bool:
    return bool(torch.rand((), generator=gen) < p)


def _uniform(lo: float, hi: float, gen: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` over every spatial axis (radius 3 sigma,
    reflect padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, c = x.dim() - 2, x.shape[1]
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    for axis in range(n):
        shape = [1, 1] + [1] * n
        shape[2 + axis] = k.numel()
        pad = [0, 0] * n
        pad[2 * (n - 1 - axis)] = pad[2 * (n - 1 - axis) + 1] = radius
        x = conv(F.pad(x, pad, mode="reflect"), k.view(shape).expand(c, *shape[1:]), groups=c)
    return x


def perturb_intensity(x: torch.Tensor, cfg: PerturbConfig, gen: torch.Generator,
                      noise_gen: torch.Generator) -> torch.Tensor:
    """Brightness/contrast, blur and noise, each drawn per sample (see :class:`PerturbConfig`);
    the choices from ``gen`` (CPU), the noise from ``noise_gen`` (on ``x``'s device)."""
    out = []
    for sample in x.split(1):
        if cfg.brightness_contrast_prob > 0 and _coin(cfg.brightness_contrast_prob, gen):
            alpha = 1 + cfg.contrast * _uniform(-1, 1, gen)
            beta = cfg.brightness * _uniform(-1, 1, gen)
            sample = sample * alpha + beta * (sample.amax() - sample.amin())
        if cfg.blur_prob > 0 and _coin(cfg.blur_prob, gen):
            sample = gaussian_blur(sample, _uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], gen))
        if cfg.noise_prob > 0 and _coin(cfg.noise_prob, gen):
            std = _uniform(cfg.noise_var[0], cfg.noise_var[1], gen) ** 0.5
            sample = sample + std * torch.randn(sample.shape, generator=noise_gen, device=x.device, dtype=x.dtype)
        out.append(sample if cfg.clip is None else sample.clamp(*cfg.clip))
    return torch.cat(out)


def make_view(x: torch.Tensor, cfg: PerturbConfig, seed: int) -> View:
    """A random view of ``x`` ``(B, C, *spatial)``: the affine first, then the intensity changes."""
    gen = torch.Generator().manual_seed(int(seed))
    noise_gen = torch.Generator(device=x.device).manual_seed(int(seed) + 0x5EED)
    theta, identity = random_theta(x.shape[0], tuple(x.shape[2:]), cfg, gen)
    theta = theta.to(x.device)
    image = x if identity else warp(x, theta)
    return View(perturb_intensity(image, cfg, gen, noise_gen), theta, identity)


__all__ = ["PerturbConfig", "View", "make_view", "warp", "compose", "invert", "gaussian_blur",
           "perturb_intensity", "random_theta"]
