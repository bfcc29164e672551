"""Inf-Net: network shapes and parts, backbone weights by name, structure loss, the toolbox
metrics on hand-checkable maps, and a short CPU training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvol.config import ModelConfig
from medvol.errors import ConfigError, InputError
from medvol.evaluation.saliency import (
    THRESHOLDS,
    e_measure,
    e_measure_binary,
    mae,
    mean_dice_256,
    s_measure,
    saliency_metrics,
    sensitivity,
    specificity,
    threshold_curves,
)
from medvol.losses.structure import infnet_loss, mask_edges, structure_loss, structure_weight, weighted_bce
from medvol.networks import build_model
from medvol.networks.slice.infnet import InfNet, InfNetOutput, Res2NetV1b, ReverseAttention

TINY = dict(width_mult=0.125, rfb_channels=8)


@pytest.fixture(autouse=True)
def _pin():
    torch.set_num_threads(1)
    torch.manual_seed(0)


# ---------------------------------------------------------------- network

def test_faithful_widths_shapes_at_352():
    m = InfNet(3).eval()
    assert m.backbone.channels == [256, 512, 1024, 2048]
    # Res2Net-50 v1b 26w×4s: 25.7 M parameters with the ImageNet classifier (2048·1000 + 1000)
    n = sum(p.numel() for p in m.backbone.parameters())
    assert abs(n + 2048 * 1000 + 1000 - 25.70e6) < 0.05e6
    x = torch.randn(1, 3, 352, 352)
    feats = m.backbone(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 88, 88), (512, 44, 44), (1024, 22, 22), (2048, 11, 11)]
    with torch.no_grad():
        out = m(x, all_outputs=True)
    assert isinstance(out, InfNetOutput)
    assert all(t.shape == (1, 1, 352, 352) for t in out)
    assert out.final is out.ra2


def test_other_size_one_channel_and_eval_returns_final_map():
    m = InfNet(1, **TINY)
    x = torch.randn(2, 1, 100, 70)  # not divisible by 32: sizes follow the tensors
    out = m(x)  # training mode: every map
    assert isinstance(out, InfNetOutput) and all(t.shape == (2, 1, 100, 70) for t in out)
    m.eval()
    with torch.no_grad():
        y = m(x)
        full = m(x, all_outputs=True)
    assert torch.is_tensor(y) and y.shape == (2, 1, 100, 70)
    torch.testing.assert_close(y, full.ra2)


def test_input_scale_runs_the_network_at_the_working_size_and_returns_the_input_size():
    """input_scale = the published whole-slice resize (512 -> 352: 0.6875; 128 -> 352: 2.75):
    the backbone sees the resized slice and every map comes back at the input's size."""
    m = InfNet(1, **TINY, input_scale=2.75).eval()
    x = torch.randn(1, 1, 32, 32)
    seen = []
    hook = m.backbone.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    with torch.no_grad():
        y, full = m(x), m(x, all_outputs=True)
    hook.remove()
    assert seen == [(88, 88), (88, 88)] and y.shape == (1, 1, 32, 32) and all(t.shape == (1, 1, 32, 32) for t in full)
    torch.testing.assert_close(y, full.ra2)
    with pytest.raises(ConfigError, match="input_scale"):
        InfNet(1, **TINY, input_scale=0)


def test_reverse_attention_weight_is_one_minus_sigmoid_of_the_prior():
    p = torch.tensor([[-3.0, 0.0, 2.0]])
    torch.testing.assert_close(ReverseAttention.weight(p), 1 - torch.sigmoid(p))
    m = InfNet(1, **TINY).eval()
    seen = {}
    m.backbone.register_forward_hook(lambda mod, i, o: seen.update(feats=o))
    m.decoder.register_forward_hook(lambda mod, i, o: seen.update(s_g=o))
    m.ra4.reduce.register_forward_pre_hook(lambda mod, i: seen.update(ra4_in=i[0]))
    m.ra4.out.register_forward_hook(lambda mod, i, o: seen.update(ra4_res=o))
    m.ra4.register_forward_hook(lambda mod, i, o: seen.update(ra4=o))
    with torch.no_grad():
        m(torch.randn(1, 1, 64, 64))
    f4 = seen["feats"][3]
    prior = F.interpolate(seen["s_g"], size=f4.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen["ra4_in"], (1 - torch.sigmoid(prior)) * f4)
    torch.testing.assert_close(seen["ra4"], seen["ra4_res"] + prior)  # residual added to the prior
    assert seen["s_g"].shape[-2:] == seen["feats"][1].shape[-2:]  # S_g at stride 8


