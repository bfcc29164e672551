"""How well can a stride-8 map draw the CT test slices' target? (Inf-Net's final map, issue 27)

    python benchmarks/infnet_ceiling.py bone        # or: brain

Inf-Net's final map has one logit per 8 x 8 working pixels, resized bilinearly to the slice.
For each working size, on the 16 test slices of ``methods.py``'s ``ct_<target>`` data (128 px):
- "cell fraction": the map each cell's share of target (the label at the working size,
  average-pooled by 8), cut at 0.5 after the resize: what a map that knows the answer per
  cell draws;
- "fitted": a free logit per cell fitted to the label by 400 Adam steps on a soft Dice (the
  best such a map can do at all).
Dice is the mean over slices."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets.ct_slices import SPLIT_SEEDS, _slices  # noqa: E402


def dice(p: torch.Tensor, g: torch.Tensor) -> float:
    p, g = p.flatten(1), g.flatten(1)
    return (2 * (p * g).sum(1) / (p.sum(1) + g.sum(1)).clamp(min=1)).mean().item()


def up(cells: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(cells, size=(size, size), mode="bilinear")


def fitted(cells: torch.Tensor, g: torch.Tensor, steps: int = 400) -> float:
    logits = torch.logit(cells.clamp(0.02, 0.98)).clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.1)
    best = 0.0
    for i in range(steps):
        s = torch.sigmoid(8 * up(logits, g.shape[-1]))
        loss = 1 - (2 * (s * g).sum((1, 2, 3)) / (s.sum((1, 2, 3)) + g.sum((1, 2, 3)))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 20 == 19:
            best = max(best, dice((up(logits.detach(), g.shape[-1]) >= 0).float(), g))
    return best


def main(target: str = "bone") -> None:
    torch.manual_seed(0)
    g = torch.tensor(np.stack([m for _, m in _slices(16, SPLIT_SEEDS["test"], 128, target)]),
                     dtype=torch.float32)[:, None]
    for size in (128, 256, 352, 512, 704):
        at_size = g if size == 128 else (up(g, size) >= 0.5).float()
        cells = F.avg_pool2d(at_size, 8)
        print(f"working {size} px, map {size // 8} x {size // 8}: cell fraction "
              f"{dice((up(cells, 128) >= 0.5).float(), g):.3f}, fitted {fitted(cells, g):.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])
