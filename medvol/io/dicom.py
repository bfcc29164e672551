"""DICOM series reading: headers with pydicom, pixels with pydicom or SimpleITK/GDCM.

A folder is read as one series. Slices are ordered by ImagePositionPatient projected
on the slice normal (never by file name); RescaleSlope/Intercept are applied (CT -> HU);
missing slices, duplicate positions and uneven spacing are errors that name positions.
Multi-frame files (enhanced or legacy) give one slice per frame.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.io.volume import Volume

log = logging.getLogger(__name__)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Relative tolerance on slice-to-slice distance before spacing counts as uneven.
SPACING_TOLERANCE = 0.01


@dataclass
class _Frame:
    path: Path
    frame: int  # index inside a multi-frame file, 0 for single-frame files
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # 6 direction cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slope: float
    intercept: float
    shape: tuple[int, int]  # (rows, columns)


def _pydicom():
    import pydicom  # local import: only DICOM users pay for it

    return pydicom


def looks_like_dicom(path: Path) -> bool:
    """True when the file carries the DICM preamble (or is named *.dcm)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def list_dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "DICOMDIR" and looks_like_dicom(p))


def _first(seq_owner, name):
    seq = getattr(seq_owner, name, None)
    return seq[0] if seq else None


def _frames_of(path: Path, ds, no_geometry_ok: bool = False) -> list[_Frame]:
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)

    def lookup(group, seq_name, attr):
        item = _first(group, seq_name) if group is not None else None
        return getattr(item, attr, None) if item is not None else None

    frames = []
    for i in range(n):
        pf = per_frame[i] if per_frame is not None and i < len(per_frame) else None
        pos = lookup(pf, "PlanePositionSequence", "ImagePositionPatient")
        ori = lookup(pf, "PlaneOrientationSequence", "ImageOrientationPatient") or lookup(
            shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        px = lookup(pf, "PixelMeasuresSequence", "PixelSpacing") or lookup(
            shared, "PixelMeasuresSequence", "PixelSpacing")
        slope = lookup(pf, "PixelValueTransformationSequence", "RescaleSlope") or lookup(
            shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = lookup(pf, "PixelValueTransformationSequence", "RescaleIntercept")
        if intercept is None:
            intercept = lookup(shared, "PixelValueTransformationSequence", "RescaleIntercept")
        ori = ori if ori is not None else getattr(ds, "ImageOrientationPatient", None)
        px = px if px is not None else getattr(ds, "PixelSpacing", None)
        slope = slope if slope is not None else getattr(ds, "RescaleSlope", 1.0)
        intercept = intercept if intercept is not None else getattr(ds, "RescaleIntercept", 0.0)
        if pos is None and getattr(ds, "ImagePositionPatient", None) is None and ori is None and no_geometry_ok:
            # A lone file without any geometry (secondary capture, anonymised test data):
            # identity orientation, frames 1 apart. Flagged in meta; warned once.
            ori, pos = [1.0, 0, 0, 0, 1.0, 0], [0.0, 0.0, float(i)]
            px = px if px is not None else (1.0, 1.0)
        if pos is None:
            base = getattr(ds, "ImagePositionPatient", None)
            if base is None or ori is None:
                raise InputError(path, "no ImagePositionPatient/ImageOrientationPatient: "
                                       "cannot place the slice in space")
            # Legacy multi-frame: frames stacked along the normal at SpacingBetweenSlices.
            o = np.asarray(ori, float)
            normal = np.cross(o[:3], o[3:])
            step = float(getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 1) or 1)
            pos = np.asarray(base, float) + i * step * normal
        if ori is None or px is None:
            raise InputError(path, "missing ImageOrientationPatient or PixelSpacing")
        frames.append(_Frame(path, i, np.asarray(pos, float), np.asarray(ori, float),
                             (float(px[0]), float(px[1])), float(slope), float(intercept), (rows, cols)))
    return frames


def _read_header(path: Path):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:
        raise InputError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from None


def group_series(files: list[Path]) -> dict[str, list[Path]]:
    """Group DICOM files by SeriesInstanceUID (files without pixel data are skipped)."""
    series: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        ds = _read_header(f)
        if "Rows" not in ds:
            sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None) or ds.get("SOPClassUID")
            if sop is not None and "Image Storage" in getattr(sop, "name", ""):
                raise InputError(f, f"truncated or corrupt: a {sop.name} file without image attributes")
            continue  # SR, RT plan, etc: no image in it
        series[str(getattr(ds, "SeriesInstanceUID", "<no SeriesInstanceUID>"))].append(f)
    return dict(series)


