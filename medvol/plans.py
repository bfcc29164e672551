"""The plan of a dataset (``plans.json``) as a typed object.

``plans.json`` stays the on-disk contract written by :mod:`medvol.preprocessing.planning`
(preprocessing reads its normalisation and resampling entries itself); everything after
preprocessing reads what it needs through :class:`Plans` instead of counting dict entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Plans:
    num_channels: int  # image channels (one normalisation scheme each)
    label_names: dict[int, str]  # label value -> name, background (0) included
    patch_size: list[int]  # (X, Y, Z) voxels
    batch_size: int = 2
    target_spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # mm, (X, Y, Z)
    topology: dict = field(default_factory=dict)  # the U-Net's kernel_sizes and strides per stage, ...
    raw: dict = field(default_factory=dict, repr=False)  # plans.json as written

    @property
    def num_classes(self) -> int:
        """Output classes, background included (labels are 0..K-1)."""
        return len(self.label_names)

    @property
    def class_names(self) -> dict[int, str]:
        """Foreground label value -> name."""
        return {v: n for v, n in self.label_names.items() if v != 0}

    @classmethod
    def from_dict(cls, plans: dict) -> Plans:
        return cls(num_channels=len(plans["normalization"]),
                   label_names={int(v): str(k) for k, v in plans["labels"].items()},
                   patch_size=[int(s) for s in plans["patch_size"]], batch_size=int(plans["batch_size"]),
                   target_spacing=[float(s) for s in plans["target_spacing"]],
                   topology=dict(plans.get("network", {})), raw=plans)
