"""The one sliding-window path: decoders, TTA, window steps, mode restoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from medvol.errors import ConfigError
from medvol.inference.sliding_window import (
    SoftmaxClasses,
    TaskSigmoid,
    overlap_for_step,
    sliding_window_probabilities,
)

CPU = torch.device("cpu")


def _pointwise_net(out_ch=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 8, 1), nn.ReLU(), nn.Conv3d(8, out_ch, 1)).eval()


def _image(shape=(37, 29, 21)):
    return np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_sliding_window_equals_a_whole_volume_forward(blend):
    net, image = _pointwise_net(), _image()
    for mirror in ((), (0, 1, 2)):
        probs = sliding_window_probabilities(net, image, [16, 16, 12], CPU, overlap=0.5, sw_batch_size=3,
                                             mirror_axes=mirror, blend=blend)
        with torch.no_grad():
            whole = torch.softmax(net(torch.from_numpy(image)[None].half().float()), 1)[0]
        assert probs.dtype == torch.float16 and probs.shape == (3, 37, 29, 21)
        torch.testing.assert_close(probs.float(), whole, atol=3e-3, rtol=0)


class _WindowPosition(nn.Module):
    """Ignores the image: the foreground logit is the voxel's position along the window's first
    axis, (i - 4) / 3; background 0. Overlapping windows disagree, so the blend shows."""

    def forward(self, x):
        i = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        fg = ((i - 4) / 3).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(fg), fg], 1)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_blend_weights_windows_as_a_hand_computed_blend(blend):
    """Two windows of 16 at x = 0 and 8 over a 24-voxel axis (the other axes one window each).
    Gaussian: nnU-Net's map, exp(-d^2 / (2 sigma^2)) per axis with d from the window centre and
    sigma = patch / 8, the product clamped below at 1e-3 (MONAI's floor); constant: weights 1.
    The logits are blended with these weights, then softmaxed: probs[1] = sigmoid(blend)."""
    patch, shape = (16, 4, 3), (24, 4, 3)

    def gauss(n):
        d = np.arange(n) - (n - 1) / 2
        return np.exp(-d ** 2 / (2 * (n / 8) ** 2))

    g = gauss(16)[:, None, None] * gauss(4)[None, :, None] * gauss(3)[None, None, :]
    weight = np.maximum(g, 1e-3) if blend == "gaussian" else np.ones(patch)
    f = np.broadcast_to(((np.arange(16) - 4) / 3)[:, None, None], patch)
    num, den = np.zeros(shape), np.zeros(shape)
    for start in (0, 8):
        num[start:start + 16] += weight * f
        den[start:start + 16] += weight
    want = 1 / (1 + np.exp(-num / den))
    probs = sliding_window_probabilities(_WindowPosition(), np.zeros((1, *shape), np.float32), list(patch), CPU,
                                         overlap=0.5, blend=blend)
    np.testing.assert_allclose(probs[1].float().numpy(), want, atol=4e-3, rtol=0)
    # the two weightings differ by far more than that tolerance where the windows overlap
    other = np.ones(patch) if blend == "gaussian" else np.maximum(g, 1e-3)
    num_o, den_o = np.zeros(shape), np.zeros(shape)
    for start in (0, 8):
        num_o[start:start + 16] += other * f
        den_o[start:start + 16] += other
    assert np.abs(1 / (1 + np.exp(-num_o / den_o)) - want).max() > 0.2


def test_a_one_channel_binary_model_gives_two_class_probabilities():
    net, image = _pointwise_net(1), _image()
    probs = sliding_window_probabilities(net, image, [16, 16, 12], CPU)
    with torch.no_grad():
        fg = torch.sigmoid(net(torch.from_numpy(image)[None].half().float()))[0, 0]
    torch.testing.assert_close(probs[1].float(), fg, atol=3e-3, rtol=0)
    torch.testing.assert_close(probs.float().sum(0), torch.ones_like(fg), atol=2e-3, rtol=0)


class _TaskNet(nn.Module):
    """A task-conditioned 2-channel model: a pointwise net whose output is shifted by the task."""

    def __init__(self):
        super().__init__()
        self.net = _pointwise_net(2)

    def forward(self, x, task):
        return self.net(x) + task.float().view(-1, 1, 1, 1, 1)


def test_task_decoder_gives_the_tasks_sigmoid_channels():
    net, image = _TaskNet().eval(), _image()
    for task in (0, 3):
        probs = sliding_window_probabilities(net, image, [16, 16, 12], CPU, TaskSigmoid(task), mirror_axes=(0,))
        with torch.no_grad():
            x = torch.from_numpy(image)[None].half().float()
            whole = torch.sigmoid(net(x, torch.tensor([task])))[0]
        assert probs.shape == (2, 37, 29, 21)
        # probabilities (not logits) are blended in float16: a few voxels where tiny Gaussian
        # weights meet differ by up to ~1e-2, the rest agree
        torch.testing.assert_close(probs.float(), whole, atol=1e-2, rtol=0)
        assert float((probs.float() - whole).abs().mean()) < 5e-4


@pytest.mark.parametrize("axis", [0, 2])
def test_a_2d_model_runs_over_each_slice(axis):
    """A 2D model over a volume: in-plane windows smaller than the slice, slabs across the
    slice axis; every slice's probabilities equal the model on that whole slice."""
    torch.manual_seed(0)
    net2d = nn.Conv2d(1, 3, 1).eval()  # pointwise: windows cut anywhere agree exactly
    image = _image((20, 18, 11))
    patch = [16, 16] if axis == 0 else [16, 14]
    probs = sliding_window_probabilities(net2d, image, patch, CPU, slice_axis=axis)
    x = torch.from_numpy(image).half().float()  # (1, X, Y, Z)
    with torch.no_grad():
        slices = x.movedim(1 + axis, 0)  # (S, 1, H, W)
        ref = torch.softmax(net2d(slices), 1).movedim(0, 1 + axis)  # (3, X, Y, Z)
    torch.testing.assert_close(probs.float(), ref, atol=3e-3, rtol=0)
    assert probs.shape == (3, 20, 18, 11)


def test_2d_context_channels_are_the_neighbouring_slices_as_training_cuts_them():
    from medvol.data.slices import extract_slices
    from medvol.inference.sliding_window import with_slice_context

    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 5, 4, 6)).astype(np.float32)
    for axis in range(3):
        stacked = with_slice_context(torch.from_numpy(image), axis, 2).numpy()
        for index in (0, 1, image.shape[1 + axis] - 1):
            want = extract_slices(image, axis, index, [0, 0], [s for a, s in enumerate(image.shape[1:]) if a != axis],
                                  2, 0.0)
            got = np.take(stacked, index, axis=1 + axis)
            np.testing.assert_array_equal(got, want)


