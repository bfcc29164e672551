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
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from medvol.cache import CACHE_VERSION, case_is_complete, case_paths, load_plans, plans_digest, save_locations
from medvol.errors import CacheError, InputError, MedvolError, OutputError
from medvol.io import Volume
from medvol.io.orientation import orient_channels
from medvol.io.volume import spacing_from_affine
from medvol.manifest import OutputFolder, refuse_overlap
from medvol.preprocessing.cropping import CT_SCHEMES, OUTSIDE_LABEL, crop_to_nonzero, ct_body_mask
from medvol.preprocessing.fingerprint import (
    case_fingerprint,
    case_fingerprint_done,
    check_dimensionality,
    merge_fingerprints,
    samples_per_case,
    warn_mixed_coarse_axes,
    write_case_fingerprint,
)
from medvol.preprocessing.normalization import normalize
from medvol.preprocessing.planning import plan_experiment
from medvol.preprocessing.raw import RawCase, RawDataset, load_raw_case, open_raw_dataset
from medvol.preprocessing.sources import changed_sources, log_changed, record_sources
from medvol.resampling import compute_new_shape, resample_image, resample_label, separate_z_axis
from medvol.resources import worker_count
from medvol.utils import read_json, save_npy, write_json

log = logging.getLogger(__name__)

NUM_LOCATION_SAMPLES = 10_000
MIN_LOCATION_COVERAGE = 0.01


# --------------------------------------------------------------------------- one case
def sample_class_locations(seg: np.ndarray, classes: Iterable[int], seed: int = 1234) -> dict[str, np.ndarray]:
    """Up to 10,000 voxel positions (x, y, z) per class (at least 1 % of its voxels), for
    foreground oversampling, as ``(n, 3)`` int32 arrays; fixed seed, as nnU-Net."""
    rng = np.random.default_rng(seed)  # draws n of N in O(n) (RandomState permutes all N)
    flat = seg.reshape(-1)
    spatial = seg.shape[1:]
    out: dict[str, np.ndarray] = {}
    for c in classes:
        idx = np.flatnonzero(flat == c)
        if idx.size == 0:
            out[str(c)] = np.zeros((0, len(spatial)), np.int32)
            continue
        n = max(min(NUM_LOCATION_SAMPLES, idx.size), int(np.ceil(idx.size * MIN_LOCATION_COVERAGE)))
        chosen = idx[rng.choice(idx.size, n, replace=False)]
        out[str(c)] = np.stack(np.unravel_index(chosen, spatial), axis=1).astype(np.int32)
    return out


def _normalise_and_resample(image: np.ndarray | list, seg: np.ndarray | None, spacing: Sequence[float],
                            plans: dict, copy: bool = True):
    """image/seg are cropped, channel-first. Returns resampled (image, seg, new_shape).
    ``copy=False`` normalises ``image`` in place (when the caller owns it: saves a copy).
    ``image`` may be ``[array]``: the caller hands over its only reference (the list is
    emptied), so the raw array and then the normalised one are freed as soon as they are used."""
    owned = image if isinstance(image, list) else [image]
    norm = plans["normalization"]
    stats = {str(n["channel"]): n["statistics"] for n in norm}
    if copy or owned[0].dtype != np.float32:
        owned.append(np.array(owned.pop(), dtype=np.float32))
    owned.append(normalize(owned.pop(), seg, [n["scheme"] for n in norm],
                           [n["use_mask_for_norm"] for n in norm], stats))
    target = plans["target_spacing"]
    new_shape = compute_new_shape(owned[0].shape[1:], spacing, target)
    image = resample_image(owned, new_shape, spacing, target, order=plans["resampling"]["image"])
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


def _check_scan(image: np.ndarray, ref: Volume, plans: dict, slice_axis: int | None) -> None:
    """A scan the plan can take: thick enough in plane, the plan's channel count, finite."""
    in_plane = [n for a, n in enumerate(image.shape[1:]) if a != slice_axis]
    if min(in_plane) < 2 and min(plans["patch_size"]) > 1:
        raise InputError(ref.meta.get("path"), f"is a 2D image (shape {ref.spatial_shape}); the model was planned "
                                               "for 3D scans: give it 3D scans")
    expected = len(plans["normalization"])
    if image.shape[0] != expected:
        raise InputError(ref.meta.get("path"), f"{image.shape[0]} channel(s) given, the plan expects {expected}")
    if not np.isfinite(image).all():
        raise InputError(ref.meta.get("path"), "non-finite intensity values (NaN/inf)")


