"""GRU slice aggregator: per-slice feature vectors -> one subject-level prediction (after DC-MT's
aggregation network, MedIA 2022; ``docs/methods/slice_aggregator.md``).

After DC-MT's aggregation network (Huo et al., MedIA 2022; the authors' ``SimpleRNN`` in
``Aggregation-Network/models/AttentionModel/rnn.py``): per-slice features ``(B, S, F)`` (F = 512
from the slice classifier) go through dropout + 1x1 convolutions F -> 256 -> 128 (BatchNorm,
ReLU); then two branches whose outputs are summed:

(a) a learned weighted sum over slices of the 128-d slice embeddings -> 192;
(b) a 2-layer bidirectional GRU (hidden 96, so 192 per slice), a learned weighted sum over
    slices -> 192;

and a linear classifier (no bias) maps the sum to subject classes.

The weighted sums (``model.options.pooling``):

- ``positional`` (as published): ``Conv2d(C_in, 192, kernel_size=(24, 1), bias=True)`` over the
  ``(B, C_in, 24, 1)`` slice sequence, i.e. a learned weight per slice *position*, input
  channel and output channel, plus a bias: it pools and projects in one, and slice order
  matters. It spans exactly ``fixed_slices`` positions, so it needs ``fixed_slices`` (24
  published): every scan is centre-cropped or zero-padded to that many slices first.
- ``attention`` (default, medvol's): a softmax attention over slices (a learned score per slice
  embedding), masked so padded slices get weight 0, then a linear layer -> 192. It ignores slice
  order and takes any number of slices, batched with a padding mask ``(B, S)`` (True = real
  slice, real slices first).

Other differences from the published network:

- The GRU runs on packed sequences, and the 1x1 convolutions run on the real slices only, so
  padded slices never reach an output, nor the BatchNorm statistics in training.
  ``fixed_slices`` keeps the published input rule (:func:`to_fixed_slices`): all its positions,
  zeros included, are treated as slices, as the published network treats them.
- Dropout is element-wise (published: ``Dropout2d`` over feature channels), p = 0.5 as published.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from medvol.errors import ConfigError
from medvol.networks import model_options, register


def slice_lengths(mask: torch.Tensor | None, batch: int, slices: int, device=None) -> torch.Tensor:
    """Real slices per subject ``(B,)`` from a padding mask ``(B, S)`` (True = real, real slices
    first; ``None`` = all real). Raises ``ValueError`` for any other mask."""
    if mask is None:
        return torch.full((batch,), slices, dtype=torch.long, device=device)
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, slices):
        raise ValueError(f"mask must be a bool tensor of shape {(batch, slices)}, got {mask.dtype} {tuple(mask.shape)}")
    lengths = mask.sum(1)
    prefix = torch.arange(slices, device=mask.device)[None] < lengths[:, None]
    if not torch.equal(prefix, mask) or bool((lengths == 0).any()):
        raise ValueError("each mask row must be True for its real slices, at the start, and False after; "
                         "every subject needs at least one real slice")
    return lengths


def pad_slices(sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Subjects' per-slice features ``[(S_i, F)]`` (tensors or arrays) as one zero-padded batch
    ``(B, max S_i, F)`` float32 and its padding mask ``(B, max S_i)`` (True = real slice)."""
    seqs = [torch.as_tensor(s, dtype=torch.float32) for s in sequences]
    out = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    lengths = torch.tensor([len(s) for s in seqs])
    return out, torch.arange(out.shape[1])[None] < lengths[:, None]


def to_fixed_slices(features: torch.Tensor, mask: torch.Tensor | None = None, n: int = 24):
    """Centre-crop or zero-pad each subject's real slices to exactly ``n`` (DC-MT's 24-slice input).

    ``features`` ``(B, S, F)``, ``mask`` ``(B, S)`` or ``None`` -> ``(fixed (B, n, F), real (B, n))``,
    ``real`` marking the positions that hold a real slice. A subject with ``L > n`` slices keeps
    slices ``(L - n) // 2`` to ``(L - n) // 2 + n - 1`` (an odd one out is dropped at the end); one
    with ``L < n`` gets ``(n - L) // 2`` zero slices before and the rest (one more when odd) after.
    """
    b, s, f = features.shape
    lengths = slice_lengths(mask, b, s, features.device)
    start = torch.where(lengths >= n, (lengths - n) // 2, -((n - lengths) // 2))
    src = start[:, None] + torch.arange(n, device=features.device)  # (B, n) source slice per position
    real = (src >= 0) & (src < lengths[:, None])
    picked = features.gather(1, src.clamp(0, s - 1)[..., None].expand(b, n, f))
    return torch.where(real[..., None], picked, torch.zeros_like(picked)), real


class MaskedAttentionPool(nn.Module):
    """A learned weighted sum over slices: ``(B, S, C)`` + mask ``(B, S)`` -> ``(B, C)``, weights
    the softmax over real slices of a linear score (no bias: softmax ignores a shared shift)."""

    def __init__(self, channels: int):
        super().__init__()
        self.score = nn.Linear(channels, 1, bias=False)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))
        return torch.einsum("bs,bsc->bc", scores.softmax(1), h)


