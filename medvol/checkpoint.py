"""Checkpoints and run folders, below both training and inference.

A checkpoint holds plain tensors/numbers/strings only and is loaded with ``weights_only=True``.
A run folder (written by ``medvol train``) holds ``recipe.yaml``, ``plans.json`` and
``checkpoints/{best,latest}.pt``; :func:`load_run` turns it into a ready model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medvol.config import Recipe
from medvol.errors import CacheError, ConfigError
from medvol.plans import Plans
from medvol.utils import atomic_path, read_json


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the legacy form: (name, key, pos, has_gauss, cached_gaussian)
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`. Its tensors may have been loaded onto the GPU (a resume
    loads with ``map_location=`` the training device); torch takes RNG states as CPU byte
    tensors only, so they are copied back first."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no checkpoint here")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CacheError(f"{path}: not a readable medvol checkpoint ({type(e).__name__}: {e})") from None


@dataclass
class RunModel:
    """A trained model with the recipe and plans it was trained with."""

    model: nn.Module
    recipe: Recipe
    plans: Plans
    run_dir: Path | None
    previous_stage: list[RunModel] = field(default_factory=list)  # 3d_cascade_fullres: the 3d_lowres run(s)

    @property
    def patch_size(self) -> list[int]:
        return list(self.recipe.data.patch_size or self.plans.patch_size)

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """The axes (of X, Y, Z) training flipped: mirroring TTA uses the same ones. A 2D
        model's flip axes are those of its slices: the in-plane axes of the volume."""
        aug = self.recipe.data.augment
        if not (aug.enabled and aug.flip_prob > 0):
            return ()
        axes = self.plans.in_plane_axes
        return tuple(axes[int(a)] for a in aug.flip_axes if int(a) < len(self.patch_size))

    @property
    def slice_axis(self) -> int | None:
        """A 2D model's slice axis (0-2 of X, Y, Z); None for a 3D model."""
        return self.plans.slice_axis

    @property
    def context(self) -> int:
        """A 2D model's neighbouring slices per side (2.5D)."""
        return self.recipe.data.context


def run_checkpoint(run_dir: str | Path, checkpoint: str = "best") -> Path:
    """``checkpoints/<checkpoint>.pt`` of a run folder; ``best`` falls back to ``latest``
    (a run validated never, or not yet)."""
    path = Path(run_dir) / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists() and checkpoint == "best":
        path = Path(run_dir) / "checkpoints" / "latest.pt"
    return path


def inference_weights(ckpt: dict) -> dict:
    """The state dict that prediction, export and feature extraction load from a checkpoint: the
    model its trainer named ``inference_model`` (a mean teacher's ``"teacher"``), ``"model"`` in
    checkpoints written before that was recorded. The one rule of which weights inference uses."""
    return ckpt["models"][ckpt.get("inference_model", "model")]


def expand_fold_folders(paths: list[Path]) -> list[Path]:
    """The run folders meant by ``paths``: each path itself, or, for a folder that is not a run
    (no ``recipe.yaml``) but holds ``fold_*`` runs, those runs in name order."""
    out = []
    for r in map(Path, paths):
        folds = sorted(r.glob("fold_*")) if r.is_dir() and not (r / "recipe.yaml").exists() else []
        out += folds or [r]
    return out


def load_weights(model: torch.nn.Module, state: dict, described_by: Path, source: Path) -> None:
    """``model.load_state_dict(state)``; a network that does not fit the weights (its plan or
    recipe changed after training) is one error naming the file that built it."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ConfigError(f"{described_by}: the network it describes does not fit the weights of the checkpoint "
                          f"{source} ({_mismatches(model.state_dict(), state) or first}); was it edited after "
                          "training?") from None


def _mismatches(own: dict, saved: dict, shown: int = 3) -> str:
    """The tensors of a network (``own``) and a checkpoint (``saved``) that differ: their count,
    and the first ``shown`` by name with both shapes (or the side they are missing from)."""
    def shape(t) -> str:
        return "x".join(map(str, getattr(t, "shape", ()))) or "scalar"

    diff = [f"{k}: {shape(saved[k])} in the checkpoint, {shape(own[k])} in the network" for k in own
            if k in saved and getattr(saved[k], "shape", None) != own[k].shape]
    diff += [f"{k}: not in the checkpoint" for k in own if k not in saved]
    diff += [f"{k}: not in the network" for k in saved if k not in own]
    more = f", and {len(diff) - shown} more" if len(diff) > shown else ""
    return f"{len(diff)} tensor(s) differ: {'; '.join(diff[:shown])}{more}" if diff else ""


def load_run(run_dir: str | Path, device: torch.device, checkpoint: str = "best") -> RunModel:
    """Model (in eval mode, on ``device``), recipe and plans of a run folder written by ``medvol train``."""
    from medvol.config import load_recipe
    from medvol.io.slice_features import AGGREGATOR_RUN_FILE
    from medvol.networks import build_model

    run_dir = Path(run_dir)
    if (run_dir / AGGREGATOR_RUN_FILE).exists():
        raise ConfigError(f"{run_dir}: a slice aggregator's run (subject classes from slice features): predict it "
                          "with `medvol predict -m` (medvol.inference.subjects.predict_subjects)")
    for f in ("recipe.yaml", "plans.json"):
        if not (run_dir / f).exists():
            raise ConfigError(f"{run_dir}: not a medvol run folder (no {f}); pass the --out of `medvol train`")
    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.trainer.name == "pcrl":
        raise ConfigError(f"{run_dir}: a PCRL pretraining run has no segmentation model; fine-tune one from its "
                          f"encoder.pt (--set init_from={run_dir / 'encoder.pt'})")
    plans = Plans.from_dict(read_json(run_dir / "plans.json")).for_configuration(recipe.data.configuration)
    ckpt = load_checkpoint(run_checkpoint(run_dir, checkpoint), map_location="cpu")
    num_classes = int(ckpt.get("num_classes", plans.num_classes))  # a classifier's classes are not the plan's labels
    previous = _previous_stage(run_dir, recipe, device)
    extra = len([v for v in plans.label_names if v != 0]) if previous else 0  # one-hot previous-stage labels
    model = build_model(recipe.model, plans, plans.num_channels * (2 * recipe.data.context + 1) + extra, num_classes)
    load_weights(model, inference_weights(ckpt), run_dir / "plans.json", run_checkpoint(run_dir, checkpoint))
    model.to(device).eval()
    return RunModel(model, recipe, plans, run_dir, previous)


PREVIOUS_STAGE_FILE = "previous_stage.json"  # a cascade run's 3d_lowres run folder(s), absolute


def _previous_stage(run_dir: Path, recipe: Recipe, device: torch.device) -> list[RunModel]:
    """The 3d_lowres run(s) a 3d_cascade_fullres run takes its input from (none for other runs),
    as ``RUN/previous_stage.json`` records them (their ``best`` checkpoints)."""
    if recipe.data.configuration != "3d_cascade_fullres":
        return []
    record = run_dir / PREVIOUS_STAGE_FILE
    if not record.exists():
        raise ConfigError(f"{run_dir}: a 3d_cascade_fullres run without {PREVIOUS_STAGE_FILE} (its low-res run); "
                          "train it again")
    runs = [Path(p) for p in read_json(record)["runs"]]
    missing = [str(p) for p in runs if not (p / "recipe.yaml").exists()]
    if missing:
        raise ConfigError(f"{record}: the low-res run {missing[0]} is gone (moved?); put it back or edit the file")
    return [load_run(p, device) for p in runs]
