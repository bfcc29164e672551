"""Resampling to a target spacing with nnU-Net's rules.

nnU-Net resamples images with cubic splines (order 3) and labels with per-label linear
interpolation, and when the current or target spacing is anisotropic (max/min > 3) it
resamples in-plane with that order and along the coarse axis with nearest neighbour (the
"separate z" rule). medvol keeps those rules and the same sampling grid (voxel centres at
half-pixel offsets, edge clamping). Images: ``order="cubic"`` (the default) is nnU-Net's
own interpolant (scikit-image's cubic spline, computed separably: scipy's prefilter and a
banded B-spline sparse matrix product per axis, equal to skimage within ~1e-6 of the range); ``order="linear"`` is
torch trilinear, several times faster, but on coarse scans with sharp edges it agrees
with cubic only at Pearson r ~ 0.98-0.996 (measured on the demo data, see
benchmarks/RESULTS.md), so it is an opt-in. Labels: one-hot linear + argmax, ties
to the nearest voxel's label, as nnU-Net's resize_segmentation does (batchgenerators >= 0.25.4;
older versions kept each label whose mask reached 0.5, in ascending order): the round trip
cache -> ``restore_geometry`` keeps the same per-class Dice as nnU-Net's preprocess -> revert
(benchmarks/label_roundtrip.py). The label argmax is computed only where it can differ from
the nearest corner: output voxels whose 2x2x2 input neighbourhood holds one label take it.

Images (cubic) and labels need numpy and scipy only, so ``medvol preprocess`` and its workers
never import torch; linear images and probabilities (prediction) use torch trilinear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

ANISO_THRESHOLD = 3.0
LABEL_BLOCK = 1 << 18  # mixed-neighbourhood output voxels scored per block (~70 MB of corner arrays)
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


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    # scipy.ndimage.map_coordinates(order=0, mode="nearest") at nnU-Net's coordinates
    # scale * (i + 0.5) - 0.5, rounded half up.
    coords = (n_in / n_out) * (np.arange(n_out) + 0.5) - 0.5
    return np.clip(np.floor(coords + 0.5), 0, n_in - 1).astype(np.int64)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear sampling with half-pixel centres as torch's ``align_corners=False`` computes it:
    per output index the two input indices and the second one's weight."""
    if n_in == n_out:
        i = np.arange(n_out)
        return i, i, np.zeros(n_out)
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    return i0, np.where(i0 < n_in - 1, i0 + 1, i0), np.clip(src - i0, 0.0, 1.0)


def _interp(x: "torch.Tensor", size: Sequence[int]) -> "torch.Tensor":
    """Linear interpolation of ``x`` (N, C, *spatial) with half-pixel centres."""
    import torch.nn.functional as F

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
SPLINE_POLE = float(np.sqrt(3.0) - 2.0)  # the cubic B-spline prefilter's pole
SPLINE_GAIN = 6.0  # its gain, (1 - z)(1 - 1/z), applied through the tap weights
SLAB_BYTES = 32 << 20  # padded coefficients held at a time per axis pass


def _bspline_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline taps at skimage/scipy's grid-mode coordinates (i + 0.5) n_in / n_out - 0.5:
    per output sample, 4 indices into the line's coefficients (edge-padded by ``SPLINE_PAD``)
    and their weights."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5 + SPLINE_PAD
    first = np.floor(x)
    t = x - first
    weights = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], 1) / 6
    return first.astype(np.int64)[:, None] - 1 + np.arange(4), weights


