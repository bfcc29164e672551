"""Adapter: the LA 2018 (left atrium) layout used by semi-supervised work -> medvol's raw layout.

Source layout: ``<root>/train.list`` and ``<root>/test.list`` (one case folder name per
line) and ``<root>/<case>/mri_norm2.h5`` holding ``image`` (float32, already z-scored) and
``label`` (uint8, 0/1). The output is an nnU-Net v2 dataset whose training cases keep the
order of ``train.list`` (``la_000``, ``la_001``, ...; the source names are kept in
``source_ids``) and which declares its first ``labelled`` training cases labelled (16 = 20 %
or 8 = 10 % in the paper); the other labels stay on disk for evaluation. The image channel is
``noNorm`` because the source is already normalised. The h5 files carry no geometry: the
LA MRI voxel size (0.625 mm isotropic) is written as an axis-aligned affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.io import Volume, write_volume
from medvol.utils import write_json

LA_SPACING = (0.625, 0.625, 0.625)


def _read_list(path: Path) -> list[str]:
    if not path.exists():
        raise InputError(path, "missing case list of the LA 2018 layout")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from medvol.io.slices2d import read_h5_volume

    if not path.exists():
        raise InputError(path, "missing: every listed case needs <case>/mri_norm2.h5")
    image, label = read_h5_volume(path)
    if not set(np.unique(label).tolist()) <= {0, 1}:
        raise InputError(path, f"label values {sorted(np.unique(label).tolist())} are not binary")
    return image, label.astype(np.uint8)


def convert_la2018(src: str | Path, out: str | Path, labelled: int = 16, spacing=LA_SPACING) -> Path:
    """Write ``out`` (nnU-Net v2 layout) from the LA 2018 h5 layout at ``src``."""
    src, out = Path(src), Path(out)
    train, test = _read_list(src / "train.list"), _read_list(src / "test.list")
    if labelled > len(train):
        raise InputError(src / "train.list", f"lists {len(train)} cases, fewer than labelled={labelled}")
    affine = np.diag(list(spacing) + [1.0])
    ids = {}
    splits = (("train", train, "imagesTr", "labelsTr"), ("test", test, "imagesTs", "labelsTs"))
    for split, names, img_dir, lab_dir in splits:
        for i, name in enumerate(names):
            case = f"la_{'' if split == 'train' else 'test_'}{i:03d}"
            image, label = _read_h5(src / name / "mri_norm2.h5")
            write_volume(Volume(image, affine), out / img_dir / f"{case}_0000.nii.gz")
            write_volume(Volume(label, affine), out / lab_dir / f"{case}.nii.gz")
            ids[case] = name
    meta = {"name": "LA2018", "description": "Left atrium (2018 Atrial Segmentation Challenge), semi-supervised split",
            "channel_names": {"0": "noNorm"}, "labels": {"background": 0, "left_atrium": 1},
            "numTraining": len(train), "file_ending": ".nii.gz",
            "labelled_cases": [f"la_{i:03d}" for i in range(labelled)], "source_ids": ids}
    write_json(out / "dataset.json", meta)
    return out
