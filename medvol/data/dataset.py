"""Training data over the preprocessing cache.

Sampling is a pure function of ``(seed, step, slot)``, where ``slot`` is a sample's position
in the *global* batch (all processes together). That makes resumed runs reproduce
uninterrupted ones exactly, and makes a run on N processes with per-process batch b draw
the same samples as one process with batch N*b: process ``r`` simply takes slots
``r*b .. r*b+b-1`` of each step.

Batch composition (slots are filled in this order):
- labelled only: every slot from the labelled training cases;
- two streams (semi-supervised): in *every process's* batch of b the first ``b - u`` slots
  are labelled and the last ``u`` come from the unlabelled cases (their label is all -1 and
  ``labelled`` is False);
- partial labels: each sample also carries whatever per-case fields the cache properties
  hold for it (``task_id``, ``annotated`` channels...), passed through unchanged.
Of the labelled slots of the global batch (counted across processes) the last
``round(n_labelled * oversample)`` are centred on foreground, as nnU-Net does per batch position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medvol.cache import list_cases, load_case
from medvol.data.augment import build_augmentation, seed_transforms
from medvol.data.sampling import choose_patch_start, extract_patch

PASSTHROUGH_KEYS = ("task_id", "annotated")


log = logging.getLogger(__name__)


def split_cases(cases: list[str], val_fraction: float, val_cases: list | None, seed: int) -> tuple[list, list]:
    """(train, val): explicit ``val_cases``, else a seeded ``val_fraction`` (at least one
    validation case when there are two or more cases)."""
    if val_cases:
        missing = sorted(set(val_cases) - set(cases))
        if missing:
            from medvol.errors import ConfigError

            raise ConfigError(f"data.val_cases: not in the cache: {missing}")
        return [c for c in cases if c not in val_cases], [c for c in cases if c in val_cases]
    n_val = int(round(len(cases) * val_fraction))
    if val_fraction > 0 and len(cases) > 1:
        n_val = max(n_val, 1)
    order = np.random.default_rng(seed).permutation(len(cases))
    val = sorted(cases[i] for i in order[:n_val])
    return [c for c in cases if c not in val], val


@dataclass
class Streams:
    labelled: list[str]
    unlabelled: list[str]
    global_batch: int
    unlabelled_per_batch: int = 0  # per process batch
    per_process_batch: int | None = None  # None: one process

    @property
    def b(self) -> int:
        return self.per_process_batch or self.global_batch

    def labelled_slots(self) -> int:
        """Labelled slots in the global batch."""
        return (self.global_batch // self.b) * (self.b - self.unlabelled_per_batch)

    def labelled_index(self, slot: int) -> int | None:
        """Position of ``slot`` among the global batch's labelled slots, or None if unlabelled."""
        proc, local = divmod(slot, self.b)
        per = self.b - self.unlabelled_per_batch
        return proc * per + local if local < per else None


