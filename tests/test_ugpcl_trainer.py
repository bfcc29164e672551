"""UGPCL trainer (medvol/training/ugpcl.py): rotations and their targets, the cross-rank merge
of the queue's class means, the paper's validation Dice, and the trainer on a tiny 2D cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvol.checkpoint import load_checkpoint
from medvol.config import load_recipe
from medvol.data import make_loader
from medvol.errors import ConfigError
from medvol.losses.pixel_contrast import IGNORE, ClassMemoryQueue, class_means, merge_rank_means
from medvol.training import train
from medvol.training.distributed import DistInfo
from medvol.training.schedules import make_scheduler
from medvol.training.ugpcl import (
    UGPCLTrainer,
    batch_averaged_dice,
    draw_rotations,
    rotate_batch,
    slice_counts,
    step_generator,
)

from conftest import metric_series, pinned, train_two_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


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
    ref = np.zeros((2, 2, 3), int)  # slices across axis 2
    pred = np.zeros((2, 2, 3), int)
    ref[0, 0, 0] = ref[0, 0, 1] = 1  # batch 1 (slices 0, 1): ref 2 px, pred 1 px, both hit -> 2/3
    pred[0, 0, 0] = 1
    pred[1, 1, 2] = 1  # batch 2 (slice 2): pred 1 px, ref none -> 0
    counts = slice_counts(pred, ref, [1, 2], axis=2)
    assert counts.shape == (3, 2, 3) and counts[0, 0].tolist() == [1, 1, 1] and counts[1, 0].tolist() == [0, 0, 1]
    got = batch_averaged_dice(counts, batch=2)
    assert got[0] == pytest.approx((2 / 3 + 0) / 2)
    assert got[1] == 1.0  # in neither: 1 per batch
    # slices of cases of different sizes pool by counts: one batch over both = pooled Dice
    other = slice_counts(np.ones((1, 4, 1), int), np.ones((1, 4, 1), int), [1, 2], axis=2)
    assert batch_averaged_dice(np.concatenate([counts, other]), batch=4)[0] == pytest.approx(2 * 5 / (6 + 6))


# ---------------------------------------------------------------- recipes


def test_paper_recipe_holds_the_papers_settings():
    r = load_recipe("ugpcl")
    assert (r.model.name, r.model.options["input_size"], r.data.patch_size) == ("ugpcl", [224, 224], [224, 224])
    assert (r.data.configuration, r.data.batch_size, r.data.unlabelled_per_batch) == ("2d", 16, 8)
    o = r.optimizer
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.01, 0.9, False, 5e-4)
    assert (r.trainer.name, r.trainer.steps) == ("ugpcl", 10000) and r.data.augment.rotate_prob == 0.0
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    factor = make_scheduler(r.schedule, opt, r.trainer.steps, 0.01).lr_lambdas[0]
    lrs = [0.01 * factor(step) for step in range(r.trainer.steps)]
    assert lrs[0] == 0.01 and lrs[5000] == pytest.approx(0.01 * 0.5 ** 0.9)
    assert lrs[-1] == pytest.approx(1e-4) and min(lrs) == pytest.approx(1e-4)  # poly 0.9 down to 1e-4
    m = r.method
    assert (m["anchor_sampling"], m["background_queue"], m["dice"]) == ("published", "zeros", "published")
    aug = r.data.augment  # the published flip (p 0.5) and ColorJitter brightness / contrast 0.4 (p 0.8)
    assert aug.enabled and (aug.flip_prob, aug.brightness_prob, aug.contrast_prob) == (0.5, 0.8, 0.8)
    assert tuple(aug.brightness_range) == tuple(aug.contrast_range) == (0.6, 1.4)
    demo = load_recipe("ugpcl_demo")  # the CPU demo trains with the same augmentation
    assert demo.trainer.name == "ugpcl" and demo.data.augment == aug


# ---------------------------------------------------------------- the trainer on a tiny 2D cache
# brain_pre (conftest): 5 training cases of brain tissue (background / grey / white matter) at
# ~4 mm, sliced across axis 2; 2 cases keep their labels, brain_004 validates.

DEMO = ["data.labelled=2", "data.val_cases=[brain_004]", "data.num_workers=0", "trainer.log_every=1"]


def _trainer(pre, run, *sets):
    torch.manual_seed(0)
    return UGPCLTrainer(load_recipe("ugpcl_demo", DEMO + list(sets)), pre, run, DistInfo())


def _first_batch(t, step=0):
    return next(iter(make_loader(t.make_dataset(), step, step + 1, t.batch_size, 0, 1, 0)))


def test_step_terms_switch_on_at_their_steps(brain_pre, tmp_path):
    t = _trainer(brain_pre, tmp_path / "run", "method.contrast_start=2", "method.consistency_rampup=10")
    batch = _first_batch(t)
    assert batch["image"].shape == (8, 1, 64, 64) and batch["labelled"].tolist() == [True] * 4 + [False] * 4
    queue = t.models["model"].memory
    seen = []
    for step in range(4):
        terms = {k: float(v.detach()) for k, v in t.training_step(batch, step).items()}
        assert all(np.isfinite(v) for v in terms.values()), terms
        cw = 0.01 * math.exp(-5 * (1 - step / 10) ** 2)  # the published sigmoid ramp-up, written out
        assert terms["consistency_weight"] == pytest.approx(cw) and terms["consistency"] > 0
        total = (terms["sup_cnn"] + 0.4 * terms["sup_tf"] + cw * terms["consistency"] + 0.1 * terms["rotation"]
                 + 0.1 * terms["contrast"])
        assert terms["loss"] == pytest.approx(total, rel=1e-5)
        assert queue.filled(0) == 0  # the published background queue: zeros, never written
        seen.append((terms["contrast"], "uncertain_fraction" in terms, queue.filled(1) + queue.filled(2)))
    # before contrast_start: no contrast, no queue; at it: the queue fills (nothing to contrast
    # with yet); after it: the contrast term is live
    assert seen[0] == (0.0, False, 0) and seen[1] == (0.0, False, 0)
    assert seen[2][0] == 0.0 and seen[2][1] and seen[2][2] > 0
    assert seen[3][0] > 0 and seen[3][2] > seen[2][2]


def test_trainer_supervised_term_is_the_published_dice_and_ce(brain_pre, tmp_path):
    """The trainer's ``sup_cnn`` is 0.5 x the published Dice (foreground classes, squared
    denominators, smooth 1e-5, / number of classes) + 0.5 x CE of the labelled images, written
    out here; the options reach the loss and a bad choice is one clear error."""
    t = _trainer(brain_pre, tmp_path / "run")
    batch = _first_batch(t)
    image, label, _, n_l = t.prepare_batch(batch, 0)
    with torch.no_grad():
        seg = t.models["model"](image, all_outputs=True)["seg_cnn"][:n_l].double()
    p, y = seg.softmax(1), F.one_hot(label[:, 0].long(), 3).movedim(-1, 1).double()
    dice = sum(1 - (2 * (p[:, c] * y[:, c]).sum() + 1e-5) / ((p[:, c] ** 2).sum() + (y[:, c] ** 2).sum() + 1e-5)
               for c in (1, 2)) / 3
    ce = -(p.log() * y).sum(1).mean()
    terms = t.training_step(batch, 0)
    assert float(terms["sup_cnn"].detach()) == pytest.approx(float(0.5 * dice + 0.5 * ce), rel=1e-4)
    c = t.loss_fn.contrast
    assert (c.anchor_sampling, c.background_queue) == ("published", "zeros")
    old = _trainer(brain_pre, tmp_path / "old", "method.anchor_sampling=random", "method.background_queue=means",
                   "method.dice=all_classes").loss_fn
    assert (old.contrast.anchor_sampling, old.contrast.background_queue) == ("random", "means")
    assert not isinstance(old.dice, type(t.loss_fn.dice))
    for key in ("anchor_sampling", "background_queue", "dice"):
        with pytest.raises(ConfigError, match=f"method.{key}: must be one of"):
            _trainer(brain_pre, tmp_path / "bad", f"method.{key}=bogus")


def test_trainer_rotation_targets_match_the_applied_rotation(brain_pre, tmp_path):
    t = _trainer(brain_pre, tmp_path / "run", "method.rotate_deg=0.0")
    batch = _first_batch(t, step=5)
    image, label, k, n_l = t.prepare_batch(batch, 5)
    assert n_l == 4 and label.shape == (4, 1, 64, 64)
    assert torch.equal(k, draw_rotations(t.recipe.trainer.seed, 5, range(8), 0.0)[0]) and len(set(k.tolist())) > 1
    for i in range(8):  # float32 bilinear sampling at grid points: exact to ~1e-5 of the (augmented) intensities
        torch.testing.assert_close(image[i], torch.rot90(batch["image"][i], int(k[i]), (-2, -1)), atol=1e-4, rtol=1e-5)
    for i in range(4):
        assert torch.equal(label[i], torch.rot90(batch["label"][i], int(k[i]), (-2, -1)))


@pytest.mark.slow
def test_resume_is_exact_queue_included(brain_pre, tmp_path):
    """Stopped at step 3 and resumed, the run ends as the uninterrupted one: same weights, same
    queue (entries, pointers, counts: buffers of the model), same losses."""
    sets = DEMO + ["trainer.steps=6", "trainer.val_every=6", "method.contrast_start=1"]
    train(load_recipe("ugpcl_demo", sets), brain_pre, tmp_path / "full", device="cpu", quiet=True)
    train(load_recipe("ugpcl_demo", sets), brain_pre, tmp_path / "cut", device="cpu", quiet=True, stop_at=3)
    train(load_recipe("ugpcl_demo", sets), brain_pre, tmp_path / "cut", device="cpu", quiet=True, resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")["models"]["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")["models"]["model"]
    # the queue is in the checkpoint: class means of steps 1-5 (the background queue: zeros, never written)
    assert a.keys() == b.keys() and int(a["memory.queues.1.count"]) > 0 and int(a["memory.queues.0.count"]) == 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    full, cut = metric_series(tmp_path / "full"), metric_series(tmp_path / "cut")
    assert full["train/loss"] == cut["train/loss"] and full["train/contrast"] == cut["train/contrast"]


# ---------------------------------------------------------------- learning, and prediction over volumes


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """ugpcl_demo on brain tissue at 3 mm (5 training cases: 2 labelled, 2 unlabelled,
    brain_004 validates), 100 steps, validated every 25, the contrast from step 25."""
    from medvol.datasets.brain import build_brain_dataset
    from medvol.preprocessing import preprocess_dataset

    tmp = tmp_path_factory.mktemp("ugpcl")
    raw = build_brain_dataset(tmp / "raw" / "Dataset001_BrainTissue", n_train=5, n_test=0, base_spacing=3.0)
    preprocess_dataset(raw, tmp / "pre", num_workers=1, quiet=True)
    recipe = load_recipe("ugpcl_demo", DEMO + ["trainer.steps=100", "trainer.val_every=25", "method.contrast_start=25"])
    with pinned(0):
        untrained = UGPCLTrainer(recipe, tmp / "pre", tmp / "untrained", DistInfo()).validate()  # the step-0 weights
        train(recipe, tmp / "pre", tmp / "run", device="cpu", quiet=True)
    return raw, tmp / "run", untrained


@pytest.mark.slow
def test_supervised_loss_falls_and_dice_rises(learned):
    # measured with the published anchors, zero background queue, published Dice and the demo's
    # flip + brightness/contrast augmentation (trainer.seed 0 / 1 / 2, 1 thread): val/dice_mean
    # (GM, WM) of the untrained weights 0.000 / 0.246 / 0.170, at steps 25, 50, 75, 100:
    # 0.734 0.736 0.772 0.790 / 0.735 0.752 0.796 0.806 / 0.641 0.789 0.799 0.817; mean sup_cnn
    # (the published Dice: foreground only, / 3 classes) over the first -> last 10 steps
    # 0.576 -> 0.203 / 0.600 -> 0.171 / 0.569 -> 0.184. The bars below keep their margin (lowest
    # final Dice 0.790 vs 0.7; sup ratio at most 0.35 vs 0.5). Before (random anchors, background
    # means, background-inclusive Dice, no augmentation; 1 thread): final Dice 0.809 / 0.814 / 0.828.
    _, run, untrained = learned
    s = metric_series(run)
    sup, dice = s["train/sup_cnn"], s["val/dice_mean"]
    assert len(dice) == 4 and len(s["val/dice2d_mean"]) == 4
    assert np.mean(sup[-10:]) < 0.5 * np.mean(sup[:10])
    # from step 25 to 100 the seeds gained 0.056 / 0.071 / 0.176: at least 0.02
    assert dice[-1] > 0.7 and dice[-1] > untrained["val/dice_mean"] + 0.4 and dice[-1] > dice[0] + 0.02
    assert s["train/contrast"][-1] > 0 and s["train/contrast"][0] == 0


@pytest.mark.slow
def test_2d_model_predicts_volumes_in_their_geometry(learned, tmp_path):
    """`medvol predict` runs the trained 2D model slice by slice over whole volumes (the slice
    path of the sliding window) and writes them in each scan's own geometry."""
    from medvol.cli import main
    from medvol.evaluation.metrics import dice
    from medvol.io import read_volume

    raw, run, _ = learned
    out = tmp_path / "pred"
    assert main(["predict", "-m", str(run), "-i", str(raw / "imagesTr"), "-o", str(out), "--device", "cpu",
                 "--quiet", "--no-pictures"]) == 0
    for case in ("brain_004", "brain_002"):  # the validation case, an unlabelled training case
        src, pred = read_volume(raw / "imagesTr" / f"{case}_0000.nii.gz"), read_volume(out / f"{case}.nii.gz")
        ref = read_volume(raw / "labelsTr" / f"{case}.nii.gz").array
        assert pred.spatial_shape == src.spatial_shape
        np.testing.assert_allclose(pred.affine, src.affine)
        assert set(np.unique(pred.array).tolist()) <= {0, 1, 2}
        assert np.mean([dice(pred.array == c, ref == c) for c in (1, 2)]) > 0.5


@pytest.mark.ddp
def test_ugpcl_under_two_gloo_processes(brain_pre, tmp_path):
    """Two processes (DDP, gloo): the projection head idle before contrast_start, dict outputs,
    the queue's all-gather every step; the ranks end with identical weights."""

    # background means in the queue (not the published zeros) make the all-gather countable below
    sets = DEMO + ["trainer.steps=3", "trainer.val_every=3", "method.contrast_start=1", "data.batch_size=4",
                   "data.unlabelled_per_batch=1", "method.background_queue=means"]
    train_two_ranks(["train", "ugpcl_demo"], brain_pre, tmp_path / "ddp", sets)
    queue = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")["models"]["model"]
    # steps 1 and 2 wrote the background means of both ranks' 3 labelled images at least (12);
    # rank 0's own 4 images could not reach that (DDP broadcasts rank 0's buffers)
    assert int(queue["memory.queues.0.count"]) >= 2 * 2 * 3
