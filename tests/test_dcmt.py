"""DC-MT network and losses (``docs/methods/dcmt.md``): LSE pooling, CAM refinement, CAM/logit relation,
shapes and stride, registry and SliceAdapter use, losses against hand computations, the
unlabelled CAM selection and gradient flow into the attention module."""

from __future__ import annotations

import math

import pytest
import torch

from medvol.config import ModelConfig
from medvol.errors import ConfigError
from medvol.losses.dcmt import (
    DCMTLoss,
    DCMTLossConfig,
    attention_mse,
    bound_loss,
    cam_classes,
    class_consistency,
    consistency_weights,
    select_cams,
)
from medvol.networks import build_model
from medvol.networks.slice.dcmt import DCMTNet, lse_pool, refine_cams
from medvol.networks.slice_adapter import SliceAdapter

TINY = dict(width=0.25, groups=2, layers=(1, 1, 1, 1), head_channels=16)


@pytest.fixture(autouse=True)
def _determinism():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> DCMTNet:
    return DCMTNet(**{**TINY, **kw})


# ---------------------------------------------------------------- pooling and CAM refinement

def test_lse_pool_tends_to_max_and_mean():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    mx, mean = x.flatten(2).amax(2), x.flatten(2).mean(2)
    hw = 35
    for r in (10.0, 100.0, 1e4):  # max - log(HW)/r <= LSE <= max
        lse = lse_pool(x, r)
        assert torch.all(lse <= mx + 1e-12) and torch.all(lse >= mx - math.log(hw) / r - 1e-12)
    torch.testing.assert_close(lse_pool(x, 1e4), mx, atol=1e-3, rtol=0)
    torch.testing.assert_close(lse_pool(x, 1e-7), mean, atol=1e-6, rtol=0)
    mid = lse_pool(x, 6.0)
    assert torch.all(mid > mean) and torch.all(mid < mx)
    with pytest.raises(ValueError):
        lse_pool(x, 0.0)


def test_refine_cams_is_half_at_sigma():
    cam = torch.tensor([[[[0.0, 0.8], [2.0, 1.0]]]])  # min 0, max 2: 0.8 normalises to sigma = 0.4
    out = refine_cams(cam, None, w=100.0, sigma=0.4)
    assert out[0, 0, 0, 1].item() == pytest.approx(0.5, abs=1e-6)
    assert out[0, 0, 0, 0].item() < 1e-15 and out[0, 0, 1, 0].item() > 1 - 1e-15
    assert out[0, 0, 1, 1].item() == pytest.approx(1 / (1 + math.exp(-100 * 0.1)))
    assert torch.all(refine_cams(torch.full((1, 2, 3, 3), 4.0)) < 1e-15)  # a constant map is empty
    assert refine_cams(torch.rand(2, 3, 4, 4), (32, 24)).shape == (2, 3, 32, 24)


# ---------------------------------------------------------------- network

