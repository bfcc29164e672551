"""nnU-Net-style preprocessing: fingerprint -> plan -> crop, normalise, resample -> cache."""

from medvol.cache import list_cases, load_case, load_plans
from medvol.preprocessing.preprocessor import (
                                               Report,
                                               fingerprint_dataset,
                                               plan_dataset,
                                               preprocess_case,
                                               preprocess_cases,
                                               preprocess_dataset,
)
from medvol.preprocessing.raw import RawCase, RawDataset, open_raw_dataset

__all__ = ["preprocess_dataset", "preprocess_case", "preprocess_cases", "fingerprint_dataset", "plan_dataset",
           "load_case", "load_plans", "list_cases", "open_raw_dataset", "RawCase", "RawDataset", "Report"]
