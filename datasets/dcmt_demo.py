"""Synthetic graded slices for DC-MT's demo and tests: the grade is visible inside the region mask.

Each slice is a cartoon of a knee MRI slice: dark fluid above, a bright wavy band (the
"cartilage", the region mask, dilated by 2 pixels) and textured "bone" below, with noise.
A slice's grade is what happens to the band: 0 intact; 1 a narrow notch through 60 % of the
band; 2 a wide notch through the whole band. Each subject (a stack of slices, one band shape per subject) has
a grade drawn from 0-2, and its slices grades up to it, at least one of them equal to it (so
the subject grade is the maximum of its slice grades, DC-MT's rule). Subjects are spread over
5 folds; the demo's labelled subjects are fold 1's, as DC-MT labels the first training fold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvol.datasets.dcmt import GradedSlice, labelled_fold_subjects, region_mask, write_subject_stacks

N_FOLDS = 5


def band_rows(width: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Top row of the band at each column: a gentle wave around the upper middle."""
    x = np.arange(width)
    centre = size * rng.uniform(0.38, 0.5)
    return centre + size * 0.06 * np.sin(2 * np.pi * x / width * rng.uniform(0.5, 1.2) + rng.uniform(0, 2 * np.pi))


def draw_slice(size: int, top: np.ndarray, thickness: float, grade: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(image (1, H, W) float32, band mask (H, W) bool)`` of one slice of the given grade."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    band = (yy >= top[None]) & (yy < top[None] + thickness)
    below = yy >= top[None] + thickness
    image = np.where(below, 0.45 + 0.08 * np.sin(xx / 2.5) * np.cos(yy / 3.0), 0.12).astype(np.float32)
    image[band] = 0.8
    if grade > 0:
        width = rng.uniform(5, 7) if grade == 1 else rng.uniform(12, 16)
        depth = thickness * (0.6 if grade == 1 else 1.0)
        centre = rng.uniform(width, size - width)
        notch = band & (np.abs(xx - centre) < width / 2) & (yy < top[None] + depth)
        image[notch] = 0.12
    image += rng.normal(0, 0.05, image.shape).astype(np.float32)
    return image[None], band


def synthetic_slices(n_subjects: int = 25, slices_per_subject: int = 6, size: int = 64,
                     seed: int = 0) -> tuple[list[GradedSlice], dict[str, int]]:
    """Slices of ``n_subjects`` subjects (``knee_000``...) and each subject's fold (i % 5)."""
    rng = np.random.default_rng(seed)
    slices, folds = [], {}
    for i in range(n_subjects):
        subject = f"knee_{i:03d}"
        folds[subject] = i % N_FOLDS
        grade = int(rng.integers(3))
        grades = rng.integers(0, grade + 1, slices_per_subject)
        grades[rng.choice(slices_per_subject, size=max(1, slices_per_subject // 3), replace=False)] = grade
        top, thickness = band_rows(size, rng, size), rng.uniform(5, 7)
        for z, g in enumerate(grades):
            image, band = draw_slice(size, top + rng.normal(0, 0.5), thickness, int(g), rng)
            region = region_mask(band.astype(np.uint8), None, dilate_px=4)
            slices.append(GradedSlice(subject, f"{subject}_{z}", image, region, int(g)))
    return slices, folds


def build_dcmt_demo(out: str | Path, n_subjects: int = 25, slices_per_subject: int = 6, size: int = 64,
                    seed: int = 0, valid_fold: int = 0) -> Path:
    """Write the demo's raw dataset (labelled subjects: the first fold after ``valid_fold``)."""
    slices, folds = synthetic_slices(n_subjects, slices_per_subject, size, seed)
    return write_subject_stacks(slices, out, labelled=labelled_fold_subjects(folds, valid_fold), folds=folds,
                                name="Dataset042_SyntheticKneeGrades",
                                description="Synthetic knee-like slices; grade = notch in the bright band "
                                            "(label 1, the region mask): 0 none, 1 small, 2 wide")


__all__ = ["synthetic_slices", "build_dcmt_demo", "draw_slice"]
