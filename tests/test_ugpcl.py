"""UGPCL network and losses (shared/METHODS.md §6): shapes, registered position embeddings,
uncertainty threshold, anchor sampling (published and random), the per-class memory queue (zero
or mean background), the contrastive loss and the supervised Dice, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvol.config import ModelConfig
from medvol.errors import ConfigError
from medvol.losses.contrastive import info_nce
from medvol.losses.pixel_contrast import (
    IGNORE,
    ClassMemoryQueue,
    PixelContrastLoss,
    PublishedDiceLoss,
    UGPCLLoss,
    contrast_labels,
    labels_on_grid,
    queue_info_nce,
    sample_anchors,
    sample_anchors_published,
    uncertainty_map,
    uncertainty_threshold,
)
from medvol.networks import build_model
from medvol.networks.slice.ugpcl import UGPCLNet, working_size
from medvol.plans import Plans

TINY = dict(width=8, layers=(1, 1, 1, 1), embed_dim=8, heads=(4, 2, 1), depths=(2, 2, 2), proj_dim=16, queue_size=6)


@pytest.fixture(autouse=True)
def pinned_cpu():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(old)


def _check_outputs(out, b, classes, size, proj_dim):
    h, w = size
    assert out["seg_cnn"].shape == (b, classes, h, w)
    assert out["seg_tf"].shape == (b, classes, h, w)
    assert out["proj"].shape == (b, proj_dim, h // 8, w // 8)
    assert out["rot"].shape == (b, 4)
    assert torch.allclose(out["proj"].norm(dim=1), torch.ones(()), atol=1e-5)


# ---------------------------------------------------------------- network


def test_faithful_widths_at_224():
    net = UGPCLNet(1, 4, (224, 224)).eval()
    assert [s.pos_embed.shape[-2:] for s in net.tf_decoder.stages] == [(14, 14), (28, 28), (56, 56)]
    assert [s.blocks.blocks[0].attn.num_heads for s in net.tf_decoder.stages] == [12, 6, 3]
    assert net.proj_head[0].in_channels == 512 and net.proj_head[-1].out_channels == 256
    with torch.no_grad():
        _check_outputs(net(torch.randn(1, 1, 224, 224), all_outputs=True), 1, 4, (224, 224), 256)


@pytest.mark.parametrize("size", [(224, 224), (96, 160)])
def test_tiny_widths_shapes(size):
    net = UGPCLNet(3, 3, size, **TINY)
    assert net.tf_decoder.stages[0].pos_embed.shape[-2:] == (size[0] // 16, size[1] // 16)
    _check_outputs(net(torch.randn(2, 3, *size)), 2, 3, size, 16)


def test_other_input_size_than_built_runs_and_bad_sizes_fail():
    net = UGPCLNet(1, 2, (64, 64), **TINY).eval()
    with torch.no_grad():
        _check_outputs(net(torch.randn(1, 1, 96, 64), all_outputs=True), 1, 2, (96, 64), 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.randn(1, 1, 70, 64))
    with pytest.raises(ConfigError, match="multiples of 32"):
        UGPCLNet(1, 2, (100, 100), **TINY)


def test_input_scale_works_at_the_zoomed_size_and_answers_at_the_input_size():
    """The published loader zooms slices to 224²: ``input_scale`` does it inside the network."""
    net = UGPCLNet(1, 3, (128, 128), **TINY, input_scale=2.0).eval()
    assert working_size((64, 64), 2.0) == (128, 128) and working_size((60, 80), 2.0) == (128, 160)
    assert working_size((40, 72), 1.0) == (40, 72) and working_size((10, 10), 0.5) == (32, 32)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = net(x, all_outputs=True)
        assert out["seg_cnn"].shape == (2, 3, 64, 64) and out["proj"].shape == (2, 16, 16, 16)
        # = the network at scale 1 on the input zoomed x2, its logits brought back to 64²
        net.input_scale = 1.0
        ref = net(F.interpolate(x, size=(128, 128), mode="bilinear"), all_outputs=True)
        assert torch.allclose(out["seg_cnn"], F.interpolate(ref["seg_cnn"], size=(64, 64), mode="bilinear"))
        assert torch.equal(out["proj"], ref["proj"])
        net.input_scale = 2.0
        assert net(torch.randn(1, 1, 60, 72)).shape == (1, 3, 60, 72)  # any input size; the zoom is a multiple of 32
    cfg = ModelConfig(name="ugpcl", options=dict(TINY, input_scale=3.5))
    assert build_model(cfg, {"patch_size": [64, 64]}, 1, 3).input_size == (224, 224)  # the published 224²
    with pytest.raises(ConfigError, match="input_scale"):
        UGPCLNet(1, 3, (64, 64), **TINY, input_scale=0)


def test_published_decoders_add_the_published_details_and_default_checkpoints_keep_their_keys():
    """``published_decoders``: nearest upsampling and a 3×3 head in the CNN decoder, LayerNorm on
    the Swin skips, drop path rising to 0.1 with depth; off, the parameters are those of before."""
    plain, pub = UGPCLNet(1, 3, (64, 64), **TINY), UGPCLNet(1, 3, (64, 64), **TINY, published_decoders=True)
    assert all(k in pub.state_dict() for k in plain.state_dict() if "skip_proj" not in k)
    assert {k for k in plain.state_dict() if "skip_proj" in k} == {
        f"tf_decoder.stages.{i}.skip_proj.{p}" for i in range(3) for p in ("weight", "bias")}
    assert [type(s.skip_proj[1]).__name__ for s in pub.tf_decoder.stages] == ["_ChannelNorm"] * 3
    assert pub.cnn_decoder.head.kernel_size == (3, 3) and plain.cnn_decoder.head.kernel_size == (1, 1)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in pub.tf_decoder.stages for b in s.blocks.blocks]
    assert rates == pytest.approx([0.08, 0.1, 0.04, 0.06, 0.0, 0.02])  # strides 16, 8, 4
    assert all(not hasattr(b.drop_path, "drop_prob") for s in plain.tf_decoder.stages for b in s.blocks.blocks)
    assert (pub.cnn_decoder.upsample, plain.cnn_decoder.upsample) == ("nearest", "bilinear")
    qkv = [n.tf_decoder.stages[0].blocks.blocks[0].attn.qkv.weight for n in (pub, plain)]
    assert 0.017 < qkv[0].std() < 0.023 and qkv[1].std() > 0.05  # truncated normal 0.02 vs PyTorch's default
    x = torch.randn(2, 1, 64, 64)
    _check_outputs(pub(x), 2, 3, (64, 64), 16)
    pub.eval()
    with torch.no_grad():
        assert torch.equal(pub(x, all_outputs=True)["seg_tf"], pub(x, all_outputs=True)["seg_tf"])
        pub.train()
        a, b = pub(x)["seg_tf"], pub(x)["seg_tf"]  # stochastic depth draws anew each pass
    assert not torch.allclose(a, b)


def test_position_embeddings_are_saved_and_trained():
    net = UGPCLNet(1, 3, (64, 64), **TINY)
    names = [k for k in net.state_dict() if k.endswith("pos_embed")]
    assert names == [f"tf_decoder.stages.{i}.pos_embed" for i in range(3)]
    assert {n for n, _ in net.named_parameters()} >= set(names)
    out = net(torch.randn(2, 1, 64, 64))
    out["seg_tf"].square().mean().backward()
    for stage in net.tf_decoder.stages:
        assert stage.pos_embed.grad is not None and stage.pos_embed.grad.abs().sum() > 0
    # save -> load -> same outputs (the queue buffers travel too)
    net.memory.enqueue(1, F.normalize(torch.randn(2, 16), dim=1))
    other = UGPCLNet(1, 3, (64, 64), **TINY)
    other.load_state_dict(net.state_dict())
    assert other.memory.filled(1) == 2
    net.eval(), other.eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a, b = net(x, all_outputs=True), other(x, all_outputs=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
        # eval mode alone: the CNN decoder's logits, what prediction uses
        assert torch.equal(net(x), a["seg_cnn"])


def test_registry_builds_ugpcl():
    cfg = ModelConfig(name="ugpcl", options=dict(TINY))
    net = build_model(cfg, {"patch_size": [64, 96]}, 1, 4)
    assert isinstance(net, UGPCLNet) and net.input_size == (64, 96)
    plans = Plans(num_channels=1, label_names={0: "bg", 1: "a"}, patch_size=[96, 64])
    assert build_model(cfg, plans, 1, 2).input_size == (96, 64)
    assert build_model(ModelConfig(name="ugpcl", options=dict(TINY)), {}, 1, 4).input_size == (224, 224)
    with pytest.raises(ConfigError, match="bogus"):
        build_model(ModelConfig(name="ugpcl", options={"bogus": 1}), {}, 1, 4)


# ---------------------------------------------------------------- uncertainty


def test_uncertainty_threshold_schedule():
    ln2 = math.log(2)
    assert uncertainty_threshold(0, 10000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * ln2)
    assert uncertainty_threshold(5000, 10000) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * ln2)
    assert uncertainty_threshold(10000, 10000) == pytest.approx(ln2)
    assert uncertainty_threshold(20000, 10000) == pytest.approx(ln2)
    vals = [uncertainty_threshold(s, 10000) for s in range(0, 10001, 500)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_uncertainty_is_entropy_of_mean_softmax():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ent, mean = uncertainty_map(a, b)
    p = (a.softmax(1) + b.softmax(1)) / 2
    assert torch.allclose(mean, p) and torch.allclose(ent, -(p * p.log()).sum(1), atol=1e-6)
    # two confident decoders that disagree: the mean is 50/50, entropy ln 2
    x = torch.tensor([10.0, -10.0]).view(1, 2, 1, 1)
    assert ent.shape == (2, 4, 4) and uncertainty_map(x, -x)[0].item() == pytest.approx(math.log(2), abs=1e-6)


def test_anchors_never_come_from_uncertain_pixels():
    b, c, h, w = 3, 3, 32, 32
    logits_a, logits_b = torch.randn(b, c, h, w) * 3, torch.randn(b, c, h, w) * 3
    gt = torch.randint(0, c, (1, h, w))  # the first image is labelled
    threshold = uncertainty_threshold(0, 10000)
    lab, uncertain = contrast_labels(logits_a, logits_b, threshold, gt)
    assert torch.equal(lab[0], gt[0])
    assert bool(uncertain[1:].any()) and bool((~uncertain[1:]).any())
    assert bool((lab[1:][uncertain[1:]] == IGNORE).all()) and bool((lab[1:][~uncertain[1:]] >= 0).all())
    proj = F.normalize(torch.randn(b, 8, h // 8, w // 8), dim=1)
    grid = labels_on_grid(lab, proj.shape[-2:])
    assert torch.equal(grid, lab[:, ::8, ::8])
    # tag every cell's embedding with its flat index to trace each anchor back to its pixel
    cells_total = b * (h // 8) * (w // 8)
    tagged = torch.arange(cells_total, dtype=torch.float).view(b, 1, h // 8, w // 8).repeat(1, 8, 1, 1)
    anchors, classes = sample_anchors(tagged, grid, max_per_class=1000)
    cells = anchors[:, 0].long()
    bi, rem = cells // ((h // 8) * (w // 8)), cells % ((h // 8) * (w // 8))
    yi, xi = rem // (w // 8), rem % (w // 8)
    assert len(cells) == int((grid >= 0).sum())
    for n in range(len(cells)):
        y, x = int(yi[n]) * 8, int(xi[n]) * 8
        assert bi[n] == 0 or not uncertain[bi[n], y, x]
        assert classes[n] == lab[bi[n], y, x]
    # per class at most max_per_class
    _, few = sample_anchors(tagged, grid, max_per_class=2)
    assert all(int((few == k).sum()) <= 2 for k in range(c))


def _tagged(b, h, w):
    """``(b, 2, h, w)`` embeddings whose value is the cell's flat index over the batch."""
    return torch.arange(b * h * w, dtype=torch.float).view(b, 1, h, w).repeat(1, 2, 1, 1)