class StepDataset(Dataset):
    """Base of the training datasets: item ``step * global_batch + slot`` is a pure function of
    ``(seed, step, slot)``, so exact resume and DDP equivalence follow. The base owns the
    indexing and the one seeded generator (:meth:`rng`); a subclass implements
    :meth:`sample` ``(step, slot, rng)``, drawing everything random from ``rng``."""

    def __init__(self, global_batch: int, seed: int = 0):
        self.global_batch, self.seed = int(global_batch), int(seed)

    def __len__(self) -> int:  # effectively unbounded; the sampler decides what is drawn
        return 2**62

    def rng(self, step: int, slot: int) -> np.random.Generator:
        """The generator of ``(seed, step, slot)``: the only source of randomness of an item."""
        return np.random.default_rng([self.seed, step, slot])

    def item(self, step: int, slot: int) -> dict:
        """The sample of ``slot`` (of the global batch) at ``step``."""
        return self.sample(step, slot, self.rng(step, slot))

    def sample(self, step: int, slot: int, rng: np.random.Generator) -> dict:
        """The item of ``(step, slot)``, every random draw from ``rng`` (a subclass's one method)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        step, slot = divmod(int(index), self.global_batch)
        return self.item(step, slot)


class PatchDataset(StepDataset):
    """3D patches of the cache's cases (:class:`StepDataset`: item ``step * global_batch + slot``),
    composed as the module docstring says: streams, foreground slots, pass-through keys."""

    def __init__(self, cache_dir, streams: Streams, patch_size: Sequence[int], oversample: float = 0.33,
                 augment=None, seed: int = 0):
        super().__init__(streams.global_batch, seed)
        self.cache_dir = str(cache_dir)
        self.streams = streams
        self.patch = [int(p) for p in patch_size]
        self.oversample = oversample
        self.transform = augment
        self._cases: dict = {}  # per worker process: case id -> (image memmap, label memmap, props)
        nl = streams.labelled_slots()
        self.first_fg_slot = int(round(nl * (1 - oversample)))

    def _case(self, case_id: str):
        if case_id not in self._cases:
            self._cases[case_id] = load_case(self.cache_dir, case_id, mmap=True)
        return self._cases[case_id]

    def sample(self, step: int, slot: int, rng: np.random.Generator) -> dict:
        image, label, props, labelled_slot, force_fg = self._draw_case(rng, slot)
        start, _ = choose_patch_start(image.shape[1:], self.patch, rng, props.get("class_locations"), force_fg)
        img = extract_patch(image, start, self.patch, 0.0)
        lab = extract_patch(label, start, self.patch, -1) if label is not None and labelled_slot else None
        return self._finish(img, lab, rng, props, slot)

    def _draw_case(self, rng: np.random.Generator, slot: int):
        """``(image, label, props, labelled slot?, centre on foreground?)`` of the case drawn for ``slot``."""
        index = self.streams.labelled_index(slot)
        labelled_slot = index is not None
        pool = self.streams.labelled if labelled_slot else self.streams.unlabelled
        case_id = pool[int(rng.integers(len(pool)))]
        image, label, props = self._case(case_id)
        return image, label, props, labelled_slot, index is not None and index >= self.first_fg_slot

    def _finish(self, img: np.ndarray, lab: np.ndarray | None, rng: np.random.Generator, props: dict,
                slot: int) -> dict:
        """The sample dict from an image patch and its label patch (None: unlabelled), augmented."""
        img = img.astype(np.float32, copy=False)
        labelled = lab is not None
        if lab is not None:
            lab = lab.astype(np.int64)
            lab[lab < 0] = 0  # outside the nonzero mask counts as background for the loss
        else:
            lab = np.full((1,) + img.shape[1:], -1, np.int64)  # unlabelled: no target
        out = {"image": torch.from_numpy(img), "label": torch.from_numpy(lab)}
        if self.transform is not None:
            seed_transforms(self.transform, int(rng.integers(2**31)))
            out = self.transform(out)
            # plain tensors: MONAI's MetaTensor would carry its per-op overhead into the network
            out = {k: (v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)) for k, v in out.items()}
            out = {"image": out["image"].float(), "label": out["label"].long()}
        out["labelled"] = torch.tensor(labelled)
        out["slot"] = torch.tensor(slot)
        for k in PASSTHROUGH_KEYS:
            if k in props:
                out[k] = torch.as_tensor(props[k])
        return out


class StepSampler(Sampler):
    """Yields this process's dataset indices for steps ``start .. stop-1``."""

    def __init__(self, start_step: int, stop_step: int, global_batch: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.start, self.stop, self.B = start_step, stop_step, global_batch
        self.b = global_batch // world_size
        self.rank = rank

    def __iter__(self):
        for step in range(self.start, self.stop):
            base = step * self.B + self.rank * self.b
            yield from range(base, base + self.b)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.b


def make_loader(dataset: StepDataset, start_step: int, stop_step: int, per_process_batch: int, rank: int,
                world_size: int, num_workers: int | None) -> DataLoader:
    """Batches of ``dataset`` for steps ``start_step``..``stop_step`` of this rank; ``num_workers`` None: one
    per core but one, at most 12."""
    import os

    if num_workers is None:
        num_workers = max(1, min(12, (os.cpu_count() or 2) - 1))
    sampler = StepSampler(start_step, stop_step, per_process_batch * world_size, rank, world_size)
    # Its own generator: the loader's base seed must not draw from the global RNG, whose
    # state (dropout masks...) a resumed run restores from the checkpoint.
    return DataLoader(dataset, batch_size=per_process_batch, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(dataset.seed + start_step))


def training_cases(cache_dir, data_cfg, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(labelled train, unlabelled train, validation) case ids from the cache and the recipe."""
    cases = list_cases(cache_dir)
    has_label = {c: load_case(cache_dir, c)[2].get("has_label", False) for c in cases}
    if data_cfg.fold is not None and not data_cfg.val_cases:
        from medvol.data.splits import fold_cases

        train, val = fold_cases(cache_dir, cases, data_cfg.fold)
    else:
        if data_cfg.fold is not None:
            log.warning("data.val_cases is set: it wins over fold %s", data_cfg.fold)
        # a seeded fraction is drawn from the labelled cases: an unlabelled case cannot be scored
        pool = cases if data_cfg.val_cases else [c for c in cases if has_label[c]]
        train, val = split_cases(pool, data_cfg.val_fraction, data_cfg.val_cases, seed)
        train += [c for c in cases if c not in pool]
    unscored = [c for c in val if not has_label[c]]
    if unscored and data_cfg.val_cases:
        from medvol.errors import ConfigError

        raise ConfigError(f"data.val_cases: cases without a label cannot be validated: {unscored}")
    if unscored:  # a fold's unlabelled cases: nothing to score, so they join the unlabelled pool
        val = [c for c in val if has_label[c]]
        train += unscored
    labelled = [c for c in train if has_label[c]]
    unlabelled = [c for c in train if not has_label[c]]
    wanted = data_cfg.labelled
    if wanted is None:  # the dataset's own semi-supervised split, when it declares one
        from pathlib import Path

        from medvol.utils import read_json

        dj = Path(cache_dir) / "dataset.json"
        wanted = read_json(dj).get("labelled_cases") if dj.exists() else None
    if isinstance(wanted, int):
        keep = labelled[:wanted]
        unlabelled += [c for c in labelled if c not in keep]
        labelled = keep
    elif isinstance(wanted, list):
        unlabelled += [c for c in labelled if c not in wanted]
        labelled = [c for c in labelled if c in wanted]
    return labelled, unlabelled, val


__all__ = ["PatchDataset", "StepDataset", "StepSampler", "Streams", "make_loader", "split_cases", "training_cases",
           "build_augmentation"]