def _edge_padded(x: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """``x`` with ``SPLINE_PAD`` edge samples added at both ends of axis 0, in float32, written
    into the flat buffer ``buf`` (reused slab after slab: fresh pages cost a fault each)."""
    n = x.shape[0]
    out = buf[:(n + 2 * SPLINE_PAD) * (x.size // max(n, 1))].reshape((n + 2 * SPLINE_PAD,) + x.shape[1:])
    out[:SPLINE_PAD] = x[:1]
    out[SPLINE_PAD:SPLINE_PAD + n] = x
    out[SPLINE_PAD + n:] = x[-1:]
    return out


def _prefilter(c: np.ndarray) -> None:
    """The cubic spline prefilter along axis 0 in place, without its gain: the causal and
    anticausal recursions of Unser's algorithm, as scipy's spline_filter1d runs them per line,
    here one vector operation over a slab per step (several times faster)."""
    z = SPLINE_POLE
    tmp = np.empty_like(c[0])
    c[0] /= 1 - z  # the edge-padded line continues as a constant
    for k in range(1, len(c)):
        np.multiply(c[k - 1], z, out=tmp)
        c[k] += tmp
    c[-1] *= z / (z - 1)  # damped by z^12 (~1e-7) before it reaches the data
    for k in range(len(c) - 2, -1, -1):
        np.subtract(c[k + 1], c[k], out=tmp)
        np.multiply(tmp, z, out=c[k])


def _apply_taps(c: np.ndarray, cols: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    """``out`` along axis 0 = the 4-tap weighted sums of the coefficients ``c``."""
    tmp = np.empty_like(out[0])
    w = weights.astype(np.float32)
    for j in range(len(cols)):
        np.multiply(c[cols[j, 0]], w[j, 0], out=out[j])
        for k in range(1, 4):
            np.multiply(c[cols[j, k]], w[j, k], out=tmp)
            out[j] += tmp


def _cubic_axis(x: np.ndarray, axis: int, n_out: int, out_buf: np.ndarray | None = None) -> np.ndarray:
    """Order-3 spline resize of one axis: scipy/skimage's prefilter of the edge-padded line,
    then the 4 B-spline taps per output sample, in float32, slab by slab across another axis
    (so the padded coefficients never cost a second copy of the volume). Each slab is worked
    with the resized axis leading (the last, contiguous axis is turned there at slab size).
    ``out_buf``: a flat float32 array to write the result into when it is large enough."""
    if x.ndim == 1:
        return _cubic_axis(x[:, None], 0, n_out)[:, 0]
    shape = list(x.shape)
    shape[axis] = n_out
    size = int(np.prod(shape))
    out = out_buf[:size].reshape(shape) if out_buf is not None and out_buf.size >= size else np.empty(shape, np.float32)
    cols, weights = _bspline_taps(x.shape[axis], n_out)
    weights = weights * SPLINE_GAIN
    across = 1 if axis == 0 else 0  # slabs are cut across this axis
    lines = x.size // x.shape[across] // x.shape[axis]  # lines along ``axis`` per index across
    padded = x.shape[axis] + 2 * SPLINE_PAD
    step = max(1, SLAB_BYTES // (4 * lines * padded))
    held = min(step, x.shape[across]) * lines  # lines in one slab
    pad_buf = np.empty(held * padded, np.float32)
    res_buf = np.empty(held * n_out, np.float32) if axis == x.ndim - 1 else None
    for start in range(0, x.shape[across], step):
        part = [slice(None)] * x.ndim
        part[across] = slice(start, start + step)
        c = _edge_padded(np.moveaxis(x[tuple(part)], axis, 0), pad_buf)
        _prefilter(c)
        dst = np.moveaxis(out[tuple(part)], axis, 0)
        if res_buf is not None:  # the contiguous axis: taps into a leading-axis buffer, then turned
            res = res_buf[:dst.size].reshape(dst.shape)
            _apply_taps(c, cols, weights, res)
            dst[...] = res
        else:
            _apply_taps(c, cols, weights, dst)
    return out


def _pass_order(shape: Sequence[int], size: Sequence[int], axes: list[int]) -> list[int]:
    """The order of the per-axis passes with the smallest peak (input + output of a pass)."""
    from itertools import permutations

    def peak(order) -> int:
        cur, worst = list(shape), 0
        for a in order:
            nxt = cur.copy()
            nxt[a] = int(size[a])
            worst = max(worst, int(np.prod(cur)) + int(np.prod(nxt)))
            cur = nxt
        return worst

    return list(min(permutations(axes), key=peak))


def _cubic(owned: list, size: Sequence[int], slice_axis: int | None = None, reuse_input: bool = False) -> np.ndarray:
    """What ``skimage.transform.resize(x, size, order=3, mode="edge", anti_aliasing=False)``
    computes (nnU-Net's image interpolant), separably: one axis at a time, then the output
    clipped to the input's range. With ``slice_axis``, each slice along it is resized in-plane
    on its own (that axis keeps its size) and clipped to its own range, as nnU-Net's per-slice
    calls do. Equal to skimage within ~1e-6 of the intensity range (tests/test_resampling.py).
    ``owned`` = [x], emptied: the input is let go after the first pass (a volume of memory);
    with ``reuse_input`` its memory takes a later pass's output (no fresh pages to fault in)."""
    x = owned.pop()
    keep = (slice_axis,) if slice_axis is not None else ()
    other = tuple(a for a in range(x.ndim) if a not in keep)
    lo, hi = x.min(axis=other, keepdims=True), x.max(axis=other, keepdims=True)
    axes = [a for a, n in enumerate(size) if a != slice_axis and x.shape[a] != n]
    if not axes:
        return np.clip(np.array(x, np.float32), lo, hi)
    spare = None  # the memory of the array before last, written over by the next pass
    for i, axis in enumerate(_pass_order(x.shape, size, axes)):
        if spare is not None and spare.size < x.size // x.shape[axis] * int(size[axis]):
            spare = None  # too small for this pass: let it go before the output is allocated
        y = _cubic_axis(x, axis, int(size[axis]), spare)
        mine = i > 0 or reuse_input
        spare = x.reshape(-1) if mine and x.dtype == np.float32 and x.flags.c_contiguous else None
        x = y
    return np.clip(x, lo, hi, out=x)


def resample_image(data: np.ndarray | list, new_shape: Sequence[int], current_spacing: Sequence[float],
                   new_spacing: Sequence[float], order: str = "cubic",
                   separate_z: int | None | str = "auto") -> np.ndarray:
    """Resample an image ``(C, X, Y, Z)`` to ``new_shape``; returns float32. ``data`` may be
    ``[array]`` to hand over the only reference: the list is emptied and, for one channel, the
    input is freed after the first axis pass (preprocessing a CT keeps one volume less)."""
    owned = data if isinstance(data, list) else [data]
    new_shape = tuple(int(s) for s in new_shape)
    if owned[0].shape[1:] == new_shape:
        return np.asarray(owned.pop(), dtype=np.float32)
    axis = _z_axis(separate_z, current_spacing, new_spacing)
    if order == "cubic":
        return _resample_cubic(owned, new_shape, axis, reuse=isinstance(data, list))
    if order != "linear":
        raise ValueError(f"order must be 'linear' or 'cubic', got {order!r}")
    import torch

    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(owned.pop(), dtype=np.float32))
        if axis is None:
            return _interp(t[None], new_shape)[0].numpy()
        return _separate_z(t, new_shape, axis, lambda x, size: _interp(x, size)).numpy()


def _separate_z(t: "torch.Tensor", new_shape: tuple[int, ...], axis: int, inplane) -> "torch.Tensor":
    """In-plane ``inplane`` per slice along ``axis``, then nearest neighbour along it."""
    c = t.shape[0]
    moved = t.movedim(axis + 1, 1)  # (C, S, P, Q)
    s = moved.shape[1]
    plane = [new_shape[a] for a in range(3) if a != axis]
    flat = moved.reshape(c * s, 1, *moved.shape[2:])
    out = inplane(flat, plane).reshape(c, s, *plane)
    if s != new_shape[axis]:
        import torch

        out = out.index_select(1, torch.from_numpy(_nearest_indices(s, new_shape[axis])))
    return out.movedim(1, axis + 1).contiguous()


def _resample_cubic(owned: list, new_shape: tuple[int, ...], axis: int | None, reuse: bool = False) -> np.ndarray:
    data = owned.pop()
    if axis is None:
        plane_shape, idx = new_shape, None
    else:
        plane_shape = tuple(data.shape[1 + a] if a == axis else new_shape[a] for a in range(3))
        idx = _nearest_indices(data.shape[1 + axis], new_shape[axis])
    channels = [data[c] for c in range(data.shape[0])]
    del data  # the channels (views) hold it; each is let go in turn
    out = None
    for c in range(len(channels)):
        handed, channels[c] = [channels[c]], None
        ch = _cubic(handed, plane_shape, axis, reuse_input=reuse)
        if idx is not None:
            ch = np.take(ch, idx, axis=axis)
        if len(channels) == 1:
            return ch[None]
        if out is None:
            out = np.empty((len(channels),) + ch.shape, np.float32)
        out[c] = ch
    assert out is not None
    return out


def _take(a: np.ndarray, indices: Sequence[np.ndarray]) -> np.ndarray:
    """``a`` sampled at the outer product of per-axis ``indices``."""
    for axis, idx in enumerate(indices):
        a = a.take(idx, axis=axis)
    return a


def _mixed_blocks(seg: np.ndarray) -> np.ndarray:
    """True where the 2x2x2 block starting at a voxel (cut at the far edges) holds two labels."""
    mixed = np.zeros(seg.shape, bool)
    for off in np.ndindex(*(2,) * seg.ndim):
        if any(off):
            a = tuple(slice(0, n - o) for n, o in zip(seg.shape, off))
            b = tuple(slice(o, n) for n, o in zip(seg.shape, off))
            mixed[a] |= seg[a] != seg[b]
    return mixed


def _corners(taps: list, at: tuple):
    """Per corner of the 2x2x2 linear neighbourhood of the output voxels ``at`` (index arrays):
    its input indices per axis and its float64 weights (``taps`` per axis: i0, i1, weight of i1)."""
    for corner in np.ndindex(*(2,) * len(at)):
        idx, w = [], np.ones(len(at[0]))
        for axis, c in enumerate(corner):
            i0, i1, l1 = taps[axis]
            idx.append((i1 if c else i0)[at[axis]])
            w = w * (l1[at[axis]] if c else 1.0 - l1[at[axis]])
        yield idx, w


def _score_block(seg: np.ndarray, taps: list, at: tuple, nearest: np.ndarray) -> np.ndarray:
    """Labels of the output voxels ``at`` (index arrays): argmax of the linearly interpolated
    one-hot scores, summed over the 8 corners in float64; scores within ``TIE_TOLERANCE``
    are tied: the nearest voxel's label wins a tie it is part of, else the lowest label."""
    labels, weights = [], []
    for idx, w in _corners(taps, at):
        labels.append(seg[tuple(idx)])
        weights.append(w)
    lab, wts = np.stack(labels), np.stack(weights)
    best, out, near_score = np.full(len(at[0]), -1.0), np.zeros(len(at[0]), seg.dtype), np.zeros(len(at[0]))
    for c in np.unique(lab):  # ascending: a tie keeps the lower label
        score = (wts * (lab == c)).sum(0)
        better = score > best + TIE_TOLERANCE
        best, out = np.where(better, score, best), np.where(better, c, out)
        near_score = np.where(nearest == c, score, near_score)
    return np.where(near_score >= best - TIE_TOLERANCE, nearest, out)


def _label_argmax(seg: np.ndarray, size: Sequence[int], nearest_axis: int | None = None) -> np.ndarray:
    """Argmax over labels of linearly interpolated one-hot masks (what nnU-Net's
    resize_segmentation computes, per label), ``seg`` (X, Y, Z); along ``nearest_axis`` nearest
    neighbour instead (separate z).

    Ties go to the nearest neighbour's label when it is among the tied ones (nnU-Net's rule,
    batchgenerators >= 0.25.4), else to the lowest label. Sample points fall midway between
    voxels wherever the size ratio reduces to an even numerator (2x, 4/3, 42/37, ...); there a
    plain argmax gives every tie to the lower label and erodes the higher labels' structures
    (a 1 mm brain through 2 mm lost 4 % of its white matter). Scores are float64 so that a tie
    is one to ~1e-13 (``TIE_TOLERANCE``): in float32 interpolation, ties come out up to ~3e-5
    apart, as far apart as genuine near-ties, which keep their argmax. Only output voxels whose
    2x2x2 input neighbourhood holds two labels are scored (a few % of a label map); the others
    take their one label."""
    near_idx = [_nearest_indices(n, int(m)) for n, m in zip(seg.shape, size)]
    taps = [(near_idx[a], near_idx[a], np.zeros(len(near_idx[a]))) if a == nearest_axis
            else _linear_taps(n, int(m)) for a, (n, m) in enumerate(zip(seg.shape, size))]
    first = [t[0] for t in taps]
    out = _take(seg, first)
    nearest = _take(seg, near_idx).reshape(-1)
    todo = np.flatnonzero(_take(_mixed_blocks(seg), first))
    flat = out.reshape(-1)
    for start in range(0, todo.size, LABEL_BLOCK):
        sel = todo[start:start + LABEL_BLOCK]
        flat[sel] = _score_block(seg, taps, np.unravel_index(sel, out.shape), nearest[sel])
    return out


def resample_label(seg: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                   new_spacing: Sequence[float], separate_z: int | None | str = "auto") -> np.ndarray:
    """Resample a label map ``(1, X, Y, Z)`` (may hold -1) by one-hot linear + argmax."""
    new_shape = tuple(int(s) for s in new_shape)
    seg = np.asarray(seg)
    if seg.shape[1:] == new_shape:
        return np.asarray(seg, dtype=np.int16)
    axis = _z_axis(separate_z, current_spacing, new_spacing)
    small = np.int8 if seg.size and -128 <= seg.min() and seg.max() <= 127 else np.int16
    return _label_argmax(np.asarray(seg[0], small), new_shape, axis)[None].astype(np.int16)


def resample_probabilities(probs: "np.ndarray | torch.Tensor", new_shape: Sequence[int],
                           current_spacing: Sequence[float], new_spacing: Sequence[float],
                           separate_z: int | None | str = "auto") -> "torch.Tensor":
    """Resample class probabilities / logits ``(C, X, Y, Z)`` linearly (separate z aware)."""
    import torch

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


def _nearest_taps(n: int, m: int) -> tuple:
    """Taps of nearest-neighbour resampling in ``_linear_taps``' form: both corners the nearest
    input voxel, weight 0 on the second."""
    idx = _nearest_indices(n, m)
    return idx, idx, np.zeros(len(idx))


def probabilities_at(probs: np.ndarray, new_shape: Sequence[int], separate_z: int | None,
                     at: tuple[np.ndarray, ...]) -> np.ndarray:
    """What :func:`resample_probabilities` gives at the output voxels ``at`` (index arrays),
    ``(C, len(at[0]))``, summed over the 8 corners in float64 (the same taps: half-pixel
    linear, nearest along ``separate_z``): a few voxels of a volume at full precision."""
    taps = [_nearest_taps(n, int(m)) if a == separate_z else _linear_taps(n, int(m))
            for a, (n, m) in enumerate(zip(probs.shape[1:], new_shape))]
    out = np.zeros((probs.shape[0], len(at[0])))
    for idx, w in _corners(taps, at):
        out += w * np.asarray(probs[(slice(None),) + tuple(idx)], np.float64)
    return out
