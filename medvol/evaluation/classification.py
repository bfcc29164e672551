"""Classification metrics of class probabilities against targets (subjects, slices)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def balanced_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """The mean over the classes present in ``target`` of the recall of that class."""
    classes = np.unique(target)
    return float(np.mean([np.mean(pred[target == c] == c) for c in classes]))


def binary_auc(score: np.ndarray, target: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``target == 1`` (the Mann-Whitney U statistic,
    ties counted half); NaN when one of the two classes is absent."""
    pos = target == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(probs: np.ndarray, target: np.ndarray, prefix: str = "val/") -> dict[str, float]:
    """``accuracy`` and ``balanced_accuracy`` of the argmax of ``probs`` ``(n, K)`` against
    ``target`` ``(n,)``; with two classes also ``auc`` of the class-1 probability."""
    probs, target = np.asarray(probs), np.asarray(target)
    pred = probs.argmax(1)
    out = {f"{prefix}accuracy": float(np.mean(pred == target)),
           f"{prefix}balanced_accuracy": balanced_accuracy(pred, target)}
    if probs.shape[1] == 2:
        out[f"{prefix}auc"] = binary_auc(probs[:, 1], target)
    return out


def majority_accuracy(target: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class of ``target``."""
    return float(np.bincount(np.asarray(target)).max() / len(target))


__all__ = ["balanced_accuracy", "binary_auc", "classification_metrics", "majority_accuracy"]