def preprocess_case(volumes: Volume | Sequence[Volume], plans: dict, inplace: bool = False,
                    body_mask: bool = False, slice_axis: int | None = None) -> tuple[np.ndarray, dict]:
    """Preprocess a new scan for inference with the dataset's ``plans``.

    ``volumes``: one Volume (3D, or 4D with channels last) or one Volume per channel, on
    the same grid. Returns ``(image (C, X, Y, Z) float32, properties)``; the properties
    hold what :func:`medvol.inference.restore_geometry` needs to undo crop and resampling.
    ``inplace=True`` lets it normalise inside the volumes' own float32 arrays (saving a copy
    of the scan) when the caller no longer needs them. ``body_mask=True`` adds
    ``properties["body_mask"]``: the nonzero mask cropping used (for a CT, whose nonzero mask is
    the whole field of view, the body: :func:`~medvol.preprocessing.cropping.ct_body_mask`), on
    the preprocessed grid ``(X, Y, Z)`` bool (prediction skips the windows outside it). ``slice_axis`` (a 2D
    model's): the scan keeps its own spacing across that axis, as nnU-Net's 2d configuration
    resamples in plane only; so a model planned on native 2D slices (999-mm spacing across
    them) runs over a volume's slices as they are, and a single slice is a valid input.
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
    orientation = plans.get("orientation", "stored")
    if orientation != "stored":  # the plan's voxel order; the properties say how to undo it
        image, affine = orient_channels(image, ref.affine, orientation)
    _check_scan(image, ref, plans, slice_axis)
    spacing = ref.spacing if orientation == "stored" else spacing_from_affine(affine)
    if slice_axis is not None:
        target = [float(spacing[a]) if a == slice_axis else float(t) for a, t in enumerate(plans["target_spacing"])]
        plans = {**plans, "target_spacing": target}
    cropped, seg, bbox = crop_to_nonzero(image, None)
    masked_norm = any(n["use_mask_for_norm"] for n in plans["normalization"])
    if not body_mask and not masked_norm:
        seg = None  # only masked z-scoring reads it: do not keep a label-sized array around
    ct = [n["channel"] for n in plans["normalization"] if n["scheme"] in CT_SCHEMES]
    if body_mask and ct and not masked_norm:  # a CT's nonzero mask is its whole field of view
        seg[0][~ct_body_mask(cropped[int(ct[0])])] = OUTSIDE_LABEL
    out, seg, new_shape = _normalise_and_resample(cropped, seg, spacing, plans, copy=False)  # image is ours now
    props = _geometry_properties(ref, bbox, cropped.shape[1:], spacing, plans, new_shape)
    if body_mask:
        props["body_mask"] = np.asarray(seg[0] >= 0)
    if orientation != "stored":
        props.update(orientation=orientation, oriented_shape=[int(s) for s in image.shape[1:]])
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


def _fingerprint_job(case: RawCase, dataset: RawDataset, out: Path, n_samples: int,
                     orientation: str | None = None) -> tuple[str, str | None]:
    try:
        loaded = load_raw_case(case, dataset, orientation=orientation)
        sources = record_sources(_source_paths(case))
        spacing = loaded.spacing
        shape_before = loaded.image.shape[1:]
        cropped, seg, bbox = crop_to_nonzero(loaded.image, loaded.label)
        fp, samples = case_fingerprint(cropped, seg, spacing, shape_before, n_samples, loaded.label is not None)
        img_p, seg_p, props_p = _staging(out, case.case_id)
        save_npy(img_p, cropped)
        save_npy(seg_p, seg)
        write_json(props_p, {"bbox": bbox, "has_label": loaded.label is not None,
                             "original_shape": list(loaded.reference.spatial_shape),
                             "original_affine": loaded.reference.affine.tolist(), "spacing": list(spacing),
                             "sources": sources, "source_meta": {k: v for k, v in loaded.reference.meta.items()
                                             if isinstance(v, (str, int, float))},
                             "orientation_properties": loaded.orientation_properties()})
        _failure_path(out, case.case_id).unlink(missing_ok=True)
        write_case_fingerprint(out / "fingerprints", case.case_id,
                               {**fp, "sources": sources, "has_label": loaded.label is not None}, samples)
        return case.case_id, None
    except OutputError:
        raise  # not this case's fault: the run stops (a rerun resumes)
    except MedvolError as e:
        _failure_path(out, case.case_id).parent.mkdir(parents=True, exist_ok=True)
        _failure_path(out, case.case_id).write_text(str(e))
        return case.case_id, str(e)


def _preprocess_job(case: RawCase, dataset: RawDataset, out: Path, plans: dict, digest: str) -> tuple[str, str | None]:
    try:
        img_p, seg_p, props_p = _staging(out, case.case_id)
        orientation = plans.get("orientation", "stored")
        st = read_json(props_p) if props_p.exists() and img_p.exists() and seg_p.exists() else None
        if st is not None and st.get("sources") and not changed_sources(st["sources"], _source_paths(case)) \
                and st.get("orientation_properties", {}).get("orientation", "stored") == orientation:
            sources = st["sources"]
            cropped, seg = np.load(img_p), np.load(seg_p)
            ref = Volume(np.empty((0, 0, 0)), np.array(st["original_affine"]), st.get("source_meta", {}))
            original_shape, spacing, bbox, has_label = st["original_shape"], st["spacing"], st["bbox"], st["has_label"]
            oriented = st.get("orientation_properties", {})
        else:  # staging gone (fingerprinted elsewhere, or cleaned) or stale: read the raw case again
            loaded = load_raw_case(case, dataset, orientation=orientation)
            sources = record_sources(_source_paths(case))
            ref, spacing, oriented = loaded.reference, loaded.spacing, loaded.orientation_properties()
            original_shape, has_label = list(ref.spatial_shape), loaded.label is not None
            cropped, seg, bbox = crop_to_nonzero(loaded.image, loaded.label)
            ref = Volume(np.empty((0, 0, 0)), ref.affine, ref.meta)  # geometry only: the scan can go
            del loaded
        crop_shape = cropped.shape[1:]
        owned = [cropped]
        del cropped  # handed over: _normalise_and_resample frees it once converted
        image, seg_r, new_shape = _normalise_and_resample(owned, seg, spacing, plans)
        props = _geometry_properties(ref, bbox, crop_shape, spacing, plans, new_shape)
        props["original_shape"] = [int(s) for s in original_shape]
        props.update(oriented)
        props.update(dataset.case_meta.get(case.case_id, {}))  # partial labels: task_id, annotated
        props.update({"case_id": case.case_id, "has_label": has_label, "cache_version": CACHE_VERSION,
                      "plans_digest": digest, "sources": sources,
                      "label_file": str(case.label) if case.label else None})
        i_out, s_out, p_out = case_paths(out, case.case_id)
        p_out.unlink(missing_ok=True)  # an old properties file must not vouch for new arrays
        save_npy(i_out, image.astype(plans.get("cache_dtype", "float32"), copy=False))
        if has_label:
            dtype = np.int16 if seg_r.max() > 127 else np.int8
            save_npy(s_out, seg_r.astype(dtype))
            fg = [v for v in sorted(set(plans["labels"].values())) if v > 0]
            save_locations(out, case.case_id, sample_class_locations(seg_r, fg))
        write_json(p_out, props)
        for p in (img_p, seg_p, props_p):
            p.unlink(missing_ok=True)
        return case.case_id, None
    except OutputError:
        raise
    except MedvolError as e:
        return case.case_id, str(e)


def _source_paths(case: RawCase) -> list:
    return [*case.images, case.label]


def _sources_changed(record_file: Path, case: RawCase, stage: str) -> bool:
    """True (and says so) when ``record_file`` (a finished case's JSON) lists sources that changed."""
    try:
        record = read_json(record_file).get("sources")
    except (OSError, ValueError):
        return False  # unreadable: the completeness checks redo it anyway
    changed = changed_sources(record, _source_paths(case))
    if changed:
        log_changed(case.case_id, changed, stage)
    return bool(changed)


def _worker_init() -> None:
    """One torch thread per worker (the workers are the parallelism), when torch is loaded:
    preprocessing itself runs on numpy and scipy."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


BYTES_PER_VOXEL = 40  # peak bytes of one worker per voxel and channel (arrays, copies, resampling)


def _case_bytes(case: RawCase) -> int | None:
    """A worker's peak memory for this case, from the NIfTI headers (None when unknown)."""
    from medvol.io import is_nifti

    if not all(is_nifti(p) for p in case.images):
        return None
    import nibabel as nib

    try:
        voxels = [int(np.prod(nib.load(str(p)).shape)) for p in case.images]  # type: ignore[attr-defined]
        return sum(voxels) * BYTES_PER_VOXEL
    except Exception:  # noqa: BLE001 - an unreadable header is reported when the case is read
        return None


def _workers(cases: list[RawCase], requested: int | None) -> int:
    """-j: as asked, or the usable CPUs kept within the available memory (largest case)."""
    if requested is not None:
        return requested
    sizes = [b for b in (_case_bytes(c) for c in cases) if b]
    return worker_count(len(cases), max(sizes) if sizes else None)


def _run_jobs(fn: Callable, cases: list[RawCase], args: tuple, num_workers: int | None, desc: str,
              quiet: bool) -> Report:
    report = Report()
    if not cases:
        return report
    num_workers = _workers(cases, num_workers)
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
            try:
                for f in as_completed(futs):
                    results.append(f.result())
                    bar.set_postfix_str(futs[f].case_id)
                    bar.update()
            except BrokenProcessPool:
                raise MedvolError(f"{desc}: a worker process died (killed, or out of memory?) while "
                                  f"{len(cases) - len(results)} case(s) were unfinished; finished cases are kept: "
                                  "rerun the same command to resume (with fewer -j workers if memory ran out)") \
                from None
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)
                raise
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


