"""Adapter: RIGA (optic disc and cup, six ophthalmologists) as MRNet's authors publish it ->
medvol's multi-rater raw layout.

Source layout (the "RIGA benchmark" linked from jiwei0921/MRNet, read as its
``utils/dataset_loader_cvpr.py`` reads it): ``ROOT/Glaucoma_multirater_<split>.csv`` per split,
with columns ``imgName`` and ``maskName`` (paths under ROOT, ``\\`` or ``/``) and ``rater``;
the rows with ``rater == 0`` list the images, and rater n's mask (n = 1..6) is ``maskName``
with ``FinalLabel`` replaced by ``Rater<n>``. Masks are grey: 0 background, about 128 the disc
outside the cup, 255 the cup (the loader's ``disc = mask != 0``, ``cup = mask == 255``).

Output (nnU-Net v2 with ``raters``): per image ``images{Tr,Ts}/<case>_000{0,1,2}.nii.gz`` (R, G,
B as three channels, ``(H, W, 1)``, affine diag(1, 1, 999, 1): nnU-Net's 2D convention) and
``labels{Tr,Ts}/<case>_r<k>.nii.gz`` for rater k = 0..5 (Rater1..Rater6): 0 background,
1 optic disc outside the cup, 2 optic cup (the disc is labels 1 and 2). With ``size`` the
images are resized (bilinear; masks nearest) to ``size`` x ``size`` as the authors train at
256. Splits named in ``train_splits`` go to imagesTr, the others to imagesTs.

The original RIGA release (rater outlines drawn over each image, ``imageN-K.tif``) is not read:
its contours would first have to be filled into masks.

    python -m medvol.datasets.riga ROOT OUT [--train-splits train] [--size 256]
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.io import Volume, write_volume
from medvol.io.slices2d import read_image_2d, read_mask_2d
from medvol.utils import write_json

SLICE_AFFINE = np.diag([1.0, 1.0, 999.0, 1.0])
RATERS = [f"Rater{n}" for n in range(1, 7)]
LABELS = {"background": 0, "optic_disc": 1, "optic_cup": 2}
_CSV = re.compile(r"^Glaucoma_multirater_(?P<split>.+)\.csv$")


def read_split(root: Path, csv_path: Path) -> list[tuple[Path, list[Path]]]:
    """``[(image, [mask of Rater1, ..., Rater6])]`` of one split's CSV (its ``rater == 0`` rows)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"imgName", "maskName", "rater"} <= set(rows[0]):
        raise InputError(csv_path, "expected the columns imgName, maskName and rater")
    out = []
    for row in rows:
        if row["rater"].strip() not in ("0", "0.0"):
            continue
        mask = row["maskName"].replace("\\", "/")
        if "FinalLabel" not in mask:
            raise InputError(csv_path, f"maskName {mask!r} has no 'FinalLabel' to replace by Rater1..Rater6")
        out.append((root / row["imgName"].replace("\\", "/"),
                    [root / mask.replace("FinalLabel", r) for r in RATERS]))
    return out


def rater_label(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """One rater's mask as 0 background / 1 disc outside the cup / 2 cup, ``(H, W)`` uint8."""
    m = read_mask_2d(path)
    if m.shape != tuple(shape):
        raise InputError(path, f"mask shape {m.shape} differs from its image's {tuple(shape)}")
    top = 255 if m.max() > 1 else 1
    return np.where(m == top, 2, np.where(m != 0, 1, 0)).astype(np.uint8)


def _resized(array: np.ndarray, size: int | None, nearest: bool) -> np.ndarray:
    """``(C, H, W)`` resized to ``(C, size, size)`` (None: unchanged)."""
    if size is None:
        return array
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array, np.float32))[None]
    mode = "nearest" if nearest else "bilinear"
    out = torch.nn.functional.interpolate(t, size=(size, size), mode=mode,
                                          align_corners=None if nearest else False)[0].numpy()
    return out.astype(array.dtype)


def case_id(image: Path, root: Path) -> str:
    """The image's path under ROOT, folders joined by '_', without its extension."""
    rel = image.relative_to(root).with_suffix("")
    return re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(rel.parts))


def convert_riga(root: str | Path, out: str | Path, train_splits: tuple[str, ...] = ("train",),
                 size: int | None = 256) -> Path:
    """Write the multi-rater raw dataset of the RIGA folder ``root`` (see the module docstring)."""
    root, out = Path(root), Path(out)
    splits = {m["split"]: p for p in sorted(root.glob("Glaucoma_multirater_*.csv")) if (m := _CSV.match(p.name))}
    if not splits:
        raise InputError(root, "no Glaucoma_multirater_<split>.csv (the RIGA benchmark of jiwei0921/MRNet)")
    n_train = 0
    for split, csv_path in splits.items():
        part = "Tr" if split in train_splits else "Ts"
        for image_path, masks in read_split(root, csv_path):
            for p in (image_path, *masks):
                if not p.is_file():
                    raise InputError(p, f"listed in {csv_path.name} but missing")
            image = read_image_2d(image_path)[:3]
            case = case_id(image_path, root)
            for c, chan in enumerate(_resized(image, size, nearest=False)):
                write_volume(Volume(chan[..., None], SLICE_AFFINE), out / f"images{part}" / f"{case}_{c:04d}.nii.gz")
            for k, m in enumerate(masks):
                lab = _resized(rater_label(m, image.shape[1:])[None], size, nearest=True)[0]
                write_volume(Volume(lab[..., None], SLICE_AFFINE), out / f"labels{part}" / f"{case}_r{k}.nii.gz")
            n_train += part == "Tr"
    write_json(out / "dataset.json", {
        "name": "Dataset041_RIGA", "description": "RIGA optic disc and cup, six raters (MRNet's release)",
        "reference": "Almazroa et al. 2018 (RIGA); Ji et al. 2021 (MRNet)",
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": LABELS, "raters": RATERS,
        "numTraining": n_train, "file_ending": ".nii.gz"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train-splits", nargs="+", default=["train"])
    ap.add_argument("--size", type=int, default=256, help="resize to SIZE x SIZE (0: keep)")
    a = ap.parse_args(argv)
    print(convert_riga(a.root, a.out, tuple(a.train_splits), a.size or None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
