"""nnU-Net's 3D U-Net (2D for the plan's 2d configuration) as MONAI's DynUNet, configured
from ``plans.json``: kernel sizes and strides from the plan's topology, features
32 * 2**stage capped at ``max_features`` (nnU-Net: 320 in 3D, 512 in 2D; both settable for
tiny test models), instance norm, leaky ReLU, deep supervision on all but the two lowest
resolutions (nnU-Net ignores the lowest)."""

from __future__ import annotations

import torch.nn as nn

from medvol.errors import ConfigError
from medvol.networks import keyword_names, model_options, register
from medvol.plans import Plans


def features_per_stage(n_stages: int, base: int, cap: int) -> list[int]:
    return [min(cap, base * 2 ** i) for i in range(n_stages)]


@register("dynunet")
def build_dynunet(model_cfg, plans: Plans | None, in_channels: int, num_classes: int) -> nn.Module:
    from monai.networks.nets import DynUNet

    options = model_options(model_cfg, "dynunet", keyword_names(
        DynUNet, "spatial_dims", "in_channels", "out_channels", "kernel_size", "strides", "upsample_kernel_size",
        "filters", "norm_name", "act_name", "deep_supervision", "deep_supr_num"))
    if plans is None:
        raise ConfigError("model dynunet is configured from a plan: train it on a preprocessing cache")
    net = plans.topology
    kernels, strides = net["kernel_sizes"], net["strides"]
    n = len(strides)
    return DynUNet(
        spatial_dims=len(plans.patch_size), in_channels=in_channels, out_channels=num_classes,
        kernel_size=kernels, strides=strides, upsample_kernel_size=strides[1:],
        filters=features_per_stage(n, model_cfg.base_features, model_cfg.max_features),
        norm_name=("INSTANCE", {"affine": True}), act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        deep_supervision=model_cfg.deep_supervision, deep_supr_num=max(1, n - 2),
        res_block=bool(options.pop("res_block", False)), **options,
    )
