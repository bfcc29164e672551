"""From probabilities to label maps: argmax, task labels, largest components, DoDNet's rules."""

from __future__ import annotations

import numpy as np

from medvol.inference.postprocess import (
    argmax_labels,
    dodnet_postprocess,
    keep_largest_components,
    largest_component,
    task_labels,
)


def test_slabwise_argmax_equals_numpy_argmax():
    p = np.random.default_rng(0).random((4, 7, 6, 19)).astype(np.float16)
    out = argmax_labels(p, slab=5)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, p.argmax(0))


def test_task_labels_let_the_tumour_win():
    p = np.zeros((2, 3, 1, 1), np.float16)
    p[0] = np.array([0.2, 0.9, 0.9]).reshape(3, 1, 1)
    p[1] = np.array([0.1, 0.1, 0.7]).reshape(3, 1, 1)
    assert task_labels(p).ravel().tolist() == [0, 1, 2]


def test_largest_components():
    seg = np.zeros((20, 20, 20), np.uint8)
    seg[1:6, 1:6, 1:6] = 1  # 125 voxels
    seg[10:12, 10:12, 10:12] = 1  # 8 voxels
    seg[15:19, 15:19, 15:19] = 2  # 64
    seg[12, 1, 1] = 2  # 1
    out = largest_component(seg)
    assert int((out == 1).sum()) == 125 and int((out == 2).sum()) == 64
    assert int(keep_largest_components(seg == 1, 2).sum()) == 133


def test_dodnet_postprocessing():
    seg = np.zeros((30, 30, 30), np.uint8)
    seg[2:12, 2:12, 2:12] = 1  # big organ
    seg[20:25, 20:25, 20:25] = 1  # small stray organ blob (125 voxels)
    seg[5:10, 5:10, 5:10] = 2  # tumour inside the organ (125 voxels)
    seg[14:16, 2:4, 2:4] = 2  # tiny tumour (8 voxels)
    seg[25:29, 2:6, 2:6] = 2  # tumour far from the organ (64 voxels)
    out = dodnet_postprocess(seg, "liver")
    assert (out[20:25, 20:25, 20:25] == 0).all()  # stray organ component removed
    assert (out[5:10, 5:10, 5:10] == 2).all()  # tumour in the organ kept
    assert (out[14:16, 2:4, 2:4] == 0).all() and (out[25:29, 2:6, 2:6] == 0).all()
    assert int((out == 1).sum()) == 1000 - 125
    kidney = dodnet_postprocess(seg, "kidney")  # two organ components kept for kidney
    assert (kidney[20:25, 20:25, 20:25] == 1).all()
    colon = np.zeros_like(seg)
    colon[25:29, 2:6, 2:6] = 2  # tumour-only task: no organ to be inside of
    assert (dodnet_postprocess(colon, "colon") == colon).all()


def test_a_task_never_writes_a_channel_it_does_not_annotate():
    p = np.zeros((2, 4, 4, 4), np.float16)
    p[0, :2] = 0.9  # organ-channel "noise" (colon's dataset has no organ)
    p[1, 2:] = 0.8
    colon = task_labels(p, annotated=(False, True))
    assert set(np.unique(colon).tolist()) == {0, 2} and (colon[:2] == 0).all()
    spleen = task_labels(p, annotated=(True, False))
    assert set(np.unique(spleen).tolist()) == {0, 1}


def test_colon_tumour_survives_organ_channel_noise_and_both_vessel_branches_stay():
    probs = np.zeros((2, 40, 40, 40), np.float16)
    probs[0, 2:20, 2:20, 2:20] = 0.9  # a big organ-channel blob the colon task does not annotate
    probs[1, 30:36, 30:36, 30:36] = 0.9  # a colon tumour far from it (216 voxels)
    seg = task_labels(probs, annotated=(False, True))
    out = dodnet_postprocess(seg, "colon", organ_annotated=False)
    assert (out[30:36, 30:36, 30:36] == 2).all() and not (out == 1).any()
    vessel = np.zeros((40, 40, 40), np.uint8)
    vessel[5:35, 10, 10] = 1  # one branch (30 voxels)
    vessel[5:35, 30, 30] = 1  # another, not connected to the first
    vessel[20:24, 8:12, 8:12] = 2  # a tumour beside the first branch (64 voxels)
    out = dodnet_postprocess(vessel, "hepatic_vessel")
    np.testing.assert_array_equal(out == 1, vessel == 1)  # both branches kept, voxel for voxel
    assert (out[20:24, 8:12, 8:12] == 2).all()
    liver = dodnet_postprocess(vessel, "liver")  # a solid organ keeps its largest component only
    assert (liver[5:35, 30, 30] == 0).all()


def test_task_tta_averages_sigmoid_probabilities():
    import torch

    from medvol.inference.sliding_window import TaskSigmoid, WindowPredictor

    class Net(torch.nn.Module):
        def forward(self, x, task):
            return 8 * x.repeat(1, 2, 1, 1, 1)  # large logits: averaging them differs from averaging sigmoids

    x = torch.linspace(-1, 1, 8).reshape(1, 1, 8, 1, 1).repeat(1, 1, 1, 2, 2)
    out = WindowPredictor(Net(), TaskSigmoid(0), mirror_axes=(0,))(x).float()
    expect = (torch.sigmoid(8 * x) + torch.sigmoid(8 * torch.flip(x, [2])).flip([2])) / 2
    torch.testing.assert_close(out[:, :1], expect, atol=2e-3, rtol=0)
