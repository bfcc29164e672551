"""UGPCL trainer (medvol/training/ugpcl.py): rotations and their targets, the cross-rank merge
of the queue's class means, the paper's validation Dice, and the trainer on a tiny 2D cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medvol.losses.pixel_contrast import IGNORE, ClassMemoryQueue, class_means, merge_rank_means
from medvol.training.ugpcl import batch_averaged_dice, draw_rotations, rotate_batch, step_generator


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------- rotation


def test_quarter_turns_are_rot90_and_jitter_turns_about_the_centre():
    x = torch.rand(4, 2, 8, 8)
    lab = torch.randint(0, 4, (4, 1, 8, 8))
    img, rl = rotate_batch(x, lab, torch.tensor([0.0, 90.0, 180.0, 270.0]))
    for k in range(4):
        torch.testing.assert_close(img[k], torch.rot90(x[k], k, (-2, -1)), atol=1e-5, rtol=0)
        assert torch.equal(rl[k], torch.rot90(lab[k], k, (-2, -1)))
    # a non-square image is turned, not sheared: 180 degrees is an exact flip of both axes
    y = torch.rand(1, 1, 4, 8)
    torch.testing.assert_close(rotate_batch(y, y.long(), torch.tensor([180.0]))[0], y.flip(-1, -2), atol=1e-5, rtol=0)
    # +20 degrees: labels stay labels, the centre stays put, corners come in as background
    disc = torch.zeros(1, 1, 33, 33, dtype=torch.long)
    disc[..., 12:21, 12:21] = 2
    turned = rotate_batch(torch.ones(1, 1, 33, 33), disc, torch.tensor([20.0]))
    assert set(turned[1].unique().tolist()) == {0, 2} and turned[1][0, 0, 16, 16] == 2
    assert turned[0][0, 0, 0, 0] == 0 and turned[0][0, 0, 16, 16] == pytest.approx(1.0)


def test_rotation_draws_are_per_slot_and_targets_match_the_applied_rotation():
    k, deg = draw_rotations(seed=3, step=7, slots=range(0, 16), max_deg=20.0)
    assert set(k.tolist()) <= {0, 1, 2, 3} and len(set(k.tolist())) > 1
    assert ((deg - 90.0 * k).abs() <= 20.0).all() and (deg - 90.0 * k).abs().max() > 1.0
    # a pure function of (seed, step, slot): two ranks' halves are the single process's batch
    k0, d0 = draw_rotations(3, 7, range(0, 8), 20.0)
    k1, d1 = draw_rotations(3, 7, range(8, 16), 20.0)
    assert torch.equal(torch.cat([k0, k1]), k) and torch.equal(torch.cat([d0, d1]), deg)
    assert not torch.equal(draw_rotations(3, 8, range(16), 20.0)[1], deg)
    # without jitter the image is rot90(x, k) for the drawn target k
    k, deg = draw_rotations(0, 0, range(6), 0.0)
    x = torch.rand(6, 1, 8, 8)
    img, _ = rotate_batch(x, torch.zeros(6, 1, 8, 8, dtype=torch.long), deg)
    for i in range(6):
        errors = [float((img[i] - torch.rot90(x[i], j, (-2, -1))).abs().max()) for j in range(4)]
        assert min(range(4), key=errors.__getitem__) == int(k[i]) and min(errors) < 1e-5


def test_step_generator_is_seeded_by_seed_step_and_rank():
    draw = lambda *a: torch.randperm(50, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 1), draw(0, 5, 0)) and not torch.equal(draw(0, 5, 1), draw(0, 6, 1))


# ---------------------------------------------------------------- queue under DDP


def _batch(seed, b=2, c=3, d=4):
    g = torch.Generator().manual_seed(seed)
    proj = F.normalize(torch.randn(b, d, 3, 3, generator=g), dim=1)
    grid = torch.randint(-1, c, (b, 3, 3), generator=g)
    grid[0] = 0  # image 0 of every rank: background only
    return proj, grid


def test_class_means_by_hand():
    proj = torch.zeros(1, 2, 2, 2)
    proj[0, 0, 0] = 3.0  # top row (3, 0)
    proj[0, 1, 1] = 1.0  # bottom row (0, 1)
    grid = torch.tensor([[[0, 1], [1, IGNORE]]])
    means, present = class_means(proj, grid, 3)
    assert present.tolist() == [[True, True, False]]
    torch.testing.assert_close(means[0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(means[0, 1], F.normalize(torch.tensor([3.0, 1.0]), dim=0))  # mean (1.5, .5)
    assert torch.equal(means[0, 2], torch.zeros(2))


def test_merged_rank_means_equal_one_process_on_the_whole_batch():
    """Rank r's class means, all-gathered and merged in rank order, are what one process with
    the concatenated batch enqueues: every rank's queue is that same queue."""
    (p0, g0), (p1, g1) = _batch(0), _batch(1)
    per_rank = [class_means(p, g, 3) for p, g in ((p0, g0), (p1, g1))]
    merged = merge_rank_means([m for m, _ in per_rank], [q for _, q in per_rank])
    whole = merge_rank_means(*map(lambda t: [t], class_means(torch.cat([p0, p1]), torch.cat([g0, g1]), 3)))
    assert all(torch.equal(a, b) for a, b in zip(merged, whole))
    # rank 0's images first, then rank 1's; background comes from image 0 of each rank at least
    assert merged[0].shape[0] >= 2
    torch.testing.assert_close(merged[0][0], F.normalize(p0[0].mean((1, 2)), dim=0))
    single, queues = ClassMemoryQueue(3, 4, 10), [ClassMemoryQueue(3, 4, 10) for _ in range(2)]
    single.enqueue_class_means(torch.cat([p0, p1]), torch.cat([g0, g1]))
    for q in queues:  # what each rank does with the gathered means
        for c, keys in enumerate(merged):
            q.enqueue(c, keys)
    for c in range(3):
        assert torch.equal(queues[0].ordered(c), single.ordered(c)) and torch.equal(queues[1].ordered(c),
                                                                                     single.ordered(c))


def test_enqueue_under_a_process_group_gathers(tmp_path):
    import torch.distributed as tdist

    proj, grid = _batch(2)
    ref = ClassMemoryQueue(3, 4, 10)
    ref.enqueue_class_means(proj, grid, across_ranks=False)
    q = ClassMemoryQueue(3, 4, 10)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        written = q.enqueue_class_means(proj, grid)
    finally:
        tdist.destroy_process_group()
    assert written == [q.filled(c) for c in range(3)]
    assert all(torch.equal(q.ordered(c), ref.ordered(c)) for c in range(3))


# ---------------------------------------------------------------- validation metric


def test_batch_averaged_dice_by_hand():
    import numpy as np

    ref = np.zeros((3, 2, 2), int)
    pred = np.zeros((3, 2, 2), int)
    ref[0, 0, 0] = ref[1, 0, 0] = 1  # batch 1 (slices 0, 1): ref 2 px, pred 1 px, both hit -> 2/3
    pred[0, 0, 0] = 1
    pred[2, 1, 1] = 1  # batch 2 (slice 2): pred 1 px, ref none -> 0
    got = batch_averaged_dice(pred, ref, [1, 2], batch=2)
    assert got[1] == pytest.approx((2 / 3 + 0) / 2)
    assert got[2] == 1.0  # in neither: 1 per batch