def test_published_sampler_one_anchor_per_image_and_class_easy_first():
    """One anchor per (image, class on more than one cell): an easy cell (the CNN's argmax
    agrees) whenever there is one, else a hard one; a class on one cell is skipped."""
    N = IGNORE
    lab = torch.tensor([[[0, 0, 0], [0, 0, 1], [1, 1, 2]],    # image 0: cells 0-4 bg, 5-7 class 1, 8 class 2
                        [[N, N, 2], [2, 1, 1], [N, 0, N]]])   # image 1: 2-3 class 2, 4-5 class 1, 7 bg
    pred = torch.tensor([[[1, 1, 1], [1, 1, 1], [0, 0, 2]],   # image 0: bg never right (all hard),
                         [[0, 0, 0], [2, 0, 0], [0, 0, 0]]])  # class 1 right at cell 5 only; image 1:
    proj = _tagged(2, 3, 3)                                   # class 2 right at cell 3 only, class 1 never
    bg_picks, hard_picks = set(), set()
    for seed in range(30):
        anchors, classes = sample_anchors_published(proj, lab, pred, torch.Generator().manual_seed(seed))
        cells = anchors[:, 0].long().tolist()
        assert classes.tolist() == [0, 1, 1, 2]  # (image 0: bg, class 1), (image 1: class 1, class 2)
        assert cells[1] == 5 and cells[3] == 9 + 3  # the only easy cells
        assert cells[0] in range(0, 5) and cells[2] in (9 + 4, 9 + 5)  # hard: any cell of the class
        bg_picks.add(cells[0])
        hard_picks.add(cells[2])
    assert len(bg_picks) > 1 and len(hard_picks) == 2  # drawn at random among them
    # image 0's class 2 (one cell) and image 1's background (one cell) never gave an anchor;
    # with a second background cell, image 1's background does
    lab[1, 2, 2] = 0
    _, classes = sample_anchors_published(proj, lab, pred)
    assert classes.tolist() == [0, 1, 0, 1, 2]
    # nothing to sample: empty, with the embedding width
    anchors, classes = sample_anchors_published(proj, torch.full_like(lab, IGNORE), pred)
    assert anchors.shape == (0, 2) and classes.shape == (0,)


