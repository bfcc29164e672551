"""The input of nnU-Net's cascade (``3d_cascade_fullres``): the low-resolution stage's label map on
the full-resolution grid, one-hot over the foreground labels, as extra image channels.

nnU-Net (``nnUNetTrainer`` with ``previous_stage``, its data loader and ``MoveSegAsOneHotToData``)
carries the previous stage's segmentation through the spatial augmentation as a second label
channel (nearest-neighbour, like the label), and only after the augmentation turns it into
one-hot channels (one per foreground label, background left out) appended to the image; the
intensity augmentation never sees them. :class:`CascadePatchDataset` does the same with medvol's
patches and MONAI transforms. nnU-Net's two extra augmentations of these channels (random
binary dilation/erosion, removal of random connected components) are not done here.

Where the label map comes from: in training, the low-res run's prediction of each cached case
(``RUN/previous_stage/<case>.npy``, written by :mod:`medvol.training.cascade`); at inference, the
low-res run's prediction of the scan, mapped onto the preprocessed grid by
:func:`to_preprocessed_grid` as nnU-Net's preprocessor does with ``-prev_stage_predictions``
(cropped with the scan's box, resampled as a label).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medvol.data.dataset import PatchDataset
from medvol.data.sampling import choose_patch_start, extract_patch
from medvol.errors import CacheError
from medvol.io.orientation import orient_channels
from medvol.resampling import resample_label

PREVIOUS_STAGE_DIR = "previous_stage"  # in a cascade run folder: the low-res label maps of the training cases


def onehot(seg: np.ndarray | torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """``(F, X, Y, Z)`` float32: channel i is 1 where ``seg`` (``(X, Y, Z)`` or ``(1, X, Y, Z)``)
    equals ``labels[i]``."""
    t = torch.as_tensor(np.asarray(seg) if not isinstance(seg, torch.Tensor) else seg)
    t = t[0] if t.dim() == 4 else t
    return torch.stack([(t == v) for v in labels]).float() if labels else t.new_zeros((0, *t.shape)).float()


def previous_stage_path(run_dir: str | Path, case_id: str) -> Path:
    return Path(run_dir) / PREVIOUS_STAGE_DIR / f"{case_id}.npy"


def load_previous_stage(run_dir: str | Path, case_id: str, shape: Sequence[int], mmap: bool = True) -> np.ndarray:
    """The low-res label map ``(1, X, Y, Z)`` of a cached case, checked against its cached shape."""
    path = previous_stage_path(run_dir, case_id)
    try:
        seg = np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as e:
        raise CacheError(f"{path}: missing or unreadable previous-stage prediction; rerun the training (it "
                         f"predicts the missing ones) ({e})") from None
    if list(seg.shape[1:]) != list(shape):
        raise CacheError(f"{path}: shape {list(seg.shape[1:])}, its cached case has {list(shape)}; delete it and "
                         "rerun the training (it predicts it again)")
    return seg


def to_preprocessed_grid(seg: np.ndarray, props: dict, orientation: str = "stored") -> np.ndarray:
    """A label map ``(X, Y, Z)`` on a scan's own grid moved onto that scan's preprocessed grid,
    as preprocessing moves the scan (``props`` of :func:`medvol.preprocessing.preprocess_case`):
    the plan's voxel order, the crop box, then label resampling to the target spacing.
    Returns ``(1, X', Y', Z')`` int16."""
    arr, _ = orient_channels(np.asarray(seg)[None], props["original_affine"], orientation)
    box = (slice(None),) + tuple(slice(int(a), int(b)) for a, b in props["crop_bbox"])
    return resample_label(arr[box], props["shape_after_resampling"], props["original_spacing"],
                          props["target_spacing"])


class CascadePatchDataset(PatchDataset):
    """:class:`PatchDataset` whose images carry the previous stage's one-hot channels: the
    low-res label map of the case (``run_dir/previous_stage/<case>.npy``) is cut with the same
    patch (outside the case: background), augmented spatially as a second label channel and
    then appended to the image as one channel per foreground label."""

    def __init__(self, cache_dir, streams, patch_size, run_dir: str | Path, labels: Sequence[int],
                 oversample: float = 0.33, augment=None, seed: int = 0):
        super().__init__(cache_dir, streams, patch_size, oversample, augment, seed)
        self.run_dir, self.labels = str(run_dir), [int(v) for v in labels]
        self._previous: dict[str, np.ndarray] = {}

    def _previous_map(self, case_id: str, shape) -> np.ndarray:
        if case_id not in self._previous:
            self._previous[case_id] = load_previous_stage(self.run_dir, case_id, shape)
        return self._previous[case_id]

    def sample(self, step: int, slot: int, rng: np.random.Generator) -> dict:
        image, label, props, labelled_slot, force_fg = self._draw_case(rng, slot)
        if label is None or not labelled_slot:
            raise CacheError(f"{self.cache_dir}: case {props.get('case_id')} has no label; the cascade trains on "
                             "labelled cases only")
        start, _ = choose_patch_start(image.shape[1:], self.patch, rng, props.get("class_locations"), force_fg)
        img = extract_patch(image, start, self.patch, 0.0)
        lab = extract_patch(label, start, self.patch, -1).astype(np.int16)
        prev = extract_patch(self._previous_map(props["case_id"], image.shape[1:]), start, self.patch, 0)
        out = self._finish(img, np.concatenate([lab, prev.astype(np.int16)]), rng, props, slot)
        out["image"] = torch.cat([out["image"], onehot(out["label"][1], self.labels)])
        out["label"] = out["label"][:1]
        return out
