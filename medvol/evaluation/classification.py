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


def ordinal_auc(probs: np.ndarray, target: np.ndarray) -> float:
    """For ordered classes (grades): the mean over the cut-offs k = 1 .. K-1 of the AUC of
    ``P(class >= k)`` for ``target >= k`` (:func:`binary_auc`); with two classes the class-1 AUC.
    Cut-offs with one side absent from ``target`` are left out; NaN when every one is."""
    probs, target = np.asarray(probs), np.asarray(target)
    aucs = [binary_auc(probs[:, k:].sum(1), (target >= k).astype(np.int64)) for k in range(1, probs.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


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


__all__ = ["balanced_accuracy", "binary_auc", "classification_metrics", "majority_accuracy", "ordinal_auc"]
