"""Data sources: what a trainer trains on, said explicitly (one small type per kind of data).

A trainer gets its source from one hook, :meth:`medvol.training.engine.Trainer.make_source`.
Every source says what it gives: ``in_channels`` (the network's input channels),
``num_outputs`` (its output channels or classes), the per-process ``batch_size`` and the
``labelled`` / ``unlabelled`` / ``val_cases`` ids; each kind adds its own fields:

- :class:`CacheSamples`: 3D patches, or 2D slices (``data.configuration: 2d``), of a
  preprocessing cache: ``plans``, ``patch_size``, ``slice_axis`` (None for 3D), ``context``;
- :class:`GradedSlices`: cache slices with their grades (``slice_labels.csv``), the one source
  of DC-MT and the slice classifier, checked in one place with one set of messages;
- :class:`FeatureFile`: the per-slice features of subjects (``features.npz``) that the slice
  aggregator trains on; no plans, no patches;
- :class:`PretextVolumes`: PCRL's unlabelled volumes, the cases of a cache or any folder of
  scans converted once into the run folder; ``patch_size``, plans only for a cache.

Code that needs the preprocessing plans asks :meth:`DataSource.require_plans` and gets one
ConfigError line when the source has none; nothing stands in for plans, patches or classes
a source does not have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np

from medvol.cache import load_plans
from medvol.data import split_cases, training_cases
from medvol.data.pretext import PretextConfig, prepare_scan_folder
from medvol.data.slices import cached_slice_grades, cached_slice_labels
from medvol.errors import ConfigError
from medvol.io.slice_features import SliceFeatures, features_path, read_features
from medvol.io.slice_labels import SLICE_LABELS_FILE, SliceLabels
from medvol.plans import Plans
from medvol.training.distributed import barrier

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DataSource:
    """What every source gives: input channels, outputs, the per-process batch size and the
    case split (labelled and unlabelled training ids, validation ids), from ``root``."""

    kind: ClassVar[str] = "data source"
    root: Path
    in_channels: int
    num_outputs: int
    batch_size: int
    labelled: list[str]
    unlabelled: list[str]
    val_cases: list[str]

    def find_plans(self) -> Plans | None:
        """The preprocessing plans the data was made with, or None where it has none."""
        return None

    def require_plans(self, purpose: str) -> Plans:
        """The plans, or one ConfigError line saying that ``purpose`` needs them."""
        plans = self.find_plans()
        if plans is None:
            raise ConfigError(f"{purpose} needs preprocessing plans, but its data ({self.kind}, {self.root}) has "
                              "none: train on a preprocessing cache")
        return plans

    def split(self) -> dict[str, list[str]]:
        """The run folder's ``split.json``."""
        return {"labelled": self.labelled, "unlabelled": self.unlabelled, "validation": self.val_cases}

    def checkpoint_fields(self) -> dict:
        """What a checkpoint must record to rebuild the model beside the plans (nothing here)."""
        return {}


def plans_for_patch(plans: Plans, patch_size: list[int]) -> Plans:
    """``plans`` with the U-Net topology nnU-Net's rule gives ``patch_size`` (the recipe's
    patch, when it is not the plan's): the run folder's plans.json records it, so prediction
    rebuilds the same network."""
    from medvol.preprocessing.planning import topology_for_patch

    topo = topology_for_patch(plans.target_spacing, patch_size)
    if topo["strides"] != plans.topology.get("strides") or topo["kernel_sizes"] != plans.topology.get("kernel_sizes"):
        log.info("patch %s: U-Net topology recomputed for it (strides %s)", patch_size, topo["strides"])
    if plans.slice_axis is None:
        raw = {**plans.raw, "patch_size": list(patch_size), "network": {**plans.raw.get("network", {}), **topo}}
        return Plans.from_dict(raw)
    cfg = plans.raw["configurations"]["2d"]
    cfg = {**cfg, "patch_size": list(patch_size), "network": {**cfg.get("network", {}), **topo}}
    return Plans.from_dict({**plans.raw, "configurations": {**plans.raw["configurations"], "2d": cfg}}).for_2d()


