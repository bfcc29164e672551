"""Per-case, per-class segmentation metrics in millimetres, and their summary.

Dice, Jaccard, HD95 and average symmetric surface distance (MONAI's implementations, with
the voxel spacing of the reference), volume difference in ml.

Empty masks, by rule:
- class absent from both prediction and reference: Dice = Jaccard = 1, HD95 = ASD = 0;
- absent from exactly one: Dice = Jaccard = 0, HD95 = ASD = NaN (undefined; left out of
  means and medians, and counted in the summary's ``n_undefined``).

nnU-Net's label modes (:mod:`medvol.labels`): a region (a list of label values) is scored as
the mask of any of its values in both maps; voxels of the reference's ignore label are left
out of every class's masks, so they count as neither hit nor miss.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from medvol.errors import InputError
from medvol.io import read_volume
from medvol.io.dataset_json import dataset_labels
from medvol.io.discovery import find_scans, scan_stem
from medvol.labels import IGNORE
from medvol.manifest import claim_files
from medvol.utils import atomic_path, write_json


def dice(pred, ref) -> float:
    """Dice of two boolean masks of one grid (numpy arrays or torch tensors); 1 when both are
    empty, 0 when only one is (the empty-mask rule above). The one Dice of the project:
    training validation, DoDNet's per-task validation and ``evaluate`` all use it."""
    return float(dice_from_counts(int((pred & ref).sum()), int(pred.sum()), int(ref.sum())))


METRICS = ("dice", "jaccard", "hd95", "asd", "volume_pred_ml", "volume_ref_ml", "volume_diff_ml")


def dice_from_counts(inter, n_pred, n_ref):
    """Dice 2·|P∩R|/(|P|+|R|) from counts (scalars or arrays), with this module's rule for
    masks empty on both sides: 1."""
    inter, denom = np.asarray(inter, float), np.asarray(n_pred, float) + np.asarray(n_ref, float)
    return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1e-300))


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing, classes: list, ignore: int | None = None) -> dict:
    """Metrics of each class in ``classes`` for label maps ``pred`` and ``ref`` (same grid);
    a class may be a region, a tuple of label values (nnU-Net's regions); ``ignore``: the
    reference's ignore label, whose voxels count for no class (see :func:`region_masks`)."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for c in classes:
        p, r = region_masks(pred, ref, c, ignore)
        np_, nr = int(p.sum()), int(r.sum())
        inter = int(np.logical_and(p, r).sum())
        m = {"volume_pred_ml": np_ * voxel_ml, "volume_ref_ml": nr * voxel_ml, "volume_diff_ml": (np_ - nr) * voxel_ml}
        if np_ == 0 and nr == 0:
            m.update(dice=1.0, jaccard=1.0, hd95=0.0, asd=0.0)
        elif np_ == 0 or nr == 0:
            m.update(dice=0.0, jaccard=0.0, hd95=math.nan, asd=math.nan)
        else:
            m["dice"] = dice(p, r)
            m["jaccard"] = inter / (np_ + nr - inter)
            pt = torch.from_numpy(p)[None, None]
            rt = torch.from_numpy(r)[None, None]
            sp = [float(s) for s in spacing]
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            m["hd95"] = float(compute_hausdorff_distance(pt, rt, include_background=True, percentile=95,
                                                         spacing=sp)[0, 0])
            m["asd"] = float(compute_average_surface_distance(pt, rt, include_background=True, symmetric=True,
                                                              spacing=sp)[0, 0])
        out[c] = m
    return out


def summarize(per_case: dict[str, dict], names: dict) -> dict:
    """Per class ``names[c]``: each metric's mean, std, median and n over the cases (undefined
    values left out and counted); ``c`` keys ``per_case[case]`` (a class value or name)."""
    summary = {}
    for c, name in names.items():
        s = {}
        for k in METRICS:
            vals = np.array([per_case[case][c][k] for case in per_case], float)
            ok = vals[np.isfinite(vals)]
            s[k] = {"mean": float(ok.mean()) if ok.size else math.nan, "std": float(ok.std()) if ok.size else math.nan,
                    "median": float(np.median(ok)) if ok.size else math.nan, "n": int(ok.size),
                    "n_undefined": int(vals.size - ok.size)}
        summary[name] = s
    return summary


def _label_files(folder: Path) -> dict[str, Path]:
    """{case: label map file} of the scan files in ``folder``."""
    if not folder.is_dir():
        raise InputError(folder, "folder not found" if not folder.exists() else "expected a folder of label maps")
    return {scan_stem(p.name): p for p in find_scans(folder) if p.is_file()}


def _affine_text(affine: np.ndarray) -> str:
    return str(np.round(np.asarray(affine)[:3], 4).tolist())


def _load_pair(pred: Path, ref: Path) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(prediction, reference, spacing) of one case, refused when not on one grid."""
    pv, rv = read_volume(pred), read_volume(ref)
    if pv.spatial_shape != rv.spatial_shape:
        raise InputError(pred, f"not on the reference's grid ({ref.name}): shape "
                               f"{pv.spatial_shape} vs {rv.spatial_shape}")
    if not np.allclose(pv.affine, rv.affine, atol=1e-3, rtol=1e-4):
        raise InputError(pred, f"not on the reference's grid ({ref.name}): affine "
                               f"{_affine_text(pv.affine)} vs {_affine_text(rv.affine)}")
    return np.asarray(pv.array).astype(np.int64), np.asarray(rv.array).astype(np.int64), rv.spacing


