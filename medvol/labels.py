"""What a dataset's labels mean to training and prediction: classes, regions, an ignore label.

nnU-Net v2's ``dataset.json`` ``labels`` (name -> value) declares one of:

- classes: one integer each, consecutive from 0 (background); the network has one softmax
  output per class and a label map is their argmax;
- regions (``documentation/region_based_training.md``): a value may be a list of label values,
  a region made of several labels (BraTS: ``whole_tumor: [1, 2, 3]``); the network has one
  sigmoid output per foreground region, trained with soft Dice + BCE on each, and a label map
  is made by placing ``regions_class_order[i]`` wherever region ``i``'s probability is above
  0.5, in order, later regions overwriting earlier ones;
- an ignore label (``documentation/ignore_label.md``): ``"ignore": N`` with N one above the
  highest other label; voxels of value N are left out of the loss and of the metrics, and the
  network has no output for it.

:class:`LabelScheme` is the one place that reads these rules; the label files themselves stay
integer maps (:func:`medvol.inference.postprocess.to_labels` turns outputs back into them).
Arrays are channel-first ``(C, X, Y, Z)`` (batches ``(B, C, X, Y, Z)``); torch is imported
only by the methods that take tensors (preprocessing never imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvol.errors import InputError

IGNORE = "ignore"
REGIONS_CLASS_ORDER = "regions_class_order"

Region = tuple[int, ...]


@dataclass(frozen=True)
class LabelScheme:
    """The parsed ``labels`` (name -> value or region, ``ignore`` left out), the
    ``regions_class_order`` (regions only) and the ignore label (or None)."""

    declared: dict[str, int | Region]
    regions_class_order: tuple[int, ...] | None = None
    ignore_label: int | None = None

    @classmethod
    def parse(cls, where: str | Path, labels: dict, regions_class_order: Any = None) -> LabelScheme:
        """Checked as nnU-Net's LabelManager checks it; every problem is one InputError naming
        ``where`` (the dataset.json or plans.json)."""
        if not isinstance(labels, dict) or not labels:
            raise InputError(where, "'labels' must be a non-empty mapping")
        declared: dict[str, int | Region] = {}
        for name, value in labels.items():
            if name != IGNORE:
                declared[str(name)] = _value(where, name, value)
        ignore = _ignore(where, labels)
        scheme = cls(declared, None, ignore)
        _check_values(where, scheme)
        if scheme.has_regions:
            return cls(declared, _class_order(where, regions_class_order, scheme), ignore)
        return scheme

    @classmethod
    def from_plans(cls, plans: dict) -> LabelScheme:
        """The scheme of a ``plans.json`` dict (its ``labels`` and ``regions_class_order``)."""
        return cls.parse("plans.json", plans["labels"], plans.get(REGIONS_CLASS_ORDER))

    @property
    def has_regions(self) -> bool:
        """nnU-Net's rule: regions when some value lists more than one label."""
        return any(isinstance(v, tuple) and len(v) > 1 for v in self.declared.values())

    @property
    def label_values(self) -> list[int]:
        """The integer values of the label maps (background included, the ignore label not)."""
        vals = {x for v in self.declared.values() for x in (v if isinstance(v, tuple) else (v,))}
        return sorted(vals)

    @property
    def file_values(self) -> list[int]:
        """The values a label file may hold: :attr:`label_values` and the ignore label."""
        return self.label_values + ([self.ignore_label] if self.ignore_label is not None else [])

    @property
    def regions(self) -> list[Region]:
        """The foreground regions in declared order (regions only; an all-0 one is background)."""
        return [_as_region(v) for v in self.declared.values() if set(_as_region(v)) != {0}]

    @property
    def outputs(self) -> dict[int, str]:
        """Network output channel -> name: one per class (background 0 included), or one per
        foreground region."""
        if self.has_regions:
            return {i: n for i, n in enumerate(n for n, v in self.declared.items() if set(_as_region(v)) != {0})}
        return {_as_region(v)[0]: n for n, v in self.declared.items()}

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def scored(self) -> dict[str, Region]:
        """What validation and evaluation score, name -> the label values it covers: each
        foreground class, or each region."""
        if self.has_regions:
            return {n: _as_region(v) for n, v in self.declared.items() if set(_as_region(v)) != {0}}
        return {n: (c,) for c, n in self.outputs.items() if c != 0}

    def annotated(self, label):
        """Boolean mask of the voxels that count (not the ignore label), or None when every
        voxel counts. ``label``: numpy array or torch tensor."""
        return None if self.ignore_label is None else label != self.ignore_label

    def region_targets(self, label):
        """Float ``(B, R, ...)`` targets of the regions from an integer label map ``(B, 1, ...)``
        (torch): channel i is 1 where the label is one of region i's values."""
        import torch

        return torch.cat([_isin(label, r) for r in self.regions], 1).float()

    def as_json(self) -> dict[str, int | list[int]]:
        """``labels`` as dataset.json and plans.json hold it (regions as lists, ignore last)."""
        out: dict[str, int | list[int]] = {n: list(v) if isinstance(v, tuple) else v for n, v in self.declared.items()}
        if self.ignore_label is not None:
            out[IGNORE] = self.ignore_label
        return out