# ---------------------------------------------------------------- memory queue


def test_queue_fifo_order_and_pointer():
    q = ClassMemoryQueue(num_classes=2, dim=3, size=4)
    assert not bool(q.valid_mask().any()) and q.filled(0) == 0 and q.ordered(0).shape == (0, 3)
    e = torch.eye(3)
    keys = [F.normalize(torch.tensor([1.0, float(i), 0.0]), dim=0) for i in range(7)]
    q.enqueue(0, torch.stack(keys[:3]))
    assert int(q.queues[0].ptr) == 3 and q.filled(0) == 3
    assert torch.allclose(q.ordered(0), torch.stack(keys[:3]))
    assert q.valid_mask().tolist() == [[True, True, True, False], [False] * 4]
    q.enqueue(0, torch.stack(keys[3:6]))  # wraps: the two oldest are overwritten
    assert int(q.queues[0].ptr) == 2 and q.filled(0) == 4
    assert torch.allclose(q.ordered(0), torch.stack(keys[2:6]))
    q.enqueue(0, keys[6][None])
    assert int(q.queues[0].ptr) == 3 and torch.allclose(q.ordered(0), torch.stack(keys[3:7]))
    # class 1 untouched; it has its own pointer
    q.enqueue(1, e[:1])
    assert int(q.queues[1].ptr) == 1 and q.filled(1) == 1 and torch.equal(q.ordered(1), e[:1])
    assert set(k for k in q.state_dict()) == {f"queues.{i}.{n}" for i in range(2) for n in ("keys", "ptr", "count")}