def test_registry_builds_infnet_and_checks_options():
    m = build_model(ModelConfig(name="infnet", options=dict(TINY)), {}, 1, 2)
    assert isinstance(m, InfNet)
    with pytest.raises(ConfigError, match="width"):
        build_model(ModelConfig(name="infnet", options={"widht_mult": 1}), {}, 1, 2)
    with pytest.raises(ConfigError, match="one foreground class"):
        build_model(ModelConfig(name="infnet", options=dict(TINY)), {}, 1, 3)


def test_backbone_names_match_the_res2net_imagenet_file():
    names = set(Res2NetV1b(3).state_dict())
    for k in ("conv1.0.weight", "conv1.1.running_var", "conv1.3.weight", "conv1.6.weight", "bn1.weight",
              "layer1.0.conv1.weight", "layer1.0.convs.2.weight", "layer1.0.bns.0.running_mean",
              "layer1.0.downsample.1.weight", "layer1.0.downsample.2.weight", "layer2.0.downsample.1.weight",
              "layer3.5.conv3.weight", "layer4.2.bn3.bias"):
        assert k in names, k


def test_load_local_weights_reports_and_loads(tmp_path):
    src = Res2NetV1b(3, width_mult=0.125)
    sd = {f"resnet.{k}": v for k, v in src.state_dict().items()}
    sd["fc.weight"] = torch.zeros(10, 256)
    f = tmp_path / "w.pth"
    torch.save(sd, f)
    m = InfNet(3, **TINY)
    rep = m.load_local_weights(f)
    assert rep["unexpected"] == ["fc.weight"] and not rep["missing"] and not rep["shape_mismatch"]
    torch.testing.assert_close(m.backbone.layer2[0].convs[1].weight, src.layer2[0].convs[1].weight)
    one = InfNet(1, **TINY)
    rep = one.load_local_weights(f)
    assert rep["adapted"] == ["conv1.0.weight"] and not rep["missing"]
    torch.testing.assert_close(one.backbone.conv1[0].weight, src.conv1[0].weight.sum(1, keepdim=True))
    with pytest.raises(InputError, match="no tensor matches"):
        InfNet(3, width_mult=0.25, rfb_channels=8).load_local_weights(f)
    torch.save({"model": object()}, tmp_path / "pickled.pth")
    with pytest.raises(InputError, match="weights_only"):
        m.load_local_weights(tmp_path / "pickled.pth")
    with pytest.raises(InputError, match="never downloads"):
        m.load_local_weights(tmp_path / "absent.pth")


# ---------------------------------------------------------------- structure loss

def _square(size=64, lo=16, hi=48):
    g = torch.zeros(1, 1, size, size)
    g[..., lo:hi, lo:hi] = 1
    return g


def test_structure_weight_is_one_on_flat_regions_and_larger_at_edges():
    assert torch.equal(structure_weight(torch.zeros(1, 1, 40, 40)), torch.ones(1, 1, 40, 40))
    g = _square(96, 16, 80)
    w = structure_weight(g)
    assert float(w[0, 0, 48, 48]) == pytest.approx(1.0)  # 32 px inside: the 31×31 window is flat
    assert float(w[0, 0, 16, 48]) > 3.0 and float(w[0, 0, 15, 48]) > 2.5  # on either side of the edge
    assert float(w.max()) <= 6.0
    direct = 1 + 5 * (F.avg_pool2d(g, 31, stride=1, padding=15) - g).abs()  # the published 31×31 pool
    torch.testing.assert_close(w, direct)


