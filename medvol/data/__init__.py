"""Training data over the preprocessing cache: patch sampling, augmentation, batch composition."""

from medvol.data.augment import build_augmentation, seed_transforms
from medvol.data.dataset import PatchDataset, StepSampler, Streams, make_loader, split_cases, training_cases
from medvol.data.sampling import choose_patch_start, extract_patch, patch_bounds
from medvol.data.slices import SliceDataset, slice_config

__all__ = ["PatchDataset", "StepSampler", "Streams", "make_loader", "split_cases", "training_cases",
           "build_augmentation", "seed_transforms", "choose_patch_start", "extract_patch", "patch_bounds",
           "SliceDataset", "slice_config"]