@dataclass(kw_only=True)
class CacheSamples(DataSource):
    """3D patches, or with ``data.configuration: 2d`` 2D slices (``slice_axis``, ``context``
    neighbours on each side as channels), of a preprocessing cache, its plans' classes as
    outputs; patch and batch size from the recipe, else from the plans."""

    kind: ClassVar[str] = "preprocessing cache"
    plans: Plans
    patch_size: list[int]
    slice_axis: int | None  # None: 3D patches
    context: int

    def find_plans(self) -> Plans:
        return self.plans

    def slice_labels(self) -> SliceLabels | None:
        """The cache's slice classes when it has a ``slice_labels.csv`` and samples are slices."""
        return None if self.slice_axis is None else cached_slice_labels(self.root, self.slice_axis)

    @classmethod
    def from_recipe(cls, cache_dir: str | Path, recipe) -> CacheSamples:
        d, cache_dir = recipe.data, Path(cache_dir)
        plans = Plans.from_dict(load_plans(cache_dir)).for_configuration(d.configuration)
        patch = list(d.patch_size or plans.patch_size)
        if patch != plans.patch_size and recipe.model.name == "dynunet":
            plans = plans_for_patch(plans, patch)
        labelled, unlabelled, val = training_cases(cache_dir, d, recipe.trainer.seed)
        if not labelled:
            raise ConfigError(f"{cache_dir}: no labelled training case left after the validation split")
        return cls(root=cache_dir, plans=plans, patch_size=patch, slice_axis=plans.slice_axis, context=d.context,
                   in_channels=plans.num_channels * (2 * d.context + 1), num_outputs=plans.num_classes,
                   batch_size=int(d.batch_size or plans.batch_size), labelled=labelled, unlabelled=unlabelled,
                   val_cases=val)


@dataclass(kw_only=True)
class GradedSlices(CacheSamples):
    """2D slices of a preprocessing cache with their grades (the cache's ``slice_labels.csv``):
    the outputs are the grades 0..largest (at least 2), not the plans' classes. DC-MT and the
    slice classifier train on it; :meth:`from_recipe` holds their checks."""

    kind: ClassVar[str] = "graded cache slices"
    grades: SliceLabels

    def slice_labels(self) -> SliceLabels:
        return self.grades

    def checkpoint_fields(self) -> dict:
        return {"num_classes": self.num_outputs}  # the grades, not the plans' labels

    def cached_grades(self, props: dict) -> np.ndarray:
        """The grade of every cached slice of a case across the slice axis (-1: none): the
        grade of the raw slice it came from (:func:`medvol.data.slices.raw_slice_of`)."""
        assert self.slice_axis is not None
        return cached_slice_grades(self.grades, props, self.slice_axis)

    @classmethod
    def from_recipe(cls, cache_dir: str | Path, recipe) -> GradedSlices:
        base = CacheSamples.from_recipe(cache_dir, recipe)
        who = f"trainer '{recipe.trainer.name}'"
        if base.slice_axis is None:
            raise ConfigError(f"{who} trains on graded slices: set data.configuration: 2d")
        grades = cached_slice_labels(base.root, base.slice_axis)
        if grades is None:
            raise ConfigError(f"{base.root}: no {SLICE_LABELS_FILE} ({who} needs slice grades: put one beside the raw "
                              "dataset.json and preprocess again)")
        values = [g for per in grades.slices.values() for g in per.values()]
        if not values:
            raise ConfigError(f"{base.root / SLICE_LABELS_FILE}: no slice grade (rows with a slice_index); {who} "
                              "trains on graded slices")
        kept = {f.name: getattr(base, f.name) for f in fields(CacheSamples)}
        return cls(**{**kept, "num_outputs": max(2, max(values) + 1)}, grades=grades)


def subject_split(data: SliceFeatures, d, seed: int,
                  labelled_fraction: float | None = None) -> tuple[list[str], list[str], list[str]]:
    """(labelled train, unlabelled train, validation) subjects: validation from the labelled
    ones (``data.val_cases`` or a seeded ``data.val_fraction``); ``data.labelled`` (a count or a
    list) keeps labels on that many / those training subjects only, the rest become unlabelled;
    ``labelled_fraction`` keeps them on the first ``round(fraction * n)`` (at least one) of the
    ``n`` training subjects, as ``data.labelled`` with that count."""
    if d.fold is not None:
        raise ConfigError("data.fold: the slice aggregator splits subjects by data.val_cases or data.val_fraction")
    labelled = [s.subject for s in data.items if s.subject_class >= 0]
    unlabelled = [s.subject for s in data.items if s.subject_class < 0]
    if not labelled:
        raise ConfigError("the features file holds no subject class (slice_labels.csv rows with an empty "
                          "slice_index): nothing to train on")
    bad = sorted(set(d.val_cases or []) - set(labelled))
    if bad:
        raise ConfigError(f"data.val_cases: {bad} are not labelled subjects of the features file")
    if labelled_fraction is not None and d.labelled is not None:
        raise ConfigError("data.labelled and method.labelled_fraction both choose the labelled subjects: set one")
    train, val = split_cases(labelled, d.val_fraction, d.val_cases, seed)
    wanted = d.labelled
    if labelled_fraction is not None:
        wanted = max(1, int(round(labelled_fraction * len(train))))
    if isinstance(wanted, int):
        wanted = train[:wanted]
    if wanted is not None:
        unlabelled += [c for c in train if c not in wanted]
        train = [c for c in train if c in wanted]
    return train, unlabelled, val


