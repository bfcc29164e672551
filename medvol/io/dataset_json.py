"""A raw dataset's ``dataset.json``: the file read as one JSON object, its dialect and its labels.

Two dialects: nnU-Net v2 (``channel_names``, ``labels`` name -> value, ``file_ending``) and the
Medical Segmentation Decathlon (``modality``, ``labels`` value -> name). The raw layouts
(:mod:`medvol.preprocessing.raw`, which checks the rest of the file) and ``medvol evaluate``
(the class names of a reference folder) read it through these functions.
"""

from __future__ import annotations

import json
from pathlib import Path

from medvol.errors import InputError
from medvol.labels import IGNORE, LabelScheme

DATASET_JSON = "dataset.json"


def read_dataset_json(path: Path) -> dict:
    """The JSON object in ``path``; one InputError naming the file when it is not UTF-8 JSON
    holding an object."""
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise InputError(path, "must hold a JSON object")
    return meta


def is_nnunet_v2(meta: dict) -> bool:
    """nnU-Net v2's dialect (else the Decathlon's)."""
    return "channel_names" in meta or "file_ending" in meta


def parse_labels(jpath: Path, labels, is_v2: bool, regions_class_order=None) -> dict[str, int | list[int]]:
    """Label name -> value, checked by :class:`medvol.labels.LabelScheme` (values consecutive
    from 0, background 0, as nnU-Net requires: a gap would become an index error in training).
    nnU-Net v2's dialect may declare regions (lists of values, with ``regions_class_order``)
    and an ``ignore`` label (the highest value); the Decathlon's maps values to names."""
    if not isinstance(labels, dict) or not labels:
        raise InputError(jpath, "'labels' must be a non-empty mapping")
    if not is_v2:  # Decathlon: "0": "background"
        bad = next(((k, v) for k, v in labels.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise InputError(jpath, f"'labels' maps values to names (e.g. {{\"1\": \"tumour\"}}), "
                                    f"got {bad[0]!r}: {bad[1]!r}")
        labels = {v: k for k, v in labels.items()}
        if IGNORE in labels:
            raise InputError(jpath, "the ignore label needs nnU-Net v2's dataset.json ('labels': name -> value)")
    return LabelScheme.parse(jpath, labels, regions_class_order if is_v2 else None).as_json()


def dataset_labels(root: Path) -> dict[str, int | list[int]] | None:
    """The labels (name -> value, region or ignore label) of the nnU-Net/Decathlon dataset
    folder ``root``: None when it has no ``dataset.json`` or that file does not declare valid labels."""
    jpath = root / DATASET_JSON
    if not jpath.is_file():
        return None
    try:
        meta = read_dataset_json(jpath)
        return parse_labels(jpath, meta.get("labels"), is_nnunet_v2(meta), meta.get("regions_class_order"))
    except (InputError, OSError):
        return None


def parse_raters(jpath: Path, raters) -> list[str] | None:
    """``dataset.json``'s ``raters``: a list of at least two distinct names (None when absent)."""
    if raters is None:
        return None
    if not isinstance(raters, list) or len(raters) < 2 or not all(isinstance(r, str) and r for r in raters):
        raise InputError(jpath, f"'raters' must list at least two rater names, e.g. [\"A\", \"B\"], got {raters!r:.60}")
    if len(set(raters)) != len(raters):
        raise InputError(jpath, f"'raters' names a rater twice: {raters}")
    return list(raters)


def dataset_raters(root: Path) -> list[str] | None:
    """The rater names of the dataset folder ``root``'s ``dataset.json`` (None: none declared)."""
    jpath = root / DATASET_JSON
    return parse_raters(jpath, read_dataset_json(jpath).get("raters")) if jpath.is_file() else None