def _head_of(model: DCMTNet, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    seen = {}
    hook = model.head.register_forward_hook(lambda m, i, o: seen.setdefault("head", o))
    try:
        out = model(x)
    finally:
        hook.remove()
    return out, seen["head"]


def test_cams_are_the_classifier_applied_per_position():
    """What is tested, exactly (float64, eval mode):
    (a) the pre-ReLU class map at every position equals the classifier's weights applied to the
        head feature there (no bias), and the output CAMs are refine_cams(ReLU(that map));
    (b) logits = classifier(LSE_r(head)) for the model's r = 6;
    (c) as r -> 0 (LSE -> mean, which is linear) the spatial mean of the pre-ReLU class map
        plus the bias equals the logit. For r = 6 that identity is only approximate: LSE
        pooling is not linear, so LSE(map) + bias is not the logit in general."""
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    model = tiny().double().eval()
    with torch.no_grad():
        out, head = _head_of(model, x)
        maps = model.class_maps(head)
        w, b = model.classifier.weight, model.classifier.bias
        torch.testing.assert_close(maps, torch.einsum("kc,bchw->bkhw", w, head))
        torch.testing.assert_close(out["cams"], refine_cams(maps.relu(), x.shape[-2:]))
        torch.testing.assert_close(out["logits"], lse_pool(head, 6.0) @ w.T + b)
        torch.testing.assert_close(out["features"], lse_pool(head, 6.0))

        model.lse_r = 1e-7
        out, head = _head_of(model, x)
        torch.testing.assert_close(model.class_maps(head).mean((2, 3)) + b, out["logits"], atol=1e-6, rtol=1e-6)


def test_faithful_network_shapes_at_256():
    model = DCMTNet(num_classes=3).eval()
    assert model.attention.reduce[0].in_channels == 2048 and model.attention.reduce[0].out_channels == 512
    assert model.head[0].in_channels == 2560 and model.classifier.in_features == 512
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert out["logits"].shape == (1, 3) and out["features"].shape == (1, 512)
    assert out["cams"].shape == (1, 3, 256, 256) and out["attention"].shape == (1, 1, 16, 16)


def test_tiny_shapes_and_last_stage_at_stride_one():
    model = tiny(num_classes=4, in_channels=1).eval()
    first = model.trunk.layer4[0]
    assert first.conv2.conv.stride == (1, 1) and first.project.conv.stride == (1, 1)
    x = torch.randn(2, 1, 96, 64)
    with torch.no_grad():
        assert model.trunk(x).shape[-2:] == (6, 4)  # 1/16 of the input
        out = model(x)
    assert out["logits"].shape == (2, 4) and out["features"].shape == (2, 16)
    assert out["cams"].shape == (2, 4, 96, 64) and out["attention"].shape == (2, 1, 6, 4)
    assert float(out["cams"].min()) >= 0 and float(out["cams"].max()) <= 1


def test_registry_and_slice_adapter():
    model = build_model(ModelConfig(name="dcmt", options=dict(TINY)), {}, 3, 3).eval()
    assert isinstance(model, DCMTNet)
    with pytest.raises(ConfigError):
        build_model(ModelConfig(name="dcmt", options={"depth": 3}), {}, 3, 3)
    with torch.no_grad():
        res = SliceAdapter(model, axis=-1, slice_batch=2, mode="classification")(torch.randn(1, 3, 32, 32, 3))
    assert res.logits.shape == (1, 3, 3) and res.features.shape == (1, 3, 16)


# ---------------------------------------------------------------- losses

def test_loss_terms_by_hand():
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    cam = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
    # (0.25 + 0.25 + 0 + 0) / (1.5 + 0.5 + 0 + 2)
    assert attention_mse(mask, cam).item() == pytest.approx(0.125)
    # 1 - (0.5 + 0 + 0 + 1) / (0.5 + 0.5 + 0 + 1)
    assert bound_loss(mask, cam).tolist() == pytest.approx([0.25])
    assert bound_loss(mask, torch.zeros_like(cam)).tolist() == pytest.approx([1.0])  # clamp 1e-5: no NaN
    # softmax [0.5, 0.5] vs [0.75, 0.25]
    s, t = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    assert class_consistency(s, t).item() == pytest.approx(0.0625)


def test_consistency_weights():
    cfg = DCMTLossConfig()
    assert consistency_weights(19.9, cfg) == (0.0, 0.0)
    w_cls, w_att = consistency_weights(20, cfg)
    assert w_cls == pytest.approx(5 * math.exp(-5 * 0.5 ** 2)) and w_att == pytest.approx(math.exp(-5))
    assert consistency_weights(60, cfg) == pytest.approx((5.0, 1.0))
    compat = DCMTLossConfig(official_compat=True)
    assert consistency_weights(50, compat)[1] == pytest.approx(math.exp(-5 * 0.5 ** 2))  # stuck at t = 0.5
    assert consistency_weights(50, cfg)[1] == pytest.approx(math.exp(-5 * 0.25 ** 2))


def _pair(b=3, k=3, h=2, w=2):
    student = {"logits": torch.randn(b, k), "cams": torch.rand(b, k, h, w)}
    teacher = {"logits": torch.randn(b, k), "cams": torch.rand(b, k, h, w)}
    return student, teacher


def test_total_loss_by_hand():
    student, teacher = _pair()
    labels = torch.tensor([2, 0, -1])
    labelled = torch.tensor([True, True, False])
    masks = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    teacher["logits"][2] = torch.tensor([0.0, 0.0, 5.0])  # teacher argmax of the unlabelled slice: 2
    out = DCMTLoss()(student, teacher, labels, masks, labelled, epoch=30)

    cs, ct = student["cams"], teacher["cams"]
    ls = student["logits"]
    ce = -(ls[0].log_softmax(0)[2] + ls[1].log_softmax(0)[0]) / 2
    m0, m1 = masks[0], masks[1]
    c0, c1 = cs[0, 2], cs[1, 0]
    mask = (((m0 - c0) ** 2).sum() + ((m1 - c1) ** 2).sum()) / (m0.sum() + c0.sum() + m1.sum() + c1.sum())
    bound = ((1 - torch.minimum(m0, c0).sum() / c0.sum()) + (1 - torch.minimum(m1, c1).sum() / c1.sum())) / 2
    cons_cls = ((ls.softmax(1) - teacher["logits"].softmax(1)) ** 2).mean()
    cons_att = ((cs[2, 2] - ct[2, 2]) ** 2).sum() / (cs[2, 2].sum() + ct[2, 2].sum())
    w_cls, w_att = 5 * math.exp(-5 * (1 - 30 / 40) ** 2), math.exp(-5 * (1 - 10 / 40) ** 2)
    for name, want in (("ce", ce), ("mask", mask), ("bound", bound), ("consistency_cls", cons_cls),
                       ("consistency_att", cons_att)):
        assert out[name].item() == pytest.approx(want.item(), rel=1e-5), name
    total = ce + 0.5 * mask + 0.001 * bound + w_cls * cons_cls + w_att * cons_att
    assert out["total"].item() == pytest.approx(total.item(), rel=1e-5)
    assert DCMTLoss()(student, teacher, labels, masks, labelled, epoch=10)["total"].item() == pytest.approx(
        (ce + 0.5 * mask + 0.001 * bound).item(), rel=1e-5)
    compat = DCMTLoss(DCMTLossConfig(official_compat=True))(student, teacher, labels, masks, labelled, epoch=30)
    assert compat["bound"].item() == pytest.approx(bound.item() * 2 / 3, rel=1e-5)  # sum / whole batch


def test_unlabelled_slices_use_the_teacher_argmax_never_the_label():
    student, teacher = _pair(b=2)
    teacher["logits"] = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # argmax 0 and 1
    labelled = torch.tensor([True, False])
    labels = torch.tensor([2, 0])  # slice 0: label 2 != teacher argmax 0; slice 1 (unlabelled): label 0
    assert cam_classes(labels, teacher["logits"], labelled).tolist() == [2, 1]
    torch.testing.assert_close(select_cams(student["cams"], torch.tensor([2, 1])),
                               torch.stack([student["cams"][0, 2:3], student["cams"][1, 1:2]]))

    masks = torch.rand(2, 1, 2, 2).round()
    loss = DCMTLoss()
    out = loss(student, teacher, labels, masks, labelled, epoch=45)
    want = attention_mse(teacher["cams"][1:, 1:2], student["cams"][1:, 1:2])
    assert out["consistency_att"].item() == pytest.approx(want.item())
    leaked = attention_mse(teacher["cams"][1:, 0:1], student["cams"][1:, 0:1])
    assert out["consistency_att"].item() != pytest.approx(leaked.item())
    # the unlabelled slice's label and mask are never read
    for other in (torch.tensor([2, 1]), torch.tensor([2, 2]), torch.tensor([2, -1])):
        masks2 = masks.clone()
        masks2[1] = 1 - masks2[1]
        again = loss(student, teacher, other, masks2, labelled, epoch=45)
        for k in ("total", "ce", "mask", "bound", "consistency_att"):
            assert again[k].item() == out[k].item(), k


def test_gradients_reach_the_attention_module_and_not_the_cam_weights():
    model = tiny(num_classes=3).train()
    x = torch.randn(2, 3, 64, 64)
    labels, labelled = torch.tensor([1, 2]), torch.tensor([True, True])
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 16:48, 16:48] = 1
    teacher = {k: v.detach() for k, v in model(torch.randn(2, 3, 64, 64)).items()}

    # CAM terms alone: they train the features, never the classifier (its weights are detached)
    out = model(x)
    DCMTLoss()(out, teacher, labels, masks, labelled, epoch=0)["mask"].backward()
    assert model.classifier.weight.grad is None or not model.classifier.weight.grad.any()
    assert model.attention.reduce[0].weight.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    out = model(x)
    DCMTLoss()(out, teacher, labels, masks, labelled, epoch=0)["total"].backward()
    att = model.attention
    assert att.gamma.grad.abs().sum() > 0  # gamma starts at 0: only it (and the convs around) see a gradient
    assert att.reduce[0].weight.grad.abs().sum() > 0 and att.out[0].weight.grad.abs().sum() > 0

    with torch.no_grad():
        att.gamma.fill_(0.5)
    model.zero_grad(set_to_none=True)
    DCMTLoss()(model(x), teacher, labels, masks, labelled, epoch=0)["total"].backward()
    for name in ("pool_score", "channel_fc", "value", "to_map", "position_gate"):
        grads = [p.grad for p in getattr(att, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
