"""The plan of a dataset (``plans.json``) as a typed object.

``plans.json`` stays the on-disk contract written by :mod:`medvol.preprocessing.planning`
(preprocessing reads its normalisation and resampling entries itself); everything after
preprocessing reads what it needs through :class:`Plans` instead of counting dict entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from medvol.labels import LabelScheme


@dataclass(frozen=True)
class Plans:
    num_channels: int  # image channels (one normalisation scheme each)
    label_names: dict[int, str]  # label-map value -> name, background (0) included, ignore label not
    patch_size: list[int]  # (X, Y, Z) voxels
    batch_size: int = 2
    target_spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # mm, (X, Y, Z)
    topology: dict = field(default_factory=dict)  # the U-Net's kernel_sizes and strides per stage, ...
    raw: dict = field(default_factory=dict, repr=False)  # plans.json as written
    slice_axis: int | None = None  # the 2d configuration: the axis (0-2 of X, Y, Z) slices are cut across

    @property
    def configuration(self) -> str:
        return "3d_fullres" if self.slice_axis is None else "2d"

    @property
    def in_plane_axes(self) -> list[int]:
        """The axes of X, Y, Z a 2D patch spans (all three for 3d_fullres)."""
        return [a for a in range(3) if a != self.slice_axis]

    @property
    def labels(self) -> LabelScheme:
        """What the labels mean (classes, regions, ignore label): :mod:`medvol.labels`."""
        if "labels" in self.raw:
            return LabelScheme.from_plans(self.raw)
        return LabelScheme({n: v for v, n in self.label_names.items()})

    @property
    def num_classes(self) -> int:
        """Network outputs: classes with background (labels 0..K-1), or one per region."""
        return self.labels.num_outputs

    @property
    def class_names(self) -> dict[int, str]:
        """Foreground label value -> name."""
        return {v: n for v, n in self.label_names.items() if v != 0}

    @classmethod
    def from_dict(cls, plans: dict) -> Plans:
        return cls(num_channels=len(plans["normalization"]),
                   label_names=_label_names(LabelScheme.from_plans(plans)),
                   patch_size=[int(s) for s in plans["patch_size"]], batch_size=int(plans["batch_size"]),
                   target_spacing=[float(s) for s in plans["target_spacing"]],
                   topology=dict(plans.get("network", {})), raw=plans)

    def for_configuration(self, name: str) -> Plans:
        """These plans for ``3d_fullres`` and ``3d_cascade_fullres`` (themselves: the cascade's
        second stage is the fullres plan with extra input channels), ``3d_lowres``
        (:func:`lowres_plans`) or ``2d`` (:meth:`for_2d`)."""
        if name == "3d_lowres":
            return Plans.from_dict(lowres_plans(self.raw))
        return self if name in ("3d_fullres", "3d_cascade_fullres") else self.for_2d()

    def for_2d(self) -> Plans:
        """nnU-Net's 2d configuration of the same plan: 2-D ``patch_size`` (in X, Y, Z order of
        the in-plane axes), its batch size, in-plane spacing and U-Net topology, and the
        ``slice_axis``. ``raw`` stays the whole plans.json (preprocessing needs all of it)."""
        from medvol.errors import CacheError

        cfg = (self.raw.get("configurations") or {}).get("2d")
        if cfg is None:
            raise CacheError("plans.json: no 2d configuration (planned by an older medvol); rerun `medvol plan` "
                             "(the cached cases stay valid)")
        return replace(self, patch_size=[int(s) for s in cfg["patch_size"]], batch_size=int(cfg["batch_size"]),
                       target_spacing=[float(s) for s in cfg["spacing"]], topology=dict(cfg.get("network", {})),
                       slice_axis=int(cfg["slice_axis"]))


def _label_names(scheme: LabelScheme) -> dict[int, str]:
    """Label-map value -> name: the classes, or for regions the value each region places
    (``regions_class_order``) named after that region."""
    if scheme.regions_class_order is None:
        return dict(scheme.outputs)
    return {0: "background", **{v: n for v, n in zip(scheme.regions_class_order, scheme.scored())}}


def batch_dice(plans: dict, configuration: str) -> bool:
    """nnU-Net's ``batch_dice`` of a configuration in ``plans.json`` (following
    ``inherits_from``): the Dice pooled over the batch (True) or per sample (False). nnU-Net's
    planner sets it on for 2d, off for 3d_lowres, and on for 3d_fullres only when a 3d_lowres
    exists; plans without the key (older medvol) keep the batch Dice."""
    cfgs = plans.get("configurations") or {}
    cfg = dict(cfgs.get(configuration) or {})
    if "inherits_from" in cfg:
        cfg = {**(cfgs.get(cfg["inherits_from"]) or {}), **cfg}
    return bool(cfg.get("batch_dice", True))


LOWRES = "3d_lowres"


def lowres_plans(plans: dict) -> dict:
    """``plans.json`` of the 3d_lowres cache (the folder ``3d_lowres/`` inside the fullres
    cache): the fullres plan with the ``configurations.3d_lowres`` block's spacing, median shape,
    patch, batch and network at the top level, marked ``"configuration": "3d_lowres"``. A plan
    already so marked is returned as it is. A plan without that block (nnU-Net's rule made none:
    the fullres patch already covers a quarter of the median shape) is a ConfigError."""
    from medvol.errors import ConfigError

    if plans.get("configuration") == LOWRES:
        return plans
    cfg = (plans.get("configurations") or {}).get(LOWRES)
    if cfg is None:
        raise ConfigError("data.configuration 3d_lowres: this plan has no 3d_lowres configuration (nnU-Net makes one "
                          "only when the 3d_fullres patch holds less than 25 % of the median image's voxels); "
                          "train 3d_fullres")
    return {**plans, "configuration": LOWRES, "target_spacing": list(cfg["spacing"]),
            "median_shape_after_resampling": list(cfg["median_shape"]), "patch_size": list(cfg["patch_size"]),
            "batch_size": cfg["batch_size"], "network": dict(cfg["network"])}