def test_queue_enqueues_one_class_mean_per_image_and_class():
    q = ClassMemoryQueue(num_classes=3, dim=2, size=10)
    proj = torch.zeros(2, 2, 2, 2)
    proj[0, 0] = 1.0  # image 0: every cell (1, 0)
    proj[1, 1, 0] = 1.0  # image 1: top row (0, 1), bottom row (0, 0) -> class mean picks rows
    proj[1, 0, 1] = 1.0
    grid = torch.tensor([[[0, 0], [1, IGNORE]], [[1, 1], [2, 2]]])
    written = q.enqueue_class_means(proj, grid)
    assert written == [1, 2, 1]
    assert [int(qq.ptr) for qq in q.queues] == [1, 2, 1]
    assert torch.allclose(q.ordered(1), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(q.ordered(2), torch.tensor([[1.0, 0.0]]))


# ---------------------------------------------------------------- contrastive loss


def test_contrastive_loss_equals_hand_computation():
    T = 0.07
    s = 1 / math.sqrt(2)
    # 2 classes, queue of 3 slots: class 0 holds 2 entries, class 1 holds 1
    bank = torch.zeros(2, 3, 2)
    bank[0, 0] = torch.tensor([1.0, 0.0])
    bank[0, 1] = torch.tensor([s, s])
    bank[1, 0] = torch.tensor([0.0, 1.0])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    anchors = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    classes = torch.tensor([0, 0, 1])

    def term(a, p, negs):
        return -math.log(math.exp(a @ p / T) / (math.exp(a @ p / T) + sum(math.exp(a @ n / T) for n in negs)))

    expected = []
    for a, c in zip(anchors, classes):
        pos = [bank[c, k] for k in range(3) if valid[c, k]]
        neg = [bank[o, k] for o in range(2) if o != c for k in range(3) if valid[o, k]]
        expected.append(sum(term(a, p, neg) for p in pos) / len(pos))
    got = queue_info_nce(anchors, classes, bank, valid, T)
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    # one positive and shared negatives: the existing MoCo InfoNCE
    a = anchors[2:]
    ref, _ = info_nce(a, bank[1, :1], bank[0, :2], temperature=T)
    assert queue_info_nce(a, classes[2:], bank, valid, T).item() == pytest.approx(ref.item(), rel=1e-4)


def test_unfilled_slots_never_act_as_negatives():
    T = 0.07
    bank = torch.zeros(2, 4, 3)
    bank[0, 0] = torch.tensor([1.0, 0.0, 0.0])
    bank[1, 0] = torch.tensor([0.0, 1.0, 0.0])
    valid = torch.tensor([[True, False, False, False], [True, False, False, False]])
    anchors = F.normalize(torch.tensor([[1.0, 0.2, -0.3], [-0.5, 1.0, 0.1]]), dim=1)
    classes = torch.tensor([0, 1])
    base = queue_info_nce(anchors, classes, bank, valid, T)
    # whatever the unfilled slots hold (zeros or garbage), the loss is the same
    junk = bank.clone()
    junk[:, 1:] = F.normalize(torch.randn(2, 3, 3), dim=-1)
    assert torch.equal(queue_info_nce(anchors, classes, junk, valid, T), base)
    # zero vectors as negatives would change it: exp(0) = 1 each in the denominator
    with_zeros = queue_info_nce(anchors, classes, bank, torch.ones_like(valid), T)
    assert not torch.allclose(with_zeros, base)
    # a class with no filled entry yields no positives: its anchors are left out
    only0 = torch.tensor([[True, False, False, False], [False] * 4])
    zero = queue_info_nce(anchors.requires_grad_(), classes, bank, only0, T)
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(anchors.grad, torch.zeros_like(anchors))


@pytest.mark.parametrize("sampling, background, filled", [("published", "zeros", [0, 2]), ("random", "means", [2, 2])])
def test_pixel_contrast_loss_uses_queue_before_updating_it(sampling, background, filled):
    q = ClassMemoryQueue(num_classes=2, dim=4, size=5)
    loss_fn = PixelContrastLoss(temperature=0.07, max_anchors_per_class=4, anchor_sampling=sampling,
                                background_queue=background)
    proj = F.normalize(torch.randn(2, 4, 2, 2), dim=1).requires_grad_()
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 8:] = 1
    first = loss_fn(proj, labels, q, pred=labels)  # empty queue: nothing to contrast with
    assert first.item() == 0.0 and [q.filled(c) for c in range(2)] == filled
    second = loss_fn(proj, labels, q, pred=labels)
    assert second.item() > 0 and [q.filled(c) for c in range(2)] == [2 * n for n in filled]
    second.backward()
    assert proj.grad.abs().sum() > 0
    if sampling == "published":
        with pytest.raises(ValueError, match="needs pred"):
            loss_fn(proj, labels, q)


