"""Evaluation: metrics per case and class (in mm), summaries, pictures and an HTML index."""

from medvol.evaluation.metrics import case_metrics, evaluate_folders, summarize
from medvol.evaluation.report import case_picture, write_index

__all__ = ["case_metrics", "evaluate_folders", "summarize", "case_picture", "write_index"]
