"""Resampling to a target spacing with nnU-Net's rules, computed with torch.

nnU-Net resamples images with cubic splines (order 3) and labels with per-label linear
interpolation, and when the current or target spacing is anisotropic (max/min > 3) it
resamples in-plane with that order and along the coarse axis with nearest neighbour (the
"separate z" rule). medvol keeps those rules and the same sampling grid (voxel centres at
half-pixel offsets, edge clamping). Images: ``order="cubic"`` (the default) is nnU-Net's
own interpolant (scikit-image's cubic spline, computed separably: scipy's prefilter and a
banded B-spline matrix product per axis, equal to skimage within ~1e-6 of the range); ``order="linear"`` is
torch trilinear, several times faster, but on coarse scans with sharp edges it agrees
with cubic only at Pearson r ~ 0.98-0.996 (measured on the demo data, see
benchmarks/RESULTS.md), so it is an opt-in. Labels: one-hot linear + argmax in torch, ties
to the nearest voxel's label, as nnU-Net's resize_segmentation does (batchgenerators >= 0.25.4;
older versions kept each label whose mask reached 0.5, in ascending order): the round trip
cache -> ``restore_geometry`` keeps the same per-class Dice as nnU-Net's preprocess -> revert
(benchmarks/label_roundtrip.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

ANISO_THRESHOLD = 3.0
LABEL_CHUNK = 4  # labels interpolated together in one call (memory vs speed; float64 one-hot)
TIE_TOLERANCE = 1e-9  # label scores this close count as tied (see _label_argmax)


def compute_new_shape(old_shape: Sequence[int], old_spacing: Sequence[float] | np.ndarray,
                      new_spacing: Sequence[float] | np.ndarray) -> tuple[int, ...]:
    """nnU-Net's rule: round(old_spacing / new_spacing * old_shape) per axis."""
    return tuple(int(round(float(s) / float(t) * int(n))) for n, s, t in zip(old_shape, old_spacing, new_spacing))


def _is_aniso(spacing: Sequence[float], threshold: float = ANISO_THRESHOLD) -> bool:
    return max(spacing) / min(spacing) > threshold


def separate_z_axis(current_spacing: Sequence[float], new_spacing: Sequence[float],
                    threshold: float = ANISO_THRESHOLD) -> int | None:
    """The axis to resample with nearest neighbour, or None (nnU-Net's rule).

    Checked on the current spacing first, then on the target; only when exactly one axis
    has the largest spacing (two equally coarse axes, e.g. 0.24 x 1.25 x 1.25, do not count).
    """
    for spacing in (current_spacing, new_spacing):
        if _is_aniso(spacing, threshold):
            s = np.asarray(spacing, float)
            axes = np.flatnonzero(s.max() / s == 1)
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _nearest_indices(n_in: int, n_out: int) -> torch.Tensor:
    # scipy.ndimage.map_coordinates(order=0, mode="nearest") at nnU-Net's coordinates
    # scale * (i + 0.5) - 0.5, rounded half up.
    coords = (n_in / n_out) * (np.arange(n_out) + 0.5) - 0.5
    return torch.from_numpy(np.clip(np.floor(coords + 0.5), 0, n_in - 1).astype(np.int64))


def _interp(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear interpolation of ``x`` (N, C, *spatial) with half-pixel centres."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=tuple(int(s) for s in size), mode=mode, align_corners=False)


def _z_axis(separate_z: int | None | str, current_spacing: Sequence[float], new_spacing: Sequence[float]
            ) -> int | None:
    """``separate_z`` as given, or by nnU-Net's rule when it is ``"auto"``."""
    if isinstance(separate_z, str):
        if separate_z != "auto":
            raise ValueError(f"separate_z must be an axis, None or 'auto', got {separate_z!r}")
        return separate_z_axis(current_spacing, new_spacing)
    return separate_z


SPLINE_PAD = 12  # scipy.ndimage pads 'nearest'-mode input by 12 edge samples before its prefilter


def _bspline_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in + 2 pad) cubic B-spline weights at skimage/scipy's grid-mode coordinates
    (i + 0.5) n_in / n_out - 0.5, on coefficients of the edge-padded line: 4 taps a row."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5 + SPLINE_PAD
    first = np.floor(x)
    t = x - first
    taps = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], 1) / 6
    w = np.zeros((n_out, n_in + 2 * SPLINE_PAD))
    cols = np.clip(first.astype(np.int64)[:, None] - 1 + np.arange(4), 0, w.shape[1] - 1)
    np.add.at(w, (np.repeat(np.arange(n_out), 4), cols.ravel()), taps.ravel())
    return w


