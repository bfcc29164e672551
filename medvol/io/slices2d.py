"""Native 2D datasets: folders of images + masks, HDF5 slice files, slice lists.

Layouts (``docs/methods/{dcmt,infnet,ugpcl}.md``):
- a folder of images (PNG/JPEG/BMP/TIFF through imageio, which scikit-image brings, or 2D
  NIfTI) and optionally a folder of masks paired by file stem (Inf-Net: ``Imgs/x.jpg`` +
  ``GT/x.png``);
- a folder of HDF5 files, one slice each, with ``image`` and optional ``label``, ``masks``
  and ``grade`` (UGPCL's ACDC slices; DC-MT's knee slices, whose ``label`` is a scalar: the
  grade, read as ``grade`` when the file has no ``grade`` of its own). Reading them needs ``h5py``
  (medvol's ``[adapters]`` extra; ``pip install 'medvol[adapters]'``), imported only when an HDF5 file is read;
- slice lists: text files of names (no suffix), one per line, ``#`` comments and blank lines
  ignored (``train_slices.list``).

Arrays: images ``(C, H, W)`` float32 (H the file's rows; grey images get C = 1, RGB C = 3, a
PNG's alpha channel is dropped); labels and masks ``(H, W)`` int64 with the file's own values
(Inf-Net's 0/255 masks stay 0/255: binarise with ``label > 0``); HDF5 ``masks`` may also be
``(K, H, W)``. Every problem is one :class:`medvol.errors.InputError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.io.nifti import NIFTI_SUFFIXES, is_nifti, read_nifti

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
H5_SUFFIXES = (".h5", ".hdf5")


@dataclass
class SliceSet:
    """Named 2D samples; per-sample fields are lists in the order of ``names`` (None: absent)."""

    names: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray | None]
    masks: list[np.ndarray | None] = field(default_factory=list)
    grades: list[int | None] = field(default_factory=list)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES + H5_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_slice_list(path: str | Path) -> list[str]:
    """Names from a slice list; a duplicate name is an error naming the file and line."""
    return list(_slice_list_lines(Path(path)))


def _slice_list_lines(path: Path) -> dict[str, int]:
    """``{name: line number}`` of a slice list, in file order."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read the slice list ({type(e).__name__}: {e})") from None
    names: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if name in names:
            raise InputError(path, f"line {n}: '{name}' repeats line {names[name]}")
        names[name] = n
    if not names:
        raise InputError(path, "the slice list names no slice")
    return names


def read_image_2d(path: str | Path) -> np.ndarray:
    """A 2D image file as ``(C, H, W)`` float32."""
    path = Path(path)
    if is_nifti(path):
        arr = _nifti_2d(path)
        return np.moveaxis(arr, -1, 0).astype(np.float32) if arr.ndim == 3 else arr[None].astype(np.float32)
    arr = _imread(path)
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # grey + alpha, RGBA: drop alpha
        arr = arr[..., :-1]
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return arr.astype(np.float32)


def read_mask_2d(path: str | Path) -> np.ndarray:
    """A 2D label/mask file as ``(H, W)`` int64 (an RGB mask must be grey: equal channels)."""
    path = Path(path)
    arr = _nifti_2d(path) if is_nifti(path) else _imread(path)
    if arr.ndim == 3:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1])):
            raise InputError(path, f"a mask must have one channel (or equal ones), got shape {arr.shape}")
        arr = arr[..., 0]
    return _integer_labels(path, arr)


def read_image_folder(images: str | Path, masks: str | Path | None = None,
                      slice_list: str | Path | None = None) -> SliceSet:
    """Images of ``images`` (all of them, sorted by name, or the names of ``slice_list``),
    each with the mask of the same stem in ``masks`` when given."""
    images = Path(images)
    found = files_by_stem(images, IMAGE_SUFFIXES + NIFTI_SUFFIXES)
    names = _select(found, slice_list, images)
    mask_files = files_by_stem(Path(masks), IMAGE_SUFFIXES + NIFTI_SUFFIXES) if masks is not None else {}
    out = SliceSet([], [], [])
    for name in names:
        image = read_image_2d(found[name])
        label = None
        if masks is not None:
            if name not in mask_files:
                raise InputError(found[name], f"no mask named '{name}.*' in {masks}")
            label = read_mask_2d(mask_files[name])
            _check_same_shape(mask_files[name], label.shape, image.shape[1:])
        out.names.append(name)
        out.images.append(image)
        out.labels.append(label)
        out.masks.append(None)
        out.grades.append(None)
    return out


