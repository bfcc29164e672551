"""What a preprocessing run writes into its cache folder besides the cases' arrays: the folder
and its manifest, the cache's ``dataset.json``, and the
``slice_labels.csv`` and ``splits_final.json`` copied from beside the raw dataset. The format
itself (paths, versions, completeness) is :mod:`medvol.cache`'s.
"""

from __future__ import annotations

from pathlib import Path

from medvol.cache import case_paths, load_plans
from medvol.errors import CacheError, InputError
from medvol.manifest import MANIFEST, OutputFolder, refuse_overlap
from medvol.preprocessing.raw import RawDataset
from medvol.utils import read_json, write_json

CACHE_ENTRIES = ("cases", "fingerprints", "staging", "dataset.json", "fingerprint.json", "plans.json", "failures.json",
                 "slice_labels.csv", "3d_lowres")


def cache_folder(out: Path) -> OutputFolder:
    """The cache folder and its manifest: what preprocessing may write (and --overwrite remove)."""
    return OutputFolder(out, "preprocess", CACHE_ENTRIES)


def _is_legacy_cache(out: Path) -> bool:
    """A cache written before manifests existed: our dataset.json (it records raw_root)."""
    try:
        return "raw_root" in read_json(out / "dataset.json")
    except (OSError, ValueError):
        return False


def prepare_out(raw: RawDataset, out: Path, overwrite: bool, orientation: str = "stored") -> None:
    refuse_overlap(out, [raw.root])
    folder = cache_folder(out)
    if overwrite and out.exists():
        _clear_lowres(out)
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


def _clear_lowres(out: Path) -> None:
    """``--overwrite``: the 3d_lowres cache inside ``out`` (a cache with its own manifest) goes
    first, by the same rule (only what medvol wrote)."""
    sub = out / "3d_lowres"
    if sub.is_dir():
        cache_folder(sub).clear()
        (sub / MANIFEST).unlink(missing_ok=True)
        sub.rmdir()  # refuses (OSError) if anything is left: nothing is, clear() removed or refused


def cache_description(out: Path) -> dict:
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
    from medvol.cache import SPLITS_FILE, check_splits
    from medvol.manifest import claim_files

    src, dst = raw / SPLITS_FILE, out / SPLITS_FILE
    if src.is_file() and not dst.exists():
        try:
            splits = read_json(src)
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(src, f"invalid JSON ({e})") from None
        check_splits(splits, src, read_json(out / "dataset.json").get("training_cases", []), "dataset")
        claim_files(out, [SPLITS_FILE])
        write_json(dst, splits)
