"""Inference: the one sliding-window path (``sliding_window``), post-processing
(``postprocess``), whole-scan prediction (``predictor``) and the geometry restore (``geometry``).

``Predictor`` (the Python API: :mod:`medvol.inference.api`), ``predict`` and ``restore_geometry``
are loaded on first use: training imports the sliding-window path from here without pulling in
the preprocessing driver that prediction needs.
"""

from medvol.checkpoint import load_run
from medvol.inference.sliding_window import sliding_window_probabilities

__all__ = ["Predictor", "restore_geometry", "predict", "load_run", "sliding_window_probabilities"]


def __getattr__(name: str):
    if name == "predict":
        from medvol.inference.predictor import predict

        return predict
    if name == "Predictor":
        from medvol.inference.api import Predictor

        return Predictor
    if name == "restore_geometry":
        from medvol.inference.geometry import restore_geometry

        return restore_geometry
    raise AttributeError(f"module 'medvol.inference' has no attribute {name!r}")
