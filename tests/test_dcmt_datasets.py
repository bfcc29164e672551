"""DC-MT's dataset adapters (per-slice HDF5 + fold CSVs; generic images + masks + grades) and the
synthetic demo data, on tiny files written here."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medvol.datasets.dcmt import convert_dcmt, convert_graded_folder, region_mask
from medvol.datasets.dcmt_demo import band_rows, build_dcmt_demo, draw_slice, synthetic_slices
from medvol.errors import InputError
from medvol.io.slice_labels import read_slice_labels
from medvol.io.slices2d import read_h5_slice

h5py = pytest.importorskip("h5py")

H, W = 12, 10


def _knee_slice(seed: int):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 500, (H, W)).astype(np.float32)
    masks = np.zeros((H, W), np.uint8)
    masks[2:4, 1:8] = 1  # femur
    masks[4:6, 2:7] = 2  # femoral cartilage: the region
    masks[8:10, 3:6] = 6  # patellar cartilage
    return image, masks


def _write_h5(path, **data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f[k] = v


def _dcmt_layout(root, rows):
    """rows: (relative path, fold, grade, seed); writes the h5 files and fold_index.csv."""
    for rel, _, grade, seed in rows:
        image, masks = _knee_slice(seed)
        _write_h5(root / rel, image=image, masks=masks, label=np.int64(grade))
    (root / "fold_index.csv").write_text("Path,Fold\n" + "".join(f"{r},{f}\n" for r, f, _, _ in rows))
    return root / "fold_index.csv"


def test_h5_scalar_label_is_the_grade(tmp_path):
    image, masks = _knee_slice(0)
    _write_h5(tmp_path / "a_3.h5", image=image, masks=masks, label=np.int64(2))
    s = read_h5_slice(tmp_path / "a_3.h5")
    assert s["grade"] == 2 and s["label"] is None and s["masks"].shape == (H, W)


def test_region_mask_dilation_by_hand():
    labels = np.zeros((9, 9), np.int64)
    labels[4, 4] = 2
    labels[0, 0] = 1
    assert region_mask(labels, (2,)).sum() == 1
    disc = region_mask(labels, (2,), dilate_px=4)  # a disc of radius 2 around (4, 4)
    yy, xx = np.mgrid[:9, :9]
    np.testing.assert_array_equal(disc, ((yy - 4) ** 2 + (xx - 4) ** 2 <= 4).astype(np.uint8))
    assert region_mask(labels, None).sum() == 2  # None: any label > 0


def test_convert_dcmt_layout(tmp_path):
    src = tmp_path / "src"
    rows = [("class1/00003_9.h5", 0, 1, 0), ("class1/00003_7.h5", 0, 0, 1), ("class2/00011_10.h5", 1, 2, 2),
            ("class2/00011_12.h5", 1, 1, 3), ("class0/00219_8.h5", 2, 0, 4), ("class0/00219_5.h5", 2, 0, 5)]
    fold_csv = _dcmt_layout(src, rows)
    (src / "subject_label.csv").write_text("SegID,subject_label,Fold\n00011.nii.gz,1,1\n")
    out = convert_dcmt(src, fold_csv, tmp_path / "raw", subject_labels=src / "subject_label.csv", valid_fold=0,
                       dilate_px=0)

    img = nib.load(out / "imagesTr" / "00003_0000.nii.gz")
    assert img.shape == (H, W, 2)
    np.testing.assert_allclose(img.affine, np.diag([1.0, 1.0, 999.0, 1.0]))
    # stacked by slice number: 00003_7 first, then 00003_9
    np.testing.assert_allclose(np.asarray(img.dataobj)[..., 0], _knee_slice(1)[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(img.dataobj)[..., 1], _knee_slice(0)[0], rtol=1e-6)
    lab = np.asarray(nib.load(out / "labelsTr" / "00003.nii.gz").dataobj)
    np.testing.assert_array_equal(lab[..., 0], (_knee_slice(1)[1] == 2).astype(np.uint8))

    labels = read_slice_labels(out / "slice_labels.csv", {"00003": 2, "00011": 2, "00219": 2})
    assert labels.slices == {"00003": {0: 0, 1: 1}, "00011": {0: 2, 1: 1}, "00219": {0: 0, 1: 0}}
    assert labels.subjects == {"00003": 1, "00011": 1, "00219": 0}  # 00011 given (1), not its max (2)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labelled_cases"] == ["00011"]  # the first fold that is not the validation fold
    assert meta["channel_names"] == {"0": "rescale_to_0_1"} and meta["numTraining"] == 3
    splits = json.loads((out / "splits_final.json").read_text())
    assert [s["val"] for s in splits] == [["00003"], ["00011"], ["00219"]]
    assert "00003,1,class1/00003_9.h5" in (out / "slice_sources.csv").read_text()


def test_convert_dcmt_resizes_and_dilates_by_default(tmp_path):
    src = tmp_path / "src"
    fold_csv = _dcmt_layout(src, [("a_1.h5", 0, 0, 0), ("b_1.h5", 1, 2, 1)])
    out = convert_dcmt(src, fold_csv, tmp_path / "raw", size=(24, 20))
    lab = np.asarray(nib.load(out / "labelsTr" / "a.nii.gz").dataobj)
    assert lab.shape == (24, 20, 1)
    assert lab.sum() > 2 * 4 * 10 * 4  # the 18-pixel disc grows the resized cartilage well beyond itself


@pytest.mark.parametrize("rows, match", [
    ([("a_1.h5", 0, 0, 0), ("a_2.h5", 1, 0, 1)], r"fold_index\.csv: line 3: subject 'a' is in fold 1 and fold 0"),
    ([("a1.h5", 0, 0, 0)], r"line 2: 'a1\.h5' is not named <subject>_<slice>\.h5"),
])
def test_convert_dcmt_bad_input(tmp_path, rows, match):
    fold_csv = _dcmt_layout(tmp_path / "src", rows)
    with pytest.raises(InputError, match=match):
        convert_dcmt(tmp_path / "src", fold_csv, tmp_path / "raw")


def test_convert_dcmt_needs_masks_and_grade(tmp_path):
    _write_h5(tmp_path / "src" / "a_1.h5", image=np.zeros((H, W), np.float32), label=np.int64(1))
    (tmp_path / "src" / "f.csv").write_text("Path,Fold\na_1.h5,0\n")
    with pytest.raises(InputError, match=r"a_1\.h5: a DC-MT slice needs 'masks'"):
        convert_dcmt(tmp_path / "src", tmp_path / "src" / "f.csv", tmp_path / "raw")


def test_convert_graded_folder(tmp_path):
    import imageio.v3 as iio

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for i in range(3):
        iio.imwrite(tmp_path / "img" / f"s{i}.png", np.full((H, W), 40 * i + 10, np.uint8))
        m = np.zeros((H, W), np.uint8)
        m[i:i + 3, 2:5] = 255
        iio.imwrite(tmp_path / "msk" / f"s{i}.png", m)
    (tmp_path / "grades.csv").write_text("name,subject,grade,fold\ns2,p1,2,0\ns0,p1,,0\ns1,p2,1,1\n")
    out = convert_graded_folder(tmp_path / "img", tmp_path / "grades.csv", tmp_path / "raw", masks=tmp_path / "msk",
                                labelled=["p2"])
    vol = np.asarray(nib.load(out / "imagesTr" / "p1_0000.nii.gz").dataobj)
    assert vol.shape == (H, W, 2) and vol[0, 0, 0] == 90 and vol[0, 0, 1] == 10  # CSV order
    lab = np.asarray(nib.load(out / "labelsTr" / "p1.nii.gz").dataobj)
    assert lab[..., 0].sum() == 9 and lab[2, 2, 0] == 1
    labels = read_slice_labels(out / "slice_labels.csv", {"p1": 2, "p2": 1})
    assert labels.slices == {"p1": {0: 2}, "p2": {0: 1}} and labels.subjects == {"p1": 2, "p2": 1}
    assert json.loads((out / "dataset.json").read_text())["labelled_cases"] == ["p2"]


def test_convert_graded_folder_errors(tmp_path):
    import imageio.v3 as iio

    (tmp_path / "img").mkdir()
    iio.imwrite(tmp_path / "img" / "s0.png", np.zeros((H, W), np.uint8))
    (tmp_path / "g.csv").write_text("name,subject,grade\ns0,p1,x\n")
    with pytest.raises(InputError, match=r"g\.csv: line 2: grade must be a whole number >= 0, got 'x'"):
        convert_graded_folder(tmp_path / "img", tmp_path / "g.csv", tmp_path / "raw")
    (tmp_path / "g.csv").write_text("name,subject,grade\ns9,p1,1\n")
    with pytest.raises(InputError, match=r"line 2: no image named 's9\.\*'"):
        convert_graded_folder(tmp_path / "img", tmp_path / "g.csv", tmp_path / "raw")
    (tmp_path / "g.csv").write_text("name,grade\ns0,1\n")
    with pytest.raises(InputError, match=r"g\.csv: line 1: needs the columns name, subject, grade"):
        convert_graded_folder(tmp_path / "img", tmp_path / "g.csv", tmp_path / "raw")


def test_synthetic_grades_are_visible_inside_the_region():
    rng = np.random.default_rng(0)
    for grade in (0, 1, 2) * 5:
        top = band_rows(48, rng, 48)
        image, band = draw_slice(48, top, 6.0, grade, rng)
        dark = (image[0][band] < 0.45).mean()  # the notch is fluid-dark inside the bright band
        assert (dark > 0.02) == (grade > 0), (grade, dark)
    slices, folds = synthetic_slices(n_subjects=6, slices_per_subject=4, size=48, seed=3)
    assert len(slices) == 24 and sorted(set(folds.values())) == [0, 1, 2, 3, 4]
    assert all(s.region.shape == (48, 48) and s.region.sum() > 0 for s in slices)


def test_build_dcmt_demo(tmp_path):
    out = build_dcmt_demo(tmp_path / "raw", n_subjects=5, slices_per_subject=3, size=32)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labelled_cases"] == ["knee_001"] and meta["numTraining"] == 5
    labels = read_slice_labels(out / "slice_labels.csv", {f"knee_{i:03d}": 3 for i in range(5)})
    for subject, per in labels.slices.items():
        assert labels.subjects[subject] == max(per.values())
