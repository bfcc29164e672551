"""nnU-Net-style preprocessing: fingerprint -> plan -> crop, normalise, resample -> cache.

The public names below are loaded on first use: importing one module of the package (the
per-case transform that prediction runs, the raw layouts) never loads the dataset driver.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medvol.cache import list_cases, load_case, load_plans
    from medvol.preprocessing.pool import Report
    from medvol.preprocessing.preprocessor import (
        fingerprint_dataset,
        plan_dataset,
        preprocess_cases,
        preprocess_dataset,
    )
    from medvol.preprocessing.raw import RawCase, RawDataset, open_raw_dataset
    from medvol.preprocessing.transform import preprocess_case

_WHERE = {"preprocess_dataset": "medvol.preprocessing.preprocessor",
          "preprocess_cases": "medvol.preprocessing.preprocessor",
          "fingerprint_dataset": "medvol.preprocessing.preprocessor",
          "plan_dataset": "medvol.preprocessing.preprocessor",
          "Report": "medvol.preprocessing.pool",
          "preprocess_case": "medvol.preprocessing.transform",
          "load_case": "medvol.cache", "load_plans": "medvol.cache", "list_cases": "medvol.cache",
          "open_raw_dataset": "medvol.preprocessing.raw", "RawCase": "medvol.preprocessing.raw",
          "RawDataset": "medvol.preprocessing.raw"}

__all__ = ["preprocess_dataset", "preprocess_case", "preprocess_cases", "fingerprint_dataset", "plan_dataset",
           "load_case", "load_plans", "list_cases", "open_raw_dataset", "RawCase", "RawDataset", "Report"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'medvol.preprocessing' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
