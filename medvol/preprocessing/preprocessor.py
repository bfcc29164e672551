"""The dataset driver: ``fingerprint_dataset`` -> ``plan_dataset`` -> ``preprocess_cases``
(``preprocess_dataset`` runs all three, as ``medvol preprocess`` does).

The driver reads every raw case once: the fingerprint pass keeps the cropped arrays in
``OUT/staging`` and the preprocessing pass picks them up from there. The per-case transform
is :mod:`~medvol.preprocessing.transform`, the worker pool, shards and staging
:mod:`~medvol.preprocessing.pool`, the cache folder's files :mod:`~medvol.preprocessing.cache_files`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from medvol.cache import (
    CACHE_VERSION,
    LOWRES_DIR,
    SPLITS_FILE,
    case_is_complete,
    case_paths,
    label_locations,
    load_plans,
    plans_digest,
    sample_class_locations,
    save_locations,
)
from medvol.errors import CacheError, InputError, MedvolError, OutputError
from medvol.io import Volume
from medvol.labels import LabelScheme
from medvol.manifest import claim_files
from medvol.plans import LOWRES, lowres_plans
from medvol.preprocessing.cache_files import (
    cache_description,
    cache_folder,
    copy_raw_splits,
    copy_slice_labels,
    prepare_out,
)
from medvol.preprocessing.cropping import crop_to_nonzero
from medvol.preprocessing.fingerprint import (
    case_fingerprint,
    case_fingerprint_done,
    check_dimensionality,
    merge_fingerprints,
    samples_per_case,
    warn_mixed_coarse_axes,
    write_case_fingerprint,
)
from medvol.preprocessing.planning import plan_experiment, transfer_plans
from medvol.preprocessing.pool import (
    Report,
    clean_partial,
    failure_path,
    parse_shard,
    run_jobs,
    select_shard,
    staging_paths,
)
from medvol.preprocessing.raw import RawCase, RawDataset, load_raw_case, open_raw_dataset
from medvol.preprocessing.sources import changed_sources, log_changed, record_sources
from medvol.preprocessing.transform import geometry_properties, normalise_and_resample, preprocess_case
from medvol.utils import read_input_json, read_json, save_npy, write_json, write_text

__all__ = ["fingerprint_dataset", "plan_dataset", "preprocess_cases", "preprocess_dataset", "preprocess_case",
           "sample_class_locations", "Report"]

log = logging.getLogger(__name__)


def _fingerprint_job(case: RawCase, dataset: RawDataset, out: Path, n_samples: int,
                     orientation: str | None = None) -> tuple[str, str | None]:
    try:
        loaded = load_raw_case(case, dataset, orientation=orientation)
        sources = record_sources(_source_paths(case))
        spacing = loaded.spacing
        shape_before = loaded.image.shape[1:]
        cropped, seg, bbox = crop_to_nonzero(loaded.image, loaded.label)
        fp, samples = case_fingerprint(cropped, seg, spacing, shape_before, n_samples, loaded.label is not None)
        img_p, seg_p, props_p = staging_paths(out, case.case_id)
        save_npy(img_p, cropped)
        save_npy(seg_p, seg)
        write_json(props_p, {"bbox": bbox, "has_label": loaded.label is not None,
                             "original_shape": list(loaded.reference.spatial_shape),
                             "original_affine": loaded.reference.affine.tolist(), "spacing": list(spacing),
                             "sources": sources, "source_meta": {k: v for k, v in loaded.reference.meta.items()
                                             if isinstance(v, (str, int, float))},
                             "orientation_properties": loaded.orientation_properties()})
        failure_path(out, case.case_id).unlink(missing_ok=True)
        write_case_fingerprint(out / "fingerprints", case.case_id,
                               {**fp, "sources": sources, "has_label": loaded.label is not None}, samples)
        return case.case_id, None
    except OutputError:
        raise  # not this case's fault: the run stops (a rerun resumes)
    except MedvolError as e:
        write_text(failure_path(out, case.case_id), str(e))
        return case.case_id, str(e)


def _preprocess_job(case: RawCase, dataset: RawDataset, out: Path, plans: dict, digest: str) -> tuple[str, str | None]:
    try:
        img_p, seg_p, props_p = staging_paths(out, case.case_id)
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
        del cropped  # handed over: normalise_and_resample frees it once converted
        image, seg_r, new_shape = normalise_and_resample(owned, seg, spacing, plans)
        props = geometry_properties(ref, bbox, crop_shape, spacing, plans, new_shape)
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
            # several raters: oversample where any rater drew a class (the highest value drawn)
            union = seg_r if seg_r.shape[0] == 1 else seg_r.max(axis=0, keepdims=True)
            save_locations(out, case.case_id, label_locations(union, LabelScheme.from_plans(plans)))
        write_json(p_out, props)
        for p in (img_p, seg_p, props_p):
            p.unlink(missing_ok=True)
        return case.case_id, None
    except OutputError:
        raise
    except MedvolError as e:
        return case.case_id, str(e)


def _source_paths(case: RawCase) -> list:
    return [*case.images, *(case.rater_labels or [case.label])]  # type: ignore[list-item]


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


def fingerprint_dataset(raw: str | Path, out: str | Path, num_workers: int | None = None, shard: str | None = None,
                        overwrite: bool = False, quiet: bool = False, orientation: str = "stored") -> Report:
    """Per-case fingerprints (and cropped staging arrays) of the training cases, in the
    files' own voxel order or (``orientation="RAS"``) reoriented to RAS."""
    ds = open_raw_dataset(raw)
    out = Path(out)
    prepare_out(ds, out, overwrite, orientation)
    sh = parse_shard(shard)
    mine = select_shard(ds.training, sh)
    clean_partial(out, [c.case_id for c in mine])
    n_samples = samples_per_case(len(ds.training))
    fp_dir = out / "fingerprints"
    todo = [c for c in mine if not case_fingerprint_done(fp_dir, c.case_id)
            or _sources_changed(fp_dir / f"{c.case_id}.json", c, "fingerprint")]
    report = run_jobs(_fingerprint_job, todo, (ds, out, n_samples, orientation), num_workers, "fingerprint", quiet)
    report.skipped += [c.case_id for c in mine if c not in todo]
    return report