def _cubic_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Order-3 spline resize of one axis: scipy's prefilter of the edge-padded line, then the
    banded B-spline matrix applied along the axis as one float32 matrix product in torch."""
    from scipy.ndimage import spline_filter1d

    pad = [(0, 0)] * x.ndim
    pad[axis] = (SPLINE_PAD, SPLINE_PAD)
    coef = spline_filter1d(np.pad(x, pad, mode="edge"), 3, axis=axis, mode="nearest", output=np.float32)
    w = torch.from_numpy(_bspline_matrix(x.shape[axis], n_out).astype(np.float32))
    with torch.no_grad():
        out = torch.from_numpy(coef).movedim(axis, -1) @ w.T
    return out.movedim(-1, axis).contiguous().numpy()


def _cubic(x: np.ndarray, size: Sequence[int], slice_axis: int | None = None) -> np.ndarray:
    """What ``skimage.transform.resize(x, size, order=3, mode="edge", anti_aliasing=False)``
    computes (nnU-Net's image interpolant), separably: one axis at a time, then the output
    clipped to the input's range. With ``slice_axis``, each slice along it is resized in-plane
    on its own (that axis keeps its size) and clipped to its own range, as nnU-Net's per-slice
    calls do. Equal to skimage within ~1e-6 of the intensity range (tests/test_resampling.py)."""
    out = np.asarray(x, np.float32)
    for axis, n in enumerate(size):
        if axis != slice_axis and out.shape[axis] != n:
            out = _cubic_axis(out, axis, int(n))
    keep = (slice_axis,) if slice_axis is not None else ()
    other = tuple(a for a in range(x.ndim) if a not in keep)
    return np.clip(out, x.min(axis=other, keepdims=True), x.max(axis=other, keepdims=True), out=out)


def resample_image(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                   new_spacing: Sequence[float], order: str = "cubic",
                   separate_z: int | None | str = "auto") -> np.ndarray:
    """Resample an image ``(C, X, Y, Z)`` to ``new_shape``; returns float32."""
    new_shape = tuple(int(s) for s in new_shape)
    data = np.asarray(data, dtype=np.float32)
    if data.shape[1:] == new_shape:
        return data
    axis = _z_axis(separate_z, current_spacing, new_spacing)
    if order == "cubic":
        return _resample_cubic(data, new_shape, axis)
    if order != "linear":
        raise ValueError(f"order must be 'linear' or 'cubic', got {order!r}")
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(data))
        if axis is None:
            return _interp(t[None], new_shape)[0].numpy()
        return _separate_z(t, new_shape, axis, lambda x, size: _interp(x, size)).numpy()


def _separate_z(t: torch.Tensor, new_shape: tuple[int, ...], axis: int, inplane) -> torch.Tensor:
    """In-plane ``inplane`` per slice along ``axis``, then nearest neighbour along it."""
    c = t.shape[0]
    moved = t.movedim(axis + 1, 1)  # (C, S, P, Q)
    s = moved.shape[1]
    plane = [new_shape[a] for a in range(3) if a != axis]
    flat = moved.reshape(c * s, 1, *moved.shape[2:])
    out = inplane(flat, plane).reshape(c, s, *plane)
    if s != new_shape[axis]:
        out = out.index_select(1, _nearest_indices(s, new_shape[axis]))
    return out.movedim(1, axis + 1).contiguous()


def _resample_cubic(data: np.ndarray, new_shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if axis is None:
        return np.stack([_cubic(ch, new_shape) for ch in data])
    plane_shape = tuple(data.shape[1 + a] if a == axis else new_shape[a] for a in range(3))
    idx = _nearest_indices(data.shape[1 + axis], new_shape[axis]).numpy()
    return np.ascontiguousarray(np.stack([np.take(_cubic(ch, plane_shape, axis), idx, axis=axis) for ch in data]))


def _nearest_labels(seg: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``seg`` (N, 1, *spatial) at nnU-Net's order-0 coordinates."""
    for d, n in enumerate(size):
        seg = seg.index_select(2 + d, _nearest_indices(seg.shape[2 + d], int(n)))
    return seg


def _label_argmax(seg: torch.Tensor, labels: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """Argmax over labels of linearly interpolated one-hot masks; seg is (N, 1, *spatial).

    Ties go to the nearest neighbour's label when it is among the tied ones (nnU-Net's rule,
    batchgenerators >= 0.25.4), else to the lowest label. Sample points fall midway between
    voxels wherever the size ratio reduces to an even numerator (2x, 4/3, 42/37, ...); there a
    plain argmax gives every tie to the lower label and erodes the higher labels' structures
    (a 1 mm brain through 2 mm lost 4 % of its white matter). The masks are interpolated in
    float64 so that a tie is one to ~1e-13 (``TIE_TOLERANCE``): in float32, torch's coordinates
    put ties up to ~3e-5 apart, as far apart as genuine near-ties, which keep their argmax."""
    nearest = _nearest_labels(seg, size)
    near_score = torch.zeros(())  # the score of each output voxel's nearest-neighbour label
    best: torch.Tensor | None = None
    out = seg
    for start in range(0, len(labels), LABEL_CHUNK):
        chunk = torch.as_tensor(labels[start:start + LABEL_CHUNK], dtype=seg.dtype)
        onehot = (seg == chunk.view(1, -1, *([1] * (seg.ndim - 2)))).double()
        probs = _interp(onehot, size)
        for j, c in enumerate(chunk):
            near_score = torch.where(nearest == c, probs[:, j:j + 1], near_score)
        val, arg = probs.max(dim=1, keepdim=True)
        lab = chunk[arg]
        if best is None:
            best, out = val, lab
        else:
            better = val > best
            best = torch.where(better, val, best)
            out = torch.where(better, lab, out)
    assert best is not None
    return torch.where(near_score >= best - TIE_TOLERANCE, nearest, out)


def resample_label(seg: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                   new_spacing: Sequence[float], separate_z: int | None | str = "auto") -> np.ndarray:
    """Resample a label map ``(1, X, Y, Z)`` (may hold -1) by one-hot linear + argmax."""
    new_shape = tuple(int(s) for s in new_shape)
    if seg.shape[1:] == new_shape:
        return np.asarray(seg, dtype=np.int16)
    axis = _z_axis(separate_z, current_spacing, new_spacing)
    labels = np.unique(seg)
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(seg, dtype=np.int16))
        if len(labels) == 1:
            return np.full((1,) + new_shape, labels[0], dtype=np.int16)
        if axis is None:
            out = _label_argmax(t[None], labels, new_shape)[0]
        else:
            out = _separate_z(t, new_shape, axis, lambda x, size: _label_argmax(x, labels, size))
    return out.numpy().astype(np.int16)


def resample_probabilities(probs: np.ndarray | torch.Tensor, new_shape: Sequence[int],
                           current_spacing: Sequence[float], new_spacing: Sequence[float],
                           separate_z: int | None | str = "auto") -> torch.Tensor:
    """Resample class probabilities / logits ``(C, X, Y, Z)`` linearly (separate z aware)."""
    t = torch.as_tensor(probs)
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(t.shape[1:]) == new_shape:
        return t
    axis = _z_axis(separate_z, current_spacing, new_spacing)
    dtype = t.dtype
    t = t.float()
    with torch.no_grad():
        if axis is None:
            out = _interp(t[None], new_shape)[0]
        else:
            out = _separate_z(t, new_shape, axis, lambda x, size: _interp(x, size))
    return out.to(dtype)