def _as_region(v: int | Region) -> Region:
    return v if isinstance(v, tuple) else (v,)


def _isin(label, region: Region):
    out = label == region[0]
    for v in region[1:]:
        out = out | (label == v)
    return out


def _int(where, name, value) -> int:
    """An integer, or a string of one (Decathlon keys); 1.5, true or "one" are refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise InputError(where, f"label '{name}': value {value!r} is not an integer")


def _value(where, name, value) -> int | Region:
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError(where, f"label '{name}': an empty region []")
        return tuple(sorted({_int(where, name, v) for v in value}))
    return _int(where, name, value)


def _ignore(where, labels: dict) -> int | None:
    if IGNORE not in labels:
        return None
    value = labels[IGNORE]
    if isinstance(value, (list, tuple)):
        raise InputError(where, f"label 'ignore' must be one integer, not a region {value}")
    return _int(where, IGNORE, value)


def _check_values(where, scheme: LabelScheme) -> None:
    bg = scheme.declared.get("background", 0)  # Decathlon files may name it otherwise ("bg")
    values = scheme.label_values
    if bg not in (0, (0,)) or 0 not in values:
        raise InputError(where, "labels must declare background as 0")
    if values != list(range(len(values))):
        raise InputError(where, f"label values must be consecutive from 0 (0, 1, 2, ...) as nnU-Net requires, "
                                f"got {values}")
    if not scheme.has_regions and len(scheme.declared) != len(values):
        raise InputError(where, f"two labels share a value ({dict(scheme.declared)}): each class needs its own")
    if scheme.ignore_label is not None and scheme.ignore_label != values[-1] + 1:
        raise InputError(where, f"label 'ignore' is {scheme.ignore_label}, but the ignore label must be the highest "
                                f"label value, one above the others: {values[-1] + 1}")


def _class_order(where, order: Any, scheme: LabelScheme) -> tuple[int, ...]:
    regions = scheme.regions
    if order is None:
        raise InputError(where, f"labels declare regions ({', '.join(map(str, regions))}): "
                                "'regions_class_order' is required (the label placed for each region, in order)")
    if not isinstance(order, (list, tuple)) or len(order) != len(regions):
        raise InputError(where, f"'regions_class_order' must list one label value per foreground region "
                                f"({len(regions)}), got {order!r}")
    out = tuple(_int(where, REGIONS_CLASS_ORDER, v) for v in order)
    bad = [v for v in out if v not in scheme.label_values or v == scheme.ignore_label]
    if bad:
        raise InputError(where, f"'regions_class_order' holds {bad}, not label values of 'labels' "
                                f"({scheme.label_values}; never the ignore label)")
    return out
