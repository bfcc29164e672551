"""Per-case, per-class segmentation metrics in millimetres, and their summary.

Dice, Jaccard, HD95 and average symmetric surface distance (MONAI's implementations, with
the voxel spacing of the reference), volume difference in ml.

Empty masks, by rule:
- class absent from both prediction and reference: Dice = Jaccard = 1, HD95 = ASD = 0;
- absent from exactly one: Dice = Jaccard = 0, HD95 = ASD = NaN (undefined; left out of
  means and medians, and counted in the summary's ``n_undefined``).
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from medvol.errors import InputError
from medvol.io import read_volume
from medvol.io.discovery import find_scans, scan_stem
from medvol.utils import atomic_path, write_json


def dice(pred, ref) -> float:
    """Dice of two boolean masks of one grid (numpy arrays or torch tensors); 1 when both are
    empty, 0 when only one is (the empty-mask rule above). The one Dice of the project:
    training validation, DoDNet's per-task validation and ``evaluate`` all use it."""
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred + n_ref == 0:
        return 1.0
    return 2.0 * int((pred & ref).sum()) / (n_pred + n_ref)


METRICS = ("dice", "jaccard", "hd95", "asd", "volume_pred_ml", "volume_ref_ml", "volume_diff_ml")


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing, classes: list[int]) -> dict[int, dict[str, float]]:
    """Metrics of each class in ``classes`` for label maps ``pred`` and ``ref`` (same grid)."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for c in classes:
        p, r = pred == c, ref == c
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


def summarize(per_case: dict[str, dict[int, dict]], names: dict[int, str]) -> dict:
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
    return {scan_stem(p.name): p for p in find_scans(folder) if p.is_file()}


def evaluate_folders(pred_dir: str | Path, ref_dir: str | Path, out: str | Path | None = None,
                     labels: dict[str, int] | None = None) -> dict:
    """Compare every prediction with the reference of the same name; write
    ``<out>.json`` (per case + summary) and ``<out>.csv`` (one row per case and class)."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, refs = _label_files(pred_dir), _label_files(ref_dir)
    cases = sorted(set(preds) & set(refs))
    if not cases:
        raise InputError(pred_dir, f"no prediction has a reference of the same name in {ref_dir}")
    per_case, all_classes = {}, set()
    loaded = {}
    for case in cases:
        pv, rv = read_volume(preds[case]), read_volume(refs[case])
        if pv.spatial_shape != rv.spatial_shape or not np.allclose(pv.affine, rv.affine, atol=1e-3, rtol=1e-4):
            raise InputError(preds[case], f"not on the reference's grid ({refs[case].name}): shape "
                                          f"{pv.spatial_shape} vs {rv.spatial_shape}")
        loaded[case] = (np.asarray(pv.array).astype(np.int64), np.asarray(rv.array).astype(np.int64), rv.spacing)
        all_classes |= set(np.unique(loaded[case][1]).tolist()) | set(np.unique(loaded[case][0]).tolist())
    if labels is None:  # nnU-Net layout: the reference folder's dataset.json names the classes
        dj = ref_dir.parent / "dataset.json"
        if dj.exists():
            from medvol.preprocessing.raw import open_raw_dataset

            try:
                labels = open_raw_dataset(ref_dir.parent).labels
            except InputError:
                labels = None
    if labels:
        names = {v: k for k, v in labels.items() if v > 0}
    else:
        names = {c: f"class_{c}" for c in sorted(all_classes) if c > 0}
    for case in cases:
        p, r, sp = loaded[case]
        per_case[case] = case_metrics(p, r, sp, list(names))
    rule = (__doc__ or "").split("Empty masks, by rule:")[1].strip()
    result = {"cases": {case: {names[c]: m for c, m in per_case[case].items()} for case in cases},
              "summary": summarize(per_case, names), "empty_mask_rule": rule,
              "missing_predictions": sorted(set(refs) - set(preds))}
    if out is not None:
        out = Path(out)
        write_json(out.with_suffix(".json"), result)
        with atomic_path(out.with_suffix(".csv")) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["case", "class", *METRICS])
                for case in cases:
                    for c, m in per_case[case].items():
                        w.writerow([case, names[c], *[f"{m[k]:.6g}" for k in METRICS]])
    return result
