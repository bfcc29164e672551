"""nnU-Net's default augmentation, expressed with MONAI dictionary transforms.

Spatial transforms (rotation, scaling, optional elastic deformation, flips) act on image and
label together (label with nearest neighbour), so they stay aligned; intensity transforms
(noise, blur, brightness, contrast, low-resolution simulation, gamma) act on the image only.
Every random transform draws from the state set by :func:`seed_transforms`, so a sample is a
pure function of its seed (exact resume, identical data under any number of processes).

``ndim=2`` builds the same pipeline for ``(C, H, W)`` slices: flips only over the axes a slice
has (nnU-Net's 2d configuration mirrors the two in-plane axes), bilinear upsampling in the
low-resolution simulation; elastic deformation is 3D only here and refused for slices.
"""

from __future__ import annotations

import numpy as np

from medvol.config import AugmentConfig


def build_augmentation(cfg: AugmentConfig, ndim: int = 3):
    """nnU-Net's augmentation pipeline as MONAI dict transforms (None when it is empty):
    spatial (affine, elastic), intensity (noise, blur, brightness, contrast, low resolution,
    gamma), then orientation (rot90, flips), each with its own probability."""
    import monai.transforms as T

    if not cfg.enabled:
        return None
    t = _spatial(T, cfg, ndim) + _intensity(T, cfg, ndim) + _orientation(T, cfg, ndim)
    return T.Compose(t) if t else None


def _spatial(T, cfg: AugmentConfig, ndim: int) -> list:
    keys, t = ["image", "label"], []
    if cfg.rotate_prob > 0 or cfg.scale_prob > 0:
        # One affine draw per sample; rotation and scaling each applied with its own probability
        # would need two resamplings, so they share one (probability = the larger of the two).
        rot = np.deg2rad(cfg.rotate_deg)
        t.append(T.RandAffined(keys, prob=max(cfg.rotate_prob, cfg.scale_prob),
                               rotate_range=[rot] * ndim if cfg.rotate_prob > 0 else None,
                               scale_range=[(cfg.scale_range[0] - 1, cfg.scale_range[1] - 1)] * ndim
                               if cfg.scale_prob > 0 else None,
                               mode=("bilinear", "nearest"), padding_mode="zeros"))
    if cfg.elastic_prob > 0 and ndim == 2:
        from medvol.errors import ConfigError

        raise ConfigError("data.augment.elastic_prob: elastic deformation is 3D only; set it to 0 for 2D data")
    if cfg.elastic_prob > 0:
        t.append(T.Rand3DElasticd(keys, sigma_range=(9, 13), magnitude_range=(0, 900), prob=cfg.elastic_prob,
                                  mode=("bilinear", "nearest"), padding_mode="zeros"))
    return t


def _intensity(T, cfg: AugmentConfig, ndim: int) -> list:
    img, t = ["image"], []
    if cfg.noise_prob > 0:
        t.append(T.RandGaussianNoised(img, prob=cfg.noise_prob, std=cfg.noise_std))
    if cfg.blur_prob > 0:
        s = cfg.blur_sigma
        t.append(T.RandGaussianSmoothd(img, sigma_x=s, sigma_y=s, sigma_z=s, prob=cfg.blur_prob))
    if cfg.brightness_prob > 0:
        lo, hi = cfg.brightness_range
        t.append(T.RandScaleIntensityd(img, factors=(lo - 1, hi - 1), prob=cfg.brightness_prob))
    if cfg.contrast_prob > 0:
        lo, hi = cfg.contrast_range
        t.append(T.RandScaleIntensityFixedMeand(img, factors=(lo - 1, hi - 1), preserve_range=True,
                                                prob=cfg.contrast_prob))
    if cfg.lowres_prob > 0:
        t.append(T.RandSimulateLowResolutiond(img, prob=cfg.lowres_prob, zoom_range=tuple(cfg.lowres_zoom),
                                               upsample_mode="trilinear" if ndim == 3 else "bilinear"))
    if cfg.gamma_prob > 0:
        t.append(T.RandAdjustContrastd(img, prob=cfg.gamma_prob, gamma=tuple(cfg.gamma_range), retain_stats=True))
    return t


def _orientation(T, cfg: AugmentConfig, ndim: int) -> list:
    keys, t = ["image", "label"], []
    if cfg.rot90_prob > 0:
        t.append(T.RandRotate90d(keys, prob=cfg.rot90_prob, max_k=3, spatial_axes=(0, 1)))
    if cfg.flip_prob > 0:  # only the axes a sample has (2D slices: the two in-plane axes)
        t += [T.RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=int(ax)) for ax in cfg.flip_axes if int(ax) < ndim]
    return t


def seed_transforms(transform, seed: int) -> None:
    if transform is not None:
        transform.set_random_state(seed=int(seed) % (2**32))
