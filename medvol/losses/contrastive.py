"""Contrastive learning pieces (MoCo-style, as PCRL uses them): a queue of past keys and InfoNCE."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KeyQueue(nn.Module):
    """A ring buffer of the last ``size`` keys (L2-normalised, ``dim`` wide).

    It starts full of random unit vectors (MoCo's convention: negatives from step one);
    each :meth:`enqueue` overwrites the oldest entries. State lives in buffers, so it is
    checkpointed with the models.
    """

    keys: torch.Tensor  # (size, dim) buffers, registered in __init__
    ptr: torch.Tensor
    count: torch.Tensor

    def __init__(self, dim: int = 128, size: int = 16384, generator: torch.Generator | None = None):
        super().__init__()
        if size < 1:
            raise ValueError("queue size must be at least 1")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write (= the oldest)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # keys enqueued so far

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = keys.detach().to(self.keys.dtype)
        n = keys.shape[0]
        if n > self.size:  # only the newest ``size`` survive
            self.count += n - self.size
            keys, n = keys[-self.size:], self.size
        idx = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[idx] = keys
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count += n

    def ordered(self) -> torch.Tensor:
        """The queue oldest first (the newest key is the last row)."""
        return torch.roll(self.keys, -int(self.ptr), 0)

    def forward(self) -> torch.Tensor:
        return self.keys


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.2
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of queries ``q`` (B, D) against their positives ``k`` (B, D) and the shared
    ``negatives`` (K, D): mean over the batch of -log(exp(q.k/T) / (exp(q.k/T) + sum_n exp(q.n/T))).
    Also returns the share of queries whose positive scores above every negative."""
    q, k, negatives = q.float(), k.float(), negatives.float()
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ negatives.t()
    logits = torch.cat([pos, neg], 1) / temperature
    loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
    acc = (logits.argmax(1) == 0).float().mean()
    return loss, acc
