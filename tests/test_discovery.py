"""One scan discovery for every caller, on a mixed folder: NIfTI, MetaImage, nested DICOM
series, channel files and junk."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from medvol.datasets.dicom import write_dicom_series
from medvol.errors import InputError
from medvol.io import Volume
from medvol.io.discovery import find_scans, group_channels, input_cases, scan_id, scan_stem

from conftest import write_nifti

MEDVOL = Path(__file__).resolve().parents[1] / "medvol"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    import SimpleITK as sitk

    root = tmp_path_factory.mktemp("mixed") / "scans"
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    write_nifti(root / "plain.nii.gz", arr)
    write_nifti(root / "old.nii", arr)
    write_nifti(root / "mr_0000.nii.gz", arr)  # two channels of one case
    write_nifti(root / "mr_0001.nii.gz", arr)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(root / "luna.mhd"))  # + luna.raw, its data file
    vol = Volume(arr * 10, np.diag([2.0, 2.0, 3.0, 1.0]))
    write_dicom_series(vol, root / "ct_series")  # a series folder next to the files
    write_dicom_series(vol, root / "patient" / "study" / "s1")  # nested two levels down
    (root / "notes.txt").write_text("junk")
    (root / "._plain.nii.gz").write_bytes(b"\0" * 10)  # macOS resource fork
    (root / "empty_dir").mkdir()
    (root / "DICOMDIR").write_bytes(b"\0" * 200)
    return root


def _names(root, paths):
    return [p.relative_to(root).as_posix() for p in paths]


def test_find_scans_in_a_mixed_folder(mixed):
    assert _names(mixed, find_scans(mixed)) == ["ct_series", "luna.mhd", "mr_0000.nii.gz", "mr_0001.nii.gz",
                                                "old.nii", "plain.nii.gz"]
    assert _names(mixed, find_scans(mixed, recursive=True)) == [
        "ct_series", "luna.mhd", "mr_0000.nii.gz", "mr_0001.nii.gz", "old.nii", "patient/study/s1", "plain.nii.gz"]
    assert find_scans(mixed / "ct_series") == [mixed / "ct_series"]  # a series folder is its own scan
    assert [scan_id(mixed, p) for p in find_scans(mixed, recursive=True)][-2:] == ["patient__study__s1", "plain"]


def test_stems_and_channel_groups(mixed):
    assert [scan_stem(n) for n in ("a.nii.gz", "A.NII.GZ", "b.nii", "c.mhd", "d.nrrd", "e.txt")] == \
        ["a", "A", "b", "c", "d", "e.txt"]
    files = [p for p in find_scans(mixed) if p.is_file()]
    one = dict(group_channels(files, 1))
    assert sorted(one) == ["luna", "mr", "mr_0001", "old", "plain"]  # with one channel only _0000 is a suffix
    two = dict(group_channels([mixed / "mr_0001.nii.gz", mixed / "mr_0000.nii.gz"], 2))
    assert two == {"mr": [mixed / "mr_0000.nii.gz", mixed / "mr_0001.nii.gz"]}  # channel order
    with pytest.raises(InputError, match=r"x_0001.nii.gz: case 'x' lacks channel\(s\) \[1\]"):
        group_channels([Path("d/x_0000.nii.gz"), Path("d/x_0002.nii.gz")], 3)


def test_input_cases_of_a_mixed_folder(mixed):
    cases = dict(input_cases(mixed, 2))
    assert sorted(cases) == ["ct_series", "luna", "mr", "old", "plain"]
    assert cases["mr"] == [mixed / "mr_0000.nii.gz", mixed / "mr_0001.nii.gz"]
    assert cases["ct_series"] == [mixed / "ct_series"]
    assert input_cases(mixed / "luna.mhd", 1) == [("luna", [mixed / "luna.mhd"])]
    assert input_cases(mixed / "patient" / "study" / "s1", 1) == [("s1", [mixed / "patient" / "study" / "s1"])]
    with pytest.raises(InputError, match="notes.txt: expected a scan file"):
        input_cases(mixed / "notes.txt", 1)
    with pytest.raises(InputError, match="empty_dir: no scan files"):
        input_cases(mixed / "empty_dir", 1)


def test_every_caller_uses_the_discovery_module(mixed, tmp_path):
    """Raw layouts, PCRL's scan folders and evaluate find the same scans in the mixed folder."""
    from medvol.data.pretext import PretextConfig, prepare_scan_folder
    from medvol.evaluation.metrics import _label_files
    from medvol.preprocessing import open_raw_dataset

    files = ["luna", "mr_0000", "mr_0001", "old", "plain"]
    assert [c.case_id for c in open_raw_dataset(mixed).training] == files
    assert sorted(_label_files(mixed)) == files
    names = prepare_scan_folder(mixed, tmp_path / "pretext", PretextConfig(), quiet=True)
    assert sorted(names) == sorted(files + ["ct_series", "patient__study__s1"])
    for p in MEDVOL.rglob("*.py"):  # no private discovery helper crosses modules
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not [a.name for a in node.names if a.name in ("_case_groups", "_stem", "_scan_name")], p


def test_one_channel_file_rule(tmp_path):
    """``<case>_<cccc>``: io.discovery.split_channel for predict inputs and the raw layouts alike;
    an nnU-Net image name without it (or with an empty case id) is refused."""
    from medvol.io.discovery import split_channel
    from medvol.preprocessing import open_raw_dataset

    assert split_channel("brain_001_0002") == ("brain_001", 2)
    assert [split_channel(s) for s in ("brain_001", "_0000", "brain_01", "brain_00001", "brain_0000\n")] == [None] * 5
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text('{"channel_names": {"0": "MRI"}, "labels": {"background": 0}, '
                                           '"numTraining": 1, "file_ending": ".nii.gz"}')
    write_nifti(tmp_path / "imagesTr" / "_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"<case>_<cccc>\.nii\.gz"):
        open_raw_dataset(tmp_path)
