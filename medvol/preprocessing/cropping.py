"""Crop to the nonzero region, as nnU-Net does (before normalisation and resampling)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

OUTSIDE_LABEL = -1  # nnU-Net's marker for label voxels outside the nonzero mask


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any channel of ``image`` (C, X, Y, Z) is nonzero, with holes filled."""
    mask = image[0] != 0
    for c in range(1, image.shape[0]):
        mask |= image[c] != 0
    return fill_holes(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (background connected face to face): the
    background components that do not reach the border are filled. Found inside the mask's
    bounding box grown by one voxel (everything outside it reaches the border); where the
    background is sparse there (a CT: air is -1000, only stray voxels are exactly 0) from a
    graph over those few voxels, else by labelling it (~2-4x faster than scipy's dilations)."""
    box = tuple(slice(max(a - 1, 0), min(b + 1, n)) for (a, b), n in zip(bbox_of(mask), mask.shape))
    background = ~mask[box]
    count = int(np.count_nonzero(background))
    out = mask.copy()
    if count <= background.size // 32:
        voxels = np.flatnonzero(background)
        holes = voxels[~_reaches_border(voxels, background.shape)]
        out[box][np.unravel_index(holes, background.shape)] = True
        return out
    out[box] |= _enclosed(background, ndimage.generate_binary_structure(mask.ndim, 1), range(mask.ndim))
    return out


def _enclosed(background: np.ndarray, structure: np.ndarray, faces) -> np.ndarray:
    """Background voxels whose component (connected by ``structure``) touches none of the
    array's faces across the axes ``faces``."""
    parts, _ = ndimage.label(background, structure=structure)
    edge = np.zeros(int(parts.max()) + 1, bool)
    for axis in faces:
        for end in (0, -1):
            edge[np.unique(np.take(parts, end, axis=axis))] = True
    edge[0] = True  # label 0: not background
    return ~edge[parts]


CT_BODY_HU = -500  # above: tissue, fluid, bone, the table; below: air (and lung, filled back in)
CT_SCHEMES = ("CTNormalization", "CTWindowNormalization")


def ct_body_mask(hu: np.ndarray) -> np.ndarray:
    """A CT's body: voxels above -500 HU, with what they enclose in any plane filled in (the
    lungs and bowel gas, enclosed by the chest and abdominal wall within the axial slices,
    whichever array axis those lie across). A CT has no zero background, so the nonzero mask
    that cropping uses is the whole field of view; this one leaves the air around the patient
    out (prediction skips windows holding none of it)."""
    tissue = hu > CT_BODY_HU
    body = tissue.copy()
    for axis in range(tissue.ndim):
        plane = ndimage.generate_binary_structure(tissue.ndim, 1)
        plane &= np.indices(plane.shape)[axis] == 1  # neighbours within the plane across ``axis``
        body |= _enclosed(~tissue, plane, [a for a in range(tissue.ndim) if a != axis])
    return body


def _reaches_border(voxels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """For sorted flat indices of background voxels: whether each one's face-connected
    component touches the array's border (connected components of the sparse voxel graph)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    coords = np.unravel_index(voxels, shape)
    strides = np.cumprod((1,) + tuple(shape[::-1]))[:-1][::-1]
    rows, cols = [], []
    for axis, stride in enumerate(strides):
        ok = coords[axis] < shape[axis] - 1
        nxt = voxels[ok] + stride
        pos = np.minimum(np.searchsorted(voxels, nxt), len(voxels) - 1)
        hit = voxels[pos] == nxt
        rows.append(np.flatnonzero(ok)[hit])
        cols.append(pos[hit])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(len(voxels),) * 2)
    _, comp = connected_components(graph, directed=False)
    border = np.zeros(len(voxels), bool)
    for axis, n in enumerate(shape):
        border |= (coords[axis] == 0) | (coords[axis] == n - 1)
    touching = np.zeros(int(comp.max()) + 1 if len(comp) else 1, bool)
    touching[comp[border]] = True
    return touching[comp]


def bbox_of(mask: np.ndarray) -> list[list[int]]:
    """``[[start, stop), ...]`` per axis of the True voxels; the whole array if none."""
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, int(mask.shape[ax])])
    return box


def crop_to_nonzero(image: np.ndarray, label: np.ndarray | None = None):
    """Crop ``image`` (C, X, Y, Z) and ``label`` (1, X, Y, Z) to the nonzero bounding box.

    Returns ``(image, seg, bbox)``. ``seg`` (int8, int16 for labels above 127) is the cropped
    label with background voxels outside the nonzero mask set to -1, or, without a label, 0
    inside the mask and -1 outside (so normalisation can ignore the outside either way).
    """
    mask = nonzero_mask(image)
    bbox = bbox_of(mask)
    sl = tuple(slice(a, b) for a, b in bbox)
    image = image[(slice(None),) + sl]
    mask = mask[sl][None]
    if label is not None:
        small = label.size == 0 or int(label.max()) <= np.iinfo(np.int8).max
        seg = np.array(label[(slice(None),) + sl], dtype=np.int8 if small else np.int16)
        outside = np.equal(seg, 0)
        outside &= ~mask
        seg[outside] = OUTSIDE_LABEL
    else:  # built as int8 directly (np.where would allocate an int64 volume first)
        seg = np.full(mask.shape, OUTSIDE_LABEL, dtype=np.int8)
        seg[mask] = 0
    return image, seg, bbox
