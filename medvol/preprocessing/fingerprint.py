"""Dataset fingerprint: per-case geometry and foreground intensity samples, merged.

Per case (computed after cropping to the nonzero region): spacing, shape before and after
the crop, relative size after cropping, and per channel the intensities of labelled voxels
(label > 0). nnU-Net draws 1e8 samples split evenly over the cases, *with replacement*, so
each case weighs the same however many foreground voxels it has. We keep that weighting
without the duplicates: a case with fewer foreground voxels than its share stores all of
them, each weighted share/count; a larger case stores a fixed-seed sample of its share
(weight 1). Dataset statistics are the weighted mean/std/percentiles of the pooled values,
i.e. the quantity nnU-Net's sampling estimates, on a fraction of the disk and memory.
Datasets without labels use the voxels inside the nonzero mask instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvol.utils import read_json, save_npy, write_json

TOTAL_INTENSITY_SAMPLES = int(1e8)
SAMPLING_SEED = 1234


def samples_per_case(num_cases: int, total: int = TOTAL_INTENSITY_SAMPLES) -> int:
    return int(total // max(num_cases, 1))


def case_fingerprint(image_cropped: np.ndarray, seg_cropped: np.ndarray, spacing, shape_before,
                     num_samples: int, has_label: bool, seed: int = SAMPLING_SEED) -> tuple[dict, np.ndarray]:
    """Fingerprint of one cropped case. Returns (JSON-able dict, samples (C, num_samples))."""
    fg = seg_cropped[0] > 0 if has_label else seg_cropped[0] >= 0
    rs = np.random.RandomState(seed)
    n_fg = int(fg.sum())
    keep = min(n_fg, num_samples)
    chosen = rs.choice(n_fg, keep, replace=False) if keep < n_fg else None
    samples = np.empty((image_cropped.shape[0], keep), np.float32)
    stats: list[dict[str, float | None]] = []
    for c in range(image_cropped.shape[0]):
        vals = image_cropped[c][fg]
        if vals.size:
            samples[c] = vals if chosen is None else vals[chosen]
            stats.append({"mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max()),
                          "num_voxels": int(vals.size)})
        else:
            stats.append({"mean": None, "min": None, "max": None, "num_voxels": 0})
    shape_after = [int(s) for s in image_cropped.shape[1:]]
    fp = {
        "spacing": [float(s) for s in spacing],
        "shape_before_crop": [int(s) for s in shape_before],
        "shape_after_crop": shape_after,
        "relative_size_after_cropping": float(np.prod(shape_after) / np.prod(shape_before)),
        "intensity_statistics_per_channel": stats,
        "num_intensity_samples": int(samples.shape[1]),
        "sample_weight": float(num_samples / keep) if keep else 0.0,
    }
    return fp, samples


def write_case_fingerprint(folder: Path, case_id: str, fp: dict, samples: np.ndarray) -> None:
    """Samples first, JSON last: the JSON's presence marks a finished case fingerprint."""
    save_npy(folder / f"{case_id}_intensities.npy", samples)
    write_json(folder / f"{case_id}.json", fp)


def case_fingerprint_done(folder: Path, case_id: str) -> bool:
    return (folder / f"{case_id}.json").exists() and (folder / f"{case_id}_intensities.npy").exists()


