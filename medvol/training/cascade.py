"""The second stage of nnU-Net's cascade (``data.configuration: 3d_cascade_fullres``).

The network is the 3d_fullres U-Net with one extra input channel per foreground label: the
low-resolution stage's prediction, one-hot (:mod:`medvol.data.cascade`). ``data.previous_stage``
names the trained 3d_lowres run (or the run folders of its folds). nnU-Net trains the second
stage on the lowres folds' cross-validation predictions (``predicted_next_stage/``); medvol does
the same when given the fold runs: each training case takes the prediction of a fold that
validated on it (its ``split.json``), and only a case that no given run validated on takes the
first run's prediction of a case it trained on (optimistic: the low-res model saw its label;
say so in the log). Predictions are made once, on the main process, from the low-res cache
(``PRE/3d_lowres/``) by the one sliding-window path with the low-res run's inference settings,
their probabilities resampled linearly onto the case's full-resolution cached grid (both grids
cover the same crop box) and turned into labels, as nnU-Net's ``resample_and_save`` does; they
are kept in ``RUN/previous_stage/<case>.npy`` (a resumed run predicts only what is missing).
``RUN/previous_stage.json`` records the low-res runs; ``medvol predict -m RUN`` reads it and runs
both stages (:func:`medvol.inference.predictor.case_outputs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from medvol.cache import configuration_cache, load_case
from medvol.checkpoint import PREVIOUS_STAGE_FILE, RunModel, load_run
from medvol.data.cascade import CascadePatchDataset, load_previous_stage, onehot, previous_stage_path
from medvol.data.dataset import StepDataset
from medvol.errors import ConfigError
from medvol.plans import LOWRES
from medvol.resampling import resample_probabilities
from medvol.training import register_trainer
from medvol.training.distributed import barrier
from medvol.training.sources import CacheSamples
from medvol.training.supervised import SupervisedTrainer
from medvol.utils import read_json, save_npy, write_json

log = logging.getLogger(__name__)


def previous_stage_runs(recipe, where: str = "data.previous_stage") -> list[Path]:
    """``data.previous_stage`` as run folders, each checked to be a 3d_lowres run."""
    from medvol.config import load_recipe

    given = recipe.data.previous_stage
    runs = [Path(p).resolve() for p in ([given] if isinstance(given, str) else list(given or []))]
    if not runs:
        raise ConfigError(f"{where} is not set: give the 3d_lowres run folder (or its fold folders) the cascade's "
                          f"second stage takes its input from (--set {where}=RUN_LOWRES)")
    for run in runs:
        if not (run / "recipe.yaml").exists():
            raise ConfigError(f"{where}: {run} is not a medvol run folder (no recipe.yaml); train the 3d_lowres "
                              "stage first (data.configuration: 3d_lowres)")
        conf = load_recipe(run / "recipe.yaml").data.configuration
        if conf != LOWRES:
            raise ConfigError(f"{where}: {run} trained data.configuration {conf}, not 3d_lowres")
    return runs


@dataclass(kw_only=True)
class CascadeSamples(CacheSamples):
    """Full-resolution patches of the cache with the low-res runs' one-hot predictions as
    extra input channels (``in_channels`` = image channels + foreground labels)."""

    kind: ClassVar[str] = "preprocessing cache + previous-stage predictions"
    previous_runs: list[Path]
    labels: list[int]  # the foreground labels, one input channel each


@register_trainer
class CascadeTrainer(SupervisedTrainer):
    """``trainer.name: cascade`` (``pipelines/quickstart_cascade.yaml``): the supervised nnU-Net
    recipe on 3d_cascade_fullres inputs; see the module's docstring."""

    name = "cascade"

    def make_source(self) -> CascadeSamples:
        if self.recipe.data.configuration != "3d_cascade_fullres":
            raise ConfigError("trainer.name cascade needs data.configuration: 3d_cascade_fullres")
        src = CacheSamples.from_recipe(self.cache_dir, self.recipe)
        if src.plans.labels.has_regions or src.plans.labels.ignore_label is not None:
            raise ConfigError(f"{self.cache_dir}: the cascade takes plain labels; regions and an ignore label are "
                              "not supported by its previous-stage channels yet (train 3d_fullres)")
        labels = sorted(src.plans.class_names)  # one channel per foreground label, ascending
        runs = previous_stage_runs(self.recipe)
        for run in runs:
            theirs = read_json(run / "plans.json")
            if theirs.get("labels") != src.plans.raw.get("labels") or \
                    theirs.get("normalization") != src.plans.raw.get("normalization"):
                raise ConfigError(f"data.previous_stage: {run} was trained on another plan (labels or channels "
                                  f"differ from {self.cache_dir}'s)")
        base = {f.name: getattr(src, f.name) for f in fields(CacheSamples)}
        return CascadeSamples(**{**base, "in_channels": src.in_channels + len(labels)}, previous_runs=runs,
                              labels=labels)

    def make_dataset(self) -> StepDataset:
        src = self.source
        assert isinstance(src, CascadeSamples)
        if self.dist.is_main:
            write_json(self.run_dir / PREVIOUS_STAGE_FILE, {"configuration": LOWRES,
                                                             "runs": [str(r) for r in src.previous_runs]})
            write_previous_stage(self.run_dir, self.cache_dir, src.previous_runs, src.labelled + src.val_cases,
                                 self.device)
        barrier(self.dist)
        from medvol.data.augment import build_augmentation

        d = self.recipe.data
        return CascadePatchDataset(src.root, self.streams(), src.patch_size, self.run_dir, src.labels,
                                   d.oversample_foreground, build_augmentation(d.augment, ndim=3),
                                   seed=self.recipe.trainer.seed)

    def score_case(self, case: str, image: np.ndarray, label: np.ndarray | None, props: dict) -> dict:
        prev = load_previous_stage(self.run_dir, case, image.shape[1:], mmap=False)
        labels = self.source.labels  # type: ignore[attr-defined]
        image = np.concatenate([np.asarray(image, np.float32), onehot(prev, labels).numpy()])
        return super().score_case(case, image, label, props)


