"""Per-case preprocessing (crop -> normalise -> resample) and the dataset-level driver.

Order of operations follows nnU-Net: crop to the nonzero box, normalise (before
resampling, so the nonzero mask still fits the image), resample to the plan's spacing.
The dataset driver reads every raw case once: the fingerprint pass keeps the cropped
arrays in ``OUT/staging`` and the preprocessing pass picks them up from there.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from medvol.cache import CACHE_VERSION, case_is_complete, case_paths, load_plans, plans_digest
from medvol.errors import CacheError, InputError, MedvolError
from medvol.io import Volume
from medvol.preprocessing.cropping import crop_to_nonzero
from medvol.preprocessing.fingerprint import (
    case_fingerprint,
    case_fingerprint_done,
    merge_fingerprints,
    samples_per_case,
    write_case_fingerprint,
)
from medvol.preprocessing.normalization import normalize
from medvol.preprocessing.planning import plan_experiment
from medvol.preprocessing.raw import RawCase, RawDataset, load_raw_case, open_raw_dataset
from medvol.preprocessing.resampling import compute_new_shape, resample_image, resample_label, separate_z_axis
from medvol.utils import read_json, save_npy, write_json

log = logging.getLogger(__name__)

NUM_LOCATION_SAMPLES = 10_000
MIN_LOCATION_COVERAGE = 0.01


# --------------------------------------------------------------------------- one case
def sample_class_locations(seg: np.ndarray, classes: Iterable[int], seed: int = 1234) -> dict[str, list]:
    """Up to 10,000 voxel positions (x, y, z) per class (at least 1 % of its voxels), for
    foreground oversampling; fixed seed, as nnU-Net."""
    rs = np.random.RandomState(seed)
    flat = seg.reshape(-1)
    spatial = seg.shape[1:]
    out: dict[str, list] = {}
    for c in classes:
        idx = np.flatnonzero(flat == c)
        if idx.size == 0:
            out[str(c)] = []
            continue
        n = max(min(NUM_LOCATION_SAMPLES, idx.size), int(np.ceil(idx.size * MIN_LOCATION_COVERAGE)))
        chosen = idx[rs.choice(idx.size, n, replace=False)]
        out[str(c)] = np.stack(np.unravel_index(chosen, spatial), axis=1).astype(int).tolist()
    return out


def _normalise_and_resample(image: np.ndarray, seg: np.ndarray | None, spacing: Sequence[float], plans: dict,
                            copy: bool = True):
    """image/seg are cropped, channel-first. Returns resampled (image, seg, new_shape).
    ``copy=False`` normalises ``image`` in place (when the caller owns it: saves a copy)."""
    norm = plans["normalization"]
    stats = {str(n["channel"]): n["statistics"] for n in norm}
    if copy or image.dtype != np.float32:
        image = np.array(image, dtype=np.float32)
    image = normalize(image, seg, [n["scheme"] for n in norm],
                      [n["use_mask_for_norm"] for n in norm], stats)
    target = plans["target_spacing"]
    new_shape = compute_new_shape(image.shape[1:], spacing, target)
    image = resample_image(image, new_shape, spacing, target, order=plans["resampling"]["image"])
    if seg is not None:
        seg = resample_label(seg, new_shape, spacing, target)
    return image, seg, new_shape


def _geometry_properties(ref: Volume, bbox, shape_after_crop, spacing, plans, new_shape) -> dict:
    return {
        "original_shape": list(ref.spatial_shape),
        "original_affine": np.asarray(ref.affine).tolist(),
        "original_spacing": [float(s) for s in spacing],
        "crop_bbox": bbox,
        "shape_after_crop": [int(s) for s in shape_after_crop],
        "target_spacing": [float(s) for s in plans["target_spacing"]],
        "shape_after_resampling": [int(s) for s in new_shape],
        "separate_z_axis": separate_z_axis(spacing, plans["target_spacing"]),
        "source_meta": {k: v for k, v in ref.meta.items() if isinstance(v, (str, int, float))},
    }


def preprocess_case(volumes: Volume | Sequence[Volume], plans: dict, inplace: bool = False) -> tuple[np.ndarray, dict]:
    """Preprocess a new scan for inference with the dataset's ``plans``.

    ``volumes``: one Volume (3D, or 4D with channels last) or one Volume per channel, on
    the same grid. Returns ``(image (C, X, Y, Z) float32, properties)``; the properties
    hold what :func:`medvol.inference.restore_geometry` needs to undo crop and resampling.
    ``inplace=True`` lets it normalise inside the volumes' own float32 arrays (saving a copy
    of the scan) when the caller no longer needs them.
    """
    vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
    if not vols:
        raise InputError(None, "preprocess_case needs at least one volume")
    ref = vols[0]
    for v in vols[1:]:
        if v.spatial_shape != ref.spatial_shape or not np.allclose(v.affine, ref.affine, rtol=1e-4, atol=1e-3):
            raise InputError(v.meta.get("path"), "channels are not on the same voxel grid")
    chans = [v.channel_first() for v in vols]  # may share memory with the volumes (float32 input)
    image = chans[0] if len(chans) == 1 else np.concatenate(chans)  # no second copy of a single channel
    if not inplace and any(np.shares_memory(image, v.array) for v in vols):
        image = image.copy()
    expected = len(plans["normalization"])
    if image.shape[0] != expected:
        raise InputError(ref.meta.get("path"), f"{image.shape[0]} channel(s) given, the plan expects {expected}")
    if not np.isfinite(image).all():
        raise InputError(ref.meta.get("path"), "non-finite intensity values (NaN/inf)")
    spacing = ref.spacing
    cropped, seg, bbox = crop_to_nonzero(image, None)
    if not any(n["use_mask_for_norm"] for n in plans["normalization"]):
        seg = None  # only masked z-scoring reads it: do not keep a label-sized array around
    out, _, new_shape = _normalise_and_resample(cropped, seg, spacing, plans, copy=False)  # image is ours now
    props = _geometry_properties(ref, bbox, cropped.shape[1:], spacing, plans, new_shape)
    return out, props


# --------------------------------------------------------------------------- dataset driver
@dataclass
class Report:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)

    def merge(self, other: "Report") -> "Report":
        self.done += other.done
        self.skipped += other.skipped
        self.failures.update(other.failures)
        return self


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """'K/N' -> (K, N): this process takes cases K, K+N, K+2N, ... (K counts from 0)."""
    if not shard:
        return None
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise MedvolError(f"--shard must look like K/N (e.g. 0/4), got {shard!r}") from None
    if n < 1 or not 0 <= k < n:
        raise MedvolError(f"--shard {shard}: need 0 <= K < N")
    return k, n


def _select(cases: list[RawCase], shard) -> list[RawCase]:
    return cases if shard is None else cases[shard[0]::shard[1]]


def _staging(out: Path, case_id: str) -> tuple[Path, Path, Path]:
    d = out / "staging"
    return d / f"{case_id}_image.npy", d / f"{case_id}_seg.npy", d / f"{case_id}.json"


def _failure_path(out: Path, case_id: str) -> Path:
    return out / "fingerprints" / f"{case_id}.failed.txt"


def _fingerprint_job(case: RawCase, dataset: RawDataset, out: Path, n_samples: int) -> tuple[str, str | None]:
    try:
        loaded = load_raw_case(case, dataset)
        spacing = loaded.reference.spacing
        shape_before = loaded.image.shape[1:]
        cropped, seg, bbox = crop_to_nonzero(loaded.image, loaded.label)
        fp, samples = case_fingerprint(cropped, seg, spacing, shape_before, n_samples, loaded.label is not None)
        img_p, seg_p, props_p = _staging(out, case.case_id)
        save_npy(img_p, cropped)
        save_npy(seg_p, seg)
        write_json(props_p, {"bbox": bbox, "has_label": loaded.label is not None,
                             "original_shape": list(loaded.reference.spatial_shape),
                             "original_affine": loaded.reference.affine.tolist(), "spacing": list(spacing),
                             "source_meta": {k: v for k, v in loaded.reference.meta.items()
                                             if isinstance(v, (str, int, float))}})
        _failure_path(out, case.case_id).unlink(missing_ok=True)
        write_case_fingerprint(out / "fingerprints", case.case_id, fp, samples)
        return case.case_id, None
    except MedvolError as e:
        _failure_path(out, case.case_id).parent.mkdir(parents=True, exist_ok=True)
        _failure_path(out, case.case_id).write_text(str(e))
        return case.case_id, str(e)


def _preprocess_job(case: RawCase, dataset: RawDataset, out: Path, plans: dict, digest: str) -> tuple[str, str | None]:
    try:
        img_p, seg_p, props_p = _staging(out, case.case_id)
        if props_p.exists() and img_p.exists() and seg_p.exists():
            st = read_json(props_p)
            cropped, seg = np.load(img_p), np.load(seg_p)
            ref = Volume(np.empty((0, 0, 0)), np.array(st["original_affine"]), st.get("source_meta", {}))
            original_shape, spacing, bbox, has_label = st["original_shape"], st["spacing"], st["bbox"], st["has_label"]
        else:  # staging gone (fingerprinted elsewhere, or cleaned): read the raw case again
            loaded = load_raw_case(case, dataset)
            ref, spacing = loaded.reference, loaded.reference.spacing
            original_shape, has_label = list(ref.spatial_shape), loaded.label is not None
            cropped, seg, bbox = crop_to_nonzero(loaded.image, loaded.label)
        image, seg_r, new_shape = _normalise_and_resample(cropped, seg, spacing, plans)
        props = _geometry_properties(ref, bbox, cropped.shape[1:], spacing, plans, new_shape)
        props["original_shape"] = [int(s) for s in original_shape]
        props.update(dataset.case_meta.get(case.case_id, {}))  # partial labels: task_id, annotated
        props.update({"case_id": case.case_id, "has_label": has_label, "cache_version": CACHE_VERSION,
                      "plans_digest": digest, "source_files": [str(p) for p in case.images],
                      "label_file": str(case.label) if case.label else None})
        if has_label:
            fg = [v for v in sorted(set(plans["labels"].values())) if v > 0]
            props["class_locations"] = sample_class_locations(seg_r, fg)
        i_out, s_out, p_out = case_paths(out, case.case_id)
        p_out.unlink(missing_ok=True)  # an old properties file must not vouch for new arrays
        save_npy(i_out, image.astype(plans.get("cache_dtype", "float32"), copy=False))
        if has_label:
            dtype = np.int16 if seg_r.max() > 127 else np.int8
            save_npy(s_out, seg_r.astype(dtype))
        write_json(p_out, props)
        for p in (img_p, seg_p, props_p):
            p.unlink(missing_ok=True)
        return case.case_id, None
    except MedvolError as e:
        return case.case_id, str(e)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _run_jobs(fn: Callable, cases: list[RawCase], args: tuple, num_workers: int, desc: str, quiet: bool) -> Report:
    report = Report()
    if not cases:
        return report
    from tqdm import tqdm

    bar = tqdm(total=len(cases), desc=desc, unit="case", disable=quiet or not sys.stderr.isatty())
    results = []
    if num_workers <= 1 or len(cases) == 1:
        for c in cases:
            results.append(fn(c, *args))
            bar.set_postfix_str(c.case_id)
            bar.update()
    else:
        # fork: workers inherit the imported modules (fast start); the parent runs no torch
        # kernels before this point, so no OpenMP pool is forked.
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx, initializer=_worker_init) as ex:
            futs = {ex.submit(fn, c, *args): c for c in cases}
            for f in as_completed(futs):
                results.append(f.result())
                bar.set_postfix_str(futs[f].case_id)
                bar.update()
    bar.close()
    for case_id, err in results:
        if err:
            report.failures[case_id] = err
            log.error(err)
        else:
            report.done.append(case_id)
    return report


def _clean_partial(out: Path, case_ids: list[str]) -> None:
    """Remove temp files of these cases' writes cut short by a kill (atomic writes rename
    only when complete). Other cases' temp files may belong to a running shard: kept."""
    suffixes = (".npy", "_seg.npy", ".json", "_image.npy", "_intensities.npy")
    prefixes = tuple(f".{cid}{suf}." for cid in case_ids for suf in suffixes)
    for sub in ("cases", "fingerprints", "staging"):
        if (out / sub).is_dir():
            for junk in (out / sub).glob(".*.part*"):
                if junk.name.startswith(prefixes):
                    junk.unlink(missing_ok=True)


