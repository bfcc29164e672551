"""The one sliding-window path: validation during training and ``medvol predict`` both use it.

A preprocessed image ``(C, X, Y, Z)`` is cut into overlapping windows of the patch size,
which run through the model in batches (MONAI's ``sliding_window_inference``), optionally
mirrored as nnU-Net's test-time augmentation does (the mean over every combination of the
trained flip axes, inside each window), and blended with Gaussian or constant weights. The
image and the accumulated output are float16, on the GPU when the output fits there and on
the CPU otherwise, so a process holds about twice the float16 probabilities.

What a window's output means is the decoder's business:

- :class:`SoftmaxClasses`: one logit per class (a single channel is a binary sigmoid logit,
  see :func:`medvol.networks.as_class_logits`); softmax probabilities out;
- :class:`TaskSigmoid`: a task-conditioned multi-label model (DoDNet) called as
  ``model(x, task_ids)``; per-channel sigmoid probabilities out;
- :class:`RegionSigmoid`: one logit per region (nnU-Net's region-based training); blended
  logits, per-region sigmoid probabilities out;

A 2D model (the plan's ``2d`` configuration) takes the same path: ``slice_axis`` given, the
image gets its neighbouring slices as channels when the model was trained with 2.5D context
(:func:`with_slice_context`, the order training uses), the windows are slabs of
:data:`SLAB` slices across the slice axis (the 2D patch in plane, no overlap across slices),
and :class:`medvol.networks.slice_adapter.SliceAdapter` runs the 2D model over every slice of
a window. Each slice's in-plane windows are blended as nnU-Net blends its 2D windows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.networks import eval_mode

from medvol.errors import ConfigError
from medvol.networks import as_class_logits
from medvol.precision import Precision

BACKGROUND_LOGIT = 20.0  # a skipped window's background logit (other classes 0): softmax ~1 - 1e-9


@dataclass(frozen=True)
class SoftmaxClasses:
    """Segmentation: class logits per window, softmax over classes at the end."""

    def window_output(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return as_class_logits(model(x).float())

    def window_mean(self, mean: torch.Tensor) -> torch.Tensor:
        return mean  # logits are blended; softmax once over the whole volume

    def empty(self, n_windows: int, n_channels: int, shape: Sequence[int], device) -> torch.Tensor:
        """The output of a skipped window (outside the body mask): background, confidently."""
        out = torch.zeros(n_windows, n_channels, *shape, device=device)
        out[:, 0] = BACKGROUND_LOGIT
        return out

    def finish(self, blended: torch.Tensor) -> torch.Tensor:
        for z in range(0, blended.shape[-1], 16):  # in slabs, in place: no float32 copy of the volume
            sl = blended[..., z:z + 16]
            sl.copy_(torch.softmax(sl.float(), dim=0).half())
        return blended


@dataclass(frozen=True)
class TaskSigmoid:
    """Task-conditioned multi-label models (DoDNet): sigmoid of each output channel."""

    task: int

    def window_output(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model(x, torch.full((x.shape[0],), self.task, device=x.device)).float())

    def window_mean(self, mean: torch.Tensor) -> torch.Tensor:
        return mean  # as DoDNet's published inference: the mirrored passes' sigmoid probabilities averaged

    def empty(self, n_windows: int, n_channels: int, shape: Sequence[int], device) -> torch.Tensor:
        return torch.zeros(n_windows, n_channels, *shape, device=device)  # no organ, no tumour

    def finish(self, blended: torch.Tensor) -> torch.Tensor:
        return blended


@dataclass(frozen=True)
class RegionSigmoid:
    """Region-based models (nnU-Net's regions, :mod:`medvol.labels`): one logit per region;
    the logits are blended and each region's sigmoid taken at the end, as nnU-Net does."""

    def window_output(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).float()  # never as_class_logits: one region is one sigmoid channel

    def window_mean(self, mean: torch.Tensor) -> torch.Tensor:
        return mean

    def empty(self, n_windows: int, n_channels: int, shape: Sequence[int], device) -> torch.Tensor:
        return torch.full((n_windows, n_channels, *shape), -BACKGROUND_LOGIT, device=device)  # no region

    def finish(self, blended: torch.Tensor) -> torch.Tensor:
        for z in range(0, blended.shape[-1], 16):
            sl = blended[..., z:z + 16]
            sl.copy_(torch.sigmoid(sl.float()).half())
        return blended


def class_decoder(has_regions: bool):
    """The decoder of a segmentation model's outputs: region sigmoids or class softmax."""
    return RegionSigmoid() if has_regions else SoftmaxClasses()


class WindowPredictor(nn.Module):
    """Runs ``model`` on one batch of windows: mirrored TTA, the chosen precision, float16 out.

    The mirrored copies of the windows go through the model together, in one forward per
    ``tta_batch`` flips (all of them by default). With ``n_channels`` given, the input's last
    channel is the body mask: windows holding none of it are not run, their output is the
    decoder's ``empty`` (background)."""

    def __init__(self, model: nn.Module, decoder, mirror_axes: Sequence[int] = (), precision: Precision | None = None,
                 n_channels: int | None = None, tta_batch: int | None = None, layout_input: bool = True):
        super().__init__()
        self.model = model
        self.decoder = decoder
        self.flips = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
        self.precision = precision or Precision("fp32", "cpu")
        self.n_channels = n_channels  # set: the last input channel is the mask (window skipping)
        self.tta_batch = max(1, tta_batch or len(self.flips))
        self.layout_input = layout_input
        self.windows_run = self.windows_skipped = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.n_channels is None:
            return self._predict(x)
        keep = x[:, -1].flatten(1).any(1)
        x = x[:, :-1]
        self.windows_run += int(keep.sum())
        self.windows_skipped += int((~keep).sum())
        out = self.decoder.empty(x.shape[0], self.n_channels, x.shape[2:], x.device).half()
        if keep.any():
            out[keep] = self._predict(x[keep])
        return out

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        with self.precision.autocast():
            for i in range(0, len(self.flips), self.tta_batch):
                y = self._mirrored(x, self.flips[i:i + self.tta_batch])
                total = y if total is None else total + y
        assert total is not None
        return self.decoder.window_mean(total / len(self.flips)).half()

    def _mirrored(self, x: torch.Tensor, flips: list[tuple[int, ...]]) -> torch.Tensor:
        """The sum over ``flips`` of the decoder's output for ``x`` flipped, flipped back;
        all flipped copies in one forward."""
        batch = torch.cat([torch.flip(x, [a + 2 for a in axes]) if axes else x for axes in flips])
        if self.layout_input:
            batch = self.precision.layout(batch)
        ys = self.decoder.window_output(self.model, batch).chunk(len(flips))
        total = ys[0]  # flips[0] is the unflipped pass when it is in this group, and ys[0] is a new tensor
        total = torch.flip(total, [a + 2 for a in flips[0]]) if flips[0] else total
        for y, axes in zip(ys[1:], flips[1:]):
            total = total + (torch.flip(y, [a + 2 for a in axes]) if axes else y)
        return total


def overlap_for_step(step: Sequence[int], patch_size: Sequence[int]) -> list[float]:
    """Per-axis overlap fractions for which MONAI's windows advance exactly ``step`` voxels
    (MONAI's interval is ``int(patch * (1 - overlap))``)."""
    if len(step) != len(patch_size) or not all(1 <= int(s) <= int(p) for s, p in zip(step, patch_size)):
        raise ConfigError(f"window step {list(step)}: one step per axis, each within 1..patch size {list(patch_size)}")
    out = []
    for s, p in zip(step, patch_size):
        o = (p - s) / p
        while int(p * (1 - o)) < s:  # float rounding: nudge until the interval is exactly s
            o = np.nextafter(o, -1.0)
        out.append(float(o))
    return out


SLAB = 8  # slices per window of a 2D model (at most; fewer when the image has fewer)


def with_slice_context(image: torch.Tensor, axis: int, context: int) -> torch.Tensor:
    """``(C, X, Y, Z)`` -> ``(C * (2k + 1), X, Y, Z)``: every slice across ``axis`` with its
    ``k = context`` neighbours on each side as channels, lowest first, each with all C
    channels; the end slices repeat (as :func:`medvol.data.slices.extract_slices` gives them)."""
    if not context:
        return image
    n = image.shape[1 + axis]
    idx = torch.arange(n, device=image.device)
    return torch.cat([image.index_select(1 + axis, (idx + o).clamp(0, n - 1)) for o in range(-context, context + 1)])


def slab_windows(patch_2d: Sequence[int], axis: int, n_slices: int, overlap: float | Sequence[float],
                 step: Sequence[int] | None) -> tuple[list[int], list[float]]:
    """3D windows for a 2D model: the in-plane patch (``patch_2d``, its ``overlap`` or ``step``)
    and up to :data:`SLAB` slices across ``axis`` with no overlap there."""
    if len(patch_2d) != 2:
        raise ConfigError(f"a 2D model's patch has 2 sizes, got {list(patch_2d)}")
    if step is not None:
        in_plane = overlap_for_step(step, patch_2d)
    elif isinstance(overlap, (int, float)):
        in_plane = [float(overlap)] * 2
    else:
        in_plane = [float(o) for o in overlap]
    if len(in_plane) != 2:
        raise ConfigError(f"a 2D model takes 2 overlaps (or steps), one per in-plane axis; got {in_plane}")
    patch = [int(p) for p in patch_2d]
    patch.insert(axis, min(SLAB, int(n_slices)))
    in_plane.insert(axis, 0.0)
    return patch, in_plane


def _accumulation_device(device: torch.device, n_channels: int, spatial: Sequence[int]) -> torch.device:
    """``device`` when the float16 output (and MONAI's count map) fit in half its free memory, else the CPU."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    out_bytes = n_channels * int(np.prod(spatial)) * 2 * 2
    return torch.device("cpu") if out_bytes > 0.5 * free else device


def sliding_window_probabilities(model: nn.Module, image: np.ndarray | torch.Tensor, patch_size: Sequence[int],
                                 device: torch.device, decoder=SoftmaxClasses(), n_channels: int | None = None,
                                 overlap: float | Sequence[float] = 0.5, step: Sequence[int] | None = None,
                                 sw_batch_size: int = 2, mirror_axes: Sequence[int] = (),
                                 precision: Precision | None = None, blend: str = "gaussian",
                                 slice_axis: int | None = None, context: int = 0,
                                 mask: np.ndarray | torch.Tensor | None = None, tta_batch: int | None = None,
                                 stats: dict | None = None) -> torch.Tensor:
    """Probabilities ``(K, X, Y, Z)`` float16 (on the CPU) of a preprocessed image ``(C, X, Y, Z)``.

    ``step`` (voxels per axis, as papers state strides) replaces ``overlap`` when given;
    ``blend`` is ``"gaussian"`` (nnU-Net's importance weighting) or ``"constant"``;
    ``n_channels`` (the output's K) only sizes the GPU-or-CPU accumulation choice. The model
    runs in eval mode and gets its former mode back. Pass the image as a float16 tensor (and
    drop the float32 array) to hold the least memory.

    ``slice_axis`` (0-2 of X, Y, Z) marks a 2D model: ``patch_size`` is its 2D patch,
    ``step``/``overlap`` are in plane, ``context`` its 2.5D neighbours (module docstring).

    ``precision`` (:mod:`medvol.precision`; default: ``auto`` for ``device``) sets autocast and
    layout. ``mask`` (``(X, Y, Z)`` bool, the scan's nonzero/body mask on the preprocessed grid)
    skips the windows that hold none of it (with class softmax and task sigmoid decoders; their
    voxels read as background); ``stats`` (a dict) receives ``windows_run``/``windows_skipped``.
    ``tta_batch``: mirrored copies per forward (default: all of them in one).
    """
    from monai.inferers import sliding_window_inference

    from medvol.precision import choose_precision

    precision = precision or choose_precision(device)
    layout_input = slice_axis is None
    if slice_axis is not None:
        if type(decoder) is not SoftmaxClasses:
            raise ConfigError(f"a 2D model is run over slices with class softmax only, not {type(decoder).__name__}")
        image = with_slice_context(torch.as_tensor(image), slice_axis, context)
        patch_size, overlap = slab_windows(patch_size, slice_axis, image.shape[1 + slice_axis], overlap, step)
        model, step = _slice_model(model, slice_axis), None
    if step is not None:
        overlap = overlap_for_step(step, patch_size)
    if mask is not None and n_channels is None:
        raise ValueError("skipping windows outside the mask needs n_channels (the output's channel count)")
    predictor = WindowPredictor(precision.prepare(model), decoder, mirror_axes, precision,
                                n_channels if mask is not None else None, tta_batch, layout_input)
    acc = _accumulation_device(device, n_channels or 1, image.shape[1:])
    x = _window_input(image, mask, acc)
    with eval_mode(model):
        out = sliding_window_inference(x, list(patch_size), sw_batch_size, predictor, overlap=overlap, mode=blend,
                                       sigma_scale=0.125, padding_mode="constant", cval=0.0, sw_device=device,
                                       device=acc)[0]
    if stats is not None:
        stats.update(windows_run=predictor.windows_run, windows_skipped=predictor.windows_skipped)
    return decoder.finish(out).cpu()


def _window_input(image: np.ndarray | torch.Tensor, mask, device: torch.device) -> torch.Tensor:
    """``(1, C, X, Y, Z)`` float16 on ``device``, the mask appended as a last channel when given.
    A (possibly strided) view of a cropped array is converted without a float32 copy."""
    x = torch.as_tensor(image).to(device=device, dtype=torch.float16)
    if mask is not None:
        x = torch.cat([x, torch.as_tensor(mask).to(device=device, dtype=torch.float16)[None]])
    return x[None]  # float16 input: MONAI accumulates in float16


def _slice_model(model: nn.Module, axis: int) -> nn.Module:
    """``model`` (2D) run over every slice across ``axis`` of a ``(B, C, X, Y, Z)`` window."""
    from medvol.networks.slice_adapter import SliceAdapter

    # the wrapper takes the model's mode: eval_mode restores the wrapper's mode, and with it the model's
    return SliceAdapter(model, axis=2 + axis, slice_batch=2 * SLAB).train(model.training)
