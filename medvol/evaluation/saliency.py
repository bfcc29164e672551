"""Metrics of a continuous 2D foreground map against a binary reference, as the Inf-Net /
COVID-SemiSeg evaluation toolbox (MATLAB, ``EvaluationTool/main.m``) computes them.

Per image, as the toolbox does:
- the map is min-max normalised to [0, 1] (a constant map becomes all zeros: our rule);
- 256 thresholds ``np.linspace(1, 0, 256)`` (the toolbox's ``1:-1/255:0``); Dice, sensitivity
  and specificity binarise with ``map >= t``, the E-measure with ``map > t`` (as the toolbox);
- Dice, sensitivity, specificity and E-measure are **means over the 256 thresholds** (the
  toolbox's ``meanDic``, ``meanSen``, ``meanSpe``, ``meanEm``; ``sensitivity``/``specificity``
  also take one ``threshold``); S-measure (α = 0.5) and MAE on the normalised map.
A dataset's score is the mean of the per-image scores (the toolbox averages per threshold over
images, then over thresholds: the same number).

Counts at every threshold come from sorted values, so a 352² map costs a few milliseconds.

Fixed here (``official_compat=True`` restores the toolbox): its ``Fmeasure_calu`` returns 0 for
Dice, sensitivity *and specificity* whenever a threshold leaves no true positive, so an image's
specificity drops to 0 exactly where the prediction is most conservative. Here specificity is
TN/(TN+FP) at every threshold, and Dice follows :func:`medvol.evaluation.metrics.dice_from_counts`
(both masks empty: 1). With a non-empty reference, Dice and sensitivity are the same either way.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from medvol.evaluation.metrics import dice_from_counts

THRESHOLDS = np.linspace(1.0, 0.0, 256)
_EPS = np.finfo(np.float64).eps  # MATLAB's eps, used where the toolbox adds it


def normalize_map(pred) -> np.ndarray:
    """Min-max normalise to [0, 1] (float64); a constant map becomes all zeros."""
    p = np.asarray(pred, dtype=np.float64)
    lo, hi = float(p.min()), float(p.max())
    return np.zeros_like(p) if hi - lo <= 0 else (p - lo) / (hi - lo)


def _prepare(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = normalize_map(pred), np.asarray(gt)
    g = g if g.dtype == bool else g > 0.5
    if p.shape != g.shape:
        raise ValueError(f"map {p.shape} and reference {g.shape} differ in shape")
    return p, g


def _counts(p: np.ndarray, g: np.ndarray, thresholds, strict: bool):
    """(predicted positives, true positives) at each threshold, binarising p >= t (p > t if strict)."""
    side: Literal["left", "right"] = "right" if strict else "left"
    t = np.asarray(thresholds, float)
    n_pred = p.size - np.searchsorted(np.sort(p.ravel()), t, side=side)
    fg = np.sort(p[g])
    tp = fg.size - np.searchsorted(fg, t, side=side)
    return n_pred.astype(float), tp.astype(float)


def threshold_curves(pred, gt, thresholds=THRESHOLDS, official_compat: bool = False) -> dict[str, np.ndarray]:
    """Dice, sensitivity, specificity (``>= t``) and E-measure (``> t``) at each threshold of the
    normalised map. Sensitivity (specificity) is NaN when the reference has no foreground
    (background); with ``official_compat`` all three are 0 wherever TP = 0, as the toolbox."""
    p, g = _prepare(pred, gt)
    n, n_gt = float(p.size), float(g.sum())
    n_pred, tp = _counts(p, g, thresholds, strict=False)
    fp = n_pred - tp
    tn = (n - n_gt) - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = dice_from_counts(tp, n_pred, n_gt)
        sen = tp / n_gt if n_gt > 0 else np.full_like(tp, np.nan)
        spe = tn / (n - n_gt) if n > n_gt else np.full_like(tp, np.nan)
    if official_compat:
        none = tp == 0
        dice, sen, spe = (np.where(none, 0.0, v) for v in (dice, sen, spe))
    n_pred_s, tp_s = _counts(p, g, thresholds, strict=True)
    em = _e_measure_from_counts(n, n_gt, n_pred_s, tp_s)
    return {"dice": dice, "sensitivity": sen, "specificity": spe, "e_measure": em}


def mean_dice_256(pred, gt, official_compat: bool = False) -> float:
    """Dice averaged over the 256 thresholds of the min-max normalised map (Inf-Net's "Dice")."""
    return float(np.mean(threshold_curves(pred, gt, official_compat=official_compat)["dice"]))


def sensitivity(pred, gt, threshold: float | None = None, official_compat: bool = False) -> float:
    """TP/(TP+FN): mean over the 256 thresholds (toolbox ``meanSen``), or at ``threshold`` of the
    normalised map (``>= threshold``)."""
    t = THRESHOLDS if threshold is None else [threshold]
    return float(np.mean(threshold_curves(pred, gt, t, official_compat)["sensitivity"]))


def specificity(pred, gt, threshold: float | None = None, official_compat: bool = False) -> float:
    """TN/(TN+FP): mean over the 256 thresholds (toolbox ``meanSpe``), or at ``threshold``."""
    t = THRESHOLDS if threshold is None else [threshold]
    return float(np.mean(threshold_curves(pred, gt, t, official_compat)["specificity"]))


# ---------------------------------------------------------------- E-measure (Fan et al., IJCAI 2018)

def _e_measure_from_counts(n: float, n_gt: float, n_pred, tp) -> np.ndarray:
    """Enhanced alignment of binary maps from their counts: the per-pixel term depends only on
    the pixel's (prediction, reference) pair, so four pair counts give the exact sum."""
    n_pred, tp = np.asarray(n_pred, float), np.asarray(tp, float)
    if n_gt == 0:  # reference all background: score the predicted background
        return (n - n_pred) / (n - 1 + _EPS)
    if n_gt == n:  # reference all foreground
        return n_pred / (n - 1 + _EPS)
    mu_f, mu_g = n_pred / n, n_gt / n
    pairs = {(1, 1): tp, (1, 0): n_pred - tp, (0, 1): n_gt - tp, (0, 0): n - n_gt - n_pred + tp}
    total = np.zeros_like(n_pred)
    for (f, gg), count in pairs.items():
        af, ag = f - mu_f, gg - mu_g
        align = 2.0 * af * ag / (af * af + ag * ag + _EPS)
        total = total + count * (align + 1.0) ** 2 / 4.0
    return total / (n - 1 + _EPS)


def e_measure_binary(fm, gt) -> float:
    """E-measure of a binary map ``fm`` against ``gt``."""
    f, g = np.asarray(fm).astype(bool), np.asarray(gt).astype(bool)
    n = float(g.size)
    return float(_e_measure_from_counts(n, float(g.sum()), float(f.sum()), float((f & g).sum())))


def e_measure(pred, gt) -> float:
    """Mean E-measure over the 256 thresholds (``map > t``) of the normalised map (``meanEm``)."""
    return float(np.mean(threshold_curves(pred, gt)["e_measure"]))


# ---------------------------------------------------------------- S-measure (Fan et al., ICCV 2017)

def _round(x: float) -> int:  # MATLAB rounds halves away from zero
    return int(math.floor(x + 0.5))


def _object_score(x: np.ndarray) -> float:
    if x.size == 0:
        return 0.0
    mu = float(x.mean())
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return 2.0 * mu / (mu * mu + 1.0 + sd + _EPS)


def _region_ssim(p: np.ndarray, g: np.ndarray) -> float:
    n = p.size
    if n == 0:  # an empty quadrant has weight 0 (the toolbox would give NaN)
        return 0.0
    gd = g.astype(float)
    x, y = float(p.mean()), float(gd.mean())
    sx2 = float(((p - x) ** 2).sum()) / (n - 1 + _EPS)
    sy2 = float(((gd - y) ** 2).sum()) / (n - 1 + _EPS)
    sxy = float(((p - x) * (gd - y)).sum()) / (n - 1 + _EPS)
    a, b = 4.0 * x * y * sxy, (x * x + y * y) * (sx2 + sy2)
    if a != 0:
        return a / (b + _EPS)
    return 1.0 if b == 0 else 0.0


def s_measure(pred, gt, alpha: float = 0.5) -> float:
    """Structure measure: α·S_object + (1 − α)·S_region on the normalised map, clipped at 0;
    1 − mean(map) when the reference is empty, mean(map) when it is full."""
    p, g = _prepare(pred, gt)
    y = float(g.mean())
    if y == 0:
        return 1.0 - float(p.mean())
    if y == 1:
        return float(p.mean())
    s_obj = y * _object_score(p[g]) + (1 - y) * _object_score(1.0 - p[~g])
    h, w = g.shape
    total = float(g.sum())
    cx = _round(float((g.sum(0) * np.arange(1, w + 1)).sum()) / total)  # 1-based centroid, as MATLAB
    cy = _round(float((g.sum(1) * np.arange(1, h + 1)).sum()) / total)
    area = float(h * w)
    w1, w2, w3 = cx * cy / area, (w - cx) * cy / area, cx * (h - cy) / area
    quads = [(slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)),
             (slice(cy, h), slice(0, cx)), (slice(cy, h), slice(cx, w))]
    s_reg = sum(wt * _region_ssim(p[q], g[q]) for wt, q in zip((w1, w2, w3, 1.0 - w1 - w2 - w3), quads))
    return max(0.0, alpha * s_obj + (1 - alpha) * s_reg)


def mae(pred, gt) -> float:
    """Mean absolute error between the normalised map and the binary reference."""
    p, g = _prepare(pred, gt)
    return float(np.abs(p - g).mean())


def saliency_metrics(pred, gt, official_compat: bool = False) -> dict[str, float]:
    """The toolbox's six numbers for one image: ``dice`` (= :func:`mean_dice_256`),
    ``sensitivity``, ``specificity``, ``e_measure`` (means over the 256 thresholds),
    ``s_measure``, ``mae``."""
    curves = threshold_curves(pred, gt, official_compat=official_compat)
    out = {k: float(np.mean(v)) for k, v in curves.items()}
    out["s_measure"] = s_measure(pred, gt)
    out["mae"] = mae(pred, gt)
    return out
