"""``medvol enhance``: super-resolve scans with a trained SERAN run (``docs/methods/seran.md``).

Each scan (NIfTI, MetaImage/NRRD or a DICOM series folder, read by :mod:`medvol.io`) is
normalised as the run's cache was (the plan's per-channel z-score: mean and std of the whole
scan; or, when the plan normalised inside the nonzero mask, of its nonzero voxels, with 0
outside), super-resolved slice by slice across the run's slice axis through
:class:`medvol.networks.slice_adapter.SliceAdapter`, mapped back to the scan's intensities
(``* std + mean``; outside the nonzero mask 0 again) and written as NIfTI (atomic). The scan
is used at its own spacing (no resampling to the plan's): the network learned a x``scale``
step at the cache's spacing and is applied as such.

Geometry: the two in-plane axes get ``scale`` times as many voxels, their spacing divided by
``scale``; the affine keeps the scan where it was: input voxel ``i`` covers
``[i - 0.5, i + 0.5]`` and output voxel ``j`` is centred at input coordinate
``(j + 0.5) / scale - 0.5``, so the output covers the same field of view
(:func:`upsampled_affine`), the convention of the network's training pairs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.checkpoint import RunModel, load_run
from medvol.errors import ConfigError
from medvol.io import Volume, read_volume, write_volume
from medvol.networks.slice_adapter import SliceAdapter
from medvol.precision import choose_precision

log = logging.getLogger(__name__)


def upsampled_affine(affine: np.ndarray, axes: tuple[int, ...], scale: int) -> np.ndarray:
    """The affine of a grid with ``scale`` times the voxels along ``axes`` over the same field
    of view: those columns divided by ``scale``, the origin moved by ``(0.5/scale - 0.5)`` of an
    input voxel along each of them."""
    affine = np.asarray(affine, np.float64)
    out = affine.copy()
    for a in axes:
        out[:3, 3] += affine[:3, a] * (0.5 / scale - 0.5)
        out[:3, a] = affine[:3, a] / scale
    return out


class FoldedSR(nn.Module):
    """A super-resolution network whose ``(N, C, sH, sW)`` output is folded back onto the
    input's grid as ``(N, C*s*s, H, W)`` (pixel unshuffle), so that
    :class:`SliceAdapter` restacks it as it restacks segmentation logits."""

    def __init__(self, model: nn.Module, scale: int):
        super().__init__()
        self.model, self.scale = model, int(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(self.model(x).float(), self.scale)


def super_resolve_volume(model: nn.Module, image: np.ndarray, scale: int, slice_axis: int, device: torch.device,
                         slice_batch: int = 8, precision: str = "fp32") -> np.ndarray:
    """``image`` ``(C, X, Y, Z)`` (normalised) -> ``(C, ...)`` with the two axes other than
    ``slice_axis`` ``scale`` times longer."""
    adapter = SliceAdapter(FoldedSR(model, scale), axis=slice_axis + 2, slice_batch=slice_batch)
    prec = choose_precision(device, precision)
    with torch.no_grad(), prec.autocast():
        folded = adapter(torch.from_numpy(np.ascontiguousarray(image, np.float32))[None].to(device))[0]
    per_slice = folded.movedim(slice_axis + 1, 0)  # (S, C*s*s, H, W)
    return F.pixel_shuffle(per_slice, scale).movedim(0, slice_axis + 1).cpu().numpy()


def _norm_stats(channel: np.ndarray, entry: dict) -> tuple[float, float]:
    """(mean, std) of the plan's z-score for one channel (inside the nonzero mask when it says so)."""
    if entry.get("scheme", "ZScoreNormalization") != "ZScoreNormalization":
        raise ConfigError(f"medvol enhance: channel {entry.get('name')} was normalised by {entry.get('scheme')}; "
                          "only z-score (MR) runs are supported")
    vals = channel[channel != 0] if entry.get("use_mask_for_norm") and (channel != 0).any() else channel
    return float(vals.mean(dtype=np.float64)), float(max(vals.std(dtype=np.float64), 1e-8))


def enhance_volume(run: RunModel, volume: Volume, device: torch.device, slice_batch: int = 8,
                   precision: str = "fp32") -> Volume:
    """The super-resolved ``volume`` in the scan's intensities, its affine by :func:`upsampled_affine`."""
    scale = int((run.recipe.model.options or {}).get("scale", 2))
    axis = int((run.recipe.method or {}).get("slice_axis", 2))
    image = volume.channel_first(np.float32)
    entries = run.plans.raw["normalization"]
    if image.shape[0] != len(entries):
        raise ConfigError(f"the run was trained on {len(entries)} channel(s), the scan has {image.shape[0]}")
    stats = [_norm_stats(image[c], entries[c]) for c in range(image.shape[0])]
    for c, (mean, std) in enumerate(stats):
        image[c] = (image[c] - mean) / std
    masked = any(e.get("use_mask_for_norm") for e in entries)
    if masked:  # as the cache: z-scores inside the nonzero mask, 0 outside
        inside = volume.channel_first(np.float32).any(0)
        image *= inside
    out = super_resolve_volume(run.model, image, scale, axis, device, slice_batch, precision)
    for c, (mean, std) in enumerate(stats):
        out[c] = out[c] * std + mean
    if masked:  # outside the mask stays 0: each input voxel's s x s output voxels (same field of view)
        out *= np.repeat(np.repeat(inside, scale, [a for a in range(3) if a != axis][0]), scale,
                         [a for a in range(3) if a != axis][1])
    array = out[0] if volume.array.ndim == 3 else np.moveaxis(out, 0, -1)
    axes = tuple(a for a in range(3) if a != axis)
    meta = {**volume.meta, "enhanced_by": str(run.run_dir), "scale": scale}
    return Volume(array.astype(np.float32), upsampled_affine(volume.affine, axes, scale), meta)


def enhance(run_dir: str | Path, inputs: str | Path, out_dir: str | Path, device: torch.device,
            checkpoint: str = "best", quiet: bool = False, slice_batch: int = 8, precision: str = "auto") -> list[Path]:
    """Every scan of ``inputs`` (a scan, a folder of scans, DICOM series folders) super-resolved
    into ``out_dir/<case>.nii.gz``."""
    from tqdm import tqdm

    from medvol.io.discovery import input_cases

    run = load_run(run_dir, device, checkpoint)
    if run.recipe.trainer.name != "seran":
        raise ConfigError(f"{run_dir}: medvol enhance needs a super-resolution run (trainer seran), got trainer "
                          f"'{run.recipe.trainer.name}'")
    cases = input_cases(inputs, run.plans.num_channels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case, sources in tqdm(cases, desc="enhance", unit="scan", disable=quiet or not sys.stderr.isatty()):
        volume = _read_channels(sources)
        written.append(write_volume(enhance_volume(run, volume, device, slice_batch, precision),
                                    out_dir / f"{case}.nii.gz"))
    return written


def _read_channels(sources: list[Path]) -> Volume:
    """One scan from its channel files (one file: as read; several: stacked as ``(X, Y, Z, C)``)."""
    vols = [read_volume(s) for s in sources]
    if len(vols) == 1:
        return vols[0]
    return Volume(np.stack([v.array for v in vols], -1), vols[0].affine, vols[0].meta)
