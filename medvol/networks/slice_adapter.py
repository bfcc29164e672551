"""Run any 2D network over a 3D volume, slice by slice (after DC-MT's aggregation network, MedIA
2022; ``docs/methods/slice_aggregator.md``).

:class:`SliceAdapter` cuts a ``(B, C, X, Y, Z)`` batch into 2D slices along one spatial axis,
feeds the 2D model at most ``slice_batch`` slices at a time (so the model's activations are
bounded by the slice batch, not by the number of slices), optionally gives each slice its
neighbours as extra channels (2.5D), and puts the results back together:

- ``mode="segmentation"``: the per-slice logits ``(N, K, H, W)`` restacked into a volume
  ``(B, K, X, Y, Z)`` in the input's voxel order, so a prediction keeps the input's geometry
  (write it with the input's affine).
- ``mode="classification"``: per-slice logits ``(B, S, K)`` and per-slice feature vectors
  ``(B, S, F)`` (``None`` when the 2D model returns logits only), as :class:`SliceOutputs`.

The result equals a plain per-slice loop when the 2D model treats the samples of a batch
independently (eval-mode BatchNorm, no batch statistics) and the normalisation hook is per slice.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn

MODES = ("segmentation", "classification")


class SliceOutputs(NamedTuple):
    """Classification output: ``logits`` ``(B, S, K)``, ``features`` ``(B, S, F)`` or ``None``."""

    logits: torch.Tensor
    features: torch.Tensor | None


def _spatial_axis(axis: int) -> int:
    """``axis`` of a ``(B, C, X, Y, Z)`` tensor as 2, 3 or 4 (also accepts -3, -2, -1)."""
    if axis not in (2, 3, 4, -3, -2, -1):
        raise ValueError(f"axis must be a spatial axis of (B, C, X, Y, Z): 2, 3, 4 or -3, -2, -1; got {axis}")
    return axis % 5


def split_classifier_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 2D classifier's output as ``(logits (N, K), features (N, F) or None)``: it may return
    logits, a ``(logits, features)`` tuple, or a dict with ``"logits"`` (and ``"features"``)."""
    if isinstance(out, dict):
        logits, feats = out["logits"], out.get("features")
    elif isinstance(out, (tuple, list)):
        logits, feats = out
    else:
        logits, feats = out, None
    for name, t in (("logits", logits), ("features", feats)):
        if t is not None and t.ndim != 2:
            raise ValueError(f"the 2D classifier's {name} must be 2-D (N, width), got shape {tuple(t.shape)}")
    return logits, feats


