"""Native 2D datasets (image/mask folders, HDF5 slices, slice lists) and the slice-label CSV,
on tiny files written here."""

from __future__ import annotations

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

from medvol.errors import InputError
from medvol.io.slice_labels import read_slice_labels
from medvol.io.slices2d import read_h5_folder, read_h5_slice, read_image_2d, read_image_folder, read_slice_list

h5py = pytest.importorskip("h5py")


def _square(h=12, w=10):
    m = np.zeros((h, w), np.uint8)
    m[3:7, 2:5] = 255
    return m


@pytest.fixture
def infnet(tmp_path):
    """Inf-Net's COVID-SemiSeg layout: Imgs/*.jpg (RGB), GT/*.png (0/255), plus a 2D NIfTI."""
    (tmp_path / "Imgs").mkdir()
    (tmp_path / "GT").mkdir()
    rgb = np.stack([np.arange(120, dtype=np.uint8).reshape(12, 10)] * 3, -1)
    iio.imwrite(tmp_path / "Imgs" / "a.png", rgb)  # lossless, so values can be checked
    iio.imwrite(tmp_path / "Imgs" / "b.jpg", rgb)
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(12, 10), np.eye(4)),
             str(tmp_path / "Imgs" / "c.nii.gz"))
    for n in "abc":
        iio.imwrite(tmp_path / "GT" / f"{n}.png", _square())
    return tmp_path


def test_image_folder_pairs_images_and_masks_by_name(infnet):
    s = read_image_folder(infnet / "Imgs", infnet / "GT")
    assert s.names == ["a", "b", "c"]
    assert s.images[0].shape == (3, 12, 10) and s.images[0].dtype == np.float32
    np.testing.assert_array_equal(s.images[0][1], np.arange(120).reshape(12, 10))  # (C, rows, cols)
    assert s.images[1].shape == (3, 12, 10)  # JPEG
    assert s.images[2].shape == (1, 12, 10) and s.images[2][0, 1, 0] == 10  # 2D NIfTI
    np.testing.assert_array_equal(s.labels[0], _square())  # mask values as stored (0/255)
    assert s.labels[2].dtype == np.int64


def test_slice_list_selects_and_orders(infnet):
    lst = infnet / "train.list"
    lst.write_text("c\n# comment\n\na\n")
    assert read_slice_list(lst) == ["c", "a"]
    assert read_image_folder(infnet / "Imgs", infnet / "GT", lst).names == ["c", "a"]
    lst.write_text("c\nzz\n")
    with pytest.raises(InputError, match=r"train\.list: line 2: 'zz' is not in"):
        read_image_folder(infnet / "Imgs", slice_list=lst)
    lst.write_text("c\na\nc\n")
    with pytest.raises(InputError, match=r"train\.list: line 3: 'c' repeats line 1"):
        read_slice_list(lst)


@pytest.mark.parametrize("breakage, match", [
    ("missing_mask", r"Imgs/b\.jpg: no mask named 'b\.\*'"),
    ("shape", r"GT/a\.png: mask shape \(4, 4\) differs from the image's \(12, 10\)"),
    ("corrupt", r"Imgs/a\.png: not a readable image file"),
    ("colour_mask", r"GT/a\.png: a mask must have one channel"),
    ("nifti_3d", r"Imgs/c\.nii\.gz: expected a 2D image \(one slice\)"),
])
def test_bad_2d_files_name_the_file(infnet, breakage, match):
    if breakage == "missing_mask":
        (infnet / "GT" / "b.png").unlink()
    elif breakage == "shape":
        iio.imwrite(infnet / "GT" / "a.png", np.zeros((4, 4), np.uint8))
    elif breakage == "corrupt":
        (infnet / "Imgs" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif breakage == "colour_mask":
        iio.imwrite(infnet / "GT" / "a.png", np.random.default_rng(0).integers(0, 255, (12, 10, 3), np.uint8))
    elif breakage == "nifti_3d":
        nib.save(nib.Nifti1Image(np.zeros((12, 10, 2), np.float32), np.eye(4)), str(infnet / "Imgs" / "c.nii.gz"))
    with pytest.raises(InputError, match=match):
        read_image_folder(infnet / "Imgs", infnet / "GT")


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 7, 255
    iio.imwrite(tmp_path / "x.png", rgba)
    img = read_image_2d(tmp_path / "x.png")
    assert img.shape == (3, 4, 5) and img[0].max() == 7 and img[1:].max() == 0


def _write_h5(path, **data):
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)


def test_h5_slices_with_label_masks_and_grade(tmp_path):
    img = np.random.default_rng(0).normal(size=(16, 12)).astype(np.float32)
    lab = np.zeros((16, 12), np.uint8)
    lab[4:8, 3:9] = 2
    _write_h5(tmp_path / "p1_slice_3.h5", image=img, label=lab)  # UGPCL's ACDC slices
    _write_h5(tmp_path / "k1_7.h5", image=np.stack([img] * 3), label=lab, masks=(lab > 0).astype(np.float32),
              grade=np.int64(2))  # DC-MT: 3 channels, cartilage mask, grade
    (tmp_path / "train_slices.list").write_text("p1_slice_3\nk1_7\n")
    s = read_h5_folder(tmp_path, tmp_path / "train_slices.list")
    assert s.names == ["p1_slice_3", "k1_7"]
    np.testing.assert_array_equal(s.images[0][0], img)
    assert s.images[1].shape == (3, 16, 12)
    np.testing.assert_array_equal(s.labels[0], lab)
    assert s.masks[0] is None and s.grades[0] is None
    assert s.masks[1].sum() == 24 and s.grades[1] == 2


