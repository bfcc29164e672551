"""The per-case transform: crop -> normalise -> resample one case with a plan.

Order of operations follows nnU-Net: crop to the nonzero box, normalise (before resampling,
so the nonzero mask still fits the image), resample to the plan's spacing. The dataset driver
(:mod:`medvol.preprocessing.preprocessor`) runs it on raw cases, prediction on new scans
(:func:`preprocess_case`); this module loads neither the driver nor the raw layouts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medvol.errors import InputError
from medvol.io import Volume
from medvol.io.orientation import orient_channels
from medvol.io.volume import spacing_from_affine
from medvol.preprocessing.cropping import CT_SCHEMES, OUTSIDE_LABEL, crop_to_nonzero, ct_body_mask
from medvol.preprocessing.normalization import normalize
from medvol.resampling import compute_new_shape, resample_image, resample_label, separate_z_axis


def normalise_and_resample(image: np.ndarray | list, seg: np.ndarray | None, spacing: Sequence[float],
                            plans: dict, copy: bool = True):
    """image/seg are cropped, channel-first. Returns resampled (image, seg, new_shape).
    ``copy=False`` normalises ``image`` in place (when the caller owns it: saves a copy).
    ``image`` may be ``[array]``: the caller hands over its only reference (the list is
    emptied), so the raw array and then the normalised one are freed as soon as they are used."""
    owned = image if isinstance(image, list) else [image]
    norm = plans["normalization"]
    stats = {str(n["channel"]): n["statistics"] for n in norm}
    if copy or owned[0].dtype != np.float32:
        owned.append(np.array(owned.pop(), dtype=np.float32))
    owned.append(normalize(owned.pop(), seg, [n["scheme"] for n in norm],
                           [n["use_mask_for_norm"] for n in norm], stats))
    target = plans["target_spacing"]
    new_shape = compute_new_shape(owned[0].shape[1:], spacing, target)
    image = resample_image(owned, new_shape, spacing, target, order=plans["resampling"]["image"])
    if seg is not None:  # several label channels (one per rater): each resampled as a label map
        seg = resample_label(seg, new_shape, spacing, target) if len(seg) == 1 else \
            np.concatenate([resample_label(s[None], new_shape, spacing, target) for s in seg])
    return image, seg, new_shape


def geometry_properties(ref: Volume, bbox, shape_after_crop, spacing, plans, new_shape) -> dict:
    return {
        "original_shape": list(ref.spatial_shape),
        "original_affine": np.asarray(ref.affine).tolist(),
        "original_spacing": [float(s) for s in spacing],
        "crop_bbox": bbox,
        "shape_after_crop": [int(s) for s in shape_after_crop],
        "target_spacing": [float(s) for s in plans["target_spacing"]],
        "shape_after_resampling": [int(s) for s in new_shape],
        "separate_z_axis": separate_z_axis(spacing, plans["target_spacing"]),
        "source_meta": {k: v for k, v in ref.meta.items() if isinstance(v, (str, int, float))},
    }


def _check_scan(image: np.ndarray, ref: Volume, plans: dict, slice_axis: int | None) -> None:
    """A scan the plan can take: thick enough in plane, the plan's channel count, finite."""
    in_plane = [n for a, n in enumerate(image.shape[1:]) if a != slice_axis]
    if min(in_plane) < 2 and min(plans["patch_size"]) > 1:
        raise InputError(ref.meta.get("path"), f"is a 2D image (shape {ref.spatial_shape}); the model was planned "
                                               "for 3D scans: give it 3D scans")
    expected = len(plans["normalization"])
    if image.shape[0] != expected:
        raise InputError(ref.meta.get("path"), f"{image.shape[0]} channel(s) given, the plan expects {expected}")
    if not np.isfinite(image).all():
        raise InputError(ref.meta.get("path"), "non-finite intensity values (NaN/inf)")


def preprocess_case(volumes: Volume | Sequence[Volume], plans: dict, inplace: bool = False,
                    body_mask: bool = False, slice_axis: int | None = None) -> tuple[np.ndarray, dict]:
    """Preprocess a new scan for inference with the dataset's ``plans``.

    ``volumes``: one Volume (3D, or 4D with channels last) or one Volume per channel, on
    the same grid. Returns ``(image (C, X, Y, Z) float32, properties)``; the properties
    hold what :func:`medvol.inference.restore_geometry` needs to undo crop and resampling.
    ``inplace=True`` lets it normalise inside the volumes' own float32 arrays (saving a copy
    of the scan) when the caller no longer needs them. ``body_mask=True`` adds
    ``properties["body_mask"]``: the nonzero mask cropping used (for a CT, whose nonzero mask is
    the whole field of view, the body: :func:`~medvol.preprocessing.cropping.ct_body_mask`), on
    the preprocessed grid ``(X, Y, Z)`` bool (prediction skips the windows outside it). ``slice_axis`` (a 2D
    model's): the scan keeps its own spacing across that axis, as nnU-Net's 2d configuration
    resamples in plane only; so a model planned on native 2D slices (999-mm spacing across
    them) runs over a volume's slices as they are, and a single slice is a valid input.
    """
    vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
    if not vols:
        raise InputError(None, "preprocess_case needs at least one volume")
    ref = vols[0]
    for v in vols[1:]:
        if v.spatial_shape != ref.spatial_shape or not np.allclose(v.affine, ref.affine, rtol=1e-4, atol=1e-3):
            raise InputError(v.meta.get("path"), "channels are not on the same voxel grid")
    chans = [v.channel_first() for v in vols]  # may share memory with the volumes (float32 input)
    image = chans[0] if len(chans) == 1 else np.concatenate(chans)  # no second copy of a single channel
    if not inplace and any(np.shares_memory(image, v.array) for v in vols):
        image = image.copy()
    orientation = plans.get("orientation", "stored")
    if orientation != "stored":  # the plan's voxel order; the properties say how to undo it
        image, affine = orient_channels(image, ref.affine, orientation)
    _check_scan(image, ref, plans, slice_axis)
    spacing = ref.spacing if orientation == "stored" else spacing_from_affine(affine)
    if slice_axis is not None:
        target = [float(spacing[a]) if a == slice_axis else float(t) for a, t in enumerate(plans["target_spacing"])]
        plans = {**plans, "target_spacing": target}
    cropped, seg, bbox = crop_to_nonzero(image, None)
    masked_norm = any(n["use_mask_for_norm"] for n in plans["normalization"])
    if not body_mask and not masked_norm:
        seg = None  # only masked z-scoring reads it: do not keep a label-sized array around
    ct = [n["channel"] for n in plans["normalization"] if n["scheme"] in CT_SCHEMES]
    if body_mask and ct and not masked_norm:  # a CT's nonzero mask is its whole field of view
        seg[0][~ct_body_mask(cropped[int(ct[0])])] = OUTSIDE_LABEL
    out, seg, new_shape = normalise_and_resample(cropped, seg, spacing, plans, copy=False)  # image is ours now
    props = geometry_properties(ref, bbox, cropped.shape[1:], spacing, plans, new_shape)
    if body_mask:
        props["body_mask"] = np.asarray(seg[0] >= 0)
    if orientation != "stored":
        props.update(orientation=orientation, oriented_shape=[int(s) for s in image.shape[1:]])
    return out, props