def test_weighted_bce_is_applied_where_edges_exist():
    logits = torch.randn(2, 1, 64, 64)
    g = _square().expand(2, 1, 64, 64).contiguous()
    w = structure_weight(g)
    bce = F.binary_cross_entropy_with_logits(logits, g, reduction="none")
    torch.testing.assert_close(weighted_bce(logits, g, w), (w * bce).sum((2, 3)) / w.sum((2, 3)))
    assert not torch.allclose(weighted_bce(logits, g, w), weighted_bce(logits, g))
    assert float(structure_loss(logits, g)) != pytest.approx(float(structure_loss(logits, g, official_compat=True)))
    flat = torch.zeros(2, 1, 64, 64)  # no edge: weight 1, both the same
    compat = float(structure_loss(logits, flat, official_compat=True))
    assert float(structure_loss(logits, flat)) == pytest.approx(compat)


def test_the_published_bce_call_ignores_the_weight():
    logits, g = torch.randn(1, 1, 64, 64), _square()
    w = structure_weight(g)
    with pytest.warns(UserWarning):  # PyTorch's deprecation of `reduce`
        published = F.binary_cross_entropy_with_logits(logits, g, reduce="none")
    assert published.dim() == 0  # a scalar mean: the weight cancels out of (w·bce).sum()/w.sum()
    torch.testing.assert_close((w * published).sum((2, 3)) / w.sum((2, 3)), weighted_bce(logits, g))


# ---------------------------------------------------------------- toolbox metrics (hand-checked)

P = np.array([[1.0, 0.5], [0.0, 0.0]])
G = np.array([[1, 1], [0, 0]], bool)


def test_mean_dice_256_by_hand():
    # t = 1 - k/255. k = 0..127 (t > 0.5): only the 1.0 pixel, Dice 2·1/(1+2) = 2/3;
    # k = 128..254 (0 < t <= 0.5): both foreground pixels, Dice 1; k = 255 (t = 0): all four, 4/6.
    assert mean_dice_256(P, G) == pytest.approx((128 * 2 / 3 + 127 * 1 + 2 / 3) / 256)
    assert len(THRESHOLDS) == 256 and THRESHOLDS[0] == 1 and THRESHOLDS[-1] == 0
    assert mean_dice_256(P * 7 - 3, G) == pytest.approx(mean_dice_256(P, G))  # min-max normalised first
    assert mean_dice_256(G.astype(float), G) == pytest.approx((255 + 2 * 2 / 6) / 256)


def test_sensitivity_specificity_by_hand():
    assert sensitivity(P, G) == pytest.approx((128 * 0.5 + 128 * 1) / 256)
    assert specificity(P, G) == pytest.approx(255 / 256)  # only t = 0 predicts the background
    assert sensitivity(P, G, threshold=0.5) == 1.0 and specificity(P, G, threshold=0.5) == 1.0
    assert sensitivity(P, G, threshold=0.75) == 0.5
    # no true positive above t = 0: the toolbox scores specificity 0 there, the fix TN/(TN+FP) = 2/3
    p, g = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0, 1], [0, 0]], bool)
    assert specificity(p, g) == pytest.approx(255 * (2 / 3) / 256)
    assert specificity(p, g, official_compat=True) == 0.0
    assert threshold_curves(p, g, official_compat=True)["dice"][:-1].max() == 0.0


def test_e_measure_by_hand_and_against_per_pixel_definition():
    g = np.array([[1, 0], [0, 0]], bool)
    assert e_measure_binary(g, g) == pytest.approx(4 / 3)  # every pixel aligned: N/(N-1)
    assert e_measure_binary(np.zeros((2, 2)), g) == pytest.approx(1 / 3)  # four terms of 1/4
    assert e_measure_binary(np.zeros((2, 2)), np.zeros((2, 2))) == pytest.approx(4 / 3)

    def per_pixel(fm, gt):
        fm, gt = fm.astype(float), gt.astype(float)
        af, ag = fm - fm.mean(), gt - gt.mean()
        align = 2 * af * ag / (af ** 2 + ag ** 2 + np.finfo(float).eps)
        return ((align + 1) ** 2 / 4).sum() / (gt.size - 1 + np.finfo(float).eps)

    rng = np.random.default_rng(0)
    p, gt = rng.random((12, 9)), rng.random((12, 9)) > 0.6
    pn = (p - p.min()) / (p.max() - p.min())
    assert e_measure(p, gt) == pytest.approx(np.mean([per_pixel(pn > t, gt) for t in THRESHOLDS]))