def test_zero_background_queue_as_published_by_hand():
    """The published background queue: zero vectors, never written, positives of background
    anchors and negatives (e^0 = 1 each) of the others. 3 classes, a queue of 2 slots, class 1
    holding e1 = (1, 0) and class 2 e2 = (0, 1); a background anchor a0 = (0.6, 0.8) and a
    class-1 anchor a1 = (0.8, 0.6), each on two cells of one image (the prediction agrees)."""
    T = 0.5  # large enough that the zero rows' e^0 = 1 terms weigh in

    def setup():
        q = ClassMemoryQueue(num_classes=3, dim=2, size=2)
        q.enqueue(1, torch.tensor([[1.0, 0.0]]))
        q.enqueue(2, torch.tensor([[0.0, 1.0]]))
        proj = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.8, 0.6], [0.8, 0.6]]).t().reshape(1, 2, 2, 2)
        return q, proj.clone().requires_grad_()

    labels = torch.tensor([[[0, 0], [1, 1]]])  # on the embedding grid already
    q, proj = setup()
    got = PixelContrastLoss(T, background_queue="zeros")(proj, labels, q, pred=labels)
    # a0: both positives are zero rows (a0.0 = 0), negatives e1 (a0.e1 = 0.6) and e2 (0.8)
    l0 = -math.log(math.exp(0.0) / (math.exp(0.0) + math.exp(0.6 / T) + math.exp(0.8 / T)))
    # a1: positive e1 (0.8), negatives the 2 zero rows (e^0 each) and e2 (0.6)
    l1 = -math.log(math.exp(0.8 / T) / (math.exp(0.8 / T) + 2 * math.exp(0.0) + math.exp(0.6 / T)))
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # never written: class 0 stays zeros with no count; class 1 took a1's mean after the loss
    assert q.filled(0) == 0 and not bool(q.queues[0].keys.any())
    assert q.filled(1) == 2 and torch.allclose(q.ordered(1)[-1], torch.tensor([0.8, 0.6]))
    assert q.filled(2) == 1
    # medvol's mean queue: background empty, so a0 has no positive and is left out; a1 sees no zeros
    q, proj = setup()
    means = PixelContrastLoss(T, background_queue="means")(proj, labels, q, pred=labels)
    l1_means = -math.log(math.exp(0.8 / T) / (math.exp(0.8 / T) + math.exp(0.6 / T)))
    assert means.item() == pytest.approx(l1_means, rel=1e-6) and q.filled(0) == 1


