"""PCRL: queue, InfoNCE, momentum encoder, attention, mixup, pretext data, pretraining and
fine-tuning from its encoder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medvol.config import load_recipe
from medvol.data.pretext import (
    PretextConfig,
    PretextDataset,
    apply_indicated,
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
from medvol.training.pcrl import PCRLTrainer, cross_rank_shuffled_forward, shuffled_forward

from conftest import metric_series, pinned

TINY = ["model.base_features=2", "data.patch_size=[16, 16, 8]", "data.batch_size=4", "data.num_workers=0",
        "method.queue_size=16", "method.proj_dim=8", "method.proj_hidden=8", "method.attention_hidden=8",
        "method.val_samples=4", "method.pretext.shuffle_blocks=100", "data.val_cases=[brain_004]"]



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
    z = small.projector(feats[-1])
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    rec = small.reconstruct(feats, torch.zeros(2, 7))
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
        by_hand = torch.sigmoid(net.decoder(feats[:-1] + [feats[-1] * gate[:, :, None, None, None]]))
        torch.testing.assert_close(net.reconstruct(feats, ind_a), by_hand)
        assert not torch.allclose(net.reconstruct(feats, ind_a), net.reconstruct(feats, ind_b))
        # a gate of ones (whatever the indicator) leaves the plain U-Net
        net.attention.fc2.weight.zero_()
        net.attention.fc2.bias.fill_(30.0)
        plain = torch.sigmoid(net.decoder(feats))
        torch.testing.assert_close(net.reconstruct(feats, ind_a), plain)
        torch.testing.assert_close(net.reconstruct(feats, ind_b), plain)


def test_mixup_with_alpha_one_is_the_student_path():
    net = _tiny_net()
    x1, x2 = torch.rand(2, 1, 16, 16, 8), torch.rand(2, 1, 16, 16, 8)
    ind = torch.zeros(2, 7)
    ind[:, 3] = 1
    with torch.no_grad():
        key_feats = net.encoder(x2)
        out = net(x1, key_feats, ind, ind, ind, torch.ones(2))
        torch.testing.assert_close(out["z_h"], out["q"])
        torch.testing.assert_close(out["rec_h"], out["rec_o"])
        feats = net.encoder(x1)
        mixed = mix_features(feats, key_feats, torch.tensor([0.7, 0.6]))
        torch.testing.assert_close(mixed[2][1], 0.6 * feats[2][1] + 0.4 * key_feats[2][1])
        assert not torch.allclose(net(x1, key_feats, ind, ind, ind, torch.full((2,), 0.6))["rec_h"], out["rec_o"])


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


def test_pretext_samples(brain_pre):
    cfg = PretextConfig(flip_prob=0.0, rot90=False, affine_prob=0.0, shuffle_blocks=200)
    ds = PretextDataset(brain_pre, ["brain_000", "brain_001"], "cache", [16, 16, 8], cfg, global_batch=4, seed=5)
    a, b = ds[9], ds[9]
    assert set(a) == {"x1", "x2", "t1", "t2", "th", "ind_o", "ind_m", "ind_h", "alpha", "slot"}
    for k in ("x1", "x2", "t1", "t2", "th"):
        assert a[k].shape == (1, 16, 16, 8) and a[k].min() >= 0 and a[k].max() <= 1
        torch.testing.assert_close(a[k], b[k])  # a pure function of (seed, step, slot)
    assert 0.5 <= float(a["alpha"]) <= 1
    # without indicated transforms the hybrid target is the alpha-mix of the two clean views
    torch.testing.assert_close(a["th"], a["alpha"] * a["t1"] + (1 - a["alpha"]) * a["t2"])
    assert a["t1"].std() > 0.05  # real anatomy, not padding
    assert not torch.equal(ds[10]["t1"], a["t1"])


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
    assert int(t.models["queue"].count) == 4  # this step's keys were enqueued (no warm-up outside fit)


@pytest.fixture(scope="module")
def pcrl_run(brain_pre, tmp_path_factory):
    run = tmp_path_factory.mktemp("pcrl") / "run"
    r = load_recipe("pcrl_demo", TINY + ["trainer.steps=40", "trainer.val_every=20", "optimizer.lr=0.05"])
    with pinned():
        train(r, brain_pre, run, device="cpu", quiet=True)
    return run


@pytest.mark.slow
def test_short_pretraining_lowers_contrastive_and_reconstruction_losses(pcrl_run):
    s = metric_series(pcrl_run)
    contrast, recon = s["train/contrast"], s["train/recon"]
    assert len(contrast) >= 8
    # Measured with threads pinned to 2 on seeds 0/1/2: first contrastive value 2.73/2.81/2.78,
    # its drop 0.76/1.21/0.93, reconstruction ratio 0.62/0.52/0.44: the bars keep a margin.
    # the warmed-up queue makes the first value the untrained one: about log(K + 1)
    assert contrast[0] == pytest.approx(math.log(17), abs=0.3)
    assert np.mean(contrast[-3:]) < contrast[0] - 0.3
    assert np.mean(recon[-3:]) < 0.8 * recon[0]
    assert len(s["val/recon_mse"]) == 2 and "val/retrieval_acc" in s and s["val/embedding_std"][0] > 0
    enc = torch.load(pcrl_run / "encoder.pt", weights_only=True)
    assert enc["format"] == "medvol-encoder-1" and enc["model"] == "pcrl_unet"
    assert enc["encoder"] and all(k.startswith("encoder.") for k in enc["encoder"])


@pytest.mark.slow
def test_fine_tuning_loads_the_encoder_and_can_freeze_it(pcrl_run, brain_pre, tmp_path):
    from medvol.training.supervised import SupervisedTrainer

    enc = torch.load(pcrl_run / "encoder.pt", weights_only=True)["encoder"]
    sets = ["model.base_features=2", "data.patch_size=[16, 16, 16]", "data.batch_size=2", "data.num_workers=0",
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
    params = {n for n, _ in PCRLSegNet(1, 3, base=2).named_parameters()}
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
def test_pretraining_on_a_folder_of_scans(brain_raw, tmp_path):
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
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert "broken.nii.gz" in manifest["failed"]["broken"]
    arr = np.load(tmp_path / "prep" / "a.npy")
    assert arr.dtype == np.float16 and arr.ndim == 4 and arr.min() == 0 and arr.max() == 1

    r = load_recipe("pcrl_demo", TINY[:-1] + ["trainer.steps=2", "trainer.val_every=2", "data.val_cases=[c]"])
    train(r, folder, tmp_path / "run", device="cpu", quiet=True)
    assert (tmp_path / "run" / "encoder.pt").exists()
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
    assert int(a["queue"]["count"]) == 16 + 4 * 4  # warm-up fills it once, then 4 keys per step


@pytest.mark.ddp
def test_pcrl_under_two_gloo_processes(brain_pre, tmp_path):
    import os
    import subprocess
    import sys

    sets = TINY + ["trainer.steps=2", "trainer.val_every=2", "data.batch_size=2"]
    cmd = [sys.executable, "-m", "medvol", "pretrain", "--recipe", "pcrl_demo", "--data", str(brain_pre), "--out",
           str(tmp_path / "ddp"), "--device", "cpu", "--nproc", "2", "--quiet", *sum((["--set", s] for s in sets), [])]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params_identical_across_ranks"] is True
    from medvol.checkpoint import load_checkpoint

    queue = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")["models"]["queue"]
    assert int(queue["count"]) == 16 + 2 * 4  # each step enqueues the keys of both ranks
    assert (tmp_path / "ddp" / "encoder.pt").exists()


@pytest.mark.slow
def test_predict_refuses_a_pretraining_run(pcrl_run):
    from medvol.checkpoint import load_run

    with pytest.raises(ConfigError, match="no segmentation model; fine-tune one from its encoder.pt"):
        load_run(pcrl_run, torch.device("cpu"))
