"""The training loop that every method trainer plugs into.

A trainer (subclass of :class:`Trainer`) says what to build and what one step computes:
``build_models``/``build_optimizers`` and ``training_step(batch, step) -> {name: loss}``
(``"loss"`` is what is back-propagated, the other entries are logged). A method with several
optimisers (a discriminator, say) or several updates per step overrides ``update_steps``:
``[(optimizer_key, closure)]``, each closure returning such a dict, run in that order; work
that follows the updates (EMA teachers, key queues) goes in ``after_update(step)``. The engine
owns everything else and no trainer calls ``backward``: zero_grad, autocast (the run's
:mod:`medvol.precision`: bf16 on CUDA where supported and on CPUs with native bf16, fp16 with
a gradient scaler on older GPUs, else fp32), the scaler, gradient clipping, schedules, DDP,
validation (``score_case`` per validation case, ``reduce`` over them), logs, checkpoints
(latest + best) and exact resume.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from medvol.cache import configuration_cache, load_case
from medvol.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medvol.config import Recipe, save_recipe
from medvol.data import PatchDataset, Streams, build_augmentation, make_loader
from medvol.data.dataset import StepDataset
from medvol.errors import ConfigError, Preempted
from medvol.evaluation.metrics import dice
from medvol.inference.postprocess import to_labels
from medvol.inference.sliding_window import class_decoder, sliding_window_probabilities
from medvol.plans import Plans
from medvol.precision import choose_precision
from medvol.training.distributed import DistInfo, barrier, params_identical_across_ranks
from medvol.training.logger import RunLogger
from medvol.training.preemption import PreemptionFlag
from medvol.training.schedules import make_optimizer, make_scheduler
from medvol.training.sources import CacheSamples, DataSource
from medvol.training.transfer import init_from
from medvol.utils import write_json, write_text

log = logging.getLogger(__name__)


def mean_scores(scores: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's mean over cases, and ``val/dice_mean``, the mean of those means."""
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    if out:
        out["val/dice_mean"] = float(np.mean(list(out.values())))
    return out


def _as_float(v) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


