"""2D training samples sliced from the 3D preprocessing cache (the plan's ``2d`` configuration).

The 3d_fullres cache is used as it is. nnU-Net's 2d configuration resamples each case
in-plane only and keeps its own spacing between slices; here the cached arrays are resampled
along the slice axis too (to the 3d target spacing). The in-plane grid is the same, so 2D
patches are the same pixels wherever a case's own slice spacing equals the target (the common
case: the median), and otherwise slices are interpolated between the acquired ones.

A sample is a ``(C * (2k + 1), H, W)`` image and a ``(1, H, W)`` label, ``(H, W)`` the two
other axes in X, Y, Z order (as :class:`medvol.networks.slice_adapter.SliceAdapter` sees
them). With ``context=k`` the slice's k neighbours on each side come along as channels, lowest
slice first, each with all C channels; at the ends the first/last slice repeats, as the
adapter does at inference. The label is the centre slice's.

Foreground oversampling follows nnU-Net's 2D loader: a class present in the case, a stored
voxel of that class, its slice, and the patch centred on that voxel; a random sample takes a
uniform slice and a uniform in-plane position. Both are :func:`choose_patch_start` on the
3D case with a patch one slice thick. Everything else (streams, ``(seed, step, slot)``
purity, augmentation, pass-through keys) is :class:`PatchDataset`'s.

Classification labels (``slice_labels.csv``, :mod:`medvol.io.slice_labels`) index the raw
scan's slices; a cached slice takes the class of the raw slice nearest its centre
(:func:`raw_slice_of`: crop undone, resampling grid inverted). Samples of the unlabelled
stream get class -1, so a semi-supervised trainer never sees their labels.

Grade oversampling (``oversample_grades``, for graded slices): the first
``round(n_labelled * oversample_grades)`` labelled slots of each batch draw a grade uniformly
among those of the labelled cases' slices, then a labelled case holding slices of that grade,
then one of those slices (uniform in-plane position): class-balanced sampling, the
classification counterpart of foreground oversampling, for the common case where most slices
hold no finding. The other slots are drawn as above.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medvol.cache import case_paths, list_cases
from medvol.data.dataset import PatchDataset, Streams
from medvol.data.sampling import choose_patch_start, extract_patch
from medvol.errors import CacheError
from medvol.io.slice_labels import SLICE_LABELS_FILE, SliceLabels, read_slice_labels
from medvol.utils import read_json


def slice_config(plans: dict) -> dict:
    """The plan's ``2d`` configuration (``slice_axis``, ``patch_size``, ``batch_size``...)."""
    try:
        return plans["configurations"]["2d"]
    except (KeyError, TypeError):
        raise CacheError("plans.json: no 2d configuration (planned by an older medvol); rerun `medvol plan` "
                         "(the cached cases stay valid)") from None


def _with_axis(values: Sequence[int] | np.ndarray, axis: int, value: int) -> np.ndarray:
    """In-plane ``values`` with ``value`` inserted at the slice ``axis``."""
    return np.insert(np.asarray(values, dtype=np.int64), axis, value)


def choose_slice(shape: Sequence[int], axis: int, patch: Sequence[int], rng: np.random.Generator,
                 class_locations: dict | None = None, force_fg: bool = False) -> tuple[int, np.ndarray]:
    """``(slice index, in-plane start)`` of a 2D patch of ``shape`` (X, Y, Z) cut across ``axis``."""
    start, _ = choose_patch_start(shape, _with_axis(patch, axis, 1), rng, class_locations, force_fg)
    return int(start[axis]), np.delete(start, axis)


def extract_slices(array: np.ndarray, axis: int, index: int, start: Sequence[int] | np.ndarray, patch: Sequence[int],
                   context: int, pad_value: float) -> np.ndarray:
    """Slice ``index`` of ``array`` ``(C, X, Y, Z)`` across ``axis`` with ``context`` neighbours
    on each side (ends repeat): ``(C * (2 * context + 1), *patch)``, lowest slice first."""
    n = array.shape[1 + axis]
    wanted = np.clip(np.arange(index - context, index + context + 1), 0, n - 1)
    lo, hi = int(wanted[0]), int(wanted[-1])
    block = extract_patch(array, _with_axis(start, axis, lo), _with_axis(patch, axis, hi - lo + 1), pad_value)
    block = np.moveaxis(block, 1 + axis, 0)[wanted - lo]  # (2k+1, C, H, W)
    return block.reshape(-1, *block.shape[2:])


def _check_raw_voxel_order(props: dict) -> None:
    """Raw slice indices mean something in the cache only when it kept the files' voxel order."""
    if props.get("orientation", "stored") != "stored":
        raise CacheError(f"case '{props.get('case_id')}': cached with --orientation {props['orientation']}, which "
                         "reorders the raw axes that slice labels index; preprocess slice-labelled data with the "
                         "default --orientation stored")


def raw_slice_of(props: dict, axis: int) -> np.ndarray:
    """For each cached slice across ``axis``, the raw scan's slice nearest its centre. The
    resampling grid puts cached slice j at cropped position (j + 0.5) * n_crop / n_cache - 0.5."""
    _check_raw_voxel_order(props)
    n_in, n_out = int(props["shape_after_crop"][axis]), int(props["shape_after_resampling"][axis])
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(np.floor(pos + 0.5), 0, n_in - 1).astype(np.int64) + int(props["crop_bbox"][axis][0])


def raw_slice_counts(cache_dir, axis: int) -> dict[str, int]:
    """``{case: slices of its raw scan across axis}``, what ``read_slice_labels`` checks against."""
    counts = {}
    for case in list_cases(cache_dir):
        props = read_json(case_paths(cache_dir, case)[2])
        _check_raw_voxel_order(props)
        counts[case] = int(props["original_shape"][axis])
    return counts


