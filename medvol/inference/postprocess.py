"""From probabilities to label maps, and the clean-ups applied to them.

``to_labels`` (any segmentation model's probabilities -> labels: ``argmax_labels`` of class
probabilities, ``region_labels`` of nnU-Net's regions), ``task_labels`` (a DoDNet task's organ and
tumour sigmoid channels -> 0 background, 1 organ, 2 tumour), ``largest_component`` (per
label), ``keep_largest_components`` (of a mask) and DoDNet's rules (``dodnet_postprocess``).
Label maps are ``(X, Y, Z)``; probabilities ``(C, X, Y, Z)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from medvol.labels import LabelScheme

_FULL_CONNECTIVITY = np.ones((3, 3, 3))  # 26-connected components


def argmax_labels(probs: np.ndarray, slab: int = 8) -> np.ndarray:
    """argmax over classes of ``probs (C, X, Y, Z)`` into a uint8 (int16 past 255 classes)
    label map, slab by slab: a whole-volume argmax would allocate an int64 volume."""
    out = np.empty(probs.shape[1:], np.uint8 if probs.shape[0] < 256 else np.int16)
    for z in range(0, probs.shape[-1], slab):
        out[..., z:z + slab] = probs[..., z:z + slab].argmax(0)
    return out


def region_labels(probs: np.ndarray, class_order: Sequence[int], slab: int = 8) -> np.ndarray:
    """nnU-Net's regions back to a label map: ``class_order[i]`` placed wherever region i's
    probability ``probs[i]`` exceeds 0.5, in order, so later regions overwrite earlier ones
    (an encompassing region first, its substructures after). uint8 (int16 past 255)."""
    out = np.zeros(probs.shape[1:], np.uint8 if max(class_order, default=0) < 256 else np.int16)
    for z in range(0, probs.shape[-1], slab):
        view = out[..., z:z + slab]
        for i, value in enumerate(class_order):
            view[probs[i, ..., z:z + slab] > 0.5] = value
    return out


def to_labels(probs: np.ndarray, labels: LabelScheme) -> np.ndarray:
    """The one conversion of a segmentation model's probabilities ``(C, X, Y, Z)`` into a
    label map, for both of nnU-Net's label modes: the class argmax, or the regions placed in
    ``regions_class_order`` (:func:`region_labels`)."""
    if labels.regions_class_order is not None:
        return region_labels(probs, labels.regions_class_order)
    return argmax_labels(probs)


def task_labels(probs: np.ndarray, threshold: float = 0.5, annotated: tuple[bool, bool] = (True, True)
                ) -> np.ndarray:
    """A task's organ/tumour sigmoid probabilities ``(2, X, Y, Z)`` -> 0 background, 1 organ,
    2 tumour (tumour wins where both pass the threshold). A channel the task's dataset does not
    annotate (``annotated``: organ, tumour; colon and lung have no organ, spleen no tumour) is
    never written: the model was never taught it for this task."""
    seg = np.zeros(probs.shape[1:], np.uint8)
    if annotated[0]:
        seg[probs[0] > threshold] = 1
    if annotated[1]:
        seg[probs[1] > threshold] = 2
    return seg


def keep_largest_components(mask: np.ndarray, k: int = 1) -> np.ndarray:
    """The ``k`` largest 26-connected components of ``mask``."""
    comp, n = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
    if n <= k:
        return mask.astype(bool)
    sizes = np.bincount(comp.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:k] + 1
    return np.isin(comp, keep)


def largest_component(seg: np.ndarray) -> np.ndarray:
    """Keep, for each foreground label, only its largest 26-connected component."""
    out = np.zeros_like(seg)
    for c in np.unique(seg):
        if c != 0:
            out[keep_largest_components(seg == c, 1)] = c
    return out


SOLID_ORGAN_COMPONENTS = {"liver": 1, "kidney": 2, "pancreas": 1, "spleen": 1}


def dodnet_postprocess(seg: np.ndarray, task_name: str, min_tumour_voxels: int = 50,
                       organ_annotated: bool = True) -> np.ndarray:
    """DoDNet's post-processing of one task's map (0 bg, 1 organ, 2 tumour): for a solid organ
    its largest component(s) (two for kidney; never for branching structures such as hepatic
    vessels, whose branches are separate components); tumour components of <=
    ``min_tumour_voxels`` voxels removed, and, only when the task annotates the organ, those not
    touching it (a colon tumour is never judged by an organ channel the task does not have)."""
    out = np.zeros_like(seg)
    organ = None
    if organ_annotated and (seg == 1).any():
        k = SOLID_ORGAN_COMPONENTS.get(task_name)
        organ = keep_largest_components(seg > 0, k) if k else seg > 0  # the organ with its tumours
        out[organ] = 1
    comp, n = ndimage.label(seg == 2, structure=_FULL_CONNECTIVITY)
    sizes = np.bincount(comp.ravel())
    for c in range(1, n + 1):
        region = comp == c
        if sizes[c] > min_tumour_voxels and (organ is None or (region & organ).any()):
            out[region] = 2
    return out


# --------------------------------------------------------------------------- nnU-Net's post-processing
# ``medvol best`` decides it on the cross-validation predictions (medvol.evaluation.best) and writes
# it to postprocessing.json; ``medvol predict --postprocessing FILE`` applies it.
POSTPROCESSING_FORMAT = "medvol-postprocessing-1"


def keep_largest_region(seg: np.ndarray, labels) -> np.ndarray:
    """nnU-Net's "remove all but the largest component" of the region made of ``labels``
    (one label value or several): voxels of those labels outside the largest 26-connected
    component of their union become background; every other voxel is kept. A copy."""
    mask = np.isin(seg, np.atleast_1d(np.asarray(labels, dtype=np.int64)))
    out = seg.copy()
    out[mask & ~keep_largest_components(mask, 1)] = 0
    return out


def apply_postprocessing(seg: np.ndarray, steps: list[list[int]]) -> np.ndarray:
    """:func:`keep_largest_region` of each step's labels, in order (nnU-Net applies its
    post-processing functions one after the other, each on the previous one's output)."""
    for labels in steps:
        seg = keep_largest_region(seg, labels)
    return seg


