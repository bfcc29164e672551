"""PCRL: queue, InfoNCE, momentum encoder, attention, mixup, pretext data, pretraining and
fine-tuning from its encoder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvol.config import load_recipe
from medvol.data.pretext import (
    PUBLISHED_CROPS,
    PretextConfig,
    PretextDataset,
    apply_indicated,
    box_iou,
    crop_pair,
    indicated_transform,
    local_pixel_shuffle,
    out_painting,
    prepare_scan_folder,
)
from medvol.errors import ConfigError
from medvol.losses.contrastive import KeyQueue, info_nce
from medvol.networks.pcrl import KeyEncoder, PCRLNet, PCRLSegNet, mix_features
from medvol.training import train
from medvol.training.distributed import DistInfo
from medvol.training.pcrl import (
    PCRLTrainer,
    cross_rank_shuffled_forward,
    draw_mix,
    pcrl_loss_terms,
    retrieval_accuracy,
    shuffled_forward,
)

from conftest import metric_series, pinned, train_two_ranks

TINY = ["model.base_features=2", "data.patch_size=[16, 16, 8]", "data.batch_size=4", "data.num_workers=0",
        "method.queue_size=16", "method.proj_dim=8", "method.proj_hidden=8", "method.attention_hidden=8",
        "method.val_samples=4", "method.pretext.shuffle_blocks=100", "data.val_cases=[brain_004]",
        "method.key_bn_groups=2"]
# the demo recipe as shipped (base 4, crops 16x16x8, batch 16, SGD 0.01, queue 256), shortened
LEARN = ["data.num_workers=0", "data.val_cases=[brain_004]", "trainer.steps=80", "trainer.val_every=40",
         "method.val_samples=32"]



# ---------------------------------------------------------------- queue and InfoNCE
def test_queue_holds_the_last_k_keys_in_order():
    q = KeyQueue(dim=3, size=8)
    keys = torch.arange(3 * 19, dtype=torch.float32).view(19, 3)
    for chunk in keys.split(5):  # 5, 5, 5, 4: wraps around twice
        q.enqueue(chunk)
    torch.testing.assert_close(q.ordered(), keys[-8:])
    assert int(q.count) == 19
    q.enqueue(keys[:11])  # more than the queue holds at once: the newest 8 survive
    torch.testing.assert_close(q.ordered(), keys[3:11])
    assert int(q.count) == 30


def test_info_nce_equals_the_hand_computed_value():
    s = 1 / math.sqrt(2)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[s, s], [0.0, 1.0]])
    neg = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    t = 0.2
    # query 0: positive s, negatives 1, -1, 0; query 1: positive 1, negatives 0, 0, -1
    l0 = -math.log(math.exp(s / t) / (math.exp(s / t) + math.exp(1 / t) + math.exp(-1 / t) + math.exp(0)))
    l1 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0) + math.exp(-1 / t)))
    loss, acc = info_nce(q, k, neg, t)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert acc.item() == 0.5  # query 0's positive loses to the negative [1, 0]


# ---------------------------------------------------------------- network
def _tiny_net():
    torch.manual_seed(0)
    return PCRLNet(1, base=2, proj_dim=8, proj_hidden=8, attention_hidden=8).eval()


def test_pcrl_unet_shapes_and_paper_widths():
    net = PCRLNet(1, base=32)
    assert net.encoder.channels == [64, 128, 256, 512]
    assert net.attention.fc1.in_features == 7 and net.attention.fc2.out_features == 512
    assert (net.projector.fc1.in_features, net.projector.fc2.out_features) == (512, 128)
    small = _tiny_net()
    x = torch.rand(2, 1, 16, 16, 8)
    feats = small.encoder(x)
    assert [f.shape[2:] for f in feats] == [(16, 16, 8), (8, 8, 4), (4, 4, 2), (2, 2, 1)]
    assert small.projector(feats[-1]).shape == (2, 8)
    rec = small.decode(small.gate(feats, torch.zeros(2, 7)))
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    assert PCRLSegNet(1, 3, base=2)(torch.rand(1, 1, 24, 16, 8)).shape == (1, 3, 24, 16, 8)


def test_the_indicator_acts_only_as_a_channel_gate_on_the_bottleneck():
    net = _tiny_net().train()  # batch statistics: untrained running ones would all but mute the bottleneck
    x = torch.rand(2, 1, 16, 16, 8)
    ind_a = torch.tensor([[1, 0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 0, 1, 0]], dtype=torch.float32)
    ind_b = torch.tensor([[0, 0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1]], dtype=torch.float32)
    with torch.no_grad():
        feats = [torch.rand_like(f) for f in net.encoder(x)]  # positive everywhere, as after a ReLU
        gate = net.attention(ind_a)
        assert gate.shape == (2, feats[-1].shape[1]) and ((gate > 0) & (gate < 1)).all()
        gated = net.gate(feats, ind_a)
        for f, g in zip(feats[:-1], gated[:-1]):
            assert g is f  # skips untouched
        torch.testing.assert_close(gated[-1], feats[-1] * gate[:, :, None, None, None])
        assert not torch.allclose(net.decode(gated), net.decode(net.gate(feats, ind_b)))
        # a gate of ones (whatever the indicator) leaves the plain U-Net
        net.attention.fc2.weight.zero_()
        net.attention.fc2.bias.fill_(30.0)
        plain = net.decode(feats)
        torch.testing.assert_close(net.decode(net.gate(feats, ind_a)), plain)
        torch.testing.assert_close(net.decode(net.gate(feats, ind_b)), plain)


def test_the_two_student_passes_as_published():
    """Gated pass: each side gated by its own indicator, the hybrid mixes the gated
    bottlenecks and the plain skips; mixup pass: no gate anywhere (published
    ``PCRLModel3d.forward``)."""
    net = _tiny_net().train()
    x1, xm = torch.rand(2, 1, 16, 16, 8), torch.rand(2, 1, 16, 16, 8)
    a1 = torch.tensor([[1, 0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 0, 1, 0]], dtype=torch.float32)
    a2 = torch.tensor([[0, 0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1]], dtype=torch.float32)
    with torch.no_grad():
        key_feats = [torch.rand_like(f) for f in net.encoder(x1)]
        key_mix = [torch.rand_like(f) for f in key_feats]
        out = net(x1, key_feats, a1, a2, 0.7, xm, key_mix, 0.6)
        f1 = net.encoder(x1)
        s_b = f1[-1] * net.attention(a1)[:, :, None, None, None]
        m_b = key_feats[-1] * net.attention(a2)[:, :, None, None, None]
        hybrid = [0.7 * s + 0.3 * m for s, m in zip(f1[:-1], key_feats[:-1])] + [0.7 * s_b + 0.3 * m_b]
        torch.testing.assert_close(out["q"], net.projector(f1[-1]))  # projection of the ungated bottleneck
        torch.testing.assert_close(out["out"], torch.sigmoid(net.decoder(f1[:-1] + [s_b])))
        torch.testing.assert_close(out["out_alpha"], torch.sigmoid(net.decoder(hybrid)))
        fm = net.encoder(xm)
        torch.testing.assert_close(out["q_mix"], net.projector(fm[-1]))
        torch.testing.assert_close(out["out_mix"], torch.sigmoid(net.decoder(fm)))
        torch.testing.assert_close(out["out_alpha_mix"], torch.sigmoid(net.decoder(mix_features(fm, key_mix, 0.6))))
        # alpha 1: the hybrid is the student's own path
        _, out_alpha, plain = net.branch(x1, key_feats, 1.0, a1, a2)
        torch.testing.assert_close(out_alpha, plain)
        mixed = mix_features(f1, key_feats, torch.tensor([0.7, 0.6]))
        torch.testing.assert_close(mixed[2][1], 0.6 * f1[2][1] + 0.4 * key_feats[2][1])
        with pytest.raises(ValueError, match="in pairs"):
            net.branch(x1, key_feats, 0.5, a1)


def _nce_by_hand(q, k, negatives, t):
    q, k, negatives = (F.normalize(v, dim=1) for v in (q, k, negatives))
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ n) / t) for n in negatives)
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def test_each_loss_term_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    b, shape = 3, (3, 1, 4, 4, 2)
    batch = {k: torch.rand(shape, generator=g) for k in ("t1", "t2", "g1", "g2")}
    out = {k: torch.rand(shape, generator=g) for k in ("out", "out_alpha", "out_mix", "out_alpha_mix")}
    out["q"], out["q_mix"] = torch.randn(b, 4, generator=g), torch.randn(b, 4, generator=g)
    k, k_tilde = torch.randn(b, 4, generator=g), torch.randn(b, 4, generator=g)
    negatives = torch.randn(5, 4, generator=g)
    draw = draw_mix(0, 3, 0, b)
    assert draw.alpha1 >= 0.5 and draw.alpha2 >= 0.5 and draw.lam >= 0.5 and sorted(draw.perm.tolist()) == [0, 1, 2]
    lam, perm, a1, a2 = draw.lam, draw.perm.tolist(), draw.alpha1, draw.alpha2
    terms = pcrl_loss_terms(out, k, k_tilde, batch, draw, F.normalize(negatives, dim=1), 0.2)

    k_mix = torch.stack([lam * k[i] + (1 - lam) * k[perm[i]] for i in range(b)])  # mix of the raw keys
    expect = {"contrast_qk": _nce_by_hand(out["q"], k, negatives, 0.2),
              "contrast_mix": _nce_by_hand(out["q_mix"], k_tilde, negatives, 0.2),
              "contrast_kmix": _nce_by_hand(out["q_mix"], k_mix, negatives, 0.2)}

    def mse(a, t):
        return float(((a - t) ** 2).mean())

    def mix(t):
        return torch.stack([lam * t[i] + (1 - lam) * t[perm[i]] for i in range(b)])

    t1, t2, g1, g2 = batch["t1"], batch["t2"], mix(batch["g1"]), mix(batch["g2"])
    expect |= {"recon_out": mse(out["out"], t1), "recon_mix": mse(out["out_mix"], g1),
               "recon_alpha": mse(out["out_alpha"], a1 * t1 + (1 - a1) * t2),
               "recon_alpha_mix": mse(out["out_alpha_mix"], a2 * g1 + (1 - a2) * g2)}
    for name, value in expect.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
    assert float(terms["contrast"]) == pytest.approx(sum(expect[n] for n in expect if n.startswith("contrast")) / 3,
                                                     rel=1e-5)
    assert float(terms["recon"]) == pytest.approx(sum(expect[n] for n in expect if n.startswith("recon")) / 4,
                                                  rel=1e-5)
    # the queue's three writes, in order: k, k~, k_mix (normalised)
    assert terms["keys"].shape == (3, b, 4)
    for written, key in zip(terms["keys"], (k, k_tilde, k_mix)):
        torch.testing.assert_close(written, F.normalize(key, dim=1))


def test_shuffled_batchnorm_groups_restore_the_order():
    torch.manual_seed(0)
    key = KeyEncoder(1, base=2, proj_dim=8, proj_hidden=8)
    x = torch.rand(6, 1, 16, 16, 8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        key.eval()  # running statistics: grouping must not matter, only the order
        feats, k = shuffled_forward(key, x, 3, g)
        ref_feats, ref_k = key(x)
        torch.testing.assert_close(k, ref_k)
        torch.testing.assert_close(feats[1], ref_feats[1])
        key.train()  # batch statistics: one group is the plain batch, three groups are not
        torch.testing.assert_close(shuffled_forward(key, x, 1, g)[1], key(x)[1])
        assert not torch.allclose(shuffled_forward(key, x, 3, g)[1], key(x)[1], atol=1e-4)


def test_cross_rank_shuffle_returns_each_rank_its_own_samples(tmp_path):
    import torch.distributed as tdist

    torch.manual_seed(0)
    key = KeyEncoder(1, base=2, proj_dim=8, proj_hidden=8).eval()
    x = torch.rand(5, 1, 16, 16, 8)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        feats, k = cross_rank_shuffled_forward(key, x, torch.Generator().manual_seed(1))
    finally:
        tdist.destroy_process_group()
    with torch.no_grad():
        ref_feats, ref_k = key(x)
    torch.testing.assert_close(k, ref_k)
    torch.testing.assert_close(feats[0], ref_feats[0])


# ---------------------------------------------------------------- pretext data
def test_indicated_transform_and_its_indicator():
    rng = np.random.default_rng(0)
    img = rng.random((1, 6, 6, 4)).astype(np.float32)
    cfg = PretextConfig()
    seen = set()
    for _ in range(40):
        out, ind = indicated_transform(img, rng, cfg)
        flips, k = ind[:3].astype(bool), int(np.argmax(ind[3:]))
        assert ind[3:].sum() == 1 and out.shape == img.shape
        undone = np.rot90(out, -k, axes=(1, 2))
        undone = np.flip(undone, tuple(a + 1 for a in range(3) if flips[a])) if flips.any() else undone
        np.testing.assert_array_equal(undone, img)
        seen.add(k)
    assert seen == {0, 1, 2, 3}
    assert np.array_equal(apply_indicated(img, [False] * 3, 0), img)
    # a non-square plane gets no rotation
    _, ind = indicated_transform(rng.random((1, 6, 4, 4)), rng, cfg)
    assert ind[3] == 1


def test_distortions():
    rng = np.random.default_rng(1)
    img = rng.random((1, 20, 20, 10)).astype(np.float32)
    one = local_pixel_shuffle(img, np.random.default_rng(2), n_blocks=1, groups=1)
    np.testing.assert_array_equal(np.sort(one.ravel()), np.sort(img.ravel()))  # one block: a permutation
    assert (one != img).sum() <= 2 * 2 * 1  # blocks are at most a tenth of each side
    many = local_pixel_shuffle(img, rng, n_blocks=2000)
    assert (many != img).mean() > 0.3 and set(np.unique(many)) <= set(np.unique(img))
    flat = np.full((1, 14, 14, 14), 0.5, np.float32)  # out-painting keeps the image inside boxes only
    out = out_painting(flat, rng)
    kept = out == 0.5
    assert 0.05 < kept.mean() < 0.8 and out.min() >= 0 and out.max() <= 1


def test_crop_pairs_as_published():
    rng = np.random.default_rng(0)
    cfg = PretextConfig(border=[5, 6, 2])
    shape, patch = (60, 64, 40), (16, 16, 8)
    allowed = {tuple(np.round(np.asarray(c) * patch).astype(int)) for c in PUBLISHED_CROPS}
    seen = set()
    for _ in range(200):
        (s1, z1), (s2, z2) = crop_pair(shape, patch, rng, cfg)
        assert box_iou(s1, z1, s2, z2) > 0.25
        for start, size in ((s1, z1), (s2, z2)):
            assert tuple(size) in allowed
            assert (start >= [5, 6, 2]).all() and (start + size <= np.asarray(shape) - [5, 6, 2]).all()
            seen.add(tuple(size))
    assert len(seen) >= 4  # the half-size crop passes only beside its own size, rarely (as published)
    # IoU by hand: boxes of 4^3 and 2x4x4 sharing 2x4x4 voxels -> 32 / 64
    assert box_iou(np.zeros(3), np.full(3, 4), np.array([2, 0, 0]), np.array([2, 4, 4])) == pytest.approx(0.5)
    # a volume smaller than the crops: the crops shrink to it
    (s1, z1), _ = crop_pair((10, 10, 6), patch, rng, PretextConfig())
    assert (z1 <= [10, 10, 6]).all() and (s1 >= 0).all()


def test_pretext_samples(brain_pre):
    cfg = PretextConfig(flip_prob=0.0, rot90=False, affine_prob=0.0, shuffle_blocks=200)
    ds = PretextDataset(brain_pre, ["brain_000", "brain_001"], "cache", [16, 16, 8], cfg, global_batch=4, seed=5)
    a, b = ds[9], ds[9]
    assert set(a) == {"x1", "x2", "t1", "t2", "g1", "g2", "a1", "a2", "slot"}
    for k in ("x1", "x2", "t1", "t2", "g1", "g2"):
        assert a[k].shape == (1, 16, 16, 8) and a[k].min() >= 0 and a[k].max() <= 1
        torch.testing.assert_close(a[k], b[k])  # a pure function of (seed, step, slot)
    # without indicated transforms the targets t are the *distorted* inputs themselves
    torch.testing.assert_close(a["t1"], a["x1"])
    torch.testing.assert_close(a["a1"], torch.tensor([0, 0, 0, 1, 0, 0, 0.0]))
    assert a["g1"].std() > 0.05  # real anatomy, not padding
    assert not torch.equal(ds[10]["g1"], a["g1"])
    # without distortions the inputs are the clean views; with indicated transforms t = T(x)
    plain = PretextConfig(affine_prob=0.0, shuffle_prob=0.0, paint_prob=0.0, blur_prob=0.0)
    c = PretextDataset(brain_pre, ["brain_000"], "cache", [16, 16, 8], plain, global_batch=4, seed=5)[3]
    torch.testing.assert_close(c["x1"], c["g1"])
    flips, k = c["a2"][:3].numpy().astype(bool), int(np.argmax(c["a2"][3:].numpy()))
    np.testing.assert_array_equal(c["t2"].numpy(), apply_indicated(c["x2"].numpy(), flips, k))
    # painting is one draw for the pair: out-painted noise in both views, or in neither
    pairs = [PretextDataset(brain_pre, ["brain_000"], "cache", [16, 16, 8],
                            PretextConfig(paint_prob=0.5, inpaint_prob=0.0, shuffle_prob=0.0, blur_prob=0.0,
                                          affine_prob=0.0), global_batch=4, seed=s)[0] for s in range(12)]
    painted = [(not torch.equal(p["x1"], p["g1"]), not torch.equal(p["x2"], p["g2"])) for p in pairs]
    assert all(p1 == p2 for p1, p2 in painted) and {p for p, _ in painted} == {True, False}


# ---------------------------------------------------------------- trainer
def _trainer(pre, tmp_path, extra=()):
    r = load_recipe("pcrl_demo", TINY + list(extra))
    return PCRLTrainer(r, pre, tmp_path / "run", DistInfo())


@pytest.mark.slow
def test_momentum_encoder_follows_the_ema_and_gets_no_gradient(brain_pre, tmp_path):
    t = _trainer(brain_pre, tmp_path, ["method.momentum=0.9"])
    student, key = t.models["model"], t.models["momentum"]
    with torch.no_grad():  # make the two differ, so that the update is visible
        for p in key.parameters():
            p.add_(0.05 * torch.randn_like(p))
    q_before = {k: v.detach().clone() for k, v in student.named_parameters()}
    k_before = {k: v.detach().clone() for k, v in key.named_parameters()}
    ds = t.make_dataset()
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    losses = t.optimization_step(batch, 0)
    assert np.isfinite(losses["loss"]) and losses["contrast"] > 0 and losses["recon"] > 0
    for name, p in key.named_parameters():
        assert not p.requires_grad and p.grad is None
        torch.testing.assert_close(p.detach(), 0.9 * k_before[name] + 0.1 * q_before[name])
    moved = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), q_before[n])]
    assert any(n.startswith("decoder.") for n in moved) and any(n.startswith("encoder.") for n in moved)
    assert any(n.startswith("attention.") for n in moved) and any(n.startswith("projector.") for n in moved)
    assert int(t.models["queue"].count) == 3 * 4  # this step's 3 keys were enqueued (no warm-up outside fit)


@pytest.mark.slow
def test_the_training_step_is_the_published_objective(brain_pre, tmp_path):
    """The trainer's loss, rebuilt by hand from the modules: keys of x2 and of the mixed x2,
    gated pass on x1, ungated pass on the mixed x1, the three InfoNCE terms against the queue
    and the four MSE terms against distorted-transformed and clean-mixed targets."""
    t = _trainer(brain_pre, tmp_path, ["method.momentum=1.0", "method.key_bn_groups=1"])  # no EMA move, plain BN
    student, key, queue = t.models["model"], t.models["momentum"], t.models["queue"]
    with torch.no_grad():  # a momentum encoder unlike the student, so that mixing them shows
        for p in key.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ds = t.make_dataset()
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    terms = t.training_step(batch, 5)

    d = draw_mix(t.recipe.trainer.seed, 5, 0, 4)
    with torch.no_grad():
        kf, k = key(batch["x2"])
        kfm, km = key(d.mix(batch["x2"]))
        f = student.encoder(batch["x1"])
        s_b = f[-1] * student.attention(batch["a1"])[:, :, None, None, None]
        m_b = kf[-1] * student.attention(batch["a2"])[:, :, None, None, None]
        a1, a2 = d.alpha1, d.alpha2
        hybrid = [a1 * x + (1 - a1) * y for x, y in zip(f[:-1] + [s_b], kf[:-1] + [m_b])]
        out = torch.sigmoid(student.decoder(f[:-1] + [s_b]))
        out_alpha = torch.sigmoid(student.decoder(hybrid))
        fm = student.encoder(d.mix(batch["x1"]))
        out_mix = torch.sigmoid(student.decoder(fm))
        out_alpha_mix = torch.sigmoid(student.decoder([a2 * x + (1 - a2) * y for x, y in zip(fm, kfm)]))
        q, qm = student.projector(f[-1]), student.projector(fm[-1])
    negatives = queue.keys
    g1, g2 = d.mix(batch["g1"]), d.mix(batch["g2"])
    contrast = (_nce_by_hand(q, k, negatives, 0.2) + _nce_by_hand(qm, km, negatives, 0.2)
                + _nce_by_hand(qm, d.mix(k), negatives, 0.2)) / 3
    recon = (F.mse_loss(out, batch["t1"]) + F.mse_loss(out_mix, g1)
             + F.mse_loss(out_alpha, a1 * batch["t1"] + (1 - a1) * batch["t2"])
             + F.mse_loss(out_alpha_mix, a2 * g1 + (1 - a2) * g2)) / 4
    value = {k: float(v.detach()) for k, v in terms.items()}
    assert value["contrast"] == pytest.approx(contrast, rel=1e-4)
    assert value["recon"] == pytest.approx(float(recon), rel=1e-4)
    assert value["loss"] == pytest.approx(contrast + float(recon), rel=1e-4)
    # gradients reach the student only, and every part of it (attention through both gates)
    terms["loss"].backward()
    assert all(p.grad is None for p in key.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.fixture(scope="module")
def pcrl_run(brain_pre, tmp_path_factory):
    run = tmp_path_factory.mktemp("pcrl") / "run"
    with pinned():
        train(load_recipe("pcrl_demo", LEARN), brain_pre, run, device="cpu", quiet=True)
    return run


def _own_key_rank(trainer: PCRLTrainer, monkeypatch) -> tuple[float, float]:
    """(retrieval accuracy, own-key rank score) of ``trainer.validate()``: the score is, per
    query, the share of the other validation keys less similar than its own key (ties count
    half), averaged over the queries; chance is 0.5 whatever the number of pairs."""
    import medvol.training.pcrl as pcrl

    seen = {}
    monkeypatch.setattr(pcrl, "retrieval_accuracy", lambda q, k: seen.update(q=q, k=k) or retrieval_accuracy(q, k))
    acc = trainer.validate()["val/retrieval_acc"]
    s = seen["q"] @ seen["k"].t()
    own, n = s.diagonal()[:, None], s.shape[0]
    below = (s < own).float() + 0.5 * (s == own).float() - 0.5 * torch.eye(n)  # the own key itself left out
    return acc, float((below.sum(1) / (n - 1)).mean())


@pytest.mark.slow
def test_short_pretraining_learns_without_collapse(pcrl_run, brain_pre, tmp_path, monkeypatch):
    s = metric_series(pcrl_run)
    contrast, recon = s["train/contrast"], s["train/recon"]
    assert len(contrast) >= 16
    # Measured with threads pinned to 2 on seeds 0/1/2 (80 steps; 32 validation pairs, chance
    # 1/32; a collapsed embedding retrieves exactly 1 of 32 with a spread of 0.001-0.004):
    # first contrastive value 5.48/5.42/5.50, its drop over the run 0.15/0.50/0.52,
    # reconstruction ratio last/first 0.35/0.46/0.69, final retrieval 3/4/3 of 32, final
    # embedding spread 0.099/0.114/0.130: the bars keep a margin.
    # Retrieval, re-measured with one thread, trainer.seed 0/1/2 (the validation's 32 pairs):
    # top-1 retrieval untrained 0.5/1.1/2.0 of 32, trained 1/6/3 of 32: no top-1 bar separates
    # them (the former bar, >= 2 of 32, is passed by chance about 26 % of the time and failed
    # by seed 0 trained at one thread), so the bar is on the own-key rank score (chance 0.5): untrained
    # 0.530/0.507/0.515, trained 0.752/0.871/0.785 (at 128 pairs: 0.516/0.460/0.518 and
    # 0.747/0.852/0.818). Bar 0.65: 0.10 below the lowest trained, 0.12 above the highest
    # untrained; the untrained weights of this run are checked to stay below 0.6.
    # the warmed-up queue makes the first value the untrained one: about log(K + 1)
    assert contrast[0] == pytest.approx(math.log(257), abs=0.3)
    assert np.mean(contrast[-3:]) < contrast[0] - 0.07
    assert np.mean(recon[-3:]) < 0.85 * recon[0]
    assert len(s["val/recon_mse"]) == 2
    assert s["val/embedding_std"][-1] > 0.05  # not collapsed
    from medvol.checkpoint import load_checkpoint

    with pinned():
        evaluator = PCRLTrainer(load_recipe("pcrl_demo", LEARN), brain_pre, tmp_path / "eval", DistInfo())
        untrained = _own_key_rank(evaluator, monkeypatch)[1]
        for key, sd in load_checkpoint(pcrl_run / "checkpoints" / "latest.pt")["models"].items():
            evaluator.models[key].load_state_dict(sd)
        acc, trained = _own_key_rank(evaluator, monkeypatch)
    assert acc == pytest.approx(s["val/retrieval_acc"][-1])  # the run's own last validation
    assert untrained < 0.6 and trained > 0.65, (untrained, trained)
    enc = torch.load(pcrl_run / "encoder.pt", weights_only=True)
    assert enc["format"] == "medvol-encoder-1" and enc["model"] == "pcrl_unet"
    assert enc["encoder"] and all(k.startswith("encoder.") for k in enc["encoder"])


@pytest.mark.slow
def test_fine_tuning_loads_the_encoder_and_can_freeze_it(pcrl_run, brain_pre, tmp_path):
    from medvol.training.supervised import SupervisedTrainer

    enc = torch.load(pcrl_run / "encoder.pt", weights_only=True)["encoder"]
    sets = ["model.base_features=4", "data.patch_size=[16, 16, 16]", "data.batch_size=2", "data.num_workers=0",
            "data.val_cases=[brain_004]", f"init_from={pcrl_run / 'encoder.pt'}", "trainer.freeze_init_steps=3",
            "trainer.steps=3", "trainer.val_every=3"]
    r = load_recipe("pcrl_finetune_demo", sets)
    t = SupervisedTrainer(r, brain_pre, tmp_path / "ft0", DistInfo())
    assert t.init_report["loaded"] == sorted(enc)  # every encoder tensor, by name and shape
    assert not t.init_report["shape_mismatch"] and not t.init_report["not_in_model"]
    assert all(k.startswith("decoder.") for k in t.init_report["missing_from_file"])
    for k, v in t.models["model"].state_dict().items():
        if k in enc:
            torch.testing.assert_close(v, enc[k])

    run = tmp_path / "ft"
    train(r, brain_pre, run, device="cpu", quiet=True)
    report = json.loads((run / "init_report.json").read_text())
    assert report["loaded"] == sorted(enc)
    from medvol.checkpoint import load_checkpoint

    after = load_checkpoint(run / "checkpoints" / "latest.pt")["models"]["model"]
    params = {n for n, _ in PCRLSegNet(1, 3, base=4).named_parameters()}
    for k in params:
        if k in enc:  # frozen for the three steps
            torch.testing.assert_close(after[k], enc[k], rtol=0, atol=0)
    assert any(not torch.equal(after[k], t.models["model"].state_dict()[k]) for k in params if k.startswith("decoder."))


@pytest.mark.slow
def test_init_from_an_unrelated_architecture_is_an_error(pcrl_run, brain_pre, tmp_path):
    from medvol.training.supervised import SupervisedTrainer

    r = load_recipe("quickstart", [f"init_from={pcrl_run / 'encoder.pt'}", "model.base_features=4",
                                   "data.num_workers=0"])
    with pytest.raises(ConfigError, match="none of its .* tensors matches"):
        SupervisedTrainer(r, brain_pre, tmp_path / "x", DistInfo())


@pytest.mark.slow
def test_retrieval_accuracy_by_hand_and_chance_for_ties():
    """Own key on top: 1; ties share the credit, so a constant encoder scores chance (1/n)
    exactly (argmax gave the tied first row the whole credit: 1/n, but only by accident of
    order); keys shifted by one: 0; two identical pairs among four distinct ones: 1/2 each."""
    eye = torch.eye(4)
    assert retrieval_accuracy(eye, eye) == 1.0
    assert retrieval_accuracy(torch.ones(4, 3), torch.ones(4, 3)) == pytest.approx(1 / 4)
    assert retrieval_accuracy(eye, eye.roll(1, 0)) == 0.0
    dup = torch.stack([eye[0], eye[0], eye[2], eye[3]])
    assert retrieval_accuracy(dup, dup) == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)


def test_pretraining_on_a_folder_of_scans(brain_raw, tmp_path, caplog):
    import shutil

    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    images = sorted((brain_raw / "imagesTr").glob("*.nii.gz"))[:3]
    shutil.copy(images[0], folder / "a.nii.gz")
    shutil.copy(images[1], folder / "sub" / "b.nii.gz")
    shutil.copy(images[2], folder / "c.nii.gz")
    (folder / "broken.nii.gz").write_bytes(images[0].read_bytes()[:400])  # truncated
    names = prepare_scan_folder(folder, tmp_path / "prep", PretextConfig(), quiet=True)
    assert names == ["a", "c", "sub__b"]
    assert "own spacing; set method.pretext.spacing" in caplog.text  # crops would cover other anatomy
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert "broken.nii.gz" in manifest["failed"]["broken"]
    arr = np.load(tmp_path / "prep" / "a.npy")
    assert arr.dtype == np.float16 and arr.ndim == 4 and arr.min() == 0 and arr.max() == 1

    r = load_recipe("pcrl_demo", TINY[:-1] + ["trainer.steps=2", "trainer.val_every=2", "data.val_cases=[c]"])
    m = train(r, folder, tmp_path / "run", device="cpu", quiet=True)
    assert (tmp_path / "run" / "encoder.pt").exists()
    assert m["val/retrieval_chance"] == pytest.approx(1 / r.method["val_samples"])
    assert sorted(json.loads((tmp_path / "run" / "split.json").read_text())["labelled"]) == ["a", "sub__b"]


def test_pcrl_recipes_load_with_the_paper_settings():
    r = load_recipe("pcrl_pretrain")
    assert r.data.patch_size == [64, 64, 32] and r.data.batch_size == 16 and r.model.base_features == 32
    opt = r.optimizer
    assert (opt.name, opt.lr, opt.momentum, opt.weight_decay) == ("sgd", 1e-3, 0.9, 1e-4)
    assert r.schedule.name == "cosine"
    m = r.method
    assert (m["momentum"], m["temperature"], m["queue_size"], m["proj_dim"]) == (0.999, 0.2, 16384, 128)
    assert m["pretext"]["intensity"] == "ct" and m["pretext"]["ct_window"] == [-1000, 1000]
    # the published preparation: 1 mm isotropic, IoU > 0.25 inside a 70/70/15 border, the
    # published crop sizes (the default); 240 epochs x 623 scans x 16 pairs / batch 16
    assert m["pretext"]["spacing"] == [1.0, 1.0, 1.0] and m["pretext"]["min_iou"] == 0.25
    assert m["pretext"]["border"] == [70, 70, 15] and "crop_sizes" not in m["pretext"]
    assert PretextConfig().crop_sizes == PUBLISHED_CROPS
    assert r.trainer.steps == 240 * 623 * 16 // 16
    with pytest.raises(ConfigError, match="method.pretext.bogus"):
        from medvol.config import from_dict
        from medvol.training.pcrl import PCRLOptions

        from_dict(PCRLOptions, {"pretext": {"bogus": 1}}, "r.yaml", "method")


@pytest.mark.slow
def test_pcrl_resume_is_exact_including_the_queue(brain_pre, tmp_path):
    from medvol.checkpoint import load_checkpoint

    r = load_recipe("pcrl_demo", TINY + ["trainer.steps=4", "trainer.val_every=2"])
    train(r, brain_pre, tmp_path / "full", device="cpu", quiet=True)
    train(r, brain_pre, tmp_path / "cut", device="cpu", stop_at=2, quiet=True)
    train(r, brain_pre, tmp_path / "cut", device="cpu", resume=True, quiet=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")["models"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")["models"]
    assert set(a) == {"model", "momentum", "queue"}
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=0, atol=0)
    assert int(a["queue"]["count"]) == 16 + 4 * 3 * 4  # warm-up fills it once, then 3 writes of 4 keys per step


@pytest.mark.ddp
def test_pcrl_under_two_gloo_processes(brain_pre, tmp_path):

    sets = TINY + ["trainer.steps=2", "trainer.val_every=2", "data.batch_size=2"]
    train_two_ranks(["pretrain", "--recipe", "pcrl_demo"], brain_pre, tmp_path / "ddp", sets)
    from medvol.checkpoint import load_checkpoint

    queue = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")["models"]["queue"]
    assert int(queue["count"]) == 16 + 2 * 3 * 4  # each of a step's 3 writes holds the keys of both ranks
    assert (tmp_path / "ddp" / "encoder.pt").exists()


@pytest.mark.slow
def test_predict_refuses_a_pretraining_run(pcrl_run):
    from medvol.checkpoint import load_run

    with pytest.raises(ConfigError, match="no segmentation model; fine-tune one from its encoder.pt"):
        load_run(pcrl_run, torch.device("cpu"))