def read_h5_slice(path: str | Path) -> dict:
    """One HDF5 slice: ``{"image": (C, H, W), "label": (H, W) or None, "masks": ... or None,
    "grade": int or None}``."""
    path = Path(path)
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise InputError(path, f"no 'image' dataset (found: {sorted(f.keys())})")
            raw = {k: np.asarray(f[k]) for k in ("image", "label", "masks", "grade") if k in f}
            if "grade" not in raw and "grade" in f.attrs:  # some writers keep the grade as an attribute
                raw["grade"] = np.asarray(f.attrs["grade"])
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(path, f"not a readable HDF5 slice file ({type(e).__name__}: {e})") from None
    image = raw["image"]
    if image.ndim not in (2, 3) or 0 in image.shape:
        raise InputError(path, f"'image' must be (H, W) or (C, H, W), got shape {image.shape}")
    image = (image[None] if image.ndim == 2 else image).astype(np.float32)
    if not np.isfinite(image).all():
        raise InputError(path, "'image' holds NaN or infinite values")
    out: dict = {"image": image, "label": None, "masks": None, "grade": None}
    if "label" in raw and raw["label"].size == 1 and "grade" not in raw:  # DC-MT: 'label' is the grade
        raw["grade"] = raw.pop("label")
    if "label" in raw:
        out["label"] = label = _integer_labels(path, raw["label"], "'label'")
        _check_same_shape(path, label.shape, image.shape[1:], "'label'")
    if "masks" in raw:
        masks = raw["masks"]
        _check_same_shape(path, masks.shape[-2:], image.shape[1:], "'masks'")
        out["masks"] = masks.astype(np.float32)
    if "grade" in raw:
        out["grade"] = _integer_scalar(path, raw["grade"])
    return out


def read_h5_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An HDF5 volume file with ``image`` and ``label`` of one 3D shape (LA 2018's
    ``mri_norm2.h5``, ACDC's volumes): ``(image float32, label)`` as stored."""
    path = Path(path)
    h5py = _h5py()
    if not path.exists():
        raise InputError(path, "missing")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise InputError(path, f"no dataset(s) {missing} in this h5 file")
            image, label = np.asarray(f["image"], np.float32), np.asarray(f["label"])
    except OSError as e:
        raise InputError(path, f"not a readable h5 file ({e})") from None
    if image.shape != label.shape or image.ndim != 3:
        raise InputError(path, f"image {image.shape} and label {label.shape} must be the same 3D shape")
    return image, label


def read_h5_folder(folder: str | Path, slice_list: str | Path | None = None) -> SliceSet:
    """The HDF5 slices of ``folder`` (all, sorted by name, or those of ``slice_list``)."""
    folder = Path(folder)
    found = files_by_stem(folder, H5_SUFFIXES)
    out = SliceSet([], [], [])
    for name in _select(found, slice_list, folder):
        s = read_h5_slice(found[name])
        out.names.append(name)
        out.images.append(s["image"])
        out.labels.append(s["label"])
        out.masks.append(s["masks"])
        out.grades.append(s["grade"])
    return out


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading HDF5 slice files needs h5py: pip install 'medvol[adapters]' (or h5py)") from None
    return h5py


def _imread(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        arr = np.asarray(iio.imread(path))
    except Exception as e:  # imageio's plugins raise many types for bad files
        raise InputError(path, f"not a readable image file ({type(e).__name__}: {e})") from None
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise InputError(path, f"expected a 2D image, got shape {arr.shape} (a multi-page or empty file?)")
    return arr


def _nifti_2d(path: Path) -> np.ndarray:
    """A NIfTI holding one slice: ``(H, W)`` or ``(H, W, C)``."""
    arr = read_nifti(path).array
    if arr.shape[2] != 1:
        raise InputError(path, f"expected a 2D image (one slice), got shape {arr.shape}")
    arr = arr[:, :, 0]
    if not np.isfinite(arr).all():
        raise InputError(path, "holds NaN or infinite values")
    return arr


def _integer_labels(path: Path, arr: np.ndarray, what: str = "mask") -> np.ndarray:
    if arr.ndim != 2:
        raise InputError(path, f"{what} must be 2D (H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise InputError(path, f"{what} holds non-integer values (labels must be whole numbers)")
    out = arr.astype(np.int64)
    if out.min() < 0:
        raise InputError(path, f"{what} holds negative values (min {out.min()})")
    return out


def _integer_scalar(path: Path, value: np.ndarray) -> int:
    v = np.asarray(value)
    if v.size != 1 or not np.isfinite(v.astype(float)).all() or float(v.ravel()[0]) != round(float(v.ravel()[0])):
        raise InputError(path, f"'grade' must be one whole number, got {v.tolist()}")
    return int(round(float(v.ravel()[0])))


def _check_same_shape(path: Path, got, want, what: str = "mask") -> None:
    if tuple(got) != tuple(want):
        raise InputError(path, f"{what} shape {tuple(got)} differs from the image's {tuple(want)}")


def files_by_stem(folder: Path, suffixes: tuple, recursive: bool = False) -> dict[str, Path]:
    """``{stem: file}`` of the files of ``folder`` (and below it, ``recursive``) ending in one of
    ``suffixes``, sorted; a repeated stem or no file at all is an error naming the folder."""
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or not p.name.lower().endswith(suffixes):
            continue
        name = _stem(p)
        if name in found:
            raise InputError(p, f"two files named '{name}' ({found[name].name} and {p.name}): keep one")
        found[name] = p
    if not found:
        raise InputError(folder, f"no {'/'.join(suffixes)} files")
    return found


def _select(found: dict[str, Path], slice_list, folder: Path) -> list[str]:
    if slice_list is None:
        return sorted(found)
    names = _slice_list_lines(Path(slice_list))
    missing = [n for n in names if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(slice_list, f"line {names[missing[0]]}: '{missing[0]}' is not in {folder}{more}")
    return list(names)


__all__ = ["SliceSet", "read_slice_list", "read_image_2d", "read_mask_2d", "read_image_folder", "read_h5_slice",
           "read_h5_volume",
           "read_h5_folder"]
