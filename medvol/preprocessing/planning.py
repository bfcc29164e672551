"""Experiment planning: target spacing, patch and batch size, U-Net topology (nnU-Net v2 rules).

nnU-Net plans in its own axis order: SimpleITK's (z, y, x), then transposed so the
coarsest axis comes first. Where the rules break ties by axis position (argmax of the
spacing, argsort when shrinking the patch) that order decides, so we plan in it too and
map every per-axis result back to medvol's (X, Y, Z) order. The result then equals
``nnUNetv2_plan_and_preprocess``'s 3d_fullres plan up to axis order.

``plans.json`` keeps the 3d_fullres plan at the top level and adds nnU-Net's ``2d``
configuration under ``"configurations": {"2d": {...}}``: slices across the coarsest axis
(nnU-Net's transposed axis 0, stored as ``slice_axis`` in X, Y, Z), in-plane target spacing =
the 3d spacing of the other two axes, patch/batch/topology by the same rules with nnU-Net's 2D
constants (reference 85e6 feature-map voxels for batch 12 at 8 GB, features capped at 512, an
initial 2048^2 patch). Per-axis values of the 2d block are in the order of the in-plane axes
in X, Y, Z (``in_plane_axes``). nnU-Net resamples its 2d data in-plane only; medvol's 2d
training reads the 3d_fullres cache (same in-plane grid; along the slice axis the 3d target
spacing instead of each case's own), so the block does not change what is cached.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from medvol import validation
from medvol.preprocessing.normalization import MASKABLE, scheme_for_channel
from medvol.preprocessing.planners import DEFAULT, Planner, planner_by_name
from medvol.resampling import ANISO_THRESHOLD, compute_new_shape

PLANS_VERSION = 1
# nnU-Net v2 ExperimentPlanner constants every planner shares; the reference values, memory
# target and batch cap of each planner are in medvol.preprocessing.planners.
REFERENCE_BS_3D = 2
BASE_FEATURES = 32
MAX_FEATURES_3D = 320
REFERENCE_BS_2D = 12
MAX_FEATURES_2D = 512
INITIAL_EDGE = {2: 2048, 3: 256}  # the initial patch has the voxels of an EDGE^dim cube
MIN_EDGE = 4  # smallest feature-map edge in the bottleneck
MIN_BATCH = 2
CONVS_PER_STAGE = 2


def fullres_target_spacing(spacings: ArrayLike, sizes: ArrayLike) -> np.ndarray:
    """Median spacing; the coarse axis takes its 10th percentile when both spacing and
    voxel count are anisotropic (never finer than the largest other spacing)."""
    all_spacings = np.atleast_2d(np.asarray(spacings, float))  # (cases, 3)
    target = np.percentile(all_spacings, 50, 0)
    target_size = np.percentile(np.atleast_2d(np.asarray(sizes, float)), 50, 0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacings = [target[i] for i in others]
    other_sizes = [target_size[i] for i in others]
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(other_spacings)
    aniso_voxels = target_size[worst] * ANISO_THRESHOLD < min(other_sizes)
    if aniso_spacing and aniso_voxels:
        coarse = np.percentile(all_spacings[:, worst], 10)
        if coarse < max(other_spacings):
            coarse = max(max(other_spacings), coarse) + 1e-5
        target[worst] = coarse
    return target


def pool_and_conv_props(spacing, patch_size, min_edge: int = MIN_EDGE, max_numpool: int = 999999):
    """Topology rule: pool an axis while its spacing is within 2x of the finest poolable
    one and its size stays >= 2*min_edge; kernel 3 once an axis is within 2x of the
    finest spacing, else 1. Returns (pools per axis, strides, kernels, padded patch, divisor)."""
    dim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(s) for s in patch_size]
    strides = [[1] * dim]
    kernels = []
    num_pool = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if cur_size[i] >= 2 * min_edge]
        if not valid:
            break
        min_sp = min(cur_spacing[i] for i in valid)
        valid = [i for i in valid if cur_spacing[i] / min_sp < 2 and num_pool[i] < max_numpool]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        for d in range(dim):
            if kernel[d] != 3 and cur_spacing[d] / min(cur_spacing) < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            num_pool[v] += 1
            cur_spacing[v] *= 2
            cur_size[v] = np.ceil(cur_size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    divisor = [2 ** n for n in num_pool]
    padded = []
    for s, d in zip(patch_size, divisor):  # sizes may be fractional medians: pad as floats
        padded.append(int(s if s % d == 0 else s + d - s % d))
    kernels.append([3] * dim)
    return num_pool, strides, kernels, padded, divisor


def unet_feature_map_size(patch_size, strides, features, num_classes: int, deep_supervision: bool = True) -> int:
    """Sum of feature-map voxels of nnU-Net's PlainConvUNet (its VRAM proxy)."""
    total = 0
    size = list(patch_size)
    skips = []
    for s, (stride, f) in enumerate(zip(strides, features)):
        size = [a // b for a, b in zip(size, stride)]
        total += CONVS_PER_STAGE * f * int(np.prod(size, dtype=np.int64))
        if s < len(strides) - 1:
            skips.append(list(size))
    decoder_convs = [CONVS_PER_STAGE] * (len(strides) - 1)
    return total + _decoder_feature_map_size(skips, features, num_classes, decoder_convs, deep_supervision)


def resenc_unet_feature_map_size(patch_size, strides, features, num_classes: int, blocks_encoder,
                                 blocks_decoder, deep_supervision: bool = True) -> int:
    """Sum of feature-map voxels of nnU-Net's ResidualEncoderUNet (its VRAM proxy for the ResEnc
    planners): the stem conv (features[0], full size); per encoder stage s with n basic blocks,
    2 convs per block at the strided size, plus the first block's 1x1 projection when the
    stage changes the features or the size; the decoder as PlainConvUNet's with
    ``blocks_decoder[s]`` convs per stage (s = 0 the lowest resolution)."""
    size = list(patch_size)
    prev = features[0]
    total = prev * int(np.prod(size, dtype=np.int64))  # stem
    skips = []
    for s, (stride, f) in enumerate(zip(strides, features)):
        new = [a // b for a, b in zip(size, stride)]
        projection = f != prev or new != size
        total += (2 * blocks_encoder[s] + int(projection)) * f * int(np.prod(new, dtype=np.int64))
        size, prev = new, f
        if s < len(strides) - 1:
            skips.append(list(size))
    return total + _decoder_feature_map_size(skips, features, num_classes, blocks_decoder, deep_supervision)


def _decoder_feature_map_size(skips, features, num_classes: int, convs, deep_supervision: bool) -> int:
    """Decoder stage s (0 = lowest resolution) on the skip of v voxels and f features: its
    convs (convs[s] * f * v), the transposed conv (f * v) and the segmentation head
    (classes * v; only the last stage's without deep supervision)."""
    total = 0
    for s in range(len(skips)):
        skip = skips[-(s + 1)]
        f = features[-(s + 2)]
        vox = int(np.prod(skip, dtype=np.int64))
        total += convs[s] * f * vox + f * vox  # conv block + transposed conv
        if deep_supervision or s == len(skips) - 1:
            total += num_classes * vox
    return total


def feature_map_size(planner: Planner, patch_size, strides, features, num_classes: int) -> int:
    """The VRAM proxy of the network ``planner`` plans for. nnU-Net's planners (2.8.1) build that
    network without deep supervision (one segmentation head) and so do both estimates here
    (medvol's default planner counted every head until 2026-12-07, one lower 2d batch than
    nnU-Net's on some fingerprints: benchmarks/resenc_plans.py)."""
    if planner.residual:
        return resenc_unet_feature_map_size(patch_size, strides, features, num_classes,
                                            planner.blocks_encoder, planner.blocks_decoder, deep_supervision=False)
    return unet_feature_map_size(patch_size, strides, features, num_classes, deep_supervision=False)


def _features(n_stages: int, max_features: int = MAX_FEATURES_3D) -> list[int]:
    return [min(max_features, BASE_FEATURES * 2 ** i) for i in range(n_stages)]


def plan_configuration(spacing, median_shape, num_classes: int, n_voxels_dataset: float,
                       gpu_memory_gb: float | None = None, planner: Planner = DEFAULT) -> dict:
    """Patch size, batch size and topology for one 3d or 2d configuration (in nnU-Net's axis
    order); the dimension is ``len(spacing)`` and picks nnU-Net's 3d or 2d constants, ``planner``
    the reference values, VRAM proxy and batch cap (:mod:`medvol.preprocessing.planners`);
    ``gpu_memory_gb`` None: the planner's own memory target."""
    dim = len(spacing)
    tmp = 1 / np.array(spacing, float)
    budget = [round(i) for i in tmp * (INITIAL_EDGE[dim] ** dim / np.prod(tmp)) ** (1 / dim)]
    initial = np.array([min(i, j) for i, j in zip(budget, median_shape)])
    num_pool, strides, kernels, patch, divisor = pool_and_conv_props(spacing, initial)
    ref_bs, max_features = (REFERENCE_BS_2D, MAX_FEATURES_2D) if dim == 2 else (REFERENCE_BS_3D, MAX_FEATURES_3D)
    gb = planner.reference_gb if gpu_memory_gb is None else gpu_memory_gb
    reference = planner.reference_val(dim) * (gb / planner.reference_gb)
    cache: dict = {}

    def estimate(patch, strides):
        key = (tuple(patch), str(strides))
        if key not in cache:
            cache[key] = feature_map_size(planner, patch, strides, _features(len(strides), max_features), num_classes)
        return cache[key]

    def too_large(est):
        return est / ref_bs * MIN_BATCH > reference if planner.shrink_for_min_batch else est > reference

    est = estimate(patch, strides)
    while too_large(est):
        axis = int(np.argsort([i / j for i, j in zip(patch, median_shape)])[-1])
        trial = list(patch)
        trial[axis] -= divisor[axis]
        *_, divisor = pool_and_conv_props(spacing, trial)
        patch = list(patch)
        patch[axis] -= divisor[axis]
        num_pool, strides, kernels, patch, divisor = pool_and_conv_props(spacing, patch)
        est = estimate(patch, strides)
    batch = round(reference / est * ref_bs)
    bs_cap = round(n_voxels_dataset * planner.max_dataset_covered / np.prod(patch, dtype=np.float64))
    batch = max(min(batch, bs_cap), MIN_BATCH)
    return {"patch_size": [int(p) for p in patch], "batch_size": int(batch), "strides": strides,
            "kernel_sizes": kernels, "num_pool_per_axis": num_pool,
            "features_per_stage": _features(len(strides), max_features),
            "vram_estimate": int(est)}


def plan_experiment(fingerprint: dict, dataset_json: dict, gpu_memory_gb: float | None = None,
                    image_interpolation: str = "cubic", cache_dtype: str = "float32",
                    target_spacing=None, ct_window=None, planner: str = "default") -> dict:
    """Build ``plans.json`` content from a merged fingerprint (all per-axis values in X, Y, Z).

    ``target_spacing`` (mm, X Y Z) replaces nnU-Net's rule (e.g. DoDNet's 0.8 x 0.8 x 1.5);
    ``ct_window`` (lo, hi) replaces CT channels' dataset statistics with a fixed window;
    ``planner`` names nnU-Net's planner (:data:`medvol.preprocessing.planners.PLANNERS`), whose
    own memory target (8, 24 or 40 GB) ``gpu_memory_gb`` replaces when given. The default
    planner's plans carry no ``planner`` entry (they are what medvol always wrote)."""
    plan = planner_by_name(planner)
    gpu_memory_gb = validation.positive(plan.reference_gb if gpu_memory_gb is None else gpu_memory_gb,
                                        "--gpu-memory")
    if ct_window is not None:
        ct_window = validation.ct_window(ct_window)
    spacings = np.asarray(fingerprint["spacings"], float)
    sizes = np.asarray(fingerprint["shapes_after_crop"], float)
    rev = [2, 1, 0]  # medvol (X,Y,Z) -> SimpleITK (z,y,x)
    if target_spacing is not None:
        target_spacing = validation.target_spacing(target_spacing)
        target_nn = np.asarray(target_spacing, float)[rev]
    else:
        target_nn = fullres_target_spacing(spacings[:, rev], sizes[:, rev])
    target = target_nn[np.argsort(rev)]  # back to X,Y,Z (rev is its own inverse)
    max_axis_nn = int(np.argmax(target_nn))
    transpose_nn = [max_axis_nn] + [i for i in range(3) if i != max_axis_nn]
    work_axes = [rev[i] for i in transpose_nn]  # planning axis k is medvol axis work_axes[k]

    new_shapes = np.array([compute_new_shape(sh, sp, target) for sp, sh in zip(spacings, sizes.astype(int))])
    median_shape = np.median(new_shapes, 0)
    n_vox = float(np.prod(median_shape, dtype=np.float64) * len(spacings))
    num_classes = len(dataset_json["labels"])
    cfg = plan_configuration(target[work_axes], median_shape[work_axes], num_classes, n_vox, gpu_memory_gb, plan)
    back = np.argsort(work_axes)  # planning order -> X,Y,Z

    def to_xyz(v):
        return [v[i] for i in back]

    channel_names = {int(k): v for k, v in dataset_json["channel_names"].items()}
    schemes = [scheme_for_channel(channel_names[c]) for c in sorted(channel_names)]
    use_mask = [s in MASKABLE and fingerprint["median_relative_size_after_cropping"] < 0.75 for s in schemes]
    stats = dict(fingerprint["foreground_intensity_properties_per_channel"])
    if ct_window is not None:
        for c, s in enumerate(schemes):
            if s == "CTNormalization":
                schemes[c] = "CTWindowNormalization"
                stats[str(c)] = {"lower": float(ct_window[0]), "upper": float(ct_window[1])}
    plans = {
        "plans_version": PLANS_VERSION,
        "axis_order": "XYZ",
        "target_spacing": [float(s) for s in target],
        "median_shape_after_resampling": [float(s) for s in median_shape],
        "patch_size": to_xyz(cfg["patch_size"]),
        "batch_size": cfg["batch_size"],
        "network": _network_block(cfg, to_xyz, gpu_memory_gb, plan),
        "normalization": [
            {"channel": c, "name": channel_names[c], "scheme": schemes[c], "use_mask_for_norm": bool(use_mask[c]),
             "statistics": stats[str(c)]} for c in range(len(schemes))
        ],
        "resampling": {"image": image_interpolation, "label": "onehot_linear_argmax",
                       "separate_z_anisotropy_threshold": ANISO_THRESHOLD},
        "labels": dict(dataset_json["labels"]),
        "channel_names": {str(k): v for k, v in channel_names.items()},
        "cache_dtype": cache_dtype,
        "nnunet_transpose_forward": transpose_nn,
        "configurations": {"2d": plan_2d(target, median_shape, work_axes, num_classes, n_vox, gpu_memory_gb, plan)},
    }
    if dataset_json.get("regions_class_order"):  # region-based training (medvol.labels)
        plans["regions_class_order"] = list(dataset_json["regions_class_order"])
    plans["configurations"].update(plan_cascade(target, median_shape, work_axes, cfg, num_classes, len(spacings),
                                                gpu_memory_gb, plan))
    if plan is not DEFAULT:
        plans["planner"] = {"name": plan.name, "nnunet_planner": plan.nnunet_class,
                            "nnunet_plans_name": plan.nnunet_plans_name}
    return plans


def plan_2d(target, median_shape, work_axes, num_classes: int, n_vox: float, gpu_memory_gb: float,
            planner: Planner = DEFAULT) -> dict:
    """nnU-Net's ``2d`` configuration: slices across ``work_axes[0]`` (the coarsest axis),
    planned on the other two axes' 3d target spacing and median resampled shape; the 5 % batch
    cap uses the 3d dataset's voxels, as nnU-Net does. Per-axis values in X, Y, Z order."""
    in_plane_nn = list(work_axes[1:])
    cfg = plan_configuration(target[in_plane_nn], median_shape[in_plane_nn], num_classes, n_vox, gpu_memory_gb,
                             planner)
    back = np.argsort(in_plane_nn)  # planning order -> ascending X, Y, Z

    def to_xy(v):
        return [v[i] for i in back]

    return {
        "slice_axis": int(work_axes[0]),
        "in_plane_axes": sorted(int(a) for a in in_plane_nn),
        "spacing": to_xy([float(s) for s in target[in_plane_nn]]),
        "median_shape": to_xy([float(s) for s in median_shape[in_plane_nn]]),
        "patch_size": to_xy(cfg["patch_size"]),
        "batch_size": cfg["batch_size"],
        "batch_dice": True,
        "network": _network_block(cfg, to_xy, gpu_memory_gb, planner),
        "data": "3d_fullres cache, sliced along slice_axis",
    }


def _network_block(cfg: dict, to_axes, gpu_memory_gb: float, planner: Planner = DEFAULT) -> dict:
    """The plan's U-Net: topology in the plan's axis order; a residual-encoder planner's block
    also names the architecture and its blocks per encoder stage / convs per decoder stage."""
    n = len(cfg["strides"])
    block = {
        "n_stages": n,
        "features_per_stage": cfg["features_per_stage"],
        "kernel_sizes": [to_axes(k) for k in cfg["kernel_sizes"]],
        "strides": [to_axes(s) for s in cfg["strides"]],
        "num_pool_per_axis": to_axes(cfg["num_pool_per_axis"]),
        "n_conv_per_stage": CONVS_PER_STAGE,
        "vram_estimate": cfg["vram_estimate"],
        "gpu_memory_gb": gpu_memory_gb,
    }
    if planner.residual:
        del block["n_conv_per_stage"]
        block.update(architecture=planner.architecture, n_blocks_per_stage=list(planner.blocks_encoder[:n]),
                     n_conv_per_stage_decoder=list(planner.blocks_decoder[:n - 1]))
    return block


def topology_for_patch(spacing, patch_size) -> dict:
    """The U-Net topology nnU-Net's rule gives a patch of another size than the plan's
    (``patch_size`` and ``spacing`` in X, Y, Z): kernel sizes and strides per stage, pools per
    axis. A patch the rule cannot serve (an axis not divisible by its pooling factor) is a
    ConfigError naming the nearest sizes that it can serve."""
    from medvol.errors import ConfigError

    num_pool, strides, kernels, padded, divisor = pool_and_conv_props(spacing, patch_size)
    patch = [int(p) for p in patch_size]
    if padded != patch:
        below = [max(d, p - p % d) for p, d in zip(patch, divisor)]
        raise ConfigError(f"data.patch_size {patch}: the U-Net this spacing gives pools {num_pool} times per axis, "
                          f"so each axis must be a multiple of {divisor}; nearest valid sizes: {below} or {padded}")
    return {"kernel_sizes": kernels, "strides": strides, "num_pool_per_axis": num_pool, "n_stages": len(strides)}


# nnU-Net's 3d_lowres rule (ExperimentPlanner.plan_experiment): a lowres configuration when the
# fullres patch holds less than this share of the median resampled shape's voxels ...
LOWRES_CREATION_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03  # ... found by growing the spacing by this factor per iteration
LOWRES_MIN_VOXEL_RATIO = 2.0  # kept only when the fullres median has at least 2x its voxels


def lowres_spacings(spacing, median_shape, fullres_patch, plan_at) -> tuple[np.ndarray, dict | None, float]:
    """nnU-Net's search for the 3d_lowres spacing (planning order). While the last patch holds
    less than 25 % of the median shape's voxels at the current spacing: grow the spacing by
    1.03 (only the axes more than 2x finer than the coarsest while there are such, else all),
    shrink the median shape by fullres / lowres spacing and plan again (``plan_at(spacing,
    rounded median shape, unrounded median voxels)``). Returns the last spacing, its plan (None
    when the fullres patch was large enough) and its median voxel count."""
    fullres = np.asarray(spacing, float)
    median = np.asarray(median_shape, float)
    lowres = fullres.copy()
    median_voxels = float(np.prod(median, dtype=np.float64))
    patch_voxels = float(np.prod(fullres_patch, dtype=np.float64))
    cfg = None
    while patch_voxels / median_voxels < LOWRES_CREATION_THRESHOLD:
        finer = lowres.max() / lowres > 2
        if finer.any():
            lowres[finer] *= LOWRES_SPACING_STEP
        else:
            lowres *= LOWRES_SPACING_STEP
        shape = fullres / lowres * median
        median_voxels = float(np.prod(shape, dtype=np.float64))
        cfg = plan_at(lowres.copy(), [round(float(s)) for s in shape], median_voxels)
        patch_voxels = float(np.prod(cfg["patch_size"], dtype=np.float64))
    return lowres, cfg, median_voxels


def plan_cascade(target, median_shape, work_axes, fullres_cfg: dict, num_classes: int, n_cases: int,
                 gpu_memory_gb: float, planner: Planner = DEFAULT) -> dict:
    """nnU-Net's cascade configurations beside the 3d_fullres plan (``fullres_cfg``, planning
    order): ``3d_lowres`` (:func:`lowres_spacings`; dropped when the fullres median shape has
    fewer than 2x its voxels) and ``3d_cascade_fullres`` (the fullres plan with the lowres
    prediction as extra input), and the ``batch_dice`` rule: on for 3d_fullres only when a
    3d_lowres exists, off for 3d_lowres. Per-axis values in X, Y, Z order; the lowres cases are
    cached in ``3d_lowres/`` inside the cache (:func:`medvol.plans.lowres_plans`)."""
    axes = list(work_axes)
    back = np.argsort(axes)

    def to_xyz(v):
        return [v[i] for i in back]

    def plan_at(spacing, shape, median_voxels):
        return plan_configuration(spacing, shape, num_classes, median_voxels * n_cases, gpu_memory_gb, planner)

    spacing, cfg, median_voxels = lowres_spacings(target[axes], median_shape[axes], fullres_cfg["patch_size"],
                                                  plan_at)
    if cfg is not None and float(np.prod(median_shape, dtype=np.float64)) / median_voxels < LOWRES_MIN_VOXEL_RATIO:
        cfg = None
    if cfg is None:
        return {"3d_fullres": {"batch_dice": False}}
    shape = np.asarray(target[axes], float) / spacing * np.asarray(median_shape[axes], float)
    lowres = {
        "spacing": to_xyz([float(s) for s in spacing]),
        "median_shape": to_xyz([float(s) for s in shape]),
        "patch_size": to_xyz(cfg["patch_size"]),
        "batch_size": cfg["batch_size"],
        "batch_dice": False,
        "network": _network_block(cfg, to_xyz, gpu_memory_gb, planner),
        "next_stage": "3d_cascade_fullres",
        "data": "3d_lowres/ (a cache of its own inside this one)",
    }
    return {"3d_fullres": {"batch_dice": True}, "3d_lowres": lowres,
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}

# What ``plan --from-plans`` takes from the other dataset's plans.json (nnU-Net's
# move_plans_between_datasets moves everything but the dataset's name and image reader, CT
# clip values, mean and std included) and what stays this dataset's own.
OWN_KEYS = ("plans_version", "axis_order", "labels", "channel_names", "median_shape_after_resampling")


def transfer_plans(source: dict, fingerprint: dict, dataset_json: dict, source_path: str = "",
                   own_intensities: bool = False) -> dict:
    """Another dataset's plans (``source``: target spacing, patch and batch size, network
    topology and planner, normalisation schemes with their intensity statistics, resampling,
    every configuration) for this dataset (``fingerprint``, ``dataset_json``), as nnU-Net's
    ``nnUNetv2_move_plans_between_datasets``: only the labels, channel names and median
    resampled shape (at the transferred spacing) are this dataset's. ``own_intensities``:
    this dataset's foreground intensity statistics instead of the source's (nnU-Net transfers
    them: a network pretrained there sees the same intensities here). The plans record what
    came from where under ``transferred_from``; a channel count that differs is a ConfigError
    (the normalisation and the network's input are per channel)."""
    from copy import deepcopy

    from medvol.errors import ConfigError

    channels = {int(k): v for k, v in dataset_json["channel_names"].items()}
    if len(source.get("normalization", [])) != len(channels):
        raise ConfigError(f"--from-plans {source_path}: planned for {len(source.get('normalization', []))} image "
                          f"channel(s), this dataset has {len(channels)}: the normalisation and the network's "
                          "input are per channel, so these plans do not transfer")
    plans = deepcopy(source)
    own = plan_experiment(fingerprint, dataset_json)
    target = [float(s) for s in source["target_spacing"]]
    shapes = [compute_new_shape(sh, sp, target) for sp, sh in
              zip(np.asarray(fingerprint["spacings"], float), np.asarray(fingerprint["shapes_after_crop"], int))]
    median = [float(s) for s in np.median(np.array(shapes), 0)]
    plans.update({k: own[k] for k in OWN_KEYS}, median_shape_after_resampling=median)
    for cfg in (plans.get("configurations") or {}).values():
        if "in_plane_axes" in cfg and "median_shape" in cfg:
            cfg["median_shape"] = [median[a] for a in cfg["in_plane_axes"]]
    for c, norm in enumerate(plans["normalization"]):
        norm["name"] = channels[c]
        if own_intensities:
            norm["statistics"] = own["normalization"][c]["statistics"]
    plans["transferred_from"] = _transfer_record(source, own, source_path, own_intensities)
    return plans


def _transfer_record(source: dict, own: dict, source_path: str, own_intensities: bool) -> dict:
    """What came from the source plans, what is this dataset's, and where the two datasets
    differ in what was not transferred (their labels: the segmentation head of a network
    trained there does not fit here when the class count differs)."""
    notes = []
    if source.get("labels") != own["labels"]:
        notes.append(f"labels differ ({len(source.get('labels', {}))} classes there, {len(own['labels'])} here: "
                     f"{own['labels']}); init_from a checkpoint trained there loads all but the segmentation head")
    if source.get("channel_names") != own["channel_names"]:
        notes.append(f"channel names differ ({source.get('channel_names')} there, {own['channel_names']} here); "
                     "the source's normalisation schemes are kept")
    own_keys = [*OWN_KEYS, *(["normalization.statistics"] if own_intensities else [])]
    mine = (*OWN_KEYS, "orientation", "transferred_from")  # the cache's voxel order is set by plan_dataset
    return {"plans": source_path, "from_source": sorted(k for k in source if k not in mine),
            "from_this_dataset": own_keys, "notes": notes}
