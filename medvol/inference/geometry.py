"""Undo preprocessing: from the cache's (resampled, cropped) space back to the scan's own grid."""

from __future__ import annotations

import numpy as np
import torch

from medvol.io.orientation import undo_orientation
from medvol.resampling import probabilities_at, resample_probabilities


def restore_geometry(array: np.ndarray | torch.Tensor, properties: dict, fill: str | float = "background",
                     dtype=None) -> np.ndarray:
    """Map ``array (C, X, Y, Z)`` in preprocessed space back to ``(C, *original_shape)``.

    The exact inverse path of preprocessing: linear resampling from the target spacing back
    to the cropped region's shape (nearest neighbour along the coarse axis when the plan
    resampled that axis separately), then un-cropping into the original grid, and, when the
    plan reoriented the scans (``--orientation RAS``), the axes back to the file's order. Outside the
    crop box the result is ``fill``: "background" puts 1 in channel 0 and 0 elsewhere (for
    probabilities / one-hot maps), a number fills every channel with it.

    Channels are resampled one at a time into the output, so the peak memory is the output
    plus one float32 channel. A float16 output keeps the float32 argmax (see ``_settle_ties``).
    """
    c = array.shape[0]
    crop_shape = properties["shape_after_crop"]
    original = properties.get("oriented_shape", properties["original_shape"])  # the grid the crop box is in
    box = tuple(slice(a, b) for a, b in properties["crop_bbox"])
    dtype = dtype or (array.dtype if isinstance(array, np.ndarray) else torch.empty(0, dtype=array.dtype).numpy().dtype)
    out = np.zeros((c, *original), dtype=dtype)
    if fill == "background":
        if c > 1:
            out[0] = 1
    else:
        out[:] = fill
    same_grid = list(array.shape[1:]) == list(crop_shape)
    for ch in range(c):
        src = torch.as_tensor(np.asarray(array[ch:ch + 1]) if isinstance(array, np.ndarray) else array[ch:ch + 1])
        if same_grid:  # nothing to resample: copy straight across, no float32 temporary
            out[(ch,) + box] = src[0].numpy()
            continue
        res = resample_probabilities(src.float(), crop_shape, properties["target_spacing"],
                                     properties["original_spacing"], separate_z=properties.get("separate_z_axis"))
        out[(ch,) + box] = res[0].numpy().astype(dtype, copy=False)
    if fill == "background" and c > 1 and not same_grid and np.dtype(dtype) == np.float16:
        _settle_ties(out[(slice(None),) + box], array, properties)
    if properties.get("orientation", "stored") != "stored":  # back to the file's own voxel order
        out = undo_orientation(out, properties["original_affine"])
    return out


def _settle_ties(out: np.ndarray, array, properties: dict) -> None:
    """Where rounding to float16 made the top classes of ``out (C, *crop)`` equal, the float32
    winner gets one float16 step more, so that argmax(out) is the argmax of the float32
    resampling (nnU-Net's export: argmax of float32; an exact tie goes to the lower class).
    Without it, argmax gave every such near-tie (scores up to one float16 step apart, ~5e-4
    near 0.5) to the lower class, background first: the round trip of a small structure lost
    to nnU-Net's (tests/test_geometry_ties.py). Only the tied voxels are recomputed."""
    bits = out.view(np.int16)  # ordered as the values wherever the top one is >= 0 (probabilities)
    top = bits.max(0)
    count = np.zeros(top.shape, np.uint8)
    for ch in bits:
        count += ch == top
    at = np.nonzero(count > 1)
    if not at[0].size:
        return
    src = array.numpy() if not isinstance(array, np.ndarray) else array
    exact = probabilities_at(src, out.shape[1:], properties.get("separate_z_axis"), at)
    winner = exact.astype(np.float32).argmax(0)
    rounded = out[(slice(None),) + tuple(at)]
    moved = rounded.argmax(0) != winner
    out[(winner[moved],) + tuple(a[moved] for a in at)] = np.nextafter(rounded.max(0)[moved], np.inf,
                                                                       dtype=out.dtype)
