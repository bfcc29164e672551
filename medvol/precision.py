"""Numerical precision and memory layout per device: what training and prediction run in.

``--precision`` (``trainer.precision`` / ``inference.precision`` in a recipe):

- ``auto`` (default): the fastest setting that keeps accuracy on the device. On a CPU with
  native bf16 (AVX512-BF16/AMX: oneDNN's capability check): bf16 autocast with channels-last
  weights and inputs, for prediction (on an idle 2-core CPU: 3.2x fp32 on real brain scans,
  labels within Dice 0.9995 of fp32's) and training (model steps 1.8-2.5x fp32; the demo's
  held-out Dice over 3 seeds: grey matter 0.820 vs 0.822, white matter 0.900 vs 0.901, within
  fp32's seed-to-seed spread; ``benchmarks/RESULTS.md``); on CUDA, AMP in bf16 where the GPU
  supports it, else fp16 (with a gradient scaler when training), default layout (channels-last
  is not measured there yet); fp32 everywhere else.
- ``fp32``: no autocast.
- ``bf16``: bf16 autocast on the device (on a CPU without native bf16 it works, slowly).
- ``fp16``: fp16 autocast, CUDA only.

Autocast keeps reductions and normalisation statistics in fp32 (PyTorch's autocast op lists),
and medvol accumulates sliding-window outputs in float16 either way. What was used is recorded
in the run's ``train_summary.json`` and the prediction's ``predict.json``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from medvol.config import PRECISIONS
from medvol.errors import ConfigError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX512-BF16 or AMX).
    ``MEDVOL_CPU_BF16=0`` in the environment says no (so that ``auto`` gives fp32: runs whose
    numbers must not depend on the machine, such as the test suite's)."""
    import os

    if os.environ.get("MEDVOL_CPU_BF16", "").strip() == "0":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """The chosen precision (``fp32``/``bf16``/``fp16``) and layout on one device type."""

    name: str
    device_type: str
    channels_last: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return _DTYPES[self.name]

    def autocast(self):
        """The autocast context for this precision (a null context for fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` with channels-last weights when chosen (in place; returned for chaining)."""
        if self.channels_last:
            fmt = torch.channels_last_3d if _is_3d(model) else torch.channels_last
            model.to(memory_format=fmt)  # type: ignore[call-overload]  # Module.to takes it (untyped)
        return model

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the chosen memory layout (5-D: channels-last 3D, 4-D: channels-last)."""
        if not self.channels_last or x.ndim not in (4, 5):
            return x
        return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)

    def describe(self) -> dict:
        return {"precision": self.name, "channels_last": self.channels_last, "device": self.device_type}


def _is_3d(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in model.modules())


def choose_precision(device: torch.device | str, requested: str = "auto", amp: bool = True) -> Precision:
    """The precision ``requested`` on ``device``, ``auto`` resolved by its capability, for
    training and prediction alike; ``amp=False`` (``trainer.amp: false``) turns ``auto`` into fp32."""
    dev = torch.device(device)
    if requested not in PRECISIONS:
        raise ConfigError(f"precision '{requested}': expected one of {', '.join(PRECISIONS)}")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if requested == "auto":
        requested = _auto(dev) if amp else "fp32"
    if requested == "fp16" and dev.type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device (got {dev.type}); use bf16 or fp32")
    if requested == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16: this GPU does not support bf16; use fp16 or fp32")
    channels_last = dev.type == "cpu" and requested == "bf16" and cpu_has_native_bf16()
    return Precision(requested, dev.type, channels_last)


def _auto(dev: torch.device) -> str:
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dev.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


__all__ = ["PRECISIONS", "Precision", "choose_precision", "cpu_has_native_bf16"]
