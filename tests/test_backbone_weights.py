"""``model.options.backbone_weights``: a local ImageNet-style state dict reaches the backbone of
each 2D method by name (prefixes stripped, torchvision names mapped, an RGB stem summed into a
one-channel model); nothing is downloaded; a file that matches nothing is one clear error."""

from __future__ import annotations

import pytest
import torch

from medvol.config import ModelConfig
from medvol.errors import InputError
from medvol.networks import build_model
from medvol.networks.slice.dcmt import DCMTNet
from medvol.networks.slice.infnet import Res2NetV1b
from medvol.networks.slice.ugpcl import UGPCLNet

UGPCL_TINY = dict(input_size=(32, 32), width=8, layers=(1, 1, 1, 1), decoder_widths=(16, 8, 8, 8, 8), embed_dim=8,
                  heads=(2, 2, 2), depths=(1, 1, 1), proj_dim=8, queue_size=4)
DCMT_TINY = dict(width=0.25, groups=2, layers=(1, 1, 1, 1), head_channels=16)


def _save(tmp_path, sd, name="w.pth"):
    torch.save(sd, tmp_path / name)
    return str(tmp_path / name)


def test_infnet_option_loads_the_res2net_file(tmp_path):
    src = Res2NetV1b(3, width_mult=0.125)
    path = _save(tmp_path, {f"module.{k}": v for k, v in src.state_dict().items()})
    m = build_model(ModelConfig(name="infnet", options=dict(width_mult=0.125, rfb_channels=8, backbone_weights=path)),
                    {}, 1, 2)
    torch.testing.assert_close(m.backbone.layer3[0].convs[0].weight, src.layer3[0].convs[0].weight)
    torch.testing.assert_close(m.backbone.conv1[0].weight, src.conv1[0].weight.sum(1, keepdim=True))  # RGB stem


def test_ugpcl_option_maps_torchvision_resnet_names_onto_the_encoder(tmp_path):
    src = UGPCLNet(3, 2, **UGPCL_TINY).encoder
    torchvision_names = {"stem.0": "conv1", "stem.1": "bn1"}
    sd = {}
    for k, v in src.state_dict().items():
        head, _, rest = k.partition(".")
        if head == "stem":
            idx, _, rest = rest.partition(".")
            k = f"{torchvision_names[f'stem.{idx}']}.{rest}"
        elif head == "layers":
            idx, _, rest = rest.partition(".")
            k = f"layer{int(idx) + 1}.{rest}"
        sd[k] = v
    sd["fc.weight"] = torch.zeros(10, 4)
    path = _save(tmp_path, sd)
    m = build_model(ModelConfig(name="ugpcl", options={**UGPCL_TINY, "backbone_weights": path}), {}, 3, 2)
    for (k, a), b in zip(m.encoder.state_dict().items(), src.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_dcmt_option_loads_the_trunk_and_a_mismatch_is_one_error(tmp_path):
    src = DCMTNet(2, 3, **DCMT_TINY).trunk
    path = _save(tmp_path, src.state_dict())
    m = build_model(ModelConfig(name="dcmt", options={**DCMT_TINY, "backbone_weights": path}), {}, 3, 2)
    for (k, a), b in zip(m.trunk.state_dict().items(), src.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    other = _save(tmp_path, {"features.0.weight": torch.zeros(8, 3, 3, 3)}, "vgg.pth")
    with pytest.raises(InputError, match="no tensor matches the SE-ResNeXt50 trunk"):
        build_model(ModelConfig(name="dcmt", options={**DCMT_TINY, "backbone_weights": other}), {}, 3, 2)
    with pytest.raises(InputError, match="never downloads"):
        build_model(ModelConfig(name="dcmt", options={**DCMT_TINY, "backbone_weights": str(tmp_path / "no.pth")}),
                    {}, 3, 2)
