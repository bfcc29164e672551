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
CHUNK = 1 << 22  # samples converted to float64 at a time


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
    small_int = image_cropped.dtype.kind in "iu" and image_cropped.dtype.itemsize <= 2
    # a CT's int16 values stay int16: half the bytes, and merging radix-sorts them
    samples = np.empty((image_cropped.shape[0], keep), image_cropped.dtype if small_int else np.float32)
    stats: list[dict[str, float | None]] = []
    for c in range(image_cropped.shape[0]):
        vals = image_cropped[c][fg]
        if vals.size:
            # sorted here (in the worker): merging then sorts a few presorted runs
            samples[c] = np.sort(vals if chosen is None else vals[chosen], kind="stable" if small_int else None)
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
    weights = [float(per_case[c]["sample_weight"]) for c in sampled]
    channel_stats = {}
    for ch in range(num_channels):
        if not any(s.shape[1] for s in samples):
            channel_stats[str(ch)] = {k: None for k in ("mean", "median", "std", "min", "max",
                                                         "percentile_99_5", "percentile_00_5")}
            continue
        channel_stats[str(ch)] = weighted_statistics([s[ch] for s in samples], weights)
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


def _sorted(run: np.ndarray) -> np.ndarray:
    run = np.asarray(run)
    return run if run.size < 2 or bool(np.all(run[1:] >= run[:-1])) else np.sort(run)


class _Runs:
    """Sorted per-case sample runs, each of one weight: cumulative weights by value."""

    def __init__(self, runs: list[np.ndarray], weights: list[float]) -> None:
        keep = [(_sorted(r), float(w)) for r, w in zip(runs, weights) if len(r) and w > 0]
        self.dtype = np.result_type(*[r.dtype for r, _ in keep])
        self.runs = [np.asarray(r, self.dtype) for r, _ in keep]
        self.w = np.array([w for _, w in keep])

    def count(self, x, side: str) -> np.ndarray:
        x = self.dtype.type(x)  # the runs' dtype: searchsorted would otherwise convert a whole run per call
        return np.array([np.searchsorted(r, x, side) for r in self.runs])  # type: ignore[call-overload]

    def group(self, x: float) -> tuple[float, float]:
        """Midpoint weights of the first and last sample equal to ``x`` in the pooled order
        (values ascending, runs in order): ``cw - w / 2`` of each."""
        lt, le = self.count(x, "left"), self.count(x, "right")
        holders = np.flatnonzero(le > lt)
        return float(self.w @ lt + self.w[holders[0]] / 2), float(self.w @ le - self.w[holders[-1]] / 2)


def weighted_quantiles(runs: list[np.ndarray], weights: list[float], qs) -> np.ndarray:
    """Quantiles (0..1) of pooled samples, ``runs[i]`` each of weight ``weights[i]``: each sample
    sits at its midpoint cumulative weight, rescaled so that the first and last sit at 0 and 1,
    and values are interpolated linearly between samples (with equal weights, np.percentile's
    default rule). Runs are per-case samples, sorted by the workers: the pooled values are sorted
    once (4 bytes a sample) and each quantile is found by bisection with per-run searchsorted,
    without per-sample weights or an argsort (a 1e8-sample CT fingerprint would need ~5 GB)."""
    pool = _Runs(runs, weights)
    merged = np.concatenate(pool.runs)
    merged.sort(kind="stable")  # timsort merges presorted runs in O(n log runs); radix for int16
    first, last = pool.group(merged[0])[0], pool.group(merged[-1])[1]
    scale = max(last - first, 1e-12)
    out = []
    for q in np.asarray(qs, float):
        target = first + min(max(q, 0.0), 1.0) * scale
        lo, hi = 0, merged.size - 1
        while lo < hi:  # the first value whose group ends at or after the target
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if pool.group(merged[mid])[1] >= target else (mid + 1, hi)
        x = merged[lo]
        start = pool.group(x)[0]
        if target >= start or lo == 0:
            out.append(float(x))
            continue
        prev = merged[np.searchsorted(merged, x, "left") - 1]
        end = pool.group(prev)[1]
        out.append(float(prev) + (float(x) - float(prev)) * (target - end) / (start - end))
    return np.array(out)


def weighted_statistics(runs: list[np.ndarray], weights: list[float]) -> dict:
    """Weighted mean, std, min, max, median and 0.5/99.5 percentiles of per-case sample runs."""
    pool = _Runs(runs, weights)
    total = float(sum(w * len(r) for r, w in zip(pool.runs, pool.w)))
    mean = sum(w * float(np.sum(r, dtype=np.float64)) for r, w in zip(pool.runs, pool.w)) / total
    sq = sum(w * sum(float(np.sum((np.asarray(r[i:i + CHUNK], np.float64) - mean) ** 2))
                     for i in range(0, len(r), CHUNK)) for r, w in zip(pool.runs, pool.w))
    p005, median, p995 = weighted_quantiles(pool.runs, list(pool.w), [0.005, 0.5, 0.995])
    return {"mean": float(mean), "median": float(median), "std": float(np.sqrt(sq / total)),
            "min": float(min(r[0] for r in pool.runs)), "max": float(max(r[-1] for r in pool.runs)),
            "percentile_99_5": float(p995), "percentile_00_5": float(p005)}


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