def merge_fingerprints(folder: Path, case_ids: list[str], num_channels: int) -> dict:
    """Merge per-case fingerprints (written by any number of shards) into the dataset's."""
    missing = [c for c in case_ids if not case_fingerprint_done(folder, c)]
    if missing:
        from medvol.errors import CacheError

        raise CacheError(f"{folder}: no fingerprint yet for {len(missing)} case(s) "
                         f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); "
                         "run `medvol fingerprint` (every shard) first")
    per_case = {c: read_json(folder / f"{c}.json") for c in case_ids}
    # foreground intensities come from labelled cases; unlabelled ones (a semi-supervised
    # dataset's) only count when no case has a label
    sampled = [c for c in case_ids if per_case[c].get("has_label", True)] or list(case_ids)
    samples = [np.load(folder / f"{c}_intensities.npy", mmap_mode="r") for c in sampled]
    weights = [np.full(s.shape[1], per_case[c]["sample_weight"]) for c, s in zip(sampled, samples)]
    channel_stats = {}
    for ch in range(num_channels):
        if not any(s.shape[1] for s in samples):
            channel_stats[str(ch)] = {k: None for k in ("mean", "median", "std", "min", "max",
                                                         "percentile_99_5", "percentile_00_5")}
            continue
        vals = np.concatenate([s[ch] for s in samples]).astype(np.float64)
        channel_stats[str(ch)] = weighted_statistics(vals, np.concatenate(weights))
    return {
        "case_ids": list(case_ids),
        "spacings": [per_case[c]["spacing"] for c in case_ids],
        "shapes_before_crop": [per_case[c]["shape_before_crop"] for c in case_ids],
        "shapes_after_crop": [per_case[c]["shape_after_crop"] for c in case_ids],
        "median_relative_size_after_cropping": float(np.median(
            [per_case[c]["relative_size_after_cropping"] for c in case_ids])),
        "foreground_intensity_properties_per_channel": channel_stats,
        "axis_order": "XYZ (voxel axes as stored in the source files)",
    }


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs) -> np.ndarray:
    """Quantiles (0..1) of a weighted sample; with equal weights this is np.percentile's
    default (linear) rule."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cw = np.cumsum(w)
    # Position of each sample on the [0, 1] scale, centred in its weight (Hazen-like),
    # rescaled so the first and last samples sit at 0 and 1 as in np.percentile.
    pos = (cw - w / 2 - w[0] / 2) / max(cw[-1] - w[0] / 2 - w[-1] / 2, 1e-12)
    return np.interp(np.asarray(qs, float), pos, v)


def weighted_statistics(values: np.ndarray, weights: np.ndarray) -> dict:
    mean = float(np.average(values, weights=weights))
    std = float(np.sqrt(np.average((values - mean) ** 2, weights=weights)))
    p005, median, p995 = weighted_quantiles(values, weights, [0.005, 0.5, 0.995])
    return {"mean": mean, "median": float(median), "std": std, "min": float(values.min()),
            "max": float(values.max()), "percentile_99_5": float(p995), "percentile_00_5": float(p005)}


def check_dimensionality(fingerprint: dict, where) -> None:
    """Refuse a dataset mixing 2D images (an axis of one voxel) with 3D ones: one plan
    (spacing, patch, network) cannot serve both, and nnU-Net trains either 2D or 3D data."""
    from medvol.errors import InputError

    flat = {c: s for c, s in zip(fingerprint["case_ids"], fingerprint["shapes_before_crop"]) if min(s) == 1}
    full = {c: s for c, s in zip(fingerprint["case_ids"], fingerprint["shapes_before_crop"]) if min(s) > 1}
    if flat and full:
        (c2, s2), (c3, s3) = next(iter(flat.items())), next(iter(full.items()))
        raise InputError(where, f"the dataset mixes 2D images ({len(flat)}, e.g. case '{c2}' of shape {s2}) and 3D "
                                f"images ({len(full)}, e.g. case '{c3}' of shape {s3}); preprocess them separately")


def warn_mixed_coarse_axes(fingerprint: dict, ratio: float = 2.0) -> dict[int, list[str]]:
    """Warn, naming the cases, when anisotropic cases of one dataset keep their coarse
    (through-plane) axis on different array axes, e.g. KiTS19's (slices, H, W) beside LiTS's
    (H, W, slices): a per-axis target spacing then means different things per case, and
    ``--orientation RAS`` puts every case in one voxel order. Returns {axis: cases}."""
    import logging

    by_axis: dict[int, list[str]] = {}
    for case, sp in zip(fingerprint["case_ids"], fingerprint["spacings"]):
        sp = np.asarray(sp, float)
        if sp.max() / sp.min() >= ratio:
            by_axis.setdefault(int(np.argmax(sp)), []).append(case)
    if len(by_axis) > 1:
        parts = "; ".join(f"axis {a}: {len(c)} case(s), e.g. {', '.join(c[:3])}" for a, c in sorted(by_axis.items()))
        logging.getLogger(__name__).warning(
            "the coarse (through-plane) axis is not the same array axis in every case (%s); "
            "consider medvol preprocess --orientation RAS", parts)
    return by_axis