class SliceAdapter(nn.Module):
    """Wrap a 2D ``nn.Module`` to run over ``(B, C, X, Y, Z)`` volumes along ``axis``.

    Args:
        model_2d: takes ``(N, C * (2 * context + 1), H, W)`` slices, where ``(H, W)`` are the two
            other spatial axes in their input order.
        axis: the spatial axis that is sliced (2/3/4 or -3/-2/-1 of ``(B, C, X, Y, Z)``).
        slice_batch: at most this many slices go through ``model_2d`` at once.
        context: 2.5D context: each slice gets its ``context`` neighbours on each side as extra
            channels, ordered from the lowest to the highest slice index (the slice itself in the
            middle), each neighbour with all ``C`` channels; edge slices repeat the first/last slice.
        mode: ``"segmentation"`` or ``"classification"`` (see the module docstring).
        normalise: optional callable on a ``(N, C, H, W)`` batch of single slices, applied to each
            slice before context stacking (so a neighbour is normalised as it is when it is the
            centre slice); it must treat slices independently.
    """

    def __init__(
        self,
        model_2d: nn.Module,
        axis: int = -1,
        slice_batch: int = 16,
        context: int = 0,
        mode: str = "segmentation",
        normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if slice_batch < 1 or context < 0:
            raise ValueError(f"slice_batch must be >= 1 and context >= 0, got {slice_batch} and {context}")
        self.model_2d = model_2d
        self.axis = _spatial_axis(axis)
        self.slice_batch = int(slice_batch)
        self.context = int(context)
        self.mode = mode
        self.normalise = normalise

    def forward(self, x: torch.Tensor):
        """``x`` ``(B, C, X, Y, Z)`` -> ``(B, K, X, Y, Z)`` logits (segmentation) or
        :class:`SliceOutputs` with ``(B, S, K)`` / ``(B, S, F)`` (classification), ``S`` the size
        of ``x`` along ``axis``. Runs under the caller's grad mode."""
        if x.ndim != 5:
            raise ValueError(f"SliceAdapter expects (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        xs = x.movedim(self.axis, 2)  # (B, C, S, H, W), a view
        if self.mode == "segmentation":
            return self._segment(xs)
        outs = [self._run(xs, idx) for idx in self._batches(xs)]
        logits, feat_parts = zip(*outs)
        b, s = xs.shape[0], xs.shape[2]
        feats = None if feat_parts[0] is None else torch.cat(feat_parts).reshape(b, s, -1)
        return SliceOutputs(torch.cat(logits).reshape(b, s, -1), feats)

    def _batches(self, xs: torch.Tensor):
        """Flat slice indices (``b * S + s``), ``slice_batch`` at a time."""
        n_slices = xs.shape[0] * xs.shape[2]
        for i in range(0, n_slices, self.slice_batch):
            yield torch.arange(i, min(i + self.slice_batch, n_slices), device=xs.device)

    def _segment(self, xs: torch.Tensor) -> torch.Tensor:
        """Each slice batch's logits written into one ``(B * S, K, H, W)`` output as it comes
        (a list + ``torch.cat`` would hold two output-sized copies at the end), then restacked."""
        out = None
        for idx in self._batches(xs):
            logits = self._run(xs, idx)
            self._check_logits(logits, xs.shape)
            if out is None:
                out = logits.new_empty(xs.shape[0] * xs.shape[2], *logits.shape[1:])
            out[idx[0]:idx[-1] + 1] = logits
        assert out is not None  # a volume has at least one slice
        return self._restack(out, xs.shape)

    def _run(self, xs: torch.Tensor, flat: torch.Tensor):
        """The 2D model on the slices with flat indices ``flat`` (``b * S + s``)."""
        out = self.model_2d(self.gather_slices(xs, flat))
        return out if self.mode == "segmentation" else split_classifier_output(out)

    def gather_slices(self, xs: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Slices ``flat`` of ``xs`` ``(B, C, S, H, W)`` with their context:
        ``(n, C * (2 * context + 1), H, W)``. Each needed slice is read (and normalised) once."""
        n_s = xs.shape[2]
        b, s = flat // n_s, flat % n_s
        offsets = torch.arange(-self.context, self.context + 1, device=flat.device)
        keys = b[:, None] * n_s + (s[:, None] + offsets).clamp(0, n_s - 1)  # (n, 2k+1)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        single = xs[uniq // n_s, :, uniq % n_s]  # (U, C, H, W): advanced indices go first
        if self.normalise is not None:
            single = self.normalise(single)
        stacked = single[inverse]  # (n, 2k+1, C, H, W)
        return stacked.reshape(stacked.shape[0], -1, *stacked.shape[-2:])

    @staticmethod
    def _check_logits(logits: torch.Tensor, shape: torch.Size) -> None:
        h, w = shape[-2:]
        if logits.ndim != 4 or tuple(logits.shape[-2:]) != (h, w):
            raise ValueError(
                f"the 2D model must return (N, K, {h}, {w}) logits for (N, C, {h}, {w}) slices to be "
                f"restacked, got {tuple(logits.shape)}; upsample its output to the slice size")

    def _restack(self, logits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``(B * S, K, H, W)`` -> ``(B, K, X, Y, Z)``, the sliced axis back in its place."""
        b, _, s, h, w = shape
        vol = logits.reshape(b, s, -1, h, w).transpose(1, 2)  # (B, K, S, H, W)
        return vol.movedim(2, self.axis)