def cached_slice_grades(labels: SliceLabels, props: dict, axis: int) -> np.ndarray:
    """The class of every cached slice of a case across ``axis`` (-1: none): the class of the
    raw slice it came from (:func:`raw_slice_of`)."""
    per = labels.slices.get(props["case_id"], {})
    return np.array([per.get(int(r), -1) for r in raw_slice_of(props, axis)], np.int64)


def cached_slice_labels(cache_dir, axis: int) -> SliceLabels | None:
    """The cache's ``slice_labels.csv`` (copied there by preprocessing), checked, or None."""
    from pathlib import Path

    path = Path(cache_dir) / SLICE_LABELS_FILE
    return read_slice_labels(path, raw_slice_counts(cache_dir, axis)) if path.is_file() else None


class SliceDataset(PatchDataset):
    """2D patches across ``slice_axis`` (0, 1 or 2 of X, Y, Z), indexed like :class:`PatchDataset`."""

    def __init__(self, cache_dir, streams: Streams, patch_size: Sequence[int], slice_axis: int,
                 oversample: float = 0.33, augment=None, seed: int = 0, context: int = 0,
                 slice_labels: SliceLabels | None = None, oversample_grades: float = 0.0):
        if len(patch_size) != 2 or slice_axis not in (0, 1, 2) or context < 0:
            raise ValueError(f"SliceDataset: a 2D patch_size, slice_axis 0-2 and context >= 0 are needed, got "
                             f"{list(patch_size)}, {slice_axis}, {context}")
        super().__init__(cache_dir, streams, patch_size, oversample, augment, seed)
        self.slice_axis = int(slice_axis)
        self.context = int(context)
        self.slice_labels = slice_labels
        if oversample_grades and slice_labels is None:
            raise ValueError("SliceDataset: oversample_grades needs slice_labels (the grades to balance)")
        self.grade_slots = int(round(streams.labelled_slots() * oversample_grades))
        self._by_grade: dict[int, list[tuple[str, np.ndarray]]] | None = None  # per worker, built on first use

    @classmethod
    def from_plans(cls, cache_dir, plans: dict, streams: Streams, **kwargs) -> "SliceDataset":
        """With the plan's 2d patch size and slice axis."""
        cfg = slice_config(plans)
        return cls(cache_dir, streams, cfg["patch_size"], cfg["slice_axis"], **kwargs)

    def sample(self, step: int, slot: int, rng: np.random.Generator) -> dict:
        index = self.streams.labelled_index(slot)
        if index is not None and index < self.grade_slots:
            image, label, props, slice_index = self._draw_graded(rng)
            labelled_slot = True
            _, start = choose_slice(image.shape[1:], self.slice_axis, self.patch, rng)
        else:
            image, label, props, labelled_slot, force_fg = self._draw_case(rng, slot)
            slice_index, start = choose_slice(image.shape[1:], self.slice_axis, self.patch, rng,
                                              props.get("class_locations"), force_fg)
        return self._slice_sample(image, label, props, labelled_slot, slice_index, start, rng, slot)

    def _draw_graded(self, rng: np.random.Generator):
        """``(image, label, props, slice index)``: a grade uniformly among the labelled slices',
        a labelled case with slices of it, one of those slices (the module docstring)."""
        if self._by_grade is None:
            assert self.slice_labels is not None
            pool: dict[int, list[tuple[str, np.ndarray]]] = {}
            for case in self.streams.labelled:
                grades = cached_slice_grades(self.slice_labels, self._case(case)[2], self.slice_axis)
                for g in np.unique(grades[grades >= 0]):
                    pool.setdefault(int(g), []).append((case, np.flatnonzero(grades == g)))
            if not pool:
                raise CacheError(f"{self.cache_dir}: oversample_grades, but no labelled training slice has a grade")
            self._by_grade = pool
        holders = self._by_grade[sorted(self._by_grade)[int(rng.integers(len(self._by_grade)))]]
        case, slices = holders[int(rng.integers(len(holders)))]
        image, label, props = self._case(case)
        return image, label, props, int(slices[int(rng.integers(len(slices)))])

    def _slice_sample(self, image, label, props: dict, labelled_slot: bool, index: int, start: np.ndarray,
                      rng: np.random.Generator, slot: int) -> dict:
        """The sample of slice ``index`` at in-plane ``start``, with its classes when graded."""
        img = extract_slices(image, self.slice_axis, index, start, self.patch, self.context, 0.0)
        lab = None
        if label is not None and labelled_slot:
            lab = extract_slices(label, self.slice_axis, index, start, self.patch, 0, -1)
        out = self._finish(img, lab, rng, props, slot)
        out["slice_index"] = torch.tensor(index)
        if self.slice_labels is not None:
            out.update(self._classes(props, index, labelled_slot))
        return out

    def _classes(self, props: dict, index: int, labelled_slot: bool) -> dict:
        """``class`` of the slice and ``subject_class`` of its case (-1: none, or an unlabelled slot)."""
        case = props["case_id"]
        assert self.slice_labels is not None
        slice_class = self.slice_labels.slices.get(case, {}).get(int(raw_slice_of(props, self.slice_axis)[index]), -1)
        subject_class = self.slice_labels.subjects.get(case, -1)
        if not labelled_slot:
            slice_class = subject_class = -1
        return {"class": torch.tensor(slice_class), "subject_class": torch.tensor(subject_class)}


__all__ = ["SliceDataset", "cached_slice_grades", "cached_slice_labels", "choose_slice", "extract_slices",
           "raw_slice_counts", "raw_slice_of", "slice_config"]