def _prepare_out(raw: RawDataset, out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        for sub in ("cases", "fingerprints", "staging"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in ("fingerprint.json", "plans.json", "dataset.json", "failures.json"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    desc = raw.dataset_json()
    desc["raw_root"] = str(raw.root.resolve())
    desc["training_cases"] = [c.case_id for c in raw.training]
    desc["test_cases"] = [c.case_id for c in raw.test]
    djson = out / "dataset.json"
    if djson.exists():
        old = read_json(djson)
        if old.get("training_cases") != desc["training_cases"] or old.get("raw_root") != desc["raw_root"]:
            raise CacheError(f"{out}: holds a cache of another dataset ({old.get('raw_root')}); "
                             "use another output folder or --overwrite")
    else:
        write_json(djson, desc)


def fingerprint_dataset(raw: str | Path, out: str | Path, num_workers: int = 2, shard: str | None = None,
                        overwrite: bool = False, quiet: bool = False) -> Report:
    """Per-case fingerprints (and cropped staging arrays) of the training cases."""
    ds = open_raw_dataset(raw)
    out = Path(out)
    _prepare_out(ds, out, overwrite)
    sh = parse_shard(shard)
    mine = _select(ds.training, sh)
    _clean_partial(out, [c.case_id for c in mine])
    n_samples = samples_per_case(len(ds.training))
    todo = [c for c in mine if not case_fingerprint_done(out / "fingerprints", c.case_id)]
    report = _run_jobs(_fingerprint_job, todo, (ds, out, n_samples), num_workers, "fingerprint", quiet)
    report.skipped += [c.case_id for c in mine if c not in todo]
    return report


def plan_dataset(out: str | Path, gpu_memory_gb: float = 8.0, image_interpolation: str = "cubic",
                 cache_dtype: str = "float32", target_spacing=None, ct_window=None) -> dict:
    """Merge the per-case fingerprints into ``fingerprint.json`` and write ``plans.json``."""
    out = Path(out)
    if not (out / "dataset.json").exists():
        raise CacheError(f"{out}: no dataset.json; run `medvol fingerprint RAW -o {out}` first")
    desc = read_json(out / "dataset.json")
    fp_dir = out / "fingerprints"
    failed = sorted(p.name[: -len(".failed.txt")] for p in fp_dir.glob("*.failed.txt")) if fp_dir.is_dir() else []
    cases = [c for c in desc["training_cases"] if c not in failed]
    if not cases:
        raise CacheError(f"{out}: no valid training case to plan from (failed: {', '.join(failed) or 'none'})")
    fp = merge_fingerprints(fp_dir, cases, len(desc["channel_names"]))
    fp["failed_cases"] = failed
    plans = plan_experiment(fp, desc, gpu_memory_gb, image_interpolation, cache_dtype, target_spacing, ct_window)
    write_json(out / "fingerprint.json", fp)
    old = out / "plans.json"
    if not old.exists() or read_json(old) != plans:
        write_json(old, plans)
    return plans


def preprocess_cases(raw: str | Path, out: str | Path, num_workers: int = 2, shard: str | None = None,
                     quiet: bool = False) -> Report:
    """Crop, normalise and resample the training cases with ``OUT/plans.json``.

    Finished cases made with the same plan are skipped; unfinished ones are redone.
    """
    ds = open_raw_dataset(raw)
    out = Path(out)
    plans = load_plans(out)
    digest = plans_digest(plans)
    fp_path = out / "fingerprint.json"
    failed = set(read_json(fp_path).get("failed_cases", [])) if fp_path.exists() else set()
    mine = [c for c in _select(ds.training, parse_shard(shard)) if c.case_id not in failed]
    _clean_partial(out, [c.case_id for c in mine])
    todo = [c for c in mine if not case_is_complete(out, c.case_id, digest)]
    report = _run_jobs(_preprocess_job, todo, (ds, out, plans, digest), num_workers, "preprocess", quiet)
    report.skipped += [c.case_id for c in mine if c not in todo]
    return report


def preprocess_dataset(raw: str | Path, out: str | Path, num_workers: int = 2, overwrite: bool = False,
                       shard: str | None = None, quiet: bool = False, **plan_options) -> Report:
    """fingerprint -> plan -> preprocess in one call (what ``medvol preprocess`` runs).

    With ``shard='K/N'`` only this shard's cases are preprocessed, and the plan must already
    exist (``medvol fingerprint --shard`` on every shard, then ``medvol plan``).
    """
    out = Path(out)
    report = Report()
    if shard is None:
        report.merge(fingerprint_dataset(raw, out, num_workers, None, overwrite, quiet))
        plan_dataset(out, **plan_options)
        pre = preprocess_cases(raw, out, num_workers, None, quiet)
        report.done = pre.done
        report.skipped = pre.skipped
        report.failures.update(pre.failures)
    else:
        if not (out / "plans.json").exists():
            raise CacheError(f"{out}: a sharded run needs the plan first: run `medvol fingerprint RAW -o {out} "
                             "--shard K/N` for every shard, then `medvol plan`")
        report = preprocess_cases(raw, out, num_workers, shard, quiet)
    failures_file = out / "failures.json"
    if report.failures:
        write_json(failures_file, report.failures)
    elif failures_file.exists() and shard is None:
        failures_file.unlink()
    if shard is None and not report.failures:  # every case is cached: the cropped copies are spent
        shutil.rmtree(out / "staging", ignore_errors=True)
    return report
