"""Ramp-up curves of the consistency and contrast weights (Laine & Aila's mean-teacher ramps).

A foundation module: losses weigh their terms with these and training schedules them, so
neither layer reaches into the other (``medvol.training.schedules`` re-exports them).
"""

from __future__ import annotations

import math

import numpy as np


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t)^2), t = current / length clipped to [0, 1] (Laine & Aila)."""
    if length <= 0:
        return 1.0
    t = float(np.clip(current / length, 0.0, 1.0))
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, length: float) -> float:
    return 1.0 if length <= 0 else float(np.clip(current / length, 0.0, 1.0))
