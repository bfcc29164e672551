"""Write a real volume as a DICOM series (one file per slice, or one enhanced multi-frame
file), so the DICOM reader can be tested end to end against a known array."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvol.io import Volume

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _base(modality: str, series_uid: str, study_uid: str, sop_class: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.Modality = modality
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
    ds.PatientName, ds.PatientID = "Demo^Phantom", "medvol-demo"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def _geometry(volume: Volume):
    lps = LPS_FROM_RAS @ volume.affine
    sx, sy, sz = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / sx, lps[:3, 1] / sy
    return lps, (float(sy), float(sx)), np.r_[row, col]


def _stored(volume: Volume, slope: float, intercept: float) -> np.ndarray:
    stored = np.round((np.asarray(volume.array, np.float64) - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("values do not fit int16 with this slope/intercept")
    return stored.astype(np.int16)


def write_dicom_series(volume: Volume, folder: str | Path, modality: str = "CT", slope: float = 1.0,
                       intercept: float = -1024.0, series_uid: str | None = None,
                       file_names: list[str] | None = None) -> list[Path]:
    """One file per slice along the array's third axis. ``file_names`` (one per slice, in
    slice order) lets tests scramble names so that only positions can order them."""
    from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    lps, pixel_spacing, iop = _geometry(volume)
    stored = _stored(volume, slope, intercept)
    paths = []
    for k in range(stored.shape[2]):
        ds = _base(modality, series_uid, study_uid, CTImageStorage if modality == "CT" else MRImageStorage)
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.PixelSpacing = list(pixel_spacing)
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        p = folder / (file_names[k] if file_names else f"slice_{k:04d}.dcm")
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_enhanced_multiframe(volume: Volume, path: str | Path, modality: str = "CT", slope: float = 1.0,
                              intercept: float = -1024.0) -> Path:
    """One enhanced multi-frame file: per-frame positions, shared orientation/spacing/rescale."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    enhanced_ct = "1.2.840.10008.5.1.4.1.1.2.1"
    enhanced_mr = "1.2.840.10008.5.1.4.1.1.4.1"
    ds = _base(modality, generate_uid(), generate_uid(), enhanced_ct if modality == "CT" else enhanced_mr)
    lps, pixel_spacing, iop = _geometry(volume)
    stored = _stored(volume, slope, intercept)
    ds.Rows, ds.Columns, ds.NumberOfFrames = stored.shape[1], stored.shape[0], stored.shape[2]
    shared = Dataset()
    po, pm, pv = Dataset(), Dataset(), Dataset()
    po.ImageOrientationPatient = [float(v) for v in iop]
    pm.PixelSpacing = list(pixel_spacing)
    pm.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
    pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = slope, intercept, "HU" if modality == "CT" else "US"
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(stored.shape[2]):
        f, pp = Dataset(), Dataset()
        pp.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        f.PlanePositionSequence = Sequence([pp])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(stored.transpose(2, 1, 0)).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
