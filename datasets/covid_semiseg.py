"""Adapter: COVID-SemiSeg (Inf-Net's data) -> medvol's raw layout (nnU-Net v2), one case per slice.

Source layout (the Inf-Net repository's ``Dataset/`` folders):
- labelled training slices: ``<train>/Imgs/<name>.jpg`` with ``<train>/GT/<name>.png`` (0/255
  masks) and, in the published data, ``<train>/Edge/<name>.png``;
- unlabelled slices (optional): a folder of images, searched recursively (the published 1600
  sit in 320 sub-folders of 5);
- test slices (optional): ``<test>/Imgs`` + ``<test>/GT``.

Output: ``imagesTr/<case>_0000.nii.gz`` for every training slice, ``labelsTr/<case>.nii.gz``
for the labelled ones, ``imagesTs``/``labelsTs`` for the test slices. Case ids are
``lab_<name>``, ``unl_<name>``, ``test_<name>`` (``source_ids`` in dataset.json maps them back to
the files); ``labelled_cases`` lists the labelled training cases, so the unlabelled ones enter
medvol as unlabelled cases. Every slice is a NIfTI of shape ``(H, W, 1)`` (rows, columns, one
slice) with affine diag(1, 1, 999, 1): nnU-Net's convention for 2D data, the 999-mm spacing
makes the third axis the slice axis of the 2D plan. Images: the mean of the file's colour
channels (the slices are grey stored as RGB), float32. Labels: 0/1 uint8, foreground where the
mask exceeds half its maximum (0/255 and 0/1 masks alike). The channel is named ``zscore``:
per-slice z-score normalisation, as the slices come from several scanners and exports (nnU-Net's
``CT`` scheme would clip every slice to the intensity percentiles of the infected regions).

Edges are not written: the ``Edge/`` masks are Canny edges of ``GT``, and medvol's Inf-Net
trainer computes the edge target of every label, pseudo-labels included, on the batch after
augmentation and rescaling (:func:`medvol.losses.structure.mask_edges`), so no edge file can
disagree with the label it belongs to. A given ``Edge/`` folder is therefore not read.

    python -m medvol.datasets.covid_semiseg TRAIN OUT [--unlabelled DIR] [--test DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from medvol.errors import InputError, MedvolError
from medvol.io import Volume, write_volume
from medvol.io.slices2d import IMAGE_SUFFIXES, files_by_stem, read_image_2d, read_mask_2d
from medvol.utils import atomic_folder, write_json

SLICE_AFFINE = np.diag([1.0, 1.0, 999.0, 1.0])
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _images(folder: Path, recursive: bool = False) -> dict[str, Path]:
    """``{stem: file}`` of the images in ``folder`` (sorted); stems become case ids."""
    found = files_by_stem(folder, IMAGE_SUFFIXES, recursive)
    for stem, p in found.items():
        if not _NAME.match(stem):
            raise InputError(p, "file names must be letters, digits, '.', '_' or '-' (they become case ids)")
    return found


def grey_slice(path: Path) -> np.ndarray:
    """The image as ``(H, W, 1)`` float32, the mean of its channels."""
    return read_image_2d(path).mean(axis=0)[..., None].astype(np.float32)


def binary_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The mask as ``(H, W, 1)`` uint8 0/1 (above half its maximum), checked against ``shape``."""
    m = read_mask_2d(path)
    if m.shape != tuple(shape):
        raise InputError(path, f"mask shape {m.shape} differs from its image's {tuple(shape)}")
    top = int(m.max())
    return ((m > top / 2) if top > 0 else np.zeros_like(m, bool))[..., None].astype(np.uint8)


def _write_pairs(folder: Path, prefix: str, out: Path, img_dir: str, lab_dir: str, ids: dict) -> list[str]:
    """``folder/Imgs`` with their ``folder/GT`` masks; returns the case ids."""
    masks = _images(folder / "GT")
    cases = []
    for stem, img_path in _images(folder / "Imgs").items():
        if stem not in masks:
            raise InputError(img_path, f"no mask named '{stem}.*' in {folder / 'GT'}")
        image = grey_slice(img_path)
        case = f"{prefix}_{stem}"
        write_volume(Volume(image, SLICE_AFFINE), out / img_dir / f"{case}_0000.nii.gz")
        write_volume(Volume(binary_mask(masks[stem], image.shape[:2]), SLICE_AFFINE), out / lab_dir / f"{case}.nii.gz")
        ids[case] = str(img_path)
        cases.append(case)
    return cases


