"""Checks of user-given settings, shared by the CLI (where options are parsed) and the
library functions that take the same values. Each raises :class:`ConfigError` naming the
option and the problem; NaN and infinities never pass (every comparison with NaN is False,
so each check asks for what is allowed rather than rejecting what is not)."""

from __future__ import annotations

import math
import re
from typing import Sequence

from medvol.errors import ConfigError


def finite(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{name}: must be a finite number, got {value!r}")
    return v


def positive(value, name: str) -> float:
    v = finite(value, name)
    if not v > 0:
        raise ConfigError(f"{name}: must be > 0, got {value!r}")
    return v


def non_negative(value, name: str) -> float:
    v = finite(value, name)
    if not v >= 0:
        raise ConfigError(f"{name}: must be >= 0, got {value!r}")
    return v


def one_of(value, choices: Sequence, name: str):
    if value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not value >= 1:
        raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")
    return value


def fraction(value, name: str) -> float:
    """A number in [0, 1) (sliding-window overlap: 1 would never advance)."""
    v = finite(value, name)
    if not 0 <= v < 1:
        raise ConfigError(f"{name}: must be in [0, 1), got {value!r}")
    return v


def ct_window(window: Sequence, name: str = "--ct-window") -> tuple[float, float]:
    if len(window) != 2:
        raise ConfigError(f"{name}: expected two numbers LO HI, got {list(window)}")
    lo, hi = finite(window[0], name), finite(window[1], name)
    if not lo < hi:
        raise ConfigError(f"{name}: LO must be below HI, got {lo:g} {hi:g}")
    return lo, hi


def target_spacing(spacing: Sequence, name: str = "--target-spacing") -> list[float]:
    if len(spacing) != 3:
        raise ConfigError(f"{name}: expected three spacings in mm (X Y Z), got {list(spacing)}")
    return [positive(s, name) for s in spacing]


def device(name: str, option: str = "--device") -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; CUDA only where a CUDA device is there."""
    m = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", str(name))
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"{option}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if m.group(1) == "cuda":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"{option} {name}: no CUDA device is available here (use --device cpu)")
        if m.group(2) is not None and int(m.group(2)) >= n:
            raise ConfigError(f"{option} {name}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return str(name)
