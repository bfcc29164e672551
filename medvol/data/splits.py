"""Cross-validation folds as nnU-Net v2 keeps them: ``PRE/splits_final.json``.

The file is a list of ``{"train": [...], "val": [...]}``, one entry per fold. An existing one
(medvol's, or copied from an nnU-Net preprocessed folder) is used as it is; when absent,
medvol writes the split nnU-Net v2 would generate for the same cases: 5-fold KFold with
shuffling, seed 12345, over the sorted case identifiers (``generate_crossval_split``; the
shuffle is numpy's ``RandomState(12345).shuffle`` as in scikit-learn's ``KFold``, the first
``n % 5`` folds one case larger, both lists in sorted order). Fold ``"all"`` trains on every
case and validates on them too, as nnU-Net's ``fold all``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medvol.cache import SPLITS_FILE, check_splits
from medvol.errors import ConfigError, InputError
from medvol.utils import read_json, write_json

log = logging.getLogger(__name__)

NNUNET_SPLIT_SEED = 12345


def nnunet_splits(case_ids: list[str], n_splits: int = 5, seed: int = NNUNET_SPLIT_SEED) -> list[dict]:
    """nnU-Net v2's ``generate_crossval_split`` of ``case_ids`` (sorted first)."""
    ids = sorted(case_ids)
    if len(ids) < n_splits:
        raise ConfigError(f"{n_splits}-fold cross-validation needs at least {n_splits} cases, got {len(ids)}")
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, len(ids) // n_splits)
    sizes[: len(ids) % n_splits] += 1
    splits, start = [], 0
    for size in sizes:
        val = set(order[start:start + size].tolist())
        start += size
        splits.append({"train": [c for i, c in enumerate(ids) if i not in val],
                       "val": [c for i, c in enumerate(ids) if i in val]})
    return splits


def load_splits(cache_dir: str | Path, case_ids: list[str]) -> list[dict]:
    """The cache's ``splits_final.json``, written with nnU-Net's rule when absent."""
    path = Path(cache_dir) / SPLITS_FILE
    if not path.exists():
        from medvol.manifest import claim_files

        splits = nnunet_splits(case_ids)
        claim_files(path.parent, [SPLITS_FILE])
        write_json(path, splits)
        log.info("wrote %s (nnU-Net's 5-fold split, seed %d)", path, NNUNET_SPLIT_SEED)
        return splits
    try:
        splits = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(path, f"invalid JSON ({e})") from None
    check_splits(splits, path, case_ids, "cache")
    return splits


def fold_cases(cache_dir: str | Path, case_ids: list[str], fold: int | str) -> tuple[list[str], list[str]]:
    """(train, val) case ids of ``fold`` (an index into the splits, or ``"all"``)."""
    if str(fold) == "all":
        return list(case_ids), list(case_ids)
    splits = load_splits(cache_dir, case_ids)
    k = int(fold)
    if not 0 <= k < len(splits):
        raise ConfigError(f"--fold {fold}: {Path(cache_dir) / SPLITS_FILE} holds folds 0..{len(splits) - 1}")
    if not splits[k]["train"]:
        raise InputError(Path(cache_dir) / SPLITS_FILE, f"fold {k}: no training case ('train' is empty)")
    return list(splits[k]["train"]), list(splits[k]["val"])
