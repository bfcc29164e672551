"""`medvol convert-msd` (Decathlon task -> nnU-Net v2 raw layout, as nnUNetv2_convert_MSD_dataset)
and `medvol check` (nnU-Net's --verify_dataset_integrity: every problem in one report)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvol import cli
from medvol.errors import InputError
from medvol.preprocessing.convert_msd import convert_msd
from medvol.preprocessing.integrity import check_raw_dataset

SHAPE = (6, 5, 4)
AFFINE = np.array([[0.0, -1.2, 0.0, 10.5], [0.9, 0.0, 0.0, -3.25], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])
MSD_JSON = {"name": "Tiny", "description": "two cases", "tensorImageSize": "4D", "licence": "CC-BY-SA 4.0",
            "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "edema", "2": "tumour"},
            "numTraining": 2, "numTest": 1,
            "training": [{"image": "./imagesTr/tiny_001.nii.gz", "label": "./labelsTr/tiny_001.nii.gz"},
                         {"image": "./imagesTr/tiny_002.nii.gz", "label": "./labelsTr/tiny_002.nii.gz"}],
            "test": ["./imagesTs/tiny_003.nii.gz"]}


def _save(array, path: Path, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def make_task(root: Path) -> Path:
    """Task07_Tiny: one 4D two-modality case, one 3D case (one channel only), a 4D test case, and
    macOS ``._`` forks beside them."""
    rng = np.random.default_rng(0)
    task = root / "Task07_Tiny"
    _save(rng.normal(size=SHAPE + (2,)).astype(np.float32), task / "imagesTr" / "tiny_001.nii.gz")
    _save(rng.integers(0, 500, SHAPE).astype(np.int16), task / "imagesTr" / "tiny_002.nii.gz")
    scaled = nib.Nifti1Image(rng.integers(-900, 900, SHAPE + (2,)).astype(np.int16), AFFINE)
    scaled.header.set_slope_inter(0.5, 10.0)  # stored integers scaled by the header: kept as values
    (task / "imagesTs").mkdir(parents=True)
    nib.save(scaled, str(task / "imagesTs" / "tiny_003.nii.gz"))
    for case in ("tiny_001", "tiny_002"):
        _save(rng.integers(0, 3, SHAPE).astype(np.uint8), task / "labelsTr" / f"{case}.nii.gz")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub / "._tiny_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble fork")
    (task / "dataset.json").write_text(json.dumps(MSD_JSON))
    return task


def test_convert_msd_splits_channels_with_the_geometry_and_writes_a_v2_dataset_json(tmp_path):
    task = make_task(tmp_path)
    target = convert_msd(task, tmp_path / "raw")
    assert target == tmp_path / "raw" / "Dataset007_Tiny"
    src = nib.load(str(task / "imagesTr" / "tiny_001.nii.gz"))
    for c in range(2):
        part = nib.load(str(target / "imagesTr" / f"tiny_001_{c:04d}.nii.gz"))
        assert part.shape == SHAPE
        np.testing.assert_array_equal(np.asanyarray(part.dataobj), np.asanyarray(src.dataobj)[..., c])
        np.testing.assert_array_equal(part.affine, src.affine)
        np.testing.assert_array_equal(part.header.get_sform(), src.header.get_sform())
        assert part.get_data_dtype() == src.get_data_dtype()
    for copied, original in ((target / "imagesTr" / "tiny_002_0000.nii.gz", task / "imagesTr" / "tiny_002.nii.gz"),
                             (target / "labelsTr" / "tiny_001.nii.gz", task / "labelsTr" / "tiny_001.nii.gz")):
        assert copied.read_bytes() == original.read_bytes()  # 3D images and labels copied as nnU-Net does
    assert sorted(p.name for p in (target / "imagesTs").iterdir()) == ["tiny_003_0000.nii.gz", "tiny_003_0001.nii.gz"]
    scaled = nib.load(str(task / "imagesTs" / "tiny_003.nii.gz")).get_fdata()
    for c in range(2):
        np.testing.assert_array_equal(nib.load(str(target / "imagesTs" / f"tiny_003_{c:04d}.nii.gz")).get_fdata(),
                                      scaled[..., c])
    written = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert not [w for w in written if "._" in w]  # the macOS forks are skipped
    assert json.loads((target / "dataset.json").read_text()) == {
        "name": "Tiny", "description": "two cases", "tensorImageSize": "4D", "licence": "CC-BY-SA 4.0",
        "labels": {"background": 0, "edema": 1, "tumour": 2}, "numTraining": 2, "numTest": 1,
        "file_ending": ".nii.gz", "channel_names": {"0": "FLAIR", "1": "T1w"}}
    # tiny_002 has one channel of two: the converted dataset's check names exactly that
    rep = check_raw_dataset(target)
    assert list(rep.problems) == ["training/tiny_002"] and "missing channel file(s) [1]" in rep.problems[
        "training/tiny_002"]


def test_convert_msd_id_option_and_rerun(tmp_path):
    task = make_task(tmp_path)
    assert cli.main(["convert-msd", str(task), str(tmp_path / "raw"), "--id", "207"]) == 0
    assert (tmp_path / "raw" / "Dataset207_Tiny" / "imagesTr" / "tiny_001_0001.nii.gz").is_file()
    assert cli.main(["convert-msd", str(task), str(tmp_path / "raw"), "--id", "207"]) == 0  # its own files: redone


def test_convert_msd_refuses_a_folder_with_foreign_files_and_a_taken_id(tmp_path, capsys):
    task = make_task(tmp_path)
    foreign = tmp_path / "raw" / "Dataset007_Tiny" / "notes.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("mine")
    assert cli.main(["convert-msd", str(task), str(tmp_path / "raw")]) == 2
    assert "not written by medvol" in capsys.readouterr().err
    assert sorted(foreign.parent.iterdir()) == [foreign] and foreign.read_text() == "mine"
    foreign.parent.rename(tmp_path / "raw" / "Dataset007_Other")
    with pytest.raises(InputError, match="Dataset007_Other.*already taken"):
        convert_msd(task, tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset007_Other"]


def make_raw(root: Path, n: int = 3) -> Path:
    """A clean nnU-Net v2 raw dataset: n cases of two channels and a label on one grid."""
    raw = root / "Dataset010_Clean"
    rng = np.random.default_rng(1)
    for i in range(n):
        for c in range(2):
            _save(rng.normal(size=SHAPE).astype(np.float32), raw / "imagesTr" / f"case{i}_{c:04d}.nii.gz")
        _save(rng.integers(0, 2, SHAPE).astype(np.uint8), raw / "labelsTr" / f"case{i}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "numTraining": n,
                                                  "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}))
    return raw


def _tree(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_check_a_clean_dataset_exits_0(tmp_path, capsys):
    raw = make_raw(tmp_path)
    assert cli.main(["check", str(raw)]) == 0
    assert "3 case(s) checked, 0 with problems" in capsys.readouterr().out


def test_check_reports_every_problem_in_one_run_and_writes_nothing(tmp_path, capsys):
    raw = make_raw(tmp_path, n=4)
    os.remove(raw / "imagesTr" / "case0_0001.nii.gz")  # a missing channel
    _save(np.full(SHAPE, 3, np.uint8), raw / "labelsTr" / "case1.nii.gz")  # a label value not declared
    shifted = AFFINE.copy()
    shifted[:3, 3] += 4.0
    _save(np.zeros(SHAPE, np.uint8), raw / "labelsTr" / "case2.nii.gz", shifted)  # not on the image's grid
    before = _tree(tmp_path)
    assert cli.main(["check", str(raw)]) == 2
    out = capsys.readouterr()
    assert "4 case(s) checked, 3 with problems" in out.out
    lines = [ln for ln in out.err.splitlines() if ln.startswith("  ")]
    assert len(lines) == 3
    assert "training/case0:" in lines[0] and "missing channel file(s) [1]" in lines[0]
    assert "training/case1:" in lines[1] and "label value(s) [3] are not declared" in lines[1]
    assert "training/case2:" in lines[2] and "affine differs" in lines[2]
    assert _tree(tmp_path) == before  # nothing written, nothing touched


def test_check_stops_at_a_broken_dataset_json_with_one_line(tmp_path, capsys):
    raw = make_raw(tmp_path)
    meta = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**meta, "numTraining": 5}))
    assert cli.main(["check", str(raw)]) == 2
    assert "numTraining is 5 but imagesTr holds 3 cases" in capsys.readouterr().err


def test_help_has_examples(capsys):
    for cmd in ("convert-msd", "check"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        assert "examples:" in capsys.readouterr().out