CACHE_ENTRIES = ("cases", "fingerprints", "staging", "dataset.json", "fingerprint.json", "plans.json", "failures.json",
                 "slice_labels.csv")


def cache_folder(out: Path) -> OutputFolder:
    """The cache folder and its manifest: what preprocessing may write (and --overwrite remove)."""
    return OutputFolder(out, "preprocess", CACHE_ENTRIES)


def _is_legacy_cache(out: Path) -> bool:
    """A cache written before manifests existed: our dataset.json (it records raw_root)."""
    try:
        return "raw_root" in read_json(out / "dataset.json")
    except (OSError, ValueError):
        return False


def _prepare_out(raw: RawDataset, out: Path, overwrite: bool, orientation: str = "stored") -> None:
    refuse_overlap(out, [raw.root])
    folder = cache_folder(out)
    if overwrite and out.exists():
        folder.clear()
    folder.claim(adopt=_is_legacy_cache(out))  # refuses a folder of someone else's files
    desc = raw.dataset_json()
    desc["raw_root"] = str(raw.root.resolve())
    desc["training_cases"] = [c.case_id for c in raw.training]
    desc["test_cases"] = [c.case_id for c in raw.test]
    desc["orientation"] = orientation
    djson = out / "dataset.json"
    if djson.exists():
        old = read_json(djson)
        if old.get("training_cases") != desc["training_cases"] or old.get("raw_root") != desc["raw_root"]:
            raise CacheError(f"{out}: holds a cache of another dataset ({old.get('raw_root')}); "
                             "use another output folder or --overwrite")
        if old.get("orientation", "stored") != orientation:
            raise CacheError(f"{out}: was made with --orientation {old.get('orientation', 'stored')}, not "
                             f"{orientation}; use another output folder or --overwrite")
    folder.claim(desc["training_cases"])
    if not djson.exists():
        write_json(djson, desc)