def _decode(path: Path) -> np.ndarray | tuple[str, np.ndarray]:
    """Stored pixel values as ``(frames, rows, columns)``, before rescaling."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except Exception as e:
        # Compressed transfer syntaxes need a decoder pydicom may not have here: GDCM (via
        # SimpleITK) reads them. GDCM applies the rescale itself, so undo nothing later:
        # signal that with a float array tagged in a tuple.
        try:
            import SimpleITK as sitk

            img = sitk.ReadImage(str(path))
            return ("rescaled", sitk.GetArrayFromImage(img))
        except Exception:
            raise InputError(path, f"cannot decode pixel data ({type(e).__name__}: {e})") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) > 1:
        raise InputError(path, "colour (RGB) DICOM is not a scan medvol can read")
    if arr.ndim == 2:
        arr = arr[None]
    return arr


def _the_one_series(folder: Path) -> tuple[str, list[Path]]:
    """(SeriesInstanceUID, files) of the one image series in ``folder``; an error naming the
    folder otherwise."""
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    files = list_dicom_files(folder)
    if not files:
        raise InputError(folder, "no DICOM files in this folder")
    series = group_series(files)
    if not series:
        raise InputError(folder, "no DICOM image files (only non-image objects) in this folder")
    if len(series) > 1:
        desc = "; ".join(f"{uid} ({len(fs)} files)" for uid, fs in series.items())
        raise InputError(folder, f"{len(series)} series mixed in one folder: {desc}. Put each series in its own folder")
    return next(iter(series.items()))


def _check_frames_agree(frames: list[_Frame]) -> None:
    """Every frame has the first one's orientation, size and pixel spacing."""
    first = frames[0]
    for fr in frames:
        if not np.allclose(fr.orientation, first.orientation, atol=1e-4):
            raise InputError(fr.path, f"ImageOrientationPatient {fr.orientation.tolist()} differs from the "
                                      f"series' {first.orientation.tolist()}")
        if fr.shape != first.shape:
            raise InputError(fr.path, f"image size {fr.shape} differs from the series' {first.shape}")
        if not np.allclose(fr.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise InputError(fr.path, f"PixelSpacing {fr.pixel_spacing} differs from the series' "
                                      f"{first.pixel_spacing}")


def read_dicom_series(folder: str | Path) -> Volume:
    """Read the one DICOM series in ``folder`` into a :class:`Volume` (RAS affine)."""
    folder = Path(folder)
    uid, files = _the_one_series(folder)
    frames: list[_Frame] = []
    modality = None
    geometry_missing = False
    for f in files:
        ds = _read_header(f)
        modality = modality or str(getattr(ds, "Modality", ""))
        if len(files) == 1 and not any(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient",
                                                          "SharedFunctionalGroupsSequence",
                                                          "PerFrameFunctionalGroupsSequence")):
            geometry_missing = True
            log.warning("%s: no patient geometry in the file; assuming identity orientation", f)
        frames.extend(_frames_of(f, ds, no_geometry_ok=len(files) == 1))

    ori = frames[0].orientation
    _check_frames_agree(frames)
    row_dir, col_dir = ori[:3], ori[3:]
    normal = np.cross(row_dir, col_dir)
    proj = np.array([fr.position @ normal for fr in frames])
    order = np.argsort(proj, kind="stable")
    frames = [frames[i] for i in order]
    proj = proj[order]
    step = _check_slice_positions(folder, proj)

    # Pixels: decode each file once, then place its frames.
    decoded: dict[Path, np.ndarray | tuple[str, np.ndarray]] = {}
    slices = []
    for fr in frames:
        if fr.path not in decoded:
            decoded[fr.path] = _decode(fr.path)
        d = decoded[fr.path]
        if isinstance(d, tuple):  # already rescaled by GDCM
            slices.append(np.asarray(d[1][fr.frame], np.float32))
        else:
            slices.append(d[fr.frame].astype(np.float32) * np.float32(fr.slope) + np.float32(fr.intercept))
    stack = np.stack(slices)  # (slices, rows, columns)
    array = np.ascontiguousarray(stack.transpose(2, 1, 0))  # (columns, rows, slices) = (X, Y, Z)

    lps = np.eye(4)
    lps[:3, 0] = row_dir * frames[0].pixel_spacing[1]  # moving along a row = next column
    lps[:3, 1] = col_dir * frames[0].pixel_spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = frames[0].position
    meta = {"path": str(folder), "format": "dicom", "series_instance_uid": uid, "modality": modality,
            "num_files": len(files), "geometry": "missing (identity assumed)" if geometry_missing else "patient"}
    return Volume(array, LPS_TO_RAS @ lps, meta)


def _check_slice_positions(folder: Path, proj: np.ndarray) -> float:
    """Return the slice step (mm); raise on duplicates, gaps and uneven spacing."""
    if len(proj) == 1:
        return 1.0
    d = np.diff(proj)
    if np.any(d < 1e-3):
        i = int(np.argmin(d))
        raise InputError(folder, f"two slices at the same position {proj[i]:.3f} mm along the normal "
                                 "(duplicate slice?)")
    step = float(np.median(d))
    bad = np.flatnonzero(np.abs(d - step) > SPACING_TOLERANCE * step)
    if bad.size:
        msgs = []
        for i in bad[:5]:
            ratio = d[i] / step
            kind = (f"{int(round(ratio)) - 1} missing slice(s)" if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1
                    else f"uneven spacing {d[i]:.3f} mm (series step {step:.3f} mm)")
            msgs.append(f"{kind} between positions {proj[i]:.3f} and {proj[i + 1]:.3f} mm")
        raise InputError(folder, "; ".join(msgs))
    return step
