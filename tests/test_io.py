"""medvol.io: NIfTI and DICOM reading/writing, geometry, and bad files."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from medvol.datasets.brain import Acquisition, make_case
from medvol.datasets.dicom import write_dicom_series, write_enhanced_multiframe
from medvol.datasets.realdata import package_file, pydicom_test_file
from medvol.errors import InputError
from medvol.io import Volume, read_volume, write_volume


@pytest.fixture(scope="module")
def real_head():
    image, label = make_case(Acquisition((6.0, 6.0, 6.0), oblique_deg=20.0))
    return image, label


def test_nifti_round_trip_keeps_array_and_affine(tmp_path, real_head):
    image, _ = real_head
    p = write_volume(image, tmp_path / "head.nii.gz")
    back = read_volume(p)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.affine, image.affine, rtol=1e-6, atol=1e-5)
    again = read_volume(write_volume(back, tmp_path / "again.nii.gz"))
    np.testing.assert_array_equal(again.affine, back.affine)  # bit-identical once stored as float32
    assert back.spacing == pytest.approx((6.0, 6.0, 6.0), rel=0.02)


def test_nifti_4d_channels_and_lps_orientation(tmp_path):
    arr = np.random.default_rng(0).normal(size=(5, 6, 7, 3)).astype(np.float32)
    aff = np.diag([-0.8, -0.8, 2.5, 1.0])
    aff[:3, 3] = [10, 20, -30]
    back = read_volume(write_volume(Volume(arr, aff), tmp_path / "v.nii"))
    assert back.array.shape == (5, 6, 7, 3) and back.num_channels == 3
    assert back.channel_first().shape == (3, 5, 6, 7)
    np.testing.assert_allclose(back.channel_first()[2], arr[..., 2])
    assert nib.aff2axcodes(back.affine) == ("L", "P", "S")
    assert back.spacing == pytest.approx((0.8, 0.8, 2.5))


def test_qform_only_file_is_read_with_its_affine(tmp_path):
    aff = np.array([[0, -1.5, 0, 10], [1.5, 0, 0, -5], [0, 0, 3, 2], [0, 0, 0, 1]], float)
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.int16), None)
    img.set_qform(aff, code=1)
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "q.nii.gz"))
    v = read_volume(tmp_path / "q.nii.gz")
    np.testing.assert_allclose(v.affine, aff, atol=1e-5)
    assert v.meta["sform_code"] == 0 and v.meta["qform_code"] == 1


def test_real_nibabel_file_reads():
    p = package_file("nibabel", "nibabel/tests/data/anatomical.nii")
    v = read_volume(p)
    ref = nib.load(str(p))
    assert v.array.shape == ref.shape[:3]
    np.testing.assert_allclose(v.affine, ref.affine)


def test_truncated_and_corrupt_nifti_name_the_file(tmp_path, real_head):
    p = write_volume(real_head[0], tmp_path / "good.nii.gz")
    data = p.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.nii.gz.*truncated or corrupt"):
        read_volume(bad)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(InputError, match="junk.nii.gz"):
        read_volume(junk)
    with pytest.raises(InputError, match="missing.nii.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")


def test_write_is_atomic_no_partial_file_left(tmp_path):
    v = Volume(np.zeros((3, 3, 3), np.float32), np.eye(4))
    # An unwritable dtype fails inside nibabel after the temp file exists.
    v.array = np.zeros((3, 3, 3), dtype=object)
    from nibabel.spatialimages import HeaderDataError

    with pytest.raises(HeaderDataError):
        write_volume(v, tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ DICOM
def _ct_volume(shape=(20, 18, 12), spacing=(0.7, 0.9, 2.5)):
    """A real head (nilearn template) rescaled to CT-like integer HU values."""
    img, _ = make_case(Acquisition((6.0, 6.0, 6.0)))
    arr = img.array[:shape[0], :shape[1], :shape[2]]
    hu = np.round(arr / max(arr.max(), 1) * 1400 - 1000).astype(np.float32)  # air -1000 .. bone 400
    rot = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # a rotated (non-identity) orientation
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = [-40.0, 12.5, -60.0]
    return Volume(hu, aff)


def test_dicom_series_read_equals_source_hu_and_geometry(tmp_path):
    vol = _ct_volume()
    names = [f"IM{n:05d}" for n in np.random.default_rng(3).permutation(vol.array.shape[2])]  # no extension
    write_dicom_series(vol, tmp_path / "ct", slope=0.5, intercept=-1024, file_names=names)
    back = read_volume(tmp_path / "ct")
    assert back.meta["format"] == "dicom" and back.meta["modality"] == "CT"
    np.testing.assert_array_equal(back.array, vol.array)  # HU after RescaleSlope/Intercept
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)


def test_dicom_written_back_as_nifti_keeps_series_geometry(tmp_path):
    vol = _ct_volume()
    write_dicom_series(vol, tmp_path / "ct")
    d = read_volume(tmp_path / "ct")
    n = read_volume(write_volume(d, tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(n.affine, d.affine, atol=1e-4)
    np.testing.assert_array_equal(n.array, d.array)


def test_dicom_missing_slice_names_positions(tmp_path):
    vol = _ct_volume()
    paths = write_dicom_series(vol, tmp_path / "ct")
    paths[5].unlink()
    with pytest.raises(InputError, match=r"ct: 1 missing slice\(s\) between positions"):
        read_volume(tmp_path / "ct")


def test_dicom_uneven_spacing_and_duplicates(tmp_path):
    import pydicom

    vol = _ct_volume()
    paths = write_dicom_series(vol, tmp_path / "uneven")
    ds = pydicom.dcmread(paths[4])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.8
    ds.save_as(paths[4])
    with pytest.raises(InputError, match="uneven spacing"):
        read_volume(tmp_path / "uneven")
    paths = write_dicom_series(vol, tmp_path / "dup")
    shutil.copy(paths[3], tmp_path / "dup" / "copy_of_3.dcm")
    with pytest.raises(InputError, match="same position"):
        read_volume(tmp_path / "dup")


def test_two_series_in_one_folder_is_an_error(tmp_path):
    vol = _ct_volume()
    write_dicom_series(vol, tmp_path / "mixed", file_names=[f"a{k}.dcm" for k in range(12)])
    write_dicom_series(vol, tmp_path / "mixed", file_names=[f"b{k}.dcm" for k in range(12)])
    with pytest.raises(InputError, match="2 series mixed in one folder"):
        read_volume(tmp_path / "mixed")


def test_empty_folder_and_corrupt_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no DICOM files"):
        read_volume(tmp_path / "empty")
    vol = _ct_volume()
    paths = write_dicom_series(vol, tmp_path / "trunc")
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:200])
    with pytest.raises(InputError, match="slice_0002.dcm: truncated or corrupt"):
        read_volume(tmp_path / "trunc")
    paths = write_dicom_series(vol, tmp_path / "cut_pixels")
    data = paths[7].read_bytes()
    paths[7].write_bytes(data[:-100])  # header intact, pixel data cut short
    with pytest.raises(InputError, match="slice_0007.dcm: cannot decode pixel data"):
        read_volume(tmp_path / "cut_pixels")


def test_enhanced_multiframe_file(tmp_path):
    vol = _ct_volume()
    write_enhanced_multiframe(vol, tmp_path / "mf" / "enhanced.dcm", slope=1.0, intercept=-1024)
    back = read_volume(tmp_path / "mf")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)


def test_real_pydicom_ct_slice_in_hu(tmp_path):
    import pydicom

    src = pydicom_test_file("CT_small.dcm")
    shutil.copy(src, tmp_path / "CT_small.dcm")
    v = read_volume(tmp_path)
    ds = pydicom.dcmread(src)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert v.array.shape == (ds.Columns, ds.Rows, 1)
    np.testing.assert_array_equal(v.array[:, :, 0], hu.T)
    # First voxel sits at ImagePositionPatient (LPS) -> RAS
    lps = np.array([float(x) for x in ds.ImagePositionPatient])
    np.testing.assert_allclose(v.affine[:3, 3], lps * [-1, -1, 1], atol=1e-4)


def test_real_multiframe_mr_from_pydicom_data(tmp_path):
    import pydicom

    src = pydicom_test_file("emri_small.dcm")
    shutil.copy(src, tmp_path / "emri_small.dcm")
    v = read_volume(tmp_path)
    ds = pydicom.dcmread(src)
    assert v.array.shape == (ds.Columns, ds.Rows, int(ds.NumberOfFrames))  # 64 x 64 x 10
    frames = ds.pixel_array.astype(np.float32)  # (frames, rows, cols), no rescale in this file
    np.testing.assert_array_equal(v.array, frames.transpose(2, 1, 0))
    assert v.meta["geometry"].startswith("missing")  # this anonymised file carries no geometry


def test_metaimage_reads_with_the_same_geometry_as_nifti(tmp_path):
    """A .mhd (LUNA16's format) and a NIfTI written by SimpleITK from one oblique image read
    back as the same array and RAS affine; a truncated .mha is one clear error."""
    import SimpleITK as sitk

    from medvol.errors import InputError
    from medvol.io import read_volume

    arr = np.arange(5 * 6 * 7, dtype=np.int16).reshape(7, 6, 5)  # ITK order (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-100.0, 50.0, 20.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "scan.mhd"))
    sitk.WriteImage(img, str(tmp_path / "scan.nii.gz"))
    mhd, nii = read_volume(tmp_path / "scan.mhd"), read_volume(tmp_path / "scan.nii.gz")
    assert mhd.array.shape == (5, 6, 7) and mhd.array[4, 2, 1] == arr[1, 2, 4]
    np.testing.assert_array_equal(mhd.array, nii.array)
    np.testing.assert_allclose(mhd.affine, nii.affine, atol=1e-4)
    np.testing.assert_allclose(mhd.spacing, (0.7, 0.8, 2.5), atol=1e-6)
    # voxel (0, 0, 0) sits at the LPS origin, i.e. RAS (100, -50, 20)
    np.testing.assert_allclose(mhd.affine[:3, 3], (100.0, -50.0, 20.0))
    sitk.WriteImage(img, str(tmp_path / "t.mha"))
    data = (tmp_path / "t.mha").read_bytes()
    (tmp_path / "t.mha").write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="t.mha: not a readable ITK image"):
        read_volume(tmp_path / "t.mha")


def test_dataset_json_labels_of_both_dialects(tmp_path):
    """io.dataset_json: the labels of nnU-Net v2 (name -> value) and Decathlon (value -> name)
    dataset.json files, None for a folder without one or with invalid labels."""
    import json

    from medvol.io.dataset_json import dataset_labels

    assert dataset_labels(tmp_path) is None
    (tmp_path / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0, "lv": 1}}))
    assert dataset_labels(tmp_path) == {"background": 0, "lv": 1}
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "liver"}}))
    assert dataset_labels(tmp_path) == {"bg": 0, "liver": 1}
    (tmp_path / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"a": 1}}))  # no 0
    assert dataset_labels(tmp_path) is None
