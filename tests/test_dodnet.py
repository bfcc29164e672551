"""DoDNet building blocks: controller size, batched dynamic head, task conditioning, and the
partial-label loss (the trainer, MOTS adapter and recipes are still to come)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medvol.losses.partial import partial_dice_bce
from medvol.networks.dodnet import DoDNet, WSConv3d, dynamic_head, head_param_count

SMALL = dict(widths=(8, 16, 32, 64, 64), groups=8)


def test_controller_output_size_is_derived_from_the_head():
    assert head_param_count((8, 8, 8, 2)) == 8 * 8 + 8 * 8 + 8 * 2 + 8 + 8 + 2 == 162
    assert DoDNet().controller.out_channels == 162  # the paper's model: 256 + 7 -> 162
    assert DoDNet().controller.in_channels == 256 + 7
    m = DoDNet(num_tasks=3, head_widths=(4, 6, 2), **SMALL)
    assert m.controller.out_channels == 4 * 6 + 6 * 2 + 6 + 2 and m.controller.in_channels == 64 + 3


def test_batched_dynamic_head_equals_a_per_sample_computation():
    torch.manual_seed(0)
    widths = (8, 8, 8, 2)
    feats = torch.randn(3, 8, 5, 6, 7)
    params = torch.randn(3, head_param_count(widths))
    out = dynamic_head(feats, params, widths)
    for s in range(3):  # reference: einsum with this sample's own weights, layer by layer
        p, o = params[s], 0
        shapes = list(zip(widths[:-1], widths[1:]))
        ws = []
        for cin, cout in shapes:
            ws.append(p[o:o + cin * cout].reshape(cout, cin))
            o += cin * cout
        x = feats[s]
        for i, (cin, cout) in enumerate(shapes):
            x = torch.einsum("oc,cxyz->oxyz", ws[i], x) + p[o:o + cout][:, None, None, None]
            o += cout
            if i < len(shapes) - 1:
                x = F.relu(x)
        torch.testing.assert_close(out[s], x, rtol=1e-5, atol=1e-5)


def test_only_the_task_changes_the_output_not_the_encoder():
    torch.manual_seed(0)
    m = DoDNet(**SMALL).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        enc_a = m.encode(x)
        a = m(x, torch.tensor([0]))
        b = m(x, torch.tensor([4]))
        enc_b = m.encode(x)
    for fa, fb in zip(enc_a, enc_b):
        torch.testing.assert_close(fa, fb)
    assert a.shape == (1, 2, 32, 32, 32)
    assert not torch.allclose(a, b)  # the dynamic head's weights depend on the task


def test_weight_standardisation():
    conv = WSConv3d(3, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(10).add_(3)  # scale and shift do not change a standardised conv's output
        ref = conv(torch.ones(1, 3, 4, 4, 4))
        conv.weight.mul_(0.1).add_(-7)
        again = conv(torch.ones(1, 3, 4, 4, 4))
        plain = F.conv3d(torch.ones(1, 3, 4, 4, 4), conv.weight, padding=1)
    torch.testing.assert_close(again, ref, rtol=1e-3, atol=5e-3)  # float32 cancellation of the shifts
    assert float((plain - ref).abs().max()) > 10  # an ordinary conv would change completely


def test_unannotated_channels_get_no_gradient():
    logits = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    target = (torch.rand(2, 2, 4, 4, 4) > 0.5).float()
    annotated = torch.tensor([[1, 0], [1, 1]])  # sample 0: organ only (e.g. spleen); sample 1: both
    partial_dice_bce(logits, target, annotated).backward()
    assert float(logits.grad[0, 1].abs().sum()) == 0.0
    assert float(logits.grad[0, 0].abs().sum()) > 0 and float(logits.grad[1].abs().sum()) > 0
    # equal to the mean of the annotated pairs' losses
    full = torch.stack([partial_dice_bce(logits[i:i + 1, c:c + 1], target[i:i + 1, c:c + 1], torch.ones(1, 1))
                        for i, c in [(0, 0), (1, 0), (1, 1)]]).mean()
    assert float(partial_dice_bce(logits, target, annotated)) == pytest.approx(float(full), rel=1e-5)