def _validating_run(case: str, runs: list[Path]) -> tuple[Path, bool]:
    """(the run whose split validated ``case``, True), else (the first run, False)."""
    for run in runs:
        split = run / "split.json"
        if split.exists() and case in read_json(split).get("validation", []):
            return run, True
    return runs[0], False


def lowres_labels_on_fullres(run: RunModel, lowres_image: np.ndarray, lowres_spacing, fullres_shape,
                             fullres_spacing, device: torch.device) -> np.ndarray:
    """The low-res run's prediction of one low-res cached image, its probabilities resampled
    linearly onto the full-resolution cached grid, as labels ``(1, X, Y, Z)`` int8."""
    from medvol.inference.postprocess import argmax_labels
    from medvol.inference.predictor import case_probabilities, run_settings

    settings, _, _ = run_settings([run])
    probs = case_probabilities(run, torch.from_numpy(np.array(lowres_image, np.float16)), device, settings)
    probs = resample_probabilities(probs.float(), fullres_shape, lowres_spacing, fullres_spacing)
    return np.asarray(argmax_labels(probs.numpy()), np.int8)[None]


def write_previous_stage(run_dir: Path, cache_dir: Path, runs: list[Path], cases: list[str],
                         device: torch.device) -> None:
    """``RUN/previous_stage/<case>.npy`` for each of ``cases`` that lacks one (see the module)."""
    lowres_cache = configuration_cache(cache_dir, LOWRES)
    loaded: dict[Path, RunModel] = {}
    leaked = []
    for case in cases:
        _, _, props = load_case(cache_dir, case)
        shape = props["shape_after_resampling"]
        path = previous_stage_path(run_dir, case)
        if path.exists() and list(np.load(path, mmap_mode="r").shape[1:]) == list(shape):
            continue
        run, validated = _validating_run(case, runs)
        if not validated:
            leaked.append(case)
        if run not in loaded:
            loaded[run] = load_run(run, device)
        image, _, low = load_case(lowres_cache, case)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy(path, lowres_labels_on_fullres(loaded[run], image, low["target_spacing"], shape,
                                                props["target_spacing"], device))
    if leaked:
        log.warning("previous stage: %d case(s) predicted by a low-res run that trained on them (%s...): give the "
                    "low-res fold runs as data.previous_stage for honest inputs, as nnU-Net does", len(leaked),
                    ", ".join(leaked[:3]))