def test_s_measure_and_mae_by_hand():
    g = np.array([[1, 0], [0, 0]], bool)
    p = np.array([[1.0, 0.5], [0.0, 0.0]])
    # object: fg {1} -> 2/(1+1) = 1; bg 1-p = {.5, 1, 1}: mean 5/6, sample std sqrt(1/12)
    o_bg = 2 * (5 / 6) / ((5 / 6) ** 2 + 1 + math.sqrt(1 / 12))
    s_obj = 0.25 * 1 + 0.75 * o_bg
    # region: centroid (1, 1) -> four 1-pixel quadrants, each constant: ssim 1
    assert s_measure(p, g) == pytest.approx(0.5 * s_obj + 0.5 * 1.0)
    sq = np.zeros((4, 4), bool)
    sq[:2, :2] = True
    assert s_measure(sq.astype(float), sq) == pytest.approx(1.0)
    assert s_measure(1.0 - sq, sq) == pytest.approx(0.5)  # object 0; constant quadrants: ssim 1
    assert s_measure(np.array([[1.0, 0.0], [0.0, 0.0]]), np.zeros((2, 2))) == pytest.approx(0.75)
    assert mae(P, G) == pytest.approx(0.5 / 4)
    m = saliency_metrics(P, G)
    assert set(m) == {"dice", "sensitivity", "specificity", "e_measure", "s_measure", "mae"}
    assert m["dice"] == pytest.approx(mean_dice_256(P, G))


# ---------------------------------------------------------------- training

def _blobs(n: int, size: int, g: torch.Generator):
    """Bright discs (1–2 per image) on Gaussian noise; labels and their 1-px-wide edges."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            cy, cx = torch.randint(6, size - 6, (2,), generator=g)
            r = 3 + 4 * torch.rand(1, generator=g)
            masks[i, 0] = torch.maximum(masks[i, 0], (((yy - cy) ** 2 + (xx - cx) ** 2) <= r ** 2).float())
    imgs = masks + 0.5 * torch.randn(n, 1, size, size, generator=g)
    return imgs, masks, mask_edges(masks)  # dilation − erosion


def _val_dice(m, x, y) -> float:
    m.eval()
    with torch.no_grad():
        p = m(x)
    m.train()
    return float(np.mean([mean_dice_256(p[i, 0].numpy(), y[i, 0].numpy()) for i in range(len(x))]))


def _train(seed: int, steps: int = 60, size: int = 48, lr: float = 3e-3):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xv, yv, _ = _blobs(4, size, g)
    m = InfNet(1, **TINY)
    opt = torch.optim.Adam(m.parameters(), lr)
    d0, losses = _val_dice(m, xv, yv), []
    for _ in range(steps):
        x, y, e = _blobs(4, size, g)
        loss, _ = infnet_loss(m(x), y, e)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(m.parameters(), 0.5)  # as published: each gradient element clamped
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses[:10])), float(np.mean(losses[-10:])), d0, _val_dice(m, xv, yv)


def test_short_cpu_training_lowers_the_loss_and_raises_dice():
    first, last, d0, d1 = _train(seed=0)
    # Bars set from seeds 0, 1, 2 (measured on CPU: mean loss of the first 10 -> last 10 steps
    # 6.70 -> 5.21, 6.79 -> 5.70, 6.76 -> 5.53; mean_dice_256 on 4 held-out images 0.07 -> 0.28,
    # 0.06 -> 0.29, 0.04 -> 0.38), with margin.
    assert last < first - 0.5
    assert d1 > d0 + 0.1 and d1 > 0.15
