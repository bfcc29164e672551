"""Inference: sliding-window prediction of whole scans and the geometry restore."""

from medvol.inference.geometry import restore_geometry
from medvol.inference.predictor import load_run, predict, sliding_window_probabilities

__all__ = ["restore_geometry", "predict", "load_run", "sliding_window_probabilities"]