def read_postprocessing(path, labels: dict[str, int] | None = None) -> list[list[int]]:
    """The steps of a ``postprocessing.json`` written by ``medvol best``, checked: one
    :class:`medvol.errors.InputError` naming the file when it is not such a file or when its
    dataset's labels differ from ``labels`` (the model's, name -> value)."""
    from medvol.errors import InputError
    from medvol.utils import read_input_json

    doc = read_input_json(path, "no post-processing file here (medvol best -o OUT writes OUT/postprocessing.json)")
    if not isinstance(doc, dict) or doc.get("format") != POSTPROCESSING_FORMAT:
        raise InputError(path, f"not a post-processing file of medvol best (format {POSTPROCESSING_FORMAT} expected)")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("labels"), list)
                                              and all(isinstance(v, int) and v > 0 for v in s["labels"])
                                              for s in steps):
        raise InputError(path, "'steps' must be a list of {\"labels\": [positive label values]}")
    if labels is not None and doc.get("labels") != dict(labels):
        raise InputError(path, f"decided for the labels {doc.get('labels')}, but the model predicts {dict(labels)}: "
                               "post-processing is decided per dataset (run medvol best on this model's folds)")
    return [list(s["labels"]) for s in steps]


def postprocessing_from_file(path, labels: dict[str, int] | None = None):
    """The label-map post-processing of a ``postprocessing.json`` (for ``predict(postprocess=...)``)."""
    steps = read_postprocessing(path, labels)

    def postprocess(seg: np.ndarray) -> np.ndarray:
        return apply_postprocessing(seg, steps)

    return postprocess