def evaluate_folders(pred_dir: str | Path, ref_dir: str | Path, out: str | Path | None = None,
                     labels: dict | None = None) -> dict:
    """Compare every prediction with the reference of the same name; write
    ``<out>.json`` (per case + summary) and ``<out>.csv`` (one row per case and class)."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, refs = _label_files(pred_dir), _label_files(ref_dir)
    cases = sorted(set(preds) & set(refs))
    if not cases:
        raters = refs and all(re.search(r"_r\d+$", c) for c in refs)  # <case>_r<k>: several raters per case
        raise InputError(pred_dir, f"no prediction has a reference of the same name in {ref_dir}" +
                         (" (its files are several raters' labels, <case>_r<k>: score them with --kind soft)"
                          if raters else ""))
    missing = sorted(set(refs) - set(preds))
    if missing:  # as nnU-Net's compute_metrics_on_folder: a mean over the cases present would flatter
        raise InputError(pred_dir, f"no prediction for {len(missing)} of the {len(refs)} reference case(s) in "
                                   f"{ref_dir}: {', '.join(missing[:10])}{'...' if len(missing) > 10 else ''}")
    if labels is None:  # nnU-Net layout: the reference folder's dataset.json names the classes
        labels = dataset_labels(ref_dir.parent)
    return evaluate_pairs({case: (preds[case], refs[case]) for case in cases}, labels, out)


def _class_names(labels: dict | None, pairs: dict[str, tuple[Path, Path]]) -> dict:
    """{value (or region: a tuple of values): name} of what is scored: the dataset's labels
    (regions as nnU-Net evaluates them, never the ignore label), else ``class_<v>`` for every
    value found in the files (read once more: the metrics pass loads one case at a time)."""
    if labels:
        return {_scored(v): k for k, v in labels.items() if k != IGNORE and set(np.atleast_1d(v)) != {0}}
    found: set[int] = set()
    for pred, ref in pairs.values():
        p, r, _ = _load_pair(pred, ref)
        found |= set(np.unique(r).tolist()) | set(np.unique(p).tolist())
    return {c: f"class_{c}" for c in sorted(found) if c > 0}


def evaluate_pairs(pairs: dict[str, tuple[Path, Path]], labels: dict | None = None,
                   out: str | Path | None = None) -> dict:
    """Metrics of each case's (prediction, reference) files, one case in memory at a time,
    as :func:`evaluate_folders` computes and writes them (``labels``: name -> value, region
    or ignore label, as dataset.json declares them; None names the values found)."""
    cases = sorted(pairs)
    names = _class_names(labels, pairs)
    ignore = (labels or {}).get(IGNORE)
    per_case = {}
    for case in cases:
        p, r, sp = _load_pair(*pairs[case])
        per_case[case] = case_metrics(p, r, sp, list(names), ignore)
    rule = (__doc__ or "").split("Empty masks, by rule:")[1].strip()
    result = {"cases": {case: {names[c]: m for c, m in per_case[case].items()} for case in cases},
              "summary": summarize(per_case, names), "empty_mask_rule": rule,
              "missing_predictions": []}
    if out is not None:
        write_metrics(Path(out), result)
    return result


def write_metrics(out: Path, result: dict) -> None:
    """``<out>.json`` (the result) and ``<out>.csv`` (one row per case and class)."""
    write_result_table(out, result, ["case", "class", *METRICS],
                       ([case, name, *[f"{m[k]:.6g}" for k in METRICS]]
                        for case, classes in result["cases"].items() for name, m in classes.items()))


def write_result_table(out: Path, result: dict, header: list[str], rows: Iterable[list]) -> None:
    """Every evaluation's files: ``<out>.json`` (the result) and ``<out>.csv`` (``header``, then
    ``rows``), claimed as medvol's first (a file medvol did not write is never replaced)."""
    claim_files(out.parent, [out.with_suffix(".json").name, out.with_suffix(".csv").name])
    write_json(out.with_suffix(".json"), result)
    with atomic_path(out.with_suffix(".csv")) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)