def fingerprint_dataset(raw: str | Path, out: str | Path, num_workers: int | None = None, shard: str | None = None,
                        overwrite: bool = False, quiet: bool = False, orientation: str = "stored") -> Report:
    """Per-case fingerprints (and cropped staging arrays) of the training cases, in the
    files' own voxel order or (``orientation="RAS"``) reoriented to RAS."""
    ds = open_raw_dataset(raw)
    out = Path(out)
    _prepare_out(ds, out, overwrite, orientation)
    sh = parse_shard(shard)
    mine = _select(ds.training, sh)
    _clean_partial(out, [c.case_id for c in mine])
    n_samples = samples_per_case(len(ds.training))
    fp_dir = out / "fingerprints"
    todo = [c for c in mine if not case_fingerprint_done(fp_dir, c.case_id)
            or _sources_changed(fp_dir / f"{c.case_id}.json", c, "fingerprint")]
    report = _run_jobs(_fingerprint_job, todo, (ds, out, n_samples, orientation), num_workers, "fingerprint", quiet)
    report.skipped += [c.case_id for c in mine if c not in todo]
    return report


def _cache_description(out: Path) -> dict:
    """The ``dataset.json`` that ``medvol fingerprint`` wrote into ``out`` (not a raw dataset's)."""
    first = f"run `medvol fingerprint RAW -o {out}` first"
    try:
        desc = read_json(out / "dataset.json")
    except FileNotFoundError:
        raise CacheError(f"{out}: no dataset.json; {first}") from None
    except (OSError, ValueError):
        desc = None
    if not isinstance(desc, dict) or "training_cases" not in desc:
        raise CacheError(f"{out}: a raw dataset (or another folder), not one `medvol fingerprint` wrote: run "
                         f"`medvol fingerprint {out} -o CACHE`, then `medvol plan CACHE`")
    return desc


