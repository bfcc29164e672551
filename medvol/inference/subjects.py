"""Subject-level predictions of the two-stage slice pipeline (METHODS.md §7).

Stage one, a trained 2D slice classifier, runs over each subject's slices (through
:class:`medvol.networks.slice_adapter.SliceAdapter`) and gives per-slice logits and feature
vectors; stage two, the GRU slice aggregator, turns a subject's feature sequence into subject
class probabilities.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from medvol.networks.aggregator import pad_slices


@torch.no_grad()
def subject_probabilities(model: nn.Module, sequences: Sequence, device: torch.device,
                          batch_size: int = 16) -> np.ndarray:
    """Class probabilities ``(n, K)`` of subjects given as per-slice features ``[(S_i, F)]``,
    from ``model`` (an aggregator) in eval mode, ``batch_size`` subjects padded together."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(sequences), batch_size):
            x, mask = pad_slices(sequences[i:i + batch_size])
            out.append(model(x.to(device), mask.to(device)).float().softmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