# ---------------------------------------------------------------- supervised Dice


def _log_probs(p1):
    """Logits of 2 classes on 4 pixels, ``(1, 2, 2, 2)``, whose softmax is (1 - p1, p1)."""
    p1 = torch.tensor(p1, dtype=torch.float64).view(1, 1, 2, 2)
    return torch.log(torch.cat([1 - p1, p1], 1))


def test_published_dice_by_hand():
    """2 classes, 4 pixels: p(class 1) = 0.9, 0.2, 0.6, 0.1, target 1, 0, 1, 0."""
    logits = _log_probs([0.9, 0.2, 0.6, 0.1])
    target = torch.tensor([1, 0, 1, 0]).view(1, 1, 2, 2)
    s = 1e-5
    # class 1 only: sum p t = 0.9 + 0.6, sum p^2 = 0.81 + 0.04 + 0.36 + 0.01, sum t^2 = 2;
    # divided by the 2 classes (background counted, weight 0)
    dice = (1 - (2 * 1.5 + s) / (1.22 + 2 + s)) / 2
    assert PublishedDiceLoss()(logits, target).item() == pytest.approx(dice, rel=1e-6)  # float32
    # the supervised term: 0.5 Dice + 0.5 CE, CE = -mean log p(target) = p 0.9, 0.8, 0.6, 0.9
    ce = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.9)) / 4
    assert UGPCLLoss().supervised(logits, target).item() == pytest.approx(0.5 * dice + 0.5 * ce, rel=1e-6)
    # medvol's earlier Dice ("all_classes"): both classes, linear denominators, averaged
    bg = 1 - (2 * (0.8 + 0.9) + s) / ((0.1 + 0.8 + 0.4 + 0.9) + 2 + s)
    fg = 1 - (2 * 1.5 + s) / ((0.9 + 0.2 + 0.6 + 0.1) + 2 + s)
    old = UGPCLLoss(dice="all_classes").supervised(logits, target).item()
    assert old == pytest.approx(0.5 * (bg + fg) / 2 + 0.5 * ce, rel=1e-6)
    with pytest.raises(ValueError, match="dice must be one of"):
        UGPCLLoss(dice="bogus")


