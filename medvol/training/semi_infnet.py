"""Semi-Inf-Net (Inf-Net, IEEE TMI 2020; ``docs/methods/infnet.md``): the progressive pseudo-label
loop, as a driver of Inf-Net runs.

``medvol train semi_infnet --data PRE --out RUN`` runs these stages, each an ordinary engine
run of :class:`medvol.training.infnet.InfNetTrainer` in ``RUN/stages/<stage>/`` (recipe,
checkpoints, metrics, resumable like any run):

1. ``initial``: Inf-Net on the labelled slices.
2. ``round_001`` … ``round_R``: before each round, the previous stage's model (its last
   weights) labels the next ``per_round`` (k = 5) slices of the unlabelled pool; they leave
   the unlabelled pool for the pseudo-labelled one, and the round fine-tunes that model on
   the labelled slices plus every pseudo-labelled slice so far. The unlabelled pool's order is
   a seeded shuffle fixed at the start (published: ``random.shuffle``). R = ceil(unlabelled /
   k), or ``max_rounds``.
3. ``pretrain``: Inf-Net from scratch on the final pool (labelled + pseudo-labelled, as
   published: their "Pseudo-label" set is a copy of the hybrid pool; ``pretrain_with_labelled:
   false`` trains on the pseudo-labels alone).
4. ``finetune``: from ``pretrain``'s weights, on the labelled slices. Its weights are the result.

Pseudo-labels live in ``RUN/pool_cache/``, an overlay of the training cache
(:func:`medvol.cache.link_overlay`: every file linked, nothing of the user's cache ever written)
that holds, for each pseudo-labelled case, its own label (``<case>_seg.npy``: the predicted foreground probability
≥ ``threshold``, in the cache's preprocessed space), foreground locations and properties
(``has_label: true``, ``pseudo_label: true``). Every stage trains on this cache with
``data.labelled`` naming its cases; the Inf-Net trainer computes the edges of every label,
pseudo-labels included, on the batch. Published pseudo-labels are the min-max normalised
probability map kept soft (their edges come from it thresholded at 0.5); here they are binary.

``RUN/semi_state.json`` holds the pools (labelled, pseudo-labelled in order of addition,
unlabelled in order of use, validation), how many rounds are labelled and which stages are
done; it is rewritten atomically after every change, so an interrupted loop resumes
(``--resume``, which takes the values and refuses the folders that it does for any run:
:func:`medvol.training.run_folder.resume_flag`, with this file as what is resumed) at the stage
where it stopped: a stage is resumed from its own ``latest.pt``; pseudo-labels written before
the state recorded them are simply made again (the same model gives the same labels). When
``finetune`` is done, ``RUN`` becomes a run folder of the final model (``plans.json``,
``checkpoints/`` linked from the stage), so ``medvol predict RUN`` works as for any run.

Stage settings (``method.initial``, ``round``, ``pretrain``, ``finetune``): epochs over the
stage's own slices, the epoch of the one ×``schedule.gamma`` decay, learning rate and batch
size; an epoch is ``ceil(slices / batch) × len(scales)`` steps, as in the published loop.
Published: Inf-Net 100 epochs, Adam 1e-4, batch 24, decay at epoch 50 (initial, pretrain,
finetune); each round 9 epochs at 3e-4, batch 16, no decay, on the hybrid pool.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvol.cache import case_paths, link_overlay, load_case, write_label
from medvol.config import Recipe, ScheduleConfig, save_recipe
from medvol.errors import ConfigError
from medvol.training import register_trainer
from medvol.training.infnet import InfNetOptions, epoch_steps
from medvol.training.run_folder import resume_flag
from medvol.utils import read_json, write_json

log = logging.getLogger(__name__)

STATE = "semi_state.json"
STATE_FORMAT = "medvol-semi-infnet-1"


@dataclass
class Stage:
    """One stage's length and rate (``method.initial``, ``round``, ``pretrain``, ``finetune``):
    ``epochs`` over its own training slices (converted to steps by
    :func:`medvol.training.infnet.epoch_steps`, so a round's length follows its pool), the
    ``decay_epoch`` of the one ×``schedule.gamma`` decay, and ``lr`` and ``batch_size`` when they
    differ from the recipe's. Checked by :class:`SemiInfNetOptions`, which knows its key."""

    epochs: float = 100.0
    decay_epoch: float | None = 50.0  # the one ×schedule.gamma decay, after this many epochs (None: never)
    lr: float | None = None  # None: the recipe's optimizer.lr
    batch_size: int | None = None  # None: the recipe's data.batch_size


@dataclass
class SemiInfNetOptions(InfNetOptions):
    """The ``method:`` section of ``trainer.name: semi_infnet``: Inf-Net's options (every stage
    trains with them) plus the loop's: ``per_round`` slices pseudo-labelled per round (k),
    ``max_rounds``, the foreground ``threshold`` of a pseudo-label, whether ``pretrain`` also
    trains on the labelled slices (published), and one :class:`Stage` per stage kind. Every value
    is checked when the recipe is loaded (:func:`medvol.training.load_recipe`)."""

    per_round: int = 5  # unlabelled slices pseudo-labelled per round (k)
    max_rounds: int | None = None  # None: until the unlabelled pool is empty
    threshold: float = 0.5  # pseudo-label = foreground probability >= threshold
    pretrain_with_labelled: bool = True  # pretrain on labelled + pseudo-labelled (published) or pseudo only
    initial: Stage = field(default_factory=Stage)
    round: Stage = field(default_factory=lambda: Stage(9.0, None, 3e-4, 16))  # published per round
    pretrain: Stage = field(default_factory=Stage)
    finetune: Stage = field(default_factory=Stage)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per_round < 1:
            raise ConfigError(f"'method.per_round' must be >= 1, got {self.per_round!r}")
        if self.max_rounds is not None and self.max_rounds < 0:
            raise ConfigError(f"'method.max_rounds' must be >= 0 (or null: until the pool is empty), "
                              f"got {self.max_rounds!r}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"'method.threshold' must be in (0, 1), got {self.threshold!r}")
        for kind in ("initial", "round", "pretrain", "finetune"):
            _check_stage(getattr(self, kind), f"method.{kind}")


def _check_stage(s: Stage, key: str) -> None:
    if not s.epochs > 0:
        raise ConfigError(f"'{key}.epochs' must be > 0, got {s.epochs!r}")
    if s.decay_epoch is not None and not s.decay_epoch > 0:
        raise ConfigError(f"'{key}.decay_epoch' must be > 0 (or null: no decay), got {s.decay_epoch!r}")
    if s.lr is not None and not s.lr > 0:
        raise ConfigError(f"'{key}.lr' must be > 0 (or null: optimizer.lr), got {s.lr!r}")
    if s.batch_size is not None and s.batch_size < 1:
        raise ConfigError(f"'{key}.batch_size' must be >= 1 (or null: data.batch_size), got {s.batch_size!r}")


@dataclass
class SemiState:
    """The loop's pools and progress (``RUN/semi_state.json``): the ``labelled`` slices, the
    ``unlabelled`` ones in the order they will be pseudo-labelled, the ``validation`` slices,
    the ``pseudo``-labelled ones in order of addition, how many rounds are labelled
    (``rounds_labelled``) and the finished stages (``done``)."""

    labelled: list[str]
    unlabelled: list[str]  # in the order they will be pseudo-labelled
    validation: list[str]
    pseudo: list[str] = field(default_factory=list)  # in order of addition
    rounds_labelled: int = 0  # rounds whose pseudo-labels are written and recorded
    done: list[str] = field(default_factory=list)  # finished stages

    def take(self, k: int) -> list[str]:
        """Move the next ``k`` unlabelled cases to the pseudo-labelled pool; returns them."""
        taken, self.unlabelled = self.unlabelled[:k], self.unlabelled[k:]
        self.pseudo += taken
        return taken


def save_state(run: Path, state: SemiState) -> None:
    write_json(run / STATE, {"format": STATE_FORMAT, **dataclasses.asdict(state)})


def load_state(run: Path) -> SemiState:
    raw = read_json(run / STATE)
    if raw.pop("format", None) != STATE_FORMAT:
        raise ConfigError(f"{run / STATE}: not a Semi-Inf-Net state file ({STATE_FORMAT})")
    return SemiState(**raw)


def stage_names(n_rounds: int) -> list[str]:
    return ["initial", *(f"round_{r:03d}" for r in range(1, n_rounds + 1)), "pretrain", "finetune"]


def n_rounds(n_unlabelled: int, o: SemiInfNetOptions) -> int:
    r = math.ceil(n_unlabelled / o.per_round)
    return r if o.max_rounds is None else min(r, o.max_rounds)


def initial_state(cache: Path, recipe: Recipe) -> SemiState:
    """Pools from the cache and the recipe's split; the unlabelled pool in a seeded order.
    Unlabelled cases the validation split drew join the unlabelled pool (nothing to score)."""
    from medvol.data.dataset import training_cases

    labelled, unlabelled, val = training_cases(cache, recipe.data, recipe.trainer.seed)
    val_labelled = [c for c in val if load_case(cache, c)[2].get("has_label", False)]
    pool = unlabelled + [c for c in val if c not in val_labelled]
    order = np.random.default_rng(recipe.trainer.seed).permutation(len(pool))
    return SemiState(labelled=list(labelled), unlabelled=[pool[i] for i in order], validation=val_labelled)


# ---------------------------------------------------------------- the pool cache

def write_pseudo_label(src: Path, dst: Path, case: str, foreground: np.ndarray, threshold: float) -> None:
    """The label of ``case`` in the overlay ``dst`` of ``src``: ``foreground`` (X, Y, Z) >=
    threshold, with ``src``'s properties marked ``pseudo_label: true``
    (:func:`medvol.cache.write_label`)."""
    seg = (np.asarray(foreground) >= threshold)[None]
    props = read_json(case_paths(src, case)[2])
    write_label(dst, case, seg, {**props, "pseudo_label": True, "label_file": None}, classes=[1])


def pseudo_label(prev_run: Path, src: Path, dst: Path, cases: list[str], threshold: float, device) -> None:
    """Label ``cases`` with the last weights of ``prev_run`` by the prediction path."""
    from medvol.checkpoint import load_run
    from medvol.inference.predictor import case_probabilities

    run = load_run(prev_run, device, checkpoint="latest")
    for case in cases:
        image = torch.from_numpy(np.array(load_case(src, case)[0], np.float16))  # as validation passes it
        prob = case_probabilities(run, image, device, run.recipe.inference)
        write_pseudo_label(src, dst, case, prob[-1].float().numpy(), threshold)
    log.info("pseudo-labelled %d slices with %s: %s", len(cases), prev_run.name, ", ".join(cases))


# ---------------------------------------------------------------- stages

def stage_kind(name: str) -> str:
    return "round" if name.startswith("round_") else name


def stage_cases(kind: str, state: SemiState, o: SemiInfNetOptions) -> list[str]:
    if kind == "initial" or kind == "finetune":
        return list(state.labelled)
    if kind == "round" or o.pretrain_with_labelled:
        return state.labelled + state.pseudo
    return list(state.pseudo)


def stage_recipe(recipe: Recipe, o: SemiInfNetOptions, name: str, state: SemiState, previous: Path | None) -> Recipe:
    """The Inf-Net recipe of stage ``name`` (``previous``: the stage before it, its run folder)."""
    kind = stage_kind(name)
    cfg: Stage = getattr(o, kind)
    d = recipe.data
    cases = stage_cases(kind, state, o)
    batch = cfg.batch_size or d.batch_size
    if batch is None:
        raise ConfigError(f"trainer semi_infnet: set data.batch_size or method.{kind}.batch_size (epochs become steps)")
    per_epoch = epoch_steps(len(cases), batch, len(o.scales))
    steps = max(1, math.ceil(cfg.epochs * per_epoch))
    decay = None if cfg.decay_epoch is None else int(round(cfg.decay_epoch * per_epoch))
    data = dataclasses.replace(d, labelled=cases, fold=None, val_cases=list(state.validation) or None,
                               val_fraction=d.val_fraction if state.validation else 0.0, batch_size=batch,
                               unlabelled_per_batch=0)
    schedule = (ScheduleConfig("step", milestones=[decay], gamma=recipe.schedule.gamma) if decay and decay < steps
                else ScheduleConfig("constant"))
    val_every = steps if kind == "round" else min(recipe.trainer.val_every, steps)
    trainer = dataclasses.replace(recipe.trainer, name="infnet", steps=steps, val_every=val_every)
    optimizer = dataclasses.replace(recipe.optimizer, lr=cfg.lr or recipe.optimizer.lr)
    method = {f.name: getattr(o, f.name) for f in dataclasses.fields(InfNetOptions)}
    fresh = kind in ("initial", "pretrain")
    init = recipe.init_from if fresh or previous is None else str(previous / "checkpoints" / "latest.pt")
    return dataclasses.replace(recipe, name=f"{recipe.name}.{name}", data=data, schedule=schedule, trainer=trainer,
                               optimizer=optimizer, method=method, init_from=init)


def run_stage(recipe: Recipe, cache: Path, run: Path, dist, quiet: bool) -> dict:
    from medvol.training.engine import fit
    from medvol.training.infnet import InfNetTrainer

    trainer = InfNetTrainer(recipe, cache, run, dist)
    return fit(trainer, resume=resume_flag(run, "auto"), quiet=quiet)


def publish(stage: Path, run: Path) -> None:
    """Make ``run`` a run folder of ``stage``'s model: its plan, split, summary and checkpoints."""
    for f in ("plans.json", "dataset.json", "split.json", "train_summary.json"):
        if (stage / f).exists():
            shutil.copy2(stage / f, run / f)
    (run / "checkpoints").mkdir(exist_ok=True)
    for ckpt in (stage / "checkpoints").glob("*.pt"):
        target = run / "checkpoints" / ckpt.name
        target.unlink(missing_ok=True)
        os.link(ckpt, target)


# ---------------------------------------------------------------- the driver

def drive(recipe: Recipe, cache, run, dist, resume: bool = False, stop_at: int | None = None,
          quiet: bool = False) -> dict:
    """Run (or, with ``resume``, continue) the loop; ``stop_at``: stop after that many stages of
    this call. :func:`medvol.training.train` decides ``resume`` by the rule of every run
    (:func:`medvol.training.run_folder.resume_flag` with ``resume_file`` :data:`STATE`).
    Returns the last validation metrics of the last stage run, and ``stages_done``."""
    from medvol.config import from_dict

    if dist.distributed:
        raise ConfigError("trainer semi_infnet runs on one process (its stages are small 2D runs): start it "
                          "without torchrun")
    o = from_dict(SemiInfNetOptions, recipe.method, f"recipe '{recipe.name}'", "method")
    cache, run = Path(cache), Path(run)
    if resume:
        state = load_state(run)
    else:
        state = initial_state(cache, recipe)
        run.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run / "recipe.yaml")
        save_state(run, state)
    link_overlay(cache, run / "pool_cache")
    names = stage_names(n_rounds(len(state.unlabelled) + len(state.pseudo), o))
    metrics: dict = {}
    ran = 0
    for i, name in enumerate(names):
        if name in state.done:
            continue
        if stop_at is not None and ran >= stop_at:
            break
        previous = run / "stages" / names[i - 1] if i else None
        if stage_kind(name) == "round" and state.rounds_labelled < int(name[-3:]):
            _label_round(state, o, cache, run, previous, dist.device)
        metrics = run_stage(stage_recipe(recipe, o, name, state, previous), run / "pool_cache",
                            run / "stages" / name, dist, quiet)
        state.done.append(name)
        save_state(run, state)
        ran += 1
    if "finetune" in state.done:
        publish(run / "stages" / "finetune", run)
    return {**metrics, "stages_done": len(state.done)}


def _label_round(state: SemiState, o: SemiInfNetOptions, cache: Path, run: Path, previous, device) -> None:
    """Pseudo-label the next k unlabelled cases with ``previous``'s model; record them."""
    nxt = dataclasses.replace(state, unlabelled=list(state.unlabelled), pseudo=list(state.pseudo))
    taken = nxt.take(o.per_round)
    pseudo_label(previous, cache, run / "pool_cache", taken, o.threshold, device)
    state.unlabelled, state.pseudo, state.rounds_labelled = nxt.unlabelled, nxt.pseudo, state.rounds_labelled + 1
    save_state(run, state)


@register_trainer
class SemiInfNet:
    """``trainer.name: semi_infnet``: not an engine trainer but the driver of Inf-Net stages
    (:func:`drive`); :func:`medvol.training.train` hands the whole run to it, once it has
    decided ``--resume`` by the rule of every run with ``resume_file`` (this loop's
    ``semi_state.json``). ``Options`` (:class:`SemiInfNetOptions`) parse its ``method:``
    section when the recipe is loaded."""

    name = "semi_infnet"
    Options = SemiInfNetOptions
    resume_file = STATE  # what --resume continues (medvol.training.run_folder.resume_flag)
    drive = staticmethod(drive)
