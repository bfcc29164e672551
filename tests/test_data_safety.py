"""Nothing of the user's is lost: --overwrite removes only what medvol wrote, outputs never
replace inputs or foreign files, and two sources of one case id are refused (issue 20, 1-3);
one predict at a time writes into an output folder (issue 35, 3)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medvol.cli import main
from medvol.errors import InputError
from medvol.manifest import MANIFEST
from medvol.preprocessing import open_raw_dataset, preprocess_dataset

from conftest import sphere_case, write_nifti, write_v2_dataset


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def raw(tmp_path) -> Path:
    cases = {f"s{i}": ([sphere_case(seed=i)[0]], sphere_case(seed=i)[1], np.eye(4)) for i in range(2)}
    root = write_v2_dataset(tmp_path / "data" / "Dataset003_Sphere", cases)
    (tmp_path / "data" / "notes.txt").write_text("the user's own file")
    return root


def _preprocess(raw: Path, out: Path, *extra: str) -> int:
    return main(["preprocess", str(raw), "-o", str(out), "-j", "1", "--quiet", *extra])


@pytest.mark.parametrize("where", ["parent", "raw", "inside"])
def test_preprocess_refuses_outputs_that_overlap_the_raw_dataset(raw, where, capsys):
    out = {"parent": raw.parent, "raw": raw, "inside": raw / "pre"}[where]
    before = checksums(raw.parent)
    assert _preprocess(raw, out, "--overwrite") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and {"parent": "contains", "raw": "is", "inside": "lies inside"}[where] in err[0]
    assert str(raw) in err[0]
    assert checksums(raw.parent) == before  # raw scans, their dataset.json and the user's notes untouched
    assert not (raw / "pre").exists()


def test_preprocess_refuses_a_folder_of_someone_elses_files(raw, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "plans.json").write_text("my own plans")
    (out / "cases").mkdir()
    (out / "cases" / "thesis.docx").write_bytes(b"\x00" * 10)
    before = checksums(out)
    for extra in ((), ("--overwrite",)):
        assert _preprocess(raw, out, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was not written by medvol" in err[0] and str(out) in err[0]
        assert checksums(out) == before and sorted(p.name for p in out.iterdir()) == ["cases", "plans.json"]


def test_overwrite_removes_only_what_the_manifest_lists(raw, tmp_path, capsys):
    out = tmp_path / "pre"
    assert _preprocess(raw, out) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "preprocess" and manifest["case_ids"] == ["s0", "s1"]
    assert {"cases", "plans.json", "dataset.json"} <= set(manifest["entries"])
    # a file medvol did not write, inside an owned folder: --overwrite refuses and deletes nothing
    (out / "cases" / "README.txt").write_text("keep me")
    before = checksums(out)
    assert _preprocess(raw, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "README.txt" in err and "not written by medvol" in err
    assert checksums(out) == before
    # ... and beside the owned entries
    (out / "cases" / "README.txt").unlink()
    (out / "results.csv").write_text("a,b")
    assert _preprocess(raw, out, "--overwrite") == 2
    assert "results.csv" in capsys.readouterr().err
    (out / "results.csv").unlink()
    # with only medvol's files there, --overwrite starts from scratch
    old = (out / "cases" / "s0.npy").stat().st_mtime_ns
    assert _preprocess(raw, out, "--overwrite") == 0
    assert (out / "cases" / "s0.npy").stat().st_mtime_ns != old
    assert sorted(p.name for p in (out / "cases").iterdir()) == sorted(
        f"s{i}{suf}" for i in range(2) for suf in (".npy", "_seg.npy", ".json", "_locations.npz"))


def test_a_cache_from_before_manifests_is_adopted(raw, tmp_path):
    out = tmp_path / "pre"
    preprocess_dataset(raw, out, num_workers=1, quiet=True)
    (out / MANIFEST).unlink()  # as an older medvol left it
    report = preprocess_dataset(raw, out, num_workers=1, quiet=True)
    assert sorted(report.skipped) == ["s0", "s1"] and (out / MANIFEST).exists()


def test_two_sources_of_one_case_id_are_refused(tmp_path):
    img, lab, aff = sphere_case()
    dec = tmp_path / "Task01_X"
    for sub in ("a", "b"):
        write_nifti(dec / sub / "x.nii.gz", img, aff)
        write_nifti(dec / "labels" / sub / "x.nii.gz", lab, aff)
    (dec / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "fg"},
        "training": [{"image": f"./{s}/x.nii.gz", "label": f"./labels/{s}/x.nii.gz"} for s in ("a", "b")]}))
    with pytest.raises(InputError, match="same case id 'x'") as e:
        open_raw_dataset(dec)
    assert "a/x.nii.gz" in str(e.value) and "b/x.nii.gz" in str(e.value)
    flat = tmp_path / "flat"
    write_nifti(flat / "x.nii", img, aff)
    write_nifti(flat / "x.nii.gz", img, aff)
    with pytest.raises(InputError, match="same case id 'x'"):
        open_raw_dataset(flat)


def _predict(run: Path, inp: Path, out: Path) -> int:
    return main(["predict", "-m", str(run), "-i", str(inp), "-o", str(out), "--device", "cpu", "--quiet"])


def test_predict_never_replaces_its_input(tiny_run, tmp_path, capsys):
    d = tmp_path / "d"
    write_nifti(d / "scan.nii.gz", sphere_case()[0])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "scan.nii.gz").symlink_to(d / "scan.nii.gz")  # the same file through a link
    before = checksums(d)
    for out in (d, tmp_path / "elsewhere"):
        assert _predict(tiny_run, d, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "would replace this input scan" in err[0] and "scan.nii.gz" in err[0]
        assert checksums(d) == before
    assert _predict(tiny_run, d / "scan.nii.gz", tmp_path / "p") == 0
    assert (tmp_path / "p" / "scan.nii.gz").exists()


def test_predict_never_replaces_a_file_it_did_not_write(tiny_run, tmp_path, capsys):
    inp = tmp_path / "in"
    write_nifti(inp / "scan.nii.gz", sphere_case()[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan.nii.gz").write_bytes(b"someone's label map")
    assert _predict(tiny_run, inp, out) == 2
    assert "not written by medvol" in capsys.readouterr().err
    assert (out / "scan.nii.gz").read_bytes() == b"someone's label map"
    (out / "scan.nii.gz").unlink()
    assert _predict(tiny_run, inp, out) == 0
    first = (out / "scan.nii.gz").read_bytes()
    assert _predict(tiny_run, inp, out) == 0  # its own outputs it may replace: a rerun works
    assert (out / "scan.nii.gz").read_bytes() == first


def test_predict_refuses_two_scans_of_one_case(tiny_run, tmp_path, capsys):
    inp = tmp_path / "in"
    write_nifti(inp / "a.nii", sphere_case()[0])
    write_nifti(inp / "a.nii.gz", sphere_case(seed=1)[0])
    assert _predict(tiny_run, inp, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "a.nii" in err and "a.nii.gz" in err and "same case 'a'" in err
    assert not (tmp_path / "out").exists()


def test_a_lock_left_by_a_killed_predict_is_taken_over_with_a_warning(tiny_run, tmp_path, caplog):
    """Issue 35, 3: the kernel drops a dead process's flock; its lock file names it."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_nifti(inp / "scan.nii.gz", sphere_case()[0])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.mkdir()
    (out / ".medvol-predict.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "node1", "since": "x"}))
    assert _predict(tiny_run, inp, out) == 0
    assert f"no longer running (pid {int(dead.stdout)} on node1" in caplog.text
    assert (out / "scan.nii.gz").exists() and not (out / ".medvol-predict.lock").exists()
    assert MANIFEST in {p.name for p in out.iterdir()}


def test_predict_leaves_no_lock_and_no_folder_when_it_fails(tiny_run, tmp_path):
    inp = tmp_path / "in"
    write_nifti(inp / "scan.nii.gz", sphere_case()[0][:, :, :1])  # a 2D image for a 3D model: refused
    assert _predict(tiny_run, inp, tmp_path / "new" / "out") == 2
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "old").mkdir()
    assert _predict(tiny_run, inp, tmp_path / "old") == 2
    assert not list((tmp_path / "old").iterdir())