def _scored(value) -> int | tuple[int, ...]:
    """A class's key: its value, or a region's values as a tuple (a one-value list is a class)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if len(value) == 1 else tuple(sorted(int(v) for v in value))
    return int(value)


def region_masks(pred: np.ndarray, ref: np.ndarray, c, ignore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The masks of class (or region) ``c`` in ``pred`` and ``ref``, without the voxels of the
    reference's ``ignore`` label."""
    p, r = (np.isin(pred, c), np.isin(ref, c)) if isinstance(c, tuple) else (pred == c, ref == c)
    if ignore is not None:
        keep = ref != ignore
        p, r = p & keep, r & keep
    return p, r


# ---------------------------------------------------------------- vessel metrics (inside a FOV)

VESSEL_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")


def roc_auc(score: np.ndarray, ref: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` against the boolean ``ref``: the Mann-Whitney
    statistic, ties counted one half (what trapezoidal integration of the ROC gives); NaN when
    ``ref`` holds one class only."""
    from scipy.stats import rankdata

    score, ref = np.asarray(score, np.float64).ravel(), np.asarray(ref, bool).ravel()
    n_pos, n_neg = int(ref.sum()), int((~ref).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[ref].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def vessel_metrics(prob: np.ndarray, ref: np.ndarray, fov: np.ndarray | None = None,
                   threshold: float = 0.5) -> dict[str, float]:
    """Retinal-vessel metrics of one image, counted over the pixels inside ``fov`` (all pixels
    when None): AUC of the probability map, and of the map thresholded at ``threshold``
    (``prob >= threshold``) accuracy, sensitivity TP/(TP+FN), specificity TN/(TN+FP) and F1
    (= the Dice of this module, :func:`dice_from_counts`). A ratio with nothing to count
    (e.g. sensitivity with no vessel inside the FOV) is NaN."""
    prob, ref = np.asarray(prob, np.float64), np.asarray(ref) > 0
    inside = np.ones(ref.shape, bool) if fov is None else np.asarray(fov) > 0
    if prob.shape != ref.shape or inside.shape != ref.shape:
        raise ValueError(f"vessel_metrics: shapes differ: probabilities {prob.shape}, reference {ref.shape}, "
                         f"FOV {inside.shape}")
    p, r = prob[inside], ref[inside]
    pred = p >= threshold
    tp, fp = int((pred & r).sum()), int((pred & ~r).sum())
    fn, tn = int((~pred & r).sum()), int((~pred & ~r).sum())
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"auc": roc_auc(p, r), "accuracy": ratio(tp + tn, tp + tn + fp + fn), "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "f1": float(dice_from_counts(tp, tp + fp, tp + fn))}


def _vessel_probabilities(pred_dir: Path, case: str, label: Path) -> tuple[np.ndarray, bool]:
    """A case's vessel probability (``<case>.npz`` of ``medvol predict --save-probabilities``:
    its last class), else its label map as 0/1 (then AUC is not computed: False)."""
    npz = pred_dir / f"{case}.npz"
    if npz.is_file():
        with np.load(npz) as f:
            if "probabilities" not in f:
                raise InputError(npz, "holds no 'probabilities' array (write it with medvol predict "
                                      "--save-probabilities)")
            return np.asarray(f["probabilities"][-1], np.float64), True
    return (np.asarray(read_volume(label).array) > 0).astype(np.float64), False


def evaluate_vessel_folders(pred_dir: str | Path, ref_dir: str | Path, fov_dir: str | Path | None = None,
                            out: str | Path | None = None, threshold: float = 0.5) -> dict:
    """:func:`vessel_metrics` of every prediction with the reference (and FOV mask, from
    ``fov_dir``, same file names) of the same name; probabilities from ``<case>.npz`` beside
    the label map when there (AUC needs them; without: NaN). Writes ``<out>.json`` (per case
    and the mean over cases) and ``<out>.csv``."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, refs = _label_files(pred_dir), _label_files(ref_dir)
    fovs = _label_files(Path(fov_dir)) if fov_dir is not None else {}
    cases = sorted(set(preds) & set(refs))
    if not cases:
        raise InputError(pred_dir, f"no prediction has a reference of the same name in {ref_dir}")
    per_case = {}
    for case in cases:
        if fov_dir is not None and case not in fovs:
            raise InputError(Path(fov_dir), f"no FOV mask for case '{case}'")
        _load_pair(preds[case], refs[case])  # one grid, or a clear error
        prob, has_prob = _vessel_probabilities(pred_dir, case, preds[case])
        fov = np.asarray(read_volume(fovs[case]).array) if case in fovs else None
        m = vessel_metrics(prob, np.asarray(read_volume(refs[case]).array), fov, threshold)
        per_case[case] = m if has_prob else {**m, "auc": float("nan")}
    summary = {k: float(np.nanmean([m[k] for m in per_case.values()])) if any(
        not math.isnan(m[k]) for m in per_case.values()) else float("nan") for k in VESSEL_METRICS}
    result = {"cases": per_case, "summary": summary, "threshold": threshold,
              "fov": str(fov_dir) if fov_dir is not None else None}
    if out is not None:
        write_result_table(Path(out), result, ["case", *VESSEL_METRICS],
                           ([case, *[f"{m[k]:.6g}" for k in VESSEL_METRICS]] for case, m in per_case.items()))
    return result



# ------------------------------------------------------------------ calibration (multi-rater references)
SOFT_DICE_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)  # MRNet's soft Dice (Ji et al. 2021)


def soft_dice(prob, soft_ref, thresholds=SOFT_DICE_THRESHOLDS) -> float:
    """MRNet's soft Dice: the mean over ``thresholds`` of the :func:`dice` of the prediction's
    probability and the soft reference (e.g. the fraction of raters who drew the class), both
    binarised at the same threshold (``> t``)."""
    p, r = np.asarray(prob, np.float32), np.asarray(soft_ref, np.float32)
    return float(np.mean([dice(p > t, r > t) for t in thresholds]))


def reliability_bins(prob, target, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Per equal-width bin of the predicted probability ``prob`` (``[0, 1]``, last bin closed):
    ``count``, ``confidence`` (mean probability) and ``frequency`` (mean of ``target``: a 0/1
    label or a soft reference), NaN in empty bins."""
    p = np.asarray(prob, np.float64).ravel()
    t = np.asarray(target, np.float64).ravel()
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, p, minlength=n_bins) / count
        freq = np.bincount(idx, t, minlength=n_bins) / count
    return {"count": count, "confidence": conf, "frequency": freq}


def expected_calibration_error(prob, target, n_bins: int = 10) -> float:
    """ECE (Guo et al. 2017) of one class's probabilities against ``target``: the mean over
    voxels of |confidence - frequency| of their bin (:func:`reliability_bins`)."""
    b = reliability_bins(prob, target, n_bins)
    ok = b["count"] > 0
    return float(np.sum(b["count"][ok] * np.abs(b["confidence"][ok] - b["frequency"][ok])) / b["count"].sum())
