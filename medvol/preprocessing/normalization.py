"""Intensity normalisation schemes, chosen per channel from ``channel_names`` as in nnU-Net.

- ``CT``: clip to the dataset's foreground 0.5/99.5 percentiles, subtract the dataset
  foreground mean, divide by its std; or, with a fixed window (``--ct-window LO HI``), clip
  to it and divide by max(|LO|, |HI|).
- ``noNorm``: unchanged. ``rescale_to_0_1``: per image min-max. ``rgb_to_0_1``: /255.
- anything else (MRI, T1, ...): z-score per image, inside the nonzero mask when the plan
  says so (``use_mask_for_norm``, when cropping removed a lot of the image).
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("CTNormalization", "CTWindowNormalization", "ZScoreNormalization", "NoNormalization",
           "RescaleTo01Normalization", "RGBTo01Normalization")
# Only z-score leaves the outside of the mask at zero, so only it may normalise inside the mask.
MASKABLE = {"ZScoreNormalization"}


def scheme_for_channel(name: str) -> str:
    key = name.casefold()
    return {"ct": "CTNormalization", "nonorm": "NoNormalization", "zscore": "ZScoreNormalization",
            "rescale_to_0_1": "RescaleTo01Normalization", "rgb_to_0_1": "RGBTo01Normalization"}.get(
        key, "ZScoreNormalization")


def normalize_channel(image: np.ndarray, scheme: str, seg: np.ndarray | None = None,
                      use_mask: bool = False, stats: dict | None = None) -> np.ndarray:
    """Normalise one channel (X, Y, Z); ``seg`` >= 0 marks the inside of the nonzero mask."""
    image = image.astype(np.float32, copy=False)
    if scheme == "CTNormalization":
        if stats is None:
            raise ValueError("CT normalisation needs the dataset's foreground intensity statistics")
        np.clip(image, stats["percentile_00_5"], stats["percentile_99_5"], out=image)
        image -= np.float32(stats["mean"])
        image /= np.float32(max(stats["std"], 1e-8))
        return image
    if scheme == "CTWindowNormalization":  # a fixed HU window (e.g. DoDNet's [-325, 325] / 325)
        if stats is None:
            raise ValueError("CT window normalisation needs the window's lower and upper bounds")
        lo, hi = stats["lower"], stats["upper"]
        np.clip(image, lo, hi, out=image)
        image /= np.float32(max(abs(lo), abs(hi)))
        return image
    if scheme == "ZScoreNormalization":
        if use_mask and seg is not None:
            mask = seg >= 0
            vals = image[mask]
            mean, std = vals.mean(dtype=np.float64), vals.std(dtype=np.float64)
            image[mask] = (vals - mean) / max(std, 1e-8)
        else:
            mean, std = image.mean(dtype=np.float64), image.std(dtype=np.float64)
            image -= np.float32(mean)
            image /= np.float32(max(std, 1e-8))
        return image
    if scheme == "NoNormalization":
        return image
    if scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= max(float(image.max()), 1e-8)
        return image
    if scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            raise ValueError("rgb_to_0_1 expects values in [0, 255]")
        image /= 255.0
        return image
    raise ValueError(f"unknown normalisation scheme {scheme!r}; known: {SCHEMES}")


def normalize(image: np.ndarray, seg: np.ndarray | None, schemes: list[str], use_mask: list[bool],
              stats: dict[str, dict]) -> np.ndarray:
    """Normalise every channel of ``image`` (C, X, Y, Z) in place; returns it."""
    for c in range(image.shape[0]):
        image[c] = normalize_channel(image[c], schemes[c], None if seg is None else seg[0], use_mask[c],
                                     stats.get(str(c)))
    return image