def test_published_dice_leaves_background_out():
    g = torch.Generator().manual_seed(0)
    prob = torch.softmax(torch.randn(2, 3, 5, 5, generator=g), 1)
    target = torch.randint(0, 3, (2, 1, 5, 5), generator=g)
    dice = PublishedDiceLoss()
    other = prob.clone()
    other[:, 0] = torch.rand(2, 5, 5, generator=g)  # only the background probabilities change
    assert torch.equal(dice.from_probs(other, target), dice.from_probs(prob, target))
    # a perfect foreground scores 0 whatever the background channel holds
    perfect = F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    perfect[:, 0] = 0.5
    assert dice.from_probs(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- total


def test_ugpcl_loss_terms_and_weights():
    net = UGPCLNet(1, 3, (64, 64), **TINY)
    x = torch.randn(4, 1, 64, 64)
    labels = torch.randint(0, 3, (2, 1, 64, 64))
    rot = torch.tensor([0, 1, 2, 3])
    crit = UGPCLLoss(consistency_rampup=100, contrast_start=10, threshold_rampup=100)
    out = net(x)
    early = crit(out, labels, rot, step=5, queue=net.memory)
    assert early["contrast"].item() == 0.0 and net.memory.filled(0) == 0

    def sup(y):  # the published Dice written out: foreground classes, squared denominators, / 3 classes
        p, t = y.softmax(1), F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
        dice = sum(1 - (2 * (p[:, c] * t[:, c]).sum() + 1e-5) / (p[:, c].pow(2).sum() + t[:, c].sum() + 1e-5)
                   for c in (1, 2)) / 3
        return 0.5 * dice + 0.5 * F.cross_entropy(y, labels[:, 0])

    assert early["sup_cnn"].item() == pytest.approx(sup(out["seg_cnn"][:2]).item(), rel=1e-5)
    assert early["sup_tf"].item() == pytest.approx(sup(out["seg_tf"][:2]).item(), rel=1e-5)
    cons = (out["seg_cnn"][2:].softmax(1) - out["seg_tf"][2:].softmax(1)).pow(2).mean()
    assert early["consistency"].item() == pytest.approx(cons.item(), rel=1e-5)
    cw = 0.01 * math.exp(-5 * (1 - 0.05) ** 2)
    assert early["consistency_weight"].item() == pytest.approx(cw)
    total = (early["sup_cnn"] + 0.4 * early["sup_tf"] + cw * early["consistency"]
             + 0.1 * F.cross_entropy(out["rot"], rot))
    assert early["total"].item() == pytest.approx(total.item(), rel=1e-5)
    # from contrast_start the queue fills and, once filled, the contrast term is live
    crit(net(x), labels, rot, step=10, queue=net.memory)
    assert net.memory.filled(1) > 0 and net.memory.filled(2) > 0
    assert net.memory.filled(0) == 0 and not bool(net.memory.queues[0].keys.any())  # zeros, never written
    late = crit(net(x), labels, rot, step=11, queue=net.memory, generator=torch.Generator().manual_seed(0))
    assert late["contrast"].item() > 0
    late["total"].backward()
    assert net.proj_head[0].weight.grad.abs().sum() > 0