def test_2d_context_model_sees_its_neighbours():
    """A model that returns the difference of the next and previous slice's channel: through
    the sliding window with context 1 its output is that difference (ends repeat)."""

    class Diff(nn.Module):
        def forward(self, x):  # (N, 3, H, W): previous, own, next
            d = x[:, 2:3] - x[:, 0:1]
            return torch.cat([-d, d], 1) * 20

    image = np.zeros((1, 6, 5, 4), np.float32)
    image[0, :, :, 2:] = 1.0  # a step between slices 1 and 2 across Z
    probs = sliding_window_probabilities(Diff(), image, [6, 5], CPU, slice_axis=2, context=1)
    fg = probs[1].float().numpy() > 0.5
    assert fg[:, :, 1].all() and fg[:, :, 2].all()  # next - previous = 1 at the step's two sides
    assert not fg[:, :, 0].any() and not fg[:, :, 3].any()


def test_window_steps_are_exact_voxel_counts():
    for p in range(1, 161):
        for s in range(1, p + 1):
            o = overlap_for_step([s], [p])[0]
            assert int(p * (1 - o)) == s, (p, s)  # MONAI's interval rule
    with pytest.raises(ConfigError, match="window step"):
        overlap_for_step([0, 4, 4], [8, 8, 8])
    with pytest.raises(ConfigError, match="one step per axis"):
        overlap_for_step([4, 4], [8, 8, 8])


def test_a_step_equal_to_the_patch_tiles_without_overlap():
    """Constant blending with step = patch: each voxel from exactly one window, so a model that
    sees the window's position (its padding) shows the tiling; a pointwise model does not."""
    net, image = _pointwise_net(), _image((32, 32, 24))
    tiled = sliding_window_probabilities(net, image, [16, 16, 12], CPU, step=[16, 16, 12], blend="constant")
    with torch.no_grad():
        whole = torch.softmax(net(torch.from_numpy(image)[None].half().float()), 1)[0]
    torch.testing.assert_close(tiled.float(), whole, atol=3e-3, rtol=0)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    sliding_window_probabilities(net, image, [16, 16, 12], CPU, step=[16, 16, 12], sw_batch_size=1)
    assert len(calls) == 8  # 2 x 2 x 2 windows
    calls.clear()
    sliding_window_probabilities(net, image, [16, 16, 12], CPU, step=[8, 16, 12], sw_batch_size=1)
    assert len(calls) == 3 * 2 * 2


def test_the_model_runs_in_eval_mode_and_gets_its_mode_back():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 1), nn.Dropout(0.9), nn.Conv3d(4, 2, 1))
    net.train()
    image = _image((16, 16, 12))
    a = sliding_window_probabilities(net, image, [16, 16, 12], CPU, SoftmaxClasses())
    b = sliding_window_probabilities(net, image, [16, 16, 12], CPU, SoftmaxClasses())
    assert net.training and all(m.training for m in net.modules())
    torch.testing.assert_close(a, b)  # dropout off: deterministic
    net.eval()
    sliding_window_probabilities(net, image, [16, 16, 12], CPU)
    assert not net.training


@pytest.mark.parametrize("mode", [True, False])
def test_a_2d_model_gets_its_own_mode_back_through_the_slice_wrapper(mode):
    """The slice wrapper is made per call: a model given in eval mode stays in eval mode
    (eval_mode restores the wrapper's mode, which reaches the wrapped model)."""
    net2d = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)).train(mode)
    sliding_window_probabilities(net2d, _image((16, 14, 5)), [16, 14], CPU, slice_axis=2)
    assert all(m.training is mode for m in net2d.modules())