def plan_dataset(out: str | Path, gpu_memory_gb: float | None = None, image_interpolation: str = "cubic",
                 cache_dtype: str = "float32", target_spacing=None, ct_window=None, planner: str = "default",
                 from_plans: str | Path | None = None, own_intensities: bool = False) -> dict:
    """Merge the per-case fingerprints into ``fingerprint.json`` and write ``plans.json``
    (``planner``: nnU-Net's default planner or a ResEnc preset; ``gpu_memory_gb`` None: its own
    memory target). ``from_plans``: another dataset's plans.json transferred to this one
    (:func:`medvol.preprocessing.planning.transfer_plans`) instead of planning."""
    out = Path(out)
    desc = cache_description(out)
    fp_dir = out / "fingerprints"
    failed = sorted(p.name[: -len(".failed.txt")] for p in fp_dir.glob("*.failed.txt")) if fp_dir.is_dir() else []
    cases = [c for c in desc["training_cases"] if c not in failed]
    if not cases:
        raise CacheError(f"{out}: no valid training case to plan from (failed: {', '.join(failed) or 'none'})")
    fp = merge_fingerprints(fp_dir, cases, len(desc["channel_names"]))
    check_dimensionality(fp, desc.get("raw_root", out))
    fp["failed_cases"] = failed
    warn_mixed_coarse_axes(fp)
    if from_plans is not None:
        plans = _transferred_plans(Path(from_plans), fp, desc, own_intensities)
    else:
        plans = plan_experiment(fp, desc, gpu_memory_gb, image_interpolation, cache_dtype, target_spacing, ct_window,
                                planner)
    plans["orientation"] = desc.get("orientation", "stored")
    _log_lowres(plans)
    write_json(out / "fingerprint.json", fp)
    old = out / "plans.json"
    if not old.exists() or read_json(old) != plans:
        write_json(old, plans)
    return plans


def _transferred_plans(path: Path, fp: dict, desc: dict, own_intensities: bool) -> dict:
    source = read_input_json(path, "--from-plans takes the plans.json of another preprocessing cache")
    missing = [k for k in ("target_spacing", "patch_size", "network", "normalization")
               if not isinstance(source, dict) or k not in source]
    if missing:
        raise InputError(path, f"not a medvol plans.json (no {', '.join(missing) or 'mapping'})")
    return transfer_plans(source, fp, desc, str(path.resolve()), own_intensities)


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
    mine = [c for c in select_shard(ds.training, parse_shard(shard)) if c.case_id not in failed]
    clean_partial(out, [c.case_id for c in mine])
    todo = [c for c in mine if not case_is_complete(out, c.case_id, digest)
            or _sources_changed(case_paths(out, c.case_id)[2], c, "preprocessing")]
    report = run_jobs(_preprocess_job, todo, (ds, out, plans, digest), num_workers, "preprocess", quiet)
    report.skipped += [c.case_id for c in mine if c not in todo]
    return report


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
    lowres = prepare_lowres_cache(out)
    if lowres is not None:  # nnU-Net's 3d_lowres: the same cases at the lowres spacing, in a cache of their own
        report.failures.update({f"{LOWRES_DIR}/{c}": e for c, e in
                                preprocess_cases(raw, lowres, num_workers, shard, quiet).failures.items()})
    failures_file = out / "failures.json"
    if report.failures:
        write_json(failures_file, report.failures)
    elif failures_file.exists() and shard is None:
        failures_file.unlink()
    if shard is None and not report.failures:  # every case is cached: the cropped copies are spent
        shutil.rmtree(out / "staging", ignore_errors=True)
    return report


def _log_lowres(plans: dict) -> None:
    low = (plans.get("configurations") or {}).get(LOWRES)
    if low is not None:
        log.info("3d_lowres planned (the 3d_fullres patch holds < 25 %% of the median image): spacing %s mm, patch "
                 "%s, batch %d; cached in 3d_lowres/ (train quickstart_lowres, then quickstart_cascade)",
                 [round(float(s), 3) for s in low["spacing"]], low["patch_size"], low["batch_size"])


def prepare_lowres_cache(out: Path) -> Path | None:
    """``out/3d_lowres/`` ready for :func:`preprocess_cases` when the plan has a 3d_lowres
    configuration (None otherwise): the cache's ``dataset.json``, ``fingerprint.json`` and
    splits copied, and ``plans.json`` the lowres plan (:func:`medvol.plans.lowres_plans`), so
    the lowres cache is a cache like any other (its own plan digest: changed plans redo it)."""
    plans = load_plans(out)
    if LOWRES not in (plans.get("configurations") or {}):
        return None
    sub = Path(out) / LOWRES_DIR
    cache_folder(sub).claim(read_json(out / "dataset.json").get("training_cases", []))  # its own manifest
    for name in ("dataset.json", "fingerprint.json", SPLITS_FILE):
        if (out / name).exists() and (not (sub / name).exists() or read_json(sub / name) != read_json(out / name)):
            claim_files(sub, [name])
            write_json(sub / name, read_json(out / name))
    lp = lowres_plans(plans)
    if not (sub / "plans.json").exists() or read_json(sub / "plans.json") != lp:
        write_json(sub / "plans.json", lp)
    return sub