@pytest.mark.parametrize("content, match", [
    ({"label": np.zeros((16, 12))}, r"bad\.h5: no 'image' dataset"),
    ({"image": np.zeros((16, 12)), "label": np.zeros((8, 12))}, r"bad\.h5: 'label' shape \(8, 12\) differs"),
    ({"image": np.zeros((16, 12)), "label": np.full((16, 12), 0.5)}, r"bad\.h5: 'label' holds non-integer"),
    ({"image": np.zeros((16, 12)), "grade": np.float64(1.5)}, r"bad\.h5: 'grade' must be one whole number"),
    ({"image": np.full((16, 12), np.nan)}, r"bad\.h5: 'image' holds NaN"),
    ({"image": np.zeros((2, 3, 16, 12))}, r"bad\.h5: 'image' must be \(H, W\) or \(C, H, W\)"),
])
def test_bad_h5_slices_name_the_file(tmp_path, content, match):
    _write_h5(tmp_path / "bad.h5", **content)
    with pytest.raises(InputError, match=match):
        read_h5_slice(tmp_path / "bad.h5")


def test_a_file_that_is_not_hdf5(tmp_path):
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(InputError, match=r"x\.h5: not a readable HDF5 slice file"):
        read_h5_slice(tmp_path / "x.h5")


def test_missing_h5py_is_named(tmp_path, monkeypatch):
    """The HDF5 adapters' run-time need has its own extra (not the test extra medvol[dev])."""
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)
    with pytest.raises(ImportError, match=r"needs h5py: pip install 'medvol\[adapters\]'"):
        read_h5_slice(tmp_path / "x.h5")


COUNTS = {"knee01": 20, "knee02": 5}


def test_slice_labels_csv(tmp_path):
    (tmp_path / "masks").mkdir()
    iio.imwrite(tmp_path / "masks" / "k1_12.png", _square())
    csv = tmp_path / "slice_labels.csv"
    csv.write_text("subject,slice_index,label,mask\nknee01,12,2,masks/k1_12.png\nknee01,13,0,\n"
                   "knee01,,1,\n\nknee02,4,1,\n")
    labels = read_slice_labels(csv, COUNTS)
    assert labels.slices == {"knee01": {12: 2, 13: 0}, "knee02": {4: 1}}
    assert labels.subjects == {"knee01": 1}
    np.testing.assert_array_equal(labels.slice_targets("knee02", 5), [-1, -1, -1, -1, 1])
    np.testing.assert_array_equal(labels.read_mask("knee01", 12), _square())
    assert labels.read_mask("knee01", 13) is None
    # the mask column is optional
    csv.write_text("subject,slice_index,label\nknee02,0,3\n")
    assert read_slice_labels(csv, COUNTS).slices == {"knee02": {0: 3}}


@pytest.mark.parametrize("rows, match", [
    ("knee09,1,1", r"line 3: unknown subject 'knee09'"),
    ("knee02,5,1", r"line 3: slice_index 5 is out of range: 'knee02' has 5 slices \(0-4\)"),
    ("knee02,-1,1", r"line 3: slice_index must be a whole number >= 0, got -1"),
    ("knee02,1,1.5", r"line 3: label must be a whole number >= 0, got '1.5'"),
    ("knee02,1,mild", r"line 3: label must be a whole number >= 0, got 'mild'"),
    ("knee01,3,1", r"line 3: duplicate row for slice 3 of 'knee01', first given on line 2"),
    ("knee02,1", r"line 3: 2 fields, the header has 3"),
])
def test_bad_slice_label_rows_name_csv_and_line(tmp_path, rows, match):
    csv = tmp_path / "slice_labels.csv"
    csv.write_text(f"subject,slice_index,label\nknee01,3,0\n{rows}\n")
    with pytest.raises(InputError, match=r"slice_labels\.csv: " + match):
        read_slice_labels(csv, COUNTS)


def test_bad_slice_label_headers_and_masks(tmp_path):
    csv = tmp_path / "slice_labels.csv"
    csv.write_text("subject,slice,label\nknee01,3,0\n")
    with pytest.raises(InputError, match=r"slice_labels\.csv: line 1: expected the columns"):
        read_slice_labels(csv, COUNTS)
    csv.write_text("subject,slice_index,label,mask\nknee01,3,0,nope.png\n")
    with pytest.raises(InputError, match=r"slice_labels\.csv: line 2: mask file not found"):
        read_slice_labels(csv, COUNTS)
    csv.write_text("subject,slice_index,label\nknee01,,0\nknee01,,1\n")
    with pytest.raises(InputError, match=r"line 3: duplicate row for subject 'knee01'"):
        read_slice_labels(csv, COUNTS)