def plan_dataset(out: str | Path, gpu_memory_gb: float = 8.0, image_interpolation: str = "cubic",
                 cache_dtype: str = "float32", target_spacing=None, ct_window=None) -> dict:
    """Merge the per-case fingerprints into ``fingerprint.json`` and write ``plans.json``."""
    out = Path(out)
    desc = _cache_description(out)
    fp_dir = out / "fingerprints"
    failed = sorted(p.name[: -len(".failed.txt")] for p in fp_dir.glob("*.failed.txt")) if fp_dir.is_dir() else []
    cases = [c for c in desc["training_cases"] if c not in failed]
    if not cases:
        raise CacheError(f"{out}: no valid training case to plan from (failed: {', '.join(failed) or 'none'})")
    fp = merge_fingerprints(fp_dir, cases, len(desc["channel_names"]))
    check_dimensionality(fp, desc.get("raw_root", out))
    fp["failed_cases"] = failed
    warn_mixed_coarse_axes(fp)
    plans = plan_experiment(fp, desc, gpu_memory_gb, image_interpolation, cache_dtype, target_spacing, ct_window)
    plans["orientation"] = desc.get("orientation", "stored")
    write_json(out / "fingerprint.json", fp)
    old = out / "plans.json"
    if not old.exists() or read_json(old) != plans:
        write_json(old, plans)
    return plans


def preprocess_cases(raw: str | Path, out: str | Path, num_workers: int | None = None, shard: str | None = None,
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
    todo = [c for c in mine if not case_is_complete(out, c.case_id, digest)
            or _sources_changed(case_paths(out, c.case_id)[2], c, "preprocessing")]
    report = _run_jobs(_preprocess_job, todo, (ds, out, plans, digest), num_workers, "preprocess", quiet)
    report.skipped += [c.case_id for c in mine if c not in todo]
    return report


def copy_slice_labels(raw: Path, out: Path) -> None:
    """A ``slice_labels.csv`` beside the raw dataset, checked against the raw scans' slice counts
    across the 2d plan's slice axis, is copied into the cache (training reads it from there)."""
    from medvol.io.slice_labels import SLICE_LABELS_FILE, read_slice_labels, write_slice_labels

    src = raw / SLICE_LABELS_FILE
    if not src.is_file():
        return
    plans = load_plans(out)
    axis = int(plans["configurations"]["2d"]["slice_axis"])
    desc = read_json(out / "dataset.json")
    counts = {c: 10**9 for c in desc["training_cases"]}  # failed cases: any index passes
    for case in desc["training_cases"]:
        props = case_paths(out, case)[2]
        if props.exists():
            counts[case] = int(read_json(props)["original_shape"][axis])
    write_slice_labels(read_slice_labels(src, counts), out / SLICE_LABELS_FILE)


def copy_raw_splits(raw: Path, out: Path) -> None:
    """A ``splits_final.json`` beside the raw dataset (nnU-Net's format; the dataset adapters
    write the published splits there) is copied into a cache that has none: ``--fold K`` uses it."""
    from medvol.cache import SPLITS_FILE
    from medvol.manifest import claim_files

    src, dst = raw / SPLITS_FILE, out / SPLITS_FILE
    if src.is_file() and not dst.exists():
        try:
            splits = read_json(src)
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(src, f"invalid JSON ({e})") from None
        claim_files(out, [SPLITS_FILE])
        write_json(dst, splits)


def preprocess_dataset(raw: str | Path, out: str | Path, num_workers: int | None = None, overwrite: bool = False,
                       shard: str | None = None, quiet: bool = False, orientation: str = "stored",
                       **plan_options) -> Report:
    """fingerprint -> plan -> preprocess in one call (what ``medvol preprocess`` runs).

    ``orientation``: "stored" (each file's voxel order, nnU-Net's behaviour) or "RAS" (every
    case reoriented to the closest canonical order first; predictions are turned back).

    With ``shard='K/N'`` only this shard's cases are preprocessed, and the plan must already
    exist (``medvol fingerprint --shard`` on every shard, then ``medvol plan``).
    """
    out = Path(out)
    report = Report()
    if shard is None:
        report.merge(fingerprint_dataset(raw, out, num_workers, None, overwrite, quiet, orientation))
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
    if shard is None:
        copy_slice_labels(Path(raw), out)
        copy_raw_splits(Path(raw), out)
    failures_file = out / "failures.json"
    if report.failures:
        write_json(failures_file, report.failures)
    elif failures_file.exists() and shard is None:
        failures_file.unlink()
    if shard is None and not report.failures:  # every case is cached: the cropped copies are spent
        shutil.rmtree(out / "staging", ignore_errors=True)
    return report
