"""DDP ≡ a larger batch, in float64 (issue 35, 2): the default loss (batch Dice + CE over the
deep-supervision levels) of 2 gloo processes × batch 1 gives the gradient of 1 process ×
batch 2 to rounding (1e-12), with the cases that a statistic pooled per rank would get wrong:
one rank's sample lacks a class entirely and holds a few voxels of another, and its patch is
half padding. In float32 the two differ by reduction order alone
(``benchmarks/ddp_equivalence.py``, benchmarks/RESULTS.md)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two samples of 1 channel, 16^3, three classes. Sample 0 holds all three; sample 1 only
    background and class 1 in one 2x2x2 corner, and its upper half is padding (image 0, label
    background)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 16, 16, generator=g, dtype=torch.float64)
    y = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    y[0, 0, 2:10, 3:12, 4:9] = 1
    y[0, 0, 9:14, 8:15, 6:13] = 2
    y[1, 0, :2, :2, :2] = 1
    x[1, :, 8:] = 0.0
    return x, y


class _Net(nn.Module):
    """A conv and instance norm (per-sample statistics) with three deep-supervision heads, the
    coarser ones upsampled to the full size as DynUNet returns them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1, dtype=torch.float64)
        self.norm = nn.InstanceNorm3d(4, affine=True, dtype=torch.float64)
        self.head = nn.Conv3d(4, 3, 1, dtype=torch.float64)

    def forward(self, x):
        logits = self.head(F.leaky_relu(self.norm(self.conv(x))))
        return [logits, *(F.interpolate(F.avg_pool3d(logits, k), scale_factor=k, mode="trilinear") for k in (2, 4))]


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    from medvol.losses import segmentation_loss

    loss = segmentation_loss("dice_ce", deep_supervision=True)
    loss(model(x), y).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _rank(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, y = _batch()
        model = nn.parallel.DistributedDataParallel(_Net())
        grads = _grads(model, x[rank:rank + 1], y[rank:rank + 1])
        queue.put((rank, {k.removeprefix("module."): v.numpy() for k, v in grads.items()}))  # by value
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_processes_give_the_gradient_of_the_double_batch_in_float64():
    x, y = _batch()
    assert not (y[1] == 2).any() and int((y[1] == 1).sum()) == 8  # as documented
    one = _grads(_Net(), x, y)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for r in (0, 1):  # DDP averaged the gradients: every rank holds the same
        for k, g in one.items():
            diff = float((torch.from_numpy(results[r][k]) - g).abs().max())
            assert diff < 1e-12 * max(1.0, float(g.abs().max())), (r, k, diff)
