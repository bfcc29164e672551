"""Multi-rater demo data built from the real MNI152 grey-matter probability map (nilearn).

The "raters" are not people: each is the template's grey-matter probability (0-1, after
resampling to the case's spacing) plus a smooth random field (seeded per case and rater, a
Gaussian-smoothed noise volume scaled to ``perturbation``, which moves the boundary by a few
voxels here and there), thresholded at that rater's strictness (``RATER_THRESHOLDS``: a
lenient, a middle and a strict rater by default). They disagree where a real panel would:
along the grey-matter boundary. Images are the template's T1 (its real intensities) at the
case's spacing with a little seeded noise. Source:
``nilearn/datasets/data/mni_icbm152_{t1,gm}_tal_nlin_sym_09a_converted.nii.gz``.

Layout written (nnU-Net v2 plus medvol's multi-rater extension): ``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>_r<k>.nii.gz`` for rater k, the same under ``imagesTs``/``labelsTs``, and
``dataset.json`` with ``"raters"``.

    python -m medvol.datasets.multirater OUT [--train 6] [--test 2] [--spacing 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from medvol.datasets.brain import _resample, load_template
from medvol.io import Volume, write_volume
from medvol.utils import write_json

RATER_THRESHOLDS = {"lenient": 0.3, "middle": 0.5, "strict": 0.7}
LABELS = {"background": 0, "grey_matter": 1}


def rater_labels(gm: np.ndarray, thresholds: dict[str, float], perturbation: float, smooth: float,
                 seed: int) -> list[np.ndarray]:
    """One uint8 0/1 map per rater: ``gm`` plus a smooth seeded field (std ``perturbation``),
    above the rater's threshold."""
    out = []
    for k, t in enumerate(thresholds.values()):
        rng = np.random.default_rng([seed, k])
        field = ndimage.gaussian_filter(rng.normal(size=gm.shape), smooth)
        field *= perturbation / max(float(field.std()), 1e-8)
        out.append(((gm + field) > t).astype(np.uint8))
    return out


def make_multirater_case(spacing: float, seed: int, thresholds: dict[str, float] = RATER_THRESHOLDS,
                         perturbation: float = 0.1, smooth: float = 2.0, noise: float = 0.02
                         ) -> tuple[Volume, list[Volume]]:
    """(T1 image, one label volume per rater) of the template at ``spacing`` mm."""
    t1, probs, affine = load_template()
    stacked, affine = _resample(np.stack([t1, probs[1]]), affine, (1.0, 1.0, 1.0), (spacing,) * 3, order=1)
    image, gm = stacked[0], stacked[1]
    image[image < 1e-3] = 0
    rng = np.random.default_rng([seed, 999])
    head = image > 0
    image[head] = np.maximum(image[head] + rng.normal(0, noise * np.percentile(image[head], 99), head.sum()), 1e-3)
    labels = rater_labels(gm * head, thresholds, perturbation, smooth, seed)
    return Volume(image.astype(np.float32), affine, {}), [Volume(lab, affine, {}) for lab in labels]


def build_multirater_dataset(out: str | Path, n_train: int = 6, n_test: int = 2, spacing: float = 3.0,
                             thresholds: dict[str, float] = RATER_THRESHOLDS, perturbation: float = 0.1) -> Path:
    """Write the multi-rater grey-matter dataset (see the module docstring); case i uses seed i
    and a spacing within +-10 % of ``spacing``."""
    out = Path(out)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_test):
        image, raters = make_multirater_case(spacing * (0.9 + 0.2 * (i % 3) / 2), seed=i, thresholds=thresholds,
                                             perturbation=perturbation)
        split = "Tr" if i < n_train else "Ts"
        case = f"mni_{i:03d}"
        write_volume(image, out / f"images{split}" / f"{case}_0000.nii.gz")
        for k, lab in enumerate(raters):
            write_volume(lab, out / f"labels{split}" / f"{case}_r{k}.nii.gz")
    write_json(out / "dataset.json", {
        "name": "Dataset040_MultiRaterGM",
        "description": "Grey matter of the MNI152 2009a template (nilearn) drawn by synthetic raters: the real "
                       "probability map plus seeded smooth boundary perturbations, thresholded at "
                       + ", ".join(f"{n} {t}" for n, t in thresholds.items()) + ". Not human annotations.",
        "reference": "Fonov et al. 2009/2011 (MNI ICBM152 2009a); files from the nilearn wheel",
        "channel_names": {"0": "T1"}, "labels": LABELS, "raters": list(thresholds),
        "numTraining": n_train, "file_ending": ".nii.gz"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=6)
    ap.add_argument("--test", type=int, default=2)
    ap.add_argument("--spacing", type=float, default=3.0)
    a = ap.parse_args(argv)
    print(build_multirater_dataset(a.out, a.train, a.test, a.spacing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
