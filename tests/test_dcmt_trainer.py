"""DC-MT's trainer (METHODS.md §4) on the slice path, and its features feeding the GRU
aggregator (§7): input preparation, the teacher-argmax CAM channel of unlabelled slices, save
and resume, a short learning run, subject-level prediction end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvol.networks.aggregator import GRUSliceAggregator
from medvol.networks.slice.dcmt import DCMTNet, SliceInput, normalise_slices
from medvol.networks.slice_adapter import SliceAdapter

TINY = dict(width=0.25, groups=2, layers=(1, 1, 1, 1), head_channels=16)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_normalise_slices_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 30, (3, 2, 20, 16)).astype(np.float32)
    x[1, 0] = 7.0  # a constant slice becomes 0
    out = normalise_slices(torch.from_numpy(x)).numpy()
    for n in range(3):
        for c in range(2):
            lo, hi = np.percentile(x[n, c], [0.1, 99.9])
            want = np.zeros_like(x[n, c]) if hi == lo else (np.clip(x[n, c], lo, hi) - lo) / (hi - lo)
            np.testing.assert_allclose(out[n, c], want, atol=1e-5)
    assert out.min() == 0 and out.max() == pytest.approx(1)
    # invariant to a positive affine change of a whole volume (what the cache's rescale_to_0_1 does)
    np.testing.assert_allclose(normalise_slices(torch.from_numpy(3 * x + 11)).numpy(), out, atol=1e-5)


def test_slice_input_repeats_grey_to_three_channels():
    net = SliceInput(torch.nn.Identity(), channels=3)
    x = torch.rand(2, 1, 8, 8) * 50
    out = net(x)
    assert out.shape == (2, 3, 8, 8) and torch.equal(out[:, 0], out[:, 2])
    torch.testing.assert_close(out[:, :1], normalise_slices(x))
    with pytest.raises(ValueError, match="expected 1 or 3 channels, got 2"):
        net(torch.rand(2, 2, 8, 8))


def test_dcmt_features_feed_the_gru_aggregator_end_to_end():
    """Volume -> SliceAdapter (classification) over DC-MT's prepared input -> per-slice 16-d
    features -> GRU aggregator -> one subject prediction; the adapter equals a per-slice loop."""
    torch.manual_seed(0)
    net = SliceInput(DCMTNet(num_classes=3, **TINY).eval())
    volumes = torch.rand(2, 1, 32, 24, 5) * 300  # (B, C, X, Y, Z): 5 slices across Z
    adapter = SliceAdapter(net, axis=-1, slice_batch=3, mode="classification")
    with torch.no_grad():
        out = adapter(volumes)
        assert out.logits.shape == (2, 5, 3) and out.features.shape == (2, 5, 16)
        for b in range(2):
            for z in range(5):
                ref = net(volumes[b:b + 1, :, :, :, z])
                torch.testing.assert_close(out.logits[b, z], ref["logits"][0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(out.features[b, z], ref["features"][0], atol=1e-5, rtol=1e-4)
        agg = GRUSliceAggregator(num_classes=3, in_features=16, hidden=(8, 4), gru_hidden=3).eval()
        mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # the second subject has 3 slices
        subject_logits = agg(out.features, mask)
        assert subject_logits.shape == (2, 3)
        probs = subject_logits.softmax(1)
        torch.testing.assert_close(probs.sum(1), torch.ones(2))
        # the padded slices change nothing: the second subject alone, with its 3 real slices
        torch.testing.assert_close(agg(out.features[1:, :3])[0], subject_logits[1], atol=1e-5, rtol=1e-4)
