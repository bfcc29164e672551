"""nnU-Net v2's experiment planners as data: the default ``ExperimentPlanner`` (PlainConvUNet)
and the Residual Encoder presets ``nnUNetPlannerResEncM/L/XL`` (ResidualEncoderUNet, nnU-Net's
recommended default since v2.5; ``documentation/resenc_presets.md``).

They share every rule of :func:`medvol.preprocessing.planning.plan_configuration` and differ only
in these values:

- the VRAM reference (feature-map voxels a batch of 2 in 3d / 12 in 2d may hold at the
  preset's own GPU memory, scaled by ``--gpu-memory`` / that memory) and the memory target a
  plan gets when ``--gpu-memory`` is not given (8, 8, 24, 40 GB);
- the network whose feature-map sum is the VRAM proxy: 2 convs per stage in encoder and decoder
  (PlainConvUNet), or a stem, residual basic blocks (1, 3, 4, 6, 6, ...) per encoder stage and one
  conv per decoder stage (ResidualEncoderUNet);
- the 2d shrink test: the default planner shrinks the patch until a batch of 2 fits
  (``estimate / 12 * 2 > reference``), the ResEnc planner until the reference batch fits
  (``estimate > reference``; the same in 3d, where the reference batch is 2);
- the batch cap: one batch covers at most 5 % of the dataset's voxels (default), no cap (the
  presets' ``max_dataset_covered = 1``: at most all of it).
"""

from __future__ import annotations

from dataclasses import dataclass

from medvol.errors import ConfigError

RESENC_BLOCKS_ENCODER = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
RESENC_BLOCKS_DECODER = (1,) * 12


@dataclass(frozen=True)
class Planner:
    name: str  # medvol's name (--planner)
    nnunet_class: str  # nnU-Net's planner class (-pl)
    nnunet_plans_name: str  # the plans identifier nnU-Net writes (-p)
    architecture: str  # "PlainConvUNet" or "ResidualEncoderUNet"
    reference_val_3d: int  # feature-map voxels of the reference batch at reference_gb
    reference_val_2d: int
    reference_gb: float  # and the memory a plan targets by default
    blocks_encoder: tuple[int, ...]  # residual blocks (ResEnc) or convs (plain) per encoder stage
    blocks_decoder: tuple[int, ...]  # convs per decoder stage
    max_dataset_covered: float  # one batch covers at most this fraction of the dataset's voxels
    shrink_for_min_batch: bool  # 2d: shrink until a batch of 2 (not 12) fits the reference

    @property
    def residual(self) -> bool:
        return self.architecture == "ResidualEncoderUNet"

    def reference_val(self, dim: int) -> int:
        return self.reference_val_2d if dim == 2 else self.reference_val_3d


DEFAULT = Planner("default", "ExperimentPlanner", "nnUNetPlans", "PlainConvUNet", 560_000_000, 85_000_000, 8.0,
                  (2,) * 14, (2,) * 13, 0.05, True)


def _resenc(size: str, ref_3d: int, ref_2d: int, gb: float) -> Planner:
    return Planner(f"resenc-{size.lower()}", f"nnUNetPlannerResEnc{size}", f"nnUNetResEncUNet{size}Plans",
                   "ResidualEncoderUNet", ref_3d, ref_2d, gb, RESENC_BLOCKS_ENCODER, RESENC_BLOCKS_DECODER, 1.0, False)


PLANNERS: dict[str, Planner] = {p.name: p for p in (
    DEFAULT,
    _resenc("M", 680_000_000, 135_000_000, 8.0),
    _resenc("L", 2_100_000_000, 380_000_000, 24.0),
    _resenc("XL", 3_600_000_000, 560_000_000, 40.0),
)}


def planner_by_name(name: str, option: str = "--planner") -> Planner:
    """The planner called ``name``; an unknown name is one ConfigError listing the known ones."""
    if name not in PLANNERS:
        raise ConfigError(f"{option}: unknown planner {name!r}; known: {', '.join(PLANNERS)}")
    return PLANNERS[name]
