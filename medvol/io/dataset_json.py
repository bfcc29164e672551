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


def _label_value(jpath: Path, name, value) -> int:
    """An integer, or (Decathlon keys) a string of one; 1.5, true or "one" are refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise InputError(jpath, f"label '{name}': value {value!r} is not an integer")


def parse_labels(jpath: Path, labels, is_v2: bool) -> dict[str, int]:
    """Label name -> value. As nnU-Net requires, the values are consecutive from 0
    (background): a gap would become an index error in training."""
    if not isinstance(labels, dict) or not labels:
        raise InputError(jpath, "'labels' must be a non-empty mapping")
    out = {}
    for k, v in labels.items():
        if is_v2:
            if isinstance(v, (list, tuple)):
                raise InputError(jpath, f"label '{k}' is a region {v}: region-based training is not supported")
            if k == "ignore":  # nnU-Net leaves these voxels out of the loss; medvol would train them as a class
                raise InputError(jpath, "label 'ignore' (nnU-Net's ignore label for unannotated voxels) is not "
                                        "supported: medvol would learn it as a class")
            name, value = str(k), v
        else:  # Decathlon: "0": "background"
            if not isinstance(v, str):
                raise InputError(jpath, f"'labels' maps values to names (e.g. {{\"1\": \"tumour\"}}), got {k!r}: {v!r}")
            name, value = v, k
        out[name] = _label_value(jpath, k, value)
    if 0 not in out.values():
        raise InputError(jpath, "labels must declare background as 0")
    values = sorted(out.values())
    if values != list(range(len(values))):
        raise InputError(jpath, f"label values must be consecutive from 0 (0, 1, 2, ...) as nnU-Net requires, "
                                f"got {values}")
    return out


def dataset_labels(root: Path) -> dict[str, int] | None:
    """The label names of the nnU-Net/Decathlon dataset folder ``root``: None when it has no
    ``dataset.json`` or that file does not declare valid labels."""
    jpath = root / DATASET_JSON
    if not jpath.is_file():
        return None
    try:
        meta = read_dataset_json(jpath)
        return parse_labels(jpath, meta.get("labels"), is_nnunet_v2(meta))
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