class Trainer:
    """Base trainer: supervised segmentation over patches (or slices) of the preprocessing
    cache. A method subclasses it and overrides hooks: its data (:meth:`make_source`, a
    :mod:`medvol.training.sources` type), models, update steps, validation. The engine owns
    the rest (see the module docstring). ``in_channels``, ``num_classes``, ``batch_size``,
    ``plans``, ``patch_size`` and ``slice_axis`` read the source (kept as the names that the
    trainers, benchmarks and tests use)."""

    name = "supervised"
    Options: type | None = None  # a dataclass for the recipe's ``method`` section, or None (must be empty)
    primary_metric = "val/dice_mean"
    higher_is_better = True  # of the primary metric (best.pt keeps the best)
    inference_key = "model"  # which of self.models prediction uses (e.g. "teacher")
    ddp_find_unused = False  # True when a model holds parameters some steps do not use
    scan_validation = True  # end-of-run validation from the raw scans (False: no class-label output to score)
    grad_clip_keys: tuple[str, ...] = ("model",)  # the optimisers whose gradients trainer.grad_clip clips
    requires_model: str | None = None  # the recipe's model.name this trainer works with (None: any)
    label_modes = False  # True: loss and validation honour regions and the ignore label (medvol.labels)
    source: DataSource  # what it trains on: from make_source()

    def __init__(self, recipe: Recipe, cache_dir: str | Path, run_dir: str | Path, dist: DistInfo):
        self.recipe, self.run_dir, self.dist = recipe, Path(run_dir), dist
        self.cache_dir = configuration_cache(cache_dir, recipe.data.configuration)  # 3d_lowres: PRE/3d_lowres
        self.device = dist.device
        self.options = self._parse_options()
        if self.requires_model is not None and recipe.model.name != self.requires_model:
            raise ConfigError(f"trainer '{self.name}' needs model.name {self.requires_model}, "
                              f"got '{recipe.model.name}'")
        self.current_step = 0
        self.source = self.make_source()
        self.after_source()
        self._check_label_modes()
        self.global_batch = self.source.batch_size * dist.world_size
        self.precision = choose_precision(self.device, recipe.trainer.precision, recipe.trainer.amp)
        self.amp_dtype = self.precision.dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        torch.manual_seed(recipe.trainer.seed)  # identical initial weights on every rank
        self.models = {k: self.precision.prepare(m.to(self.device)) for k, m in self.build_models().items()}
        self.init_report = None
        if recipe.init_from:
            plans = self.source.find_plans()
            self.init_report = init_from(self.models["model"], recipe.init_from,
                                         None if plans is None else plans.raw.get("labels"))
        elif recipe.trainer.freeze_init_steps:
            raise ConfigError("trainer.freeze_init_steps needs init_from (it freezes the tensors loaded from it)")
        self.optimizers = self.build_optimizers()
        self._freeze_loaded_tensors()
        self.schedulers = self.make_schedulers()
        if dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            for k, m in self.models.items():
                if any(p.requires_grad for p in m.parameters()) and k in self.optimizers:
                    self.models[k] = nn.parallel.DistributedDataParallel(
                        m, device_ids=ids, find_unused_parameters=self.ddp_find_unused)

    def _check_label_modes(self) -> None:
        """Regions and the ignore label need a trainer whose loss knows them (``label_modes``)."""
        plans = self.source.find_plans()
        if plans is None or self.label_modes or type(self.source) is not CacheSamples:  # graded slices: no labels
            return
        labels = plans.labels
        what = "regions (regions_class_order)" if labels.has_regions else "an ignore label" \
            if labels.ignore_label is not None else None
        if what:
            raise ConfigError(f"{self.source.root}: the dataset declares {what}, which trainer '{self.name}' does not "
                              "support; use trainer.name: supervised")

    # ------------------------------------------------------------------ data
    def make_source(self) -> DataSource:
        """What this trainer trains on, the one data hook (:mod:`medvol.training.sources`):
        patches, or with ``data.configuration: 2d`` slices, of the preprocessing cache here."""
        return CacheSamples.from_recipe(self.cache_dir, self.recipe)

    def after_source(self) -> None:
        """Called once the source is made, before the models: what a trainer derives from its
        data (DC-MT and the aggregator turn epochs into steps here)."""

    def cache_samples(self, purpose: str) -> CacheSamples:
        """The source as patches/slices of a cache, or one ConfigError line naming ``purpose``."""
        if not isinstance(self.source, CacheSamples):
            raise ConfigError(f"{purpose} needs patches of a preprocessing cache, but trainer '{self.name}' trains on "
                              f"a {self.source.kind} ({self.source.root})")
        return self.source

    @property
    def in_channels(self) -> int:
        return self.source.in_channels

    @property
    def num_classes(self) -> int:
        return self.source.num_outputs

    @property
    def batch_size(self) -> int:
        """Per process."""
        return self.source.batch_size

    @property
    def plans(self) -> Plans:
        return self.source.require_plans(f"trainer '{self.name}'")

    @property
    def patch_size(self) -> list[int]:
        return self.cache_samples("the patch size").patch_size

    @property
    def slice_axis(self) -> int | None:
        return self.cache_samples("the slice axis").slice_axis

    # ------------------------------------------------------------------ hooks
    def _freeze_loaded_tensors(self) -> None:
        """``trainer.freeze_init_steps``: the parameters init_from loaded get no update for
        that many steps (their gradients are dropped before the optimiser step, so neither
        momentum nor weight decay moves them). BatchNorm statistics keep adapting."""
        n = self.recipe.trainer.freeze_init_steps
        if not n:
            return
        names = set(self.init_report["loaded"]) if self.init_report else set()
        frozen = [p for k, p in self.models["model"].named_parameters() if k in names]

        def drop_grads(opt, args, kwargs):
            if self.current_step < n:
                for p in frozen:
                    p.grad = None

        self.optimizers["model"].register_step_pre_hook(drop_grads)
        log.info("freezing %d loaded parameter tensors for the first %d steps", len(frozen), n)

    def before_training(self, start_step: int) -> None:
        """Called on every process right before the first step of a run (or of a resume)."""

    def export(self) -> None:
        """Called on the main process after each checkpoint and at the end (e.g. PCRL writes
        ``encoder.pt``)."""

    def _parse_options(self):
        """The recipe's ``method:`` section as ``self.Options`` (None when the trainer takes none):
        the registry's parser, the one ``medvol.training.load_recipe`` checks recipes with."""
        from medvol.training import parse_method

        return parse_method(type(self), self.recipe.method, f"recipe '{self.recipe.name}'")

    def build_models(self) -> dict[str, nn.Module]:
        from medvol.networks import build_model

        src = self.source
        return {"model": build_model(self.recipe.model, src.find_plans(), src.in_channels, src.num_outputs)}

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": make_optimizer(self.recipe.optimizer, self.models["model"].parameters())}

    def make_schedulers(self) -> dict:
        """The recipe's schedule for every optimiser (override for per-optimiser schedules)."""
        return {k: make_scheduler(self.recipe.schedule, o, self.recipe.trainer.steps, o.defaults["lr"])
                for k, o in self.optimizers.items()}

    def streams(self) -> Streams:
        """Batch composition: labelled only, or two streams when the recipe asks for
        ``data.unlabelled_per_batch`` unlabelled samples in every (per-process) batch."""
        u, src = self.recipe.data.unlabelled_per_batch, self.source
        if u and not src.unlabelled:
            raise ConfigError("data.unlabelled_per_batch > 0 but no unlabelled training case (see data.labelled)")
        if u >= src.batch_size:
            raise ConfigError("data.unlabelled_per_batch must leave room for labelled samples in each batch")
        return Streams(src.labelled, src.unlabelled, self.global_batch, u, src.batch_size)

    def make_dataset(self) -> StepDataset:
        """3D patches of the cache, or (``data.configuration: 2d``) 2D slices of it."""
        d, src = self.recipe.data, self.cache_samples("the base trainer's dataset")
        augment = build_augmentation(d.augment, ndim=len(src.patch_size))
        labels = src.slice_labels()
        if d.oversample_grades and labels is None:
            raise ConfigError(f"data.oversample_grades: trainer '{self.recipe.trainer.name}' has no slice grades "
                              "(2d slices of a cache with slice_labels.csv)")
        if src.slice_axis is None:
            return PatchDataset(src.root, self.streams(), src.patch_size, d.oversample_foreground, augment,
                                seed=self.recipe.trainer.seed)
        from medvol.data.slices import SliceDataset

        return SliceDataset(src.root, self.streams(), src.patch_size, src.slice_axis, d.oversample_foreground,
                            augment, seed=self.recipe.trainer.seed, context=src.context,
                            slice_labels=labels, oversample_grades=d.oversample_grades)

    def autocast(self):
        """The run's precision (:mod:`medvol.precision`) as an autocast context."""
        return self.precision.autocast()

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update_steps(self, batch: dict, step: int) -> list[tuple[str, Callable[[], dict]]]:
        """The updates of one step, in order: ``(optimizer key, closure)``. The engine runs each
        closure under autocast after zeroing that optimiser's gradients, back-propagates its
        ``"loss"``, clips (``trainer.grad_clip``, for the keys in ``grad_clip_keys``) and steps
        the optimiser. Default: the single optimiser ``"model"`` on :meth:`training_step`."""
        return [("model", lambda: self.training_step(batch, step))]

    def after_update(self, step: int) -> None:
        """Called once per step after every optimiser of :meth:`update_steps` has stepped (and
        the schedules), e.g. to move an EMA teacher or write keys into a queue."""

    def optimization_step(self, batch: dict, step: int) -> dict[str, float]:
        """One step: every update of :meth:`update_steps` (zero_grad, forward under autocast,
        backward through the scaler, clip, optimiser step), then the scaler's update, every
        schedule's step and :meth:`after_update`. Returns the logged values: each closure's
        terms, and the first closure's ``"loss"`` as ``loss`` (a later closure logs its own
        loss under a name of its own)."""
        logged: dict[str, float] = {}
        for i, (key, closure) in enumerate(self.update_steps(batch, step)):
            opt = self.optimizers[key]
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                terms = closure()
            self.scaler.scale(terms["loss"]).backward()
            clip = self.recipe.trainer.grad_clip
            if clip and key in self.grad_clip_keys:
                self.scaler.unscale_(opt)
                self.clip_gradients(self.models[key].parameters(), clip)
            self.scaler.step(opt)
            logged.update({k: _as_float(v) for k, v in terms.items() if i == 0 or k != "loss"})
        self.scaler.update()
        for s in self.schedulers.values():
            s.step()
        self.after_update(step)
        return logged

    def clip_gradients(self, parameters, limit: float) -> None:
        """``trainer.grad_clip`` on unscaled gradients: the global norm (Inf-Net clamps each element)."""
        nn.utils.clip_grad_norm_(parameters, limit)

    def inference_model(self) -> nn.Module:
        """The network that prediction uses (e.g. an EMA teacher for mean-teacher methods)."""
        return unwrap(self.models[self.inference_key])

    def validation_decoder(self, props: dict):
        """How the validation windows' outputs become probabilities (class softmax, or region
        sigmoids for nnU-Net's regions)."""
        return class_decoder(self.plans.labels.has_regions)

    def validation_probabilities(self, image: np.ndarray, props: dict) -> torch.Tensor:
        """Probabilities of one cached image by the sliding-window path ``medvol predict`` uses
        (float16, Gaussian blending, no TTA, the recipe's ``trainer.val_overlap``)."""
        return sliding_window_probabilities(self.inference_model(), torch.from_numpy(np.array(image, np.float16)),
                                            self.patch_size, self.device, self.validation_decoder(props),
                                            n_channels=self.num_classes, overlap=self.recipe.trainer.val_overlap,
                                            precision=self.precision, slice_axis=self.slice_axis,
                                            context=self.recipe.data.context)

    def class_dice(self, pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        """``val/dice_<name>`` of one case, for every foreground class (or region), the
        voxels of an ignore label left out (:mod:`medvol.labels`)."""
        labels = self.plans.labels
        keep = labels.annotated(ref)
        out = {}
        for name, values in labels.scored().items():
            p, r = np.isin(pred, values), np.isin(ref, values)
            out[f"val/dice_{name}"] = dice(p, r) if keep is None else dice(p & keep, r & keep)
        return out

    def predicted_labels(self, image: np.ndarray, props: dict) -> np.ndarray:
        """The label map predicted for one cached image (:func:`to_labels` of the validation
        probabilities: argmax, or the regions in ``regions_class_order``)."""
        return to_labels(self.validation_probabilities(image, props).numpy(), self.plans.labels)

    def score_case(self, case: str, image: np.ndarray, label: np.ndarray | None, props: dict) -> dict:
        """The scores of one validation case (its cached image, label and properties) in the
        preprocessed space (the label is -1 outside the nonzero mask): ``{name: value}``, each
        value collected over the cases for :meth:`reduce`. Here per-class Dice; an unlabelled
        case scores nothing."""
        if label is None:
            return {}
        return self.class_dice(self.predicted_labels(image, props), np.asarray(label[0]))

    def reduce(self, scores: dict[str, list]) -> dict[str, float]:
        """The validation metrics from every case's scores (``{name: [value per case]}``, names
        in the order first scored): each mean, and ``val/dice_mean``, the mean of those means."""
        return mean_scores(scores)

    def validate(self) -> dict[str, float]:
        """:meth:`score_case` on each validation case, then :meth:`reduce`."""
        scores: dict[str, list] = {}
        for case in self.source.val_cases:
            image, label, props = load_case(self.cache_dir, case)
            for k, v in self.score_case(case, image, label, props).items():
                scores.setdefault(k, []).append(v)
        return self.reduce(scores)

    # ------------------------------------------------------------------ checkpoints
    def state(self, step: int, best: float) -> dict:
        return {
            "format": "medvol-checkpoint-1",
            "trainer": self.name,
            "inference_model": self.inference_key,
            "step": step,
            "best_metric": best,
            "models": {k: unwrap(m).state_dict() for k, m in self.models.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "extra": self.extra_state(),
            **self.source.checkpoint_fields(),
        }

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, extra: dict) -> None:
        pass

    def load_state(self, ckpt: dict) -> tuple[int, float]:
        for k, sd in ckpt["models"].items():
            unwrap(self.models[k]).load_state_dict(sd)
        for k, sd in ckpt["optimizers"].items():
            self.optimizers[k].load_state_dict(sd)
        for k, sd in ckpt["schedulers"].items():
            self.schedulers[k].load_state_dict(sd)
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.load_extra_state(ckpt.get("extra", {}))
        return int(ckpt["step"]), float(ckpt["best_metric"])


def fit(trainer: Trainer, resume: bool = False, stop_at: int | None = None, quiet: bool = False) -> dict:
    """Run (or resume) training; returns the last validation metrics.

    ``stop_at`` stops after that many steps as if interrupted (tests, debugging); the run
    can then be resumed and ends exactly as an uninterrupted one.
    """
    dist, total = trainer.dist, trainer.recipe.trainer.steps
    start, best = setup_run_folder(trainer, resume)
    barrier(dist)
    stop = min(total, stop_at) if stop_at else total
    loop = _Loop(trainer, RunLogger(trainer.run_dir, dist.is_main, start), best)
    t0 = time.perf_counter()
    with PreemptionFlag() as loop.preempt:  # to the end: the final validation stops on it too
        loop.run(start, stop, quiet)
        if dist.is_main and stop < total:  # "interrupted": leave a resumable checkpoint
            save_checkpoint(trainer.run_dir / "checkpoints" / "latest.pt", trainer.state(stop, loop.best))
        write_summary(trainer, loop, stop, time.perf_counter() - t0)
        val_cases = trainer.source.val_cases
        if stop == total and trainer.recipe.trainer.final_validation and trainer.scan_validation and val_cases:
            from medvol.training.final_validation import validate_at_end

            trainer.source.require_plans("the end-of-run validation (trainer.final_validation)")
            validate_at_end(trainer.run_dir, trainer.cache_dir, val_cases, total, trainer.device, dist,
                            trained=start < total, quiet=quiet, flag=loop.preempt)
    return loop.metrics


def setup_run_folder(trainer: Trainer, resume: bool) -> tuple[int, float]:
    """(first step, best score so far): from ``latest.pt`` when resuming, else (0, -inf) after
    the main process wrote the run folder (recipe, plans, dataset.json, split, init report)."""
    run, dist = trainer.run_dir, trainer.dist
    latest = run / "checkpoints" / "latest.pt"
    if resume and latest.exists():
        start, best = trainer.load_state(load_checkpoint(latest, map_location=trainer.device))
        if dist.is_main:
            log.info("resumed from %s at step %d", latest, start)
        return start, best
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_recipe(trainer.recipe, run / "recipe.yaml")
        plans = trainer.source.find_plans()
        if plans is not None:
            write_json(run / "plans.json", plans.raw)
        if (trainer.cache_dir / "dataset.json").exists():
            write_text(run / "dataset.json", (trainer.cache_dir / "dataset.json").read_text())
        write_json(run / "split.json", trainer.source.split())
        if trainer.init_report:
            write_json(run / "init_report.json", trainer.init_report)
    return 0, -np.inf


class _Loop:
    """The step loop of :func:`fit`, with its validation + checkpoint stops and their state."""

    def __init__(self, trainer: Trainer, logger: RunLogger, best: float):
        self.trainer, self.logger, self.best = trainer, logger, best
        self.sign = 1.0 if trainer.higher_is_better else -1.0  # ``best`` is kept as sign * metric
        self.metrics: dict = {}
        self.preempt = PreemptionFlag()

    def run(self, start: int, stop: int, quiet: bool) -> None:
        from tqdm import tqdm

        t, r = self.trainer, self.trainer.recipe
        loader = make_loader(t.make_dataset(), start, stop, t.batch_size, t.dist.rank, t.dist.world_size,
                             r.data.num_workers)
        for m in t.models.values():
            m.train()
        t.before_training(start)
        bar = tqdm(total=stop - start, desc=f"train {r.name}", unit="step",
                   disable=quiet or not t.dist.is_main or not sys.stderr.isatty())
        for step, batch in zip(range(start, stop), loader):
            losses = self.step(step, batch, stop)
            bar.update()
            bar.set_postfix(loss=f"{losses['loss']:.4f}")
            self.after_step(step + 1)
        bar.close()

    def after_step(self, done: int) -> None:
        """Validation + checkpoint every ``val_every`` steps, ``latest.pt`` alone every
        ``checkpoint_every`` steps, and a clean stop when the job is being pre-empted."""
        t, cfg = self.trainer, self.trainer.recipe.trainer
        latest = t.run_dir / "checkpoints" / "latest.pt"
        if done % cfg.val_every == 0 or done == cfg.steps:
            if t.dist.is_main:
                self.validate_and_checkpoint(done - 1)
            barrier(t.dist)
        elif cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and t.dist.is_main:
            save_checkpoint(latest, t.state(done, self.best))
        if self.preempt.requested(t.device, t.dist.distributed):
            if t.dist.is_main:
                save_checkpoint(latest, t.state(done, self.best))
            barrier(t.dist)
            raise Preempted(done, latest)

    def step(self, step: int, batch: dict, stop: int) -> dict[str, float]:
        """One optimisation step, and its log line every ``trainer.log_every`` steps."""
        t = self.trainer
        batch = {k: t.precision.layout(v.to(t.device, non_blocking=True)) if v.is_floating_point() else
                 v.to(t.device, non_blocking=True) for k, v in batch.items()}
        t.current_step = step
        losses = t.optimization_step(batch, step)
        if not all(np.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: {losses}")
        if t.dist.is_main and (step % t.recipe.trainer.log_every == 0 or step + 1 == stop):
            vals = {f"train/{k}": v for k, v in losses.items()}
            vals["train/lr"] = t.optimizers[next(iter(t.optimizers))].param_groups[0]["lr"]
            self.logger.log(step, vals)
        return losses

    def validate_and_checkpoint(self, step: int) -> None:
        """Validate, log, write ``latest.pt`` (and ``best.pt`` when the primary metric improved), export."""
        t, ckpt_dir = self.trainer, self.trainer.run_dir / "checkpoints"
        self.metrics = t.validate()
        self.logger.log(step, self.metrics)
        score = self.sign * self.metrics.get(t.primary_metric, -self.sign * np.inf)
        improved = score > self.best
        self.best = max(self.best, score)
        state = t.state(step + 1, self.best)
        save_checkpoint(ckpt_dir / "latest.pt", state)
        if improved:
            save_checkpoint(ckpt_dir / "best.pt", state)
        t.export()
        self.logger.plot()
        log.info("step %d: %s", step + 1, ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()))


def write_summary(trainer: Trainer, loop: _Loop, stop: int, seconds: float) -> None:
    """``train_summary.json`` (and the final plot and export) on the main process."""
    same = params_identical_across_ranks(unwrap(trainer.models["model"]), trainer.dist)
    if not trainer.dist.is_main:
        return
    loop.logger.plot()
    trainer.export()
    best = loop.best
    write_json(trainer.run_dir / "train_summary.json", {
        "steps_done": stop, "steps_total": trainer.recipe.trainer.steps, "seconds": seconds,
        "world_size": trainer.dist.world_size, "device": str(trainer.device),
        "amp": str(trainer.amp_dtype) if trainer.amp_dtype else "fp32", **trainer.precision.describe(),
        "params_identical_across_ranks": bool(same), "last_validation": loop.metrics,
        "best_metric": loop.sign * best if np.isfinite(best) else None,
    })
