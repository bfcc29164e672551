"""Adapters: DRIVE, CHASE_DB1 and STARE (retinal vessels) -> medvol's raw layout, and the
vessel demo built from the fundus photograph that scikit-image ships.

Published layouts read (file names as the datasets distribute them):
- DRIVE: ``training/images/21_training.tif``, ``training/1st_manual/21_manual1.gif``,
  ``training/mask/21_training_mask.gif`` (FOV), and ``test/...`` with ``01_test.tif``,
  ``01_manual1.gif``, ``01_test_mask.gif``. ``training`` -> imagesTr, ``test`` -> imagesTs.
- CHASE_DB1: one folder, ``Image_01L.jpg`` with ``Image_01L_1stHO.png`` (first observer;
  ``_2ndHO`` is not read). No FOV masks. The usual split (first 20 images train, last 8 test)
  is ``n_train=20``.
- STARE: ``stare-images/im0001.ppm`` with ``labels-ah/im0001.ah.ppm`` (Hoover's labels; the
  ``.vk`` ones are not read); unzip the published ``.ppm.gz`` first. No FOV masks, no official
  split: ``n_train`` first images train (default all).

CHASE_DB1 and STARE have no FOV masks: :func:`derive_fov` thresholds the red channel (the
FOV's dark surround is near black there) at 15 % of its 99th percentile, fills holes and keeps
the largest connected region. DRIVE's own masks are used as published.

Output (nnU-Net v2 raw layout, one case per image): ``imagesTr/<case>_000{0,1,2}.nii.gz`` (the
red, green and blue channels, channel names ``rgb_to_0_1``: /255), ``labelsTr/<case>.nii.gz``
(0/1 vessels, above half the mask's maximum), ``fovTr/<case>.nii.gz`` (0/1 FOV), and
``imagesTs``/``labelsTs``/``fovTs`` for test images. Every image is a NIfTI of shape
``(H, W, 1)`` (rows, columns, one slice), affine diag(1, 1, 999): the 2D convention of
:mod:`medvol.datasets.covid_semiseg`. Evaluate with ``medvol evaluate --kind vessels --fov RAW/fovTs``.

    python -m medvol.datasets.vessels {drive,chase,stare} SOURCE OUT [--n-train N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from medvol.datasets.covid_semiseg import SLICE_AFFINE
from medvol.errors import InputError, MedvolError, OutputError
from medvol.io import Volume, write_volume
from medvol.io.slices2d import read_image_2d, read_mask_2d
from medvol.utils import atomic_folder, write_json

FOV_FRACTION = 0.15  # of the red channel's 99th percentile: the threshold of derive_fov


def derive_fov(rgb: np.ndarray) -> np.ndarray:
    """The field of view of a fundus image ``(3, H, W)``: red > 15 % of its 99th percentile,
    holes filled, the largest connected region; ``(H, W)`` bool."""
    from scipy import ndimage

    red = rgb[0].astype(np.float64)
    inside = ndimage.binary_fill_holes(red > FOV_FRACTION * np.percentile(red, 99))
    regions, n = ndimage.label(inside)
    if n == 0:
        return inside
    sizes = np.bincount(regions.ravel())[1:]
    return regions == 1 + int(np.argmax(sizes))


def _rgb(path: Path) -> np.ndarray:
    """An RGB fundus image as ``(3, H, W)`` float32 (a grey image is refused)."""
    img = read_image_2d(path)
    if img.shape[0] != 3:
        raise InputError(path, f"expected an RGB fundus image, got {img.shape[0]} channel(s)")
    return img


def _gif_mask(path: Path) -> np.ndarray:
    """A GIF mask (DRIVE's): its first frame, one channel (imageio gives GIFs as RGB frames)."""
    import imageio.v3 as iio

    _need(path, "mask")
    try:
        arr = np.asarray(iio.imread(path, index=0))
    except Exception as e:  # imageio's plugins raise many types for bad files
        raise InputError(path, f"not a readable GIF ({type(e).__name__}: {e})") from None
    if arr.ndim == 3:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1])):
            raise InputError(path, f"a mask must have one channel (or equal ones), got shape {arr.shape}")
        arr = arr[..., 0]
    return arr