def convert_covid_semiseg(train: str | Path, out: str | Path, unlabelled: str | Path | None = None,
                          test: str | Path | None = None, label_name: str = "infection") -> Path:
    """Write ``out`` (nnU-Net v2 layout) from the COVID-SemiSeg folders; returns ``out``.
    ``label_name``: the foreground's name in dataset.json (the same layout holds other targets).
    Written into a hidden sibling folder renamed to ``out`` when complete: a bad slice leaves
    nothing behind; ``out`` must not exist yet, or be empty."""
    out = Path(out)
    with atomic_folder(out) as staging:
        _convert(Path(train), staging, unlabelled, test, label_name)
    return out


def _convert(train: Path, out: Path, unlabelled, test, label_name: str) -> None:
    ids: dict[str, str] = {}
    labelled = _write_pairs(train, "lab", out, "imagesTr", "labelsTr", ids)
    n_unlabelled = 0
    if unlabelled is not None:
        for stem, path in _images(Path(unlabelled), recursive=True).items():
            case = f"unl_{stem}"
            write_volume(Volume(grey_slice(path), SLICE_AFFINE), out / "imagesTr" / f"{case}_0000.nii.gz")
            ids[case] = str(path)
            n_unlabelled += 1
    if test is not None:
        _write_pairs(Path(test), "test", out, "imagesTs", "labelsTs", ids)
    meta = {"name": "COVID-SemiSeg", "description": "Lung infection in CT slices (Inf-Net), one case per slice",
            "channel_names": {"0": "zscore"}, "labels": {"background": 0, label_name: 1},
            "numTraining": len(labelled) + n_unlabelled, "file_ending": ".nii.gz",
            "labelled_cases": labelled, "source_ids": ids}
    write_json(out / "dataset.json", meta)


def write_demo_layout(root: str | Path, n_labelled: int = 8, n_unlabelled: int = 8, n_test: int = 4,
                      size: int = 48, seed: int = 0) -> Path:
    """A small synthetic COVID-SemiSeg layout (``train/``, ``unlabelled/``, ``test/``) for demos and
    tests: a grey body, two dark lungs, bright irregular "infection" blobs inside the lungs,
    noise; JPEG images (RGB) and 0/255 PNG masks, as the real folders hold them."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_labelled), ("unlabelled", n_unlabelled), ("test", n_test)):
        write_split(root, split, [_demo_slice(size, rng) for _ in range(n)])
    return root


def write_split(root: Path, split: str, slices) -> None:
    """``(grey uint8, mask)`` slices as one split of the layout: ``root/<split>/Imgs/*.jpg`` (RGB)
    and ``GT/*.png`` (0/255), or the images alone in ``root/unlabelled/``; names ``<sp><iii>``."""
    for i, (grey, mask) in enumerate(slices):
        name = f"{split[:2]}{i:03d}"
        img_dir = root / split if split == "unlabelled" else root / split / "Imgs"
        img_dir.mkdir(parents=True, exist_ok=True)
        iio_write(img_dir / f"{name}.jpg", np.stack([grey] * 3, -1))
        if split != "unlabelled":
            (root / split / "GT").mkdir(exist_ok=True)
            iio_write(root / split / "GT" / f"{name}.png", (255 * mask).astype(np.uint8))


def _demo_slice(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size] / size
    body = ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.48) ** 2 <= 1
    lungs = [((yy - 0.48) / 0.3) ** 2 + ((xx - cx) / 0.16) ** 2 <= 1 for cx in (0.3, 0.7)]
    lung = lungs[0] | lungs[1]
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.3, 0.66), rng.choice([0.3, 0.7]) + rng.uniform(-0.08, 0.08)
        ry, rx = rng.uniform(0.05, 0.12, 2)
        wobble = 1 + 0.25 * np.sin(rng.uniform(2, 5) * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 6))
        mask |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= wobble
    mask &= lung
    grey = 30 + 120 * body - 90 * lung + 80 * mask + rng.normal(0, 12, (size, size))
    return np.clip(grey, 0, 255).astype(np.uint8), mask


def iio_write(path: Path, array: np.ndarray) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, array)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medvol.datasets.covid_semiseg", description=__doc__.split("\n")[0])
    p.add_argument("train", help="folder with Imgs/ and GT/ (the labelled training slices)")
    p.add_argument("out", help="raw dataset folder to write (e.g. raw/Dataset050_COVIDSemiSeg)")
    p.add_argument("--unlabelled", help="folder of unlabelled slices (searched recursively)")
    p.add_argument("--test", help="folder with Imgs/ and GT/ (the test slices)")
    a = p.parse_args(argv)
    try:
        print(convert_covid_semiseg(a.train, a.out, a.unlabelled, a.test))
    except MedvolError as e:  # one line naming the file, as medvol's commands say it
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