@dataclass(kw_only=True)
class FeatureFile(DataSource):
    """Subjects as sequences of slice features (``features.npz``, written by ``medvol
    extract-features``): ``features``; the input is a feature vector per slice, the outputs
    the subject classes; split by :func:`subject_split`."""

    kind: ClassVar[str] = "feature file"
    features: SliceFeatures

    @classmethod
    def from_recipe(cls, path: str | Path, recipe, default_batch: int,
                    labelled_fraction: float | None = None) -> FeatureFile:
        file = features_path(path)
        data = read_features(file)
        labelled, unlabelled, val = subject_split(data, recipe.data, recipe.trainer.seed, labelled_fraction)
        if not labelled:
            raise ConfigError(f"{file}: no labelled training subject left after the validation split")
        return cls(root=file, features=data, in_channels=data.feature_dim, num_outputs=data.num_subject_classes,
                   batch_size=int(recipe.data.batch_size or default_batch), labelled=labelled,
                   unlabelled=unlabelled, val_cases=val)


@dataclass(kw_only=True)
class PretextVolumes(DataSource):
    """Unlabelled volumes for PCRL's pretext task: the cases of a preprocessing cache
    (``volumes`` "cache", ``plans`` its plans) or any folder of scans, converted once into
    ``<run>/pretext_volumes`` (``volumes`` "folder", no plans). Every scan trains (labels,
    where the cache has them, are never read): nothing is unlabelled; the outputs are the
    reconstructed image channels."""

    kind: ClassVar[str] = "pretext volumes"
    volumes: str  # "cache" | "folder": how medvol.data.pretext.PretextDataset reads root
    patch_size: list[int]
    plans: Plans | None = None  # the cache's; a folder of scans was never planned

    def find_plans(self) -> Plans | None:
        return self.plans

    @classmethod
    def from_recipe(cls, data: str | Path, run_dir: str | Path, recipe, cfg: PretextConfig, dist,
                    default_patch: list[int], default_batch: int) -> PretextVolumes:
        """From a cache (``data/plans.json``) or a folder of scans, which the main process
        converts into ``run_dir/pretext_volumes`` while the others wait."""
        from medvol.utils import read_json

        d, data = recipe.data, Path(data)
        plans = None
        if (data / "plans.json").exists():
            from medvol.cache import list_cases

            root, volumes = data, "cache"
            plans = Plans.from_dict(load_plans(data))
            cases, channels = list_cases(data), plans.num_channels
        else:
            root, volumes = Path(run_dir) / "pretext_volumes", "folder"
            if dist.is_main:
                prepare_scan_folder(data, root, cfg, quiet=False)
            barrier(dist)
            cases = sorted(read_json(root / "manifest.json")["scans"])
            channels = int(np.load(root / f"{cases[0]}.npy", mmap_mode="r").shape[0]) if cases else 0
        if not cases:
            raise ConfigError(f"{data}: no scans to pretrain on")
        train, val = split_cases(cases, d.val_fraction, d.val_cases, recipe.trainer.seed)
        if not train:
            raise ConfigError(f"{data}: no scan left for pretraining after the validation split")
        return cls(root=root, volumes=volumes, plans=plans, patch_size=list(d.patch_size or default_patch),
                   in_channels=channels, num_outputs=channels, batch_size=int(d.batch_size or default_batch),
                   labelled=train, unlabelled=[], val_cases=val)


__all__ = ["CacheSamples", "DataSource", "FeatureFile", "GradedSlices", "PretextVolumes", "plans_for_patch",
           "subject_split"]