def _binary(path: Path, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A 0/1 mask (``(H, W)`` uint8, above half its maximum), checked against ``shape``."""
    m = _gif_mask(path) if path.suffix.lower() == ".gif" else read_mask_2d(path)
    if m.shape != tuple(shape):
        raise InputError(path, f"{what} shape {m.shape} differs from its image's {tuple(shape)}")
    top = int(m.max())
    return (m > top / 2).astype(np.uint8) if top > 0 else np.zeros(m.shape, np.uint8)


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(path, f"{what} not found (expected by the published layout)")
    return path


def drive_pairs(root: Path) -> list[tuple[str, str, Path, Path, Path | None]]:
    """``(split, case, image, vessels, fov)`` of a DRIVE folder (``training/`` and ``test/``)."""
    out = []
    for split, folder in (("Tr", "training"), ("Ts", "test")):
        images = sorted((root / folder / "images").glob("*.tif")) if (root / folder).is_dir() else []
        for img in images:
            num = img.stem.split("_")[0]
            out.append((split, f"drive_{num}", img,
                        _need(root / folder / "1st_manual" / f"{num}_manual1.gif", "vessel mask"),
                        _need(root / folder / "mask" / f"{img.stem}_mask.gif", "FOV mask")))
    if not out:
        raise InputError(root, "no DRIVE images (expected training/images/*.tif and/or test/images/*.tif)")
    return out


def _split(pairs: list, n_train: int | None) -> list[tuple[str, str, Path, Path, Path | None]]:
    n = len(pairs) if n_train is None else n_train
    return [("Tr" if i < n else "Ts", *p) for i, p in enumerate(pairs)]


def chase_pairs(root: Path, n_train: int | None = 20) -> list[tuple[str, str, Path, Path, Path | None]]:
    """CHASE_DB1: ``Image_NNx.jpg`` + ``Image_NNx_1stHO.png``; the first ``n_train`` train."""
    images = sorted(root.glob("Image_*.jpg"))
    if not images:
        raise InputError(root, "no CHASE_DB1 images (expected Image_01L.jpg, ...)")
    pairs = [(f"chase_{p.stem[len('Image_'):]}", p, _need(root / f"{p.stem}_1stHO.png", "vessel mask"), None)
             for p in images]
    return _split(pairs, n_train)


def stare_pairs(root: Path, n_train: int | None = None) -> list[tuple[str, str, Path, Path, Path | None]]:
    """STARE: ``stare-images/imNNNN.ppm`` + ``labels-ah/imNNNN.ah.ppm``; the first ``n_train`` train."""
    images = sorted((root / "stare-images").glob("*.ppm"))
    if not images:
        raise InputError(root, "no STARE images (expected stare-images/im0001.ppm, ...; unzip .ppm.gz first)")
    pairs = [(f"stare_{p.stem}", p, _need(root / "labels-ah" / f"{p.stem}.ah.ppm", "vessel mask"), None)
             for p in images]
    return _split(pairs, n_train)


def write_case(out: Path, split: str, case: str, rgb: np.ndarray, vessels: np.ndarray, fov: np.ndarray) -> None:
    """One case: three channel NIfTIs, the vessel label and the FOV mask, each ``(H, W, 1)``."""
    for c in range(3):
        channel = Volume(rgb[c][..., None].astype(np.float32), SLICE_AFFINE)
        write_volume(channel, out / f"images{split}" / f"{case}_{c:04d}.nii.gz")
    write_volume(Volume(vessels.astype(np.uint8)[..., None], SLICE_AFFINE), out / f"labels{split}" / f"{case}.nii.gz")
    write_volume(Volume(fov.astype(np.uint8)[..., None], SLICE_AFFINE), out / f"fov{split}" / f"{case}.nii.gz")


def _convert(pairs, out: Path, name: str) -> None:
    ids, train = {}, []
    for split, case, img, vessel_path, fov_path in pairs:
        rgb = _rgb(img)
        vessels = _binary(vessel_path, rgb.shape[1:], "vessel mask")
        fov = _binary(fov_path, rgb.shape[1:], "FOV mask") if fov_path is not None else derive_fov(rgb)
        write_case(out, split, case, rgb, vessels, fov)
        ids[case] = str(img)
        if split == "Tr":
            train.append(case)
    write_json(out / "dataset.json", dataset_json(name, len(train), ids, fov_derived=pairs[0][4] is None))


def dataset_json(name: str, n_train: int, ids: dict, fov_derived: bool) -> dict:
    how = "derived by thresholding (medvol.datasets.vessels.derive_fov)" if fov_derived else "as published"
    fov = f"FOV masks (fovTr/, fovTs/) {how}"
    return {"name": name, "description": f"{name} retinal vessels, one image a case (RGB as 3 channels); {fov}",
            "channel_names": {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"},
            "labels": {"background": 0, "vessel": 1}, "numTraining": n_train, "file_ending": ".nii.gz",
            "source_ids": ids}


def convert(layout: str, source: str | Path, out: str | Path, n_train: int | None = None) -> Path:
    """Write ``out`` from a published ``layout`` (``drive``, ``chase``, ``stare``) folder;
    into a hidden sibling folder renamed when complete (a bad file leaves nothing); ``out``
    must not exist yet, or be empty."""
    source, out = Path(source), Path(out)
    finders = {"drive": lambda: drive_pairs(source),
               "chase": lambda: chase_pairs(source, 20 if n_train is None else n_train),
               "stare": lambda: stare_pairs(source, n_train)}
    if layout not in finders:
        raise InputError(source, f"unknown layout '{layout}': drive, chase or stare")
    pairs = finders[layout]()
    with atomic_folder(out) as staging:
        _convert(pairs, staging, {"drive": "DRIVE", "chase": "CHASE_DB1", "stare": "STARE"}[layout])
    return out


# ---------------------------------------------------------------- demo: skimage's fundus photograph

def frangi_reference(rgb: np.ndarray, fov: np.ndarray, fraction: float = 0.12) -> np.ndarray:
    """A vessel reference from a Frangi filter (dark ridges of the green channel, sigmas 1-3 px):
    the ``fraction`` of FOV pixels (4 px in from its rim) with the highest response. A filter's output, not a manual
    annotation: it makes a learnable, reproducible target from a real fundus photograph."""
    from scipy import ndimage
    from skimage.filters import frangi

    green = rgb[1].astype(np.float64) / 255.0
    response = frangi(green, sigmas=(1.0, 2.0, 3.0), black_ridges=True)
    inner = ndimage.binary_erosion(fov, iterations=4)  # the FOV's rim is a dark-to-bright ridge itself
    response[~inner] = 0
    cut = np.quantile(response[inner], 1.0 - fraction)
    return (response > cut) & inner


def write_demo(out: str | Path, size: int = 256, tile: int = 64, n_test: int = 4) -> Path:
    """The vessel demo: scikit-image's bundled fundus photograph (``skimage/data/retina.jpg``,
    1411 x 1411, shipped inside the wheel: nothing is downloaded) resized to ``size``; its FOV by
    :func:`derive_fov`, its vessel reference by :func:`frangi_reference`; cut into
    ``tile`` x ``tile`` cases (those with some FOV), the last ``n_test`` as test cases."""
    from pathlib import Path as _P

    import imageio.v3 as iio
    import skimage
    from skimage.transform import resize

    photo = _P(skimage.__file__).parent / "data" / "retina.jpg"
    rgb = np.moveaxis(np.asarray(iio.imread(photo)), -1, 0).astype(np.float64)
    rgb = np.stack([resize(c, (size, size), order=1, anti_aliasing=True, preserve_range=True) for c in rgb])
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.float32)
    fov = derive_fov(rgb)
    vessels = frangi_reference(rgb, fov)
    tiles = [(r, c) for r in range(0, size - tile + 1, tile) for c in range(0, size - tile + 1, tile)
             if fov[r:r + tile, c:c + tile].mean() > 0.5]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OutputError(out, "exists and is not an empty folder: choose a new one (nothing is overwritten)")
    ids, n_train = {}, len(tiles) - n_test
    for i, (r, c) in enumerate(tiles):
        case, split = f"retina_r{r:03d}c{c:03d}", "Tr" if i < n_train else "Ts"
        sl = (slice(r, r + tile), slice(c, c + tile))
        write_case(out, split, case, rgb[(slice(None), *sl)], vessels[sl], fov[sl])
        ids[case] = f"skimage/data/retina.jpg resized to {size}, rows {r}:{r + tile}, cols {c}:{c + tile}"
    meta = dataset_json("RetinaDemo", n_train, ids, fov_derived=True)
    meta["description"] = ("scikit-image's fundus photograph in tiles; vessels from a Frangi filter (not a manual "
                           "annotation); FOV masks (fovTr/, fovTs/) derived by thresholding")
    write_json(out / "dataset.json", meta)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medvol.datasets.vessels", description=__doc__.split("\n\n")[0])
    p.add_argument("layout", choices=["drive", "chase", "stare", "demo"])
    p.add_argument("source", type=Path, help="the dataset's folder as published (ignored for demo)")
    p.add_argument("out", type=Path, help="the raw dataset folder to write, e.g. raw/Dataset060_DRIVE")
    p.add_argument("--n-train", type=int, default=None, help="CHASE_DB1/STARE: the first N images train")
    a = p.parse_args(argv)
    try:
        path = write_demo(a.out) if a.layout == "demo" else convert(a.layout, a.source, a.out, a.n_train)
    except MedvolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"raw dataset -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