class PositionalSum(nn.Module):
    """DC-MT's weighted sum over slice positions: ``(B, S, C)`` -> ``(B, out)`` with ``S`` exactly
    ``slices``; ``out[o] = bias[o] + sum_{s, c} weight[o, c, s] * h[s, c]``, the published
    ``Conv2d(C, out, kernel_size=(slices, 1), bias=True)`` on ``(B, C, S, 1)`` (held here as the
    equivalent ``Conv1d(C, out, slices)``). ``mask`` is accepted for the attention pool's call
    signature and must be all True: every position is a slice."""

    def __init__(self, channels: int, out: int, slices: int):
        super().__init__()
        self.slices = slices
        self.conv = nn.Conv1d(channels, out, slices, bias=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if h.shape[1] != self.slices:
            raise ValueError(f"positional pooling takes exactly {self.slices} slices, got {h.shape[1]}")
        if mask is not None and not bool(mask.all()):
            raise ValueError("positional pooling treats every position as a slice: no padding mask")
        return self.conv(h.transpose(1, 2)).squeeze(-1)


POOLINGS = ("attention", "positional")


def _slice_embedding(in_features: int, widths: tuple[int, ...], dropout: float) -> nn.Sequential:
    """Dropout + 1x1 convs (BN, ReLU) over ``(N, F, 1)`` slice vectors, dropout after the last."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip((in_features,) + widths[:-1], widths):
        layers += [nn.Dropout(dropout), nn.Conv1d(w_in, w_out, 1, bias=False), nn.BatchNorm1d(w_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Dropout(dropout))


def check_pooling(pooling: str, fixed_slices: int | None) -> None:
    """ConfigError for an unknown pooling, a bad ``fixed_slices``, or positional pooling without it."""
    if pooling not in POOLINGS:
        raise ConfigError(f"model.options.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if fixed_slices is not None and (isinstance(fixed_slices, bool) or not isinstance(fixed_slices, int)
                                     or fixed_slices < 1):
        raise ConfigError(f"model.options.fixed_slices must be a whole number >= 1 or null, got {fixed_slices!r}")
    if pooling == "positional" and fixed_slices is None:
        raise ConfigError("model.options.pooling 'positional' weighs each of exactly fixed_slices slice positions: "
                          "set model.options.fixed_slices (24 published)")


class GRUSliceAggregator(nn.Module):
    """Per-slice features ``(B, S, F)`` (+ padding mask ``(B, S)``) -> subject logits ``(B, K)``.

    Args:
        num_classes: K subject classes.
        in_features: F, the per-slice feature width (512 in DC-MT).
        hidden: widths of the 1x1 convs (256, 128 published).
        gru_hidden: GRU hidden size per direction (96 published); both branches give ``2 * gru_hidden``.
        dropout: dropout probability before each 1x1 conv and after the last.
        fixed_slices: ``None`` (any length, masked) or a slice count (24 published) every input is
            centre-cropped / zero-padded to.
        pooling: ``attention`` (masked softmax over slices, then a linear layer; any slice count)
            or ``positional`` (published: a weight per slice position, channel and output, plus a
            bias; needs ``fixed_slices``).
    """

    to_fixed_slices = staticmethod(to_fixed_slices)

    def __init__(self, num_classes: int, in_features: int = 512, hidden: tuple[int, ...] = (256, 128),
                 gru_hidden: int = 96, dropout: float = 0.5, fixed_slices: int | None = None,
                 pooling: str = "attention"):
        super().__init__()
        check_pooling(pooling, fixed_slices)
        hidden = tuple(int(w) for w in hidden)
        width, out = hidden[-1], 2 * gru_hidden
        self.fixed_slices, self.pooling = fixed_slices, pooling
        self.embed = _slice_embedding(in_features, hidden, dropout)
        self.pool_a, self.proj_a = self._pool(width, out)
        self.gru = nn.GRU(width, gru_hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.pool_b, self.proj_b = self._pool(out, out)
        self.classifier = nn.Linear(out, num_classes, bias=False)  # the branches carry the biases

    def _pool(self, channels: int, out: int) -> tuple[nn.Module, nn.Module]:
        """One branch's weighted sum over slices and its projection to ``out``."""
        if self.pooling == "positional":
            assert self.fixed_slices is not None
            return PositionalSum(channels, out, self.fixed_slices), nn.Identity()  # pools and projects
        return MaskedAttentionPool(channels), nn.Linear(channels, out)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` ``(B, S, F)``, ``mask`` ``(B, S)`` bool (True = real slice, real slices
        first; ``None`` = all real) -> logits ``(B, K)``."""
        if self.fixed_slices is not None:
            features, _ = to_fixed_slices(features, mask, self.fixed_slices)
            mask = None  # the zero slices are input, as in the published network
        b, s, _ = features.shape
        lengths = slice_lengths(mask, b, s, features.device)
        if mask is None:
            mask = torch.ones(b, s, dtype=torch.bool, device=features.device)
        h = self._embed(features, mask)
        branch_a = self.proj_a(self.pool_a(h, mask))
        branch_b = self.proj_b(self.pool_b(self._gru(h, lengths), mask))
        return self.classifier(branch_a + branch_b)

    def _embed(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The 1x1 convs on the real slices only -> ``(B, S, C)``, zeros at padded slices."""
        real = self.embed(features[mask].unsqueeze(-1)).squeeze(-1)  # (N_real, C)
        h = real.new_zeros(*mask.shape, real.shape[-1])
        h[mask] = real
        return h

    def _gru(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Bidirectional GRU over the real slices (packed) -> ``(B, S, 2 * gru_hidden)``."""
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])[0]


_OPTIONS = {"hidden", "gru_hidden", "dropout", "fixed_slices", "pooling"}


@register("gru_aggregator")
def build_gru_aggregator(model_cfg, plans: dict, in_channels: int, num_classes: int) -> nn.Module:
    """``in_channels`` is the per-slice feature width F; ``model.options`` may set ``hidden``,
    ``gru_hidden``, ``dropout``, ``fixed_slices`` and ``pooling`` (``model.base_features`` is not
    used)."""
    opts = model_options(model_cfg, "gru_aggregator", _OPTIONS)
    return GRUSliceAggregator(num_classes, in_features=in_channels, **opts)
