"""Silent wrong output, issue 20: the cache notices changed sources, files keep the user's
umask, and the CLI shows tracebacks only for real bugs (or with --debug)."""

from __future__ import annotations

import json
import logging
import os
import stat

import numpy as np
import pytest

from medvol.cli import COMMANDS, main
from medvol.preprocessing import load_case, preprocess_dataset
from medvol.utils import write_json

from conftest import sphere_case, write_nifti, write_v2_dataset


@pytest.fixture()
def raw(tmp_path):
    return write_v2_dataset(tmp_path / "Dataset010_Src", {c: ([sphere_case(seed=i)[0]], sphere_case(seed=i)[1],
                                                               np.eye(4)) for i, c in enumerate("ab")})


def test_an_edited_source_is_redone_and_said_so(raw, tmp_path, caplog):
    out = tmp_path / "out"
    assert preprocess_dataset(raw, out, num_workers=1, quiet=True).done == ["a", "b"]
    sources = json.loads((out / "cases" / "a.json").read_text())["sources"]
    assert [os.path.basename(s["path"]) for s in sources] == ["a_0000.nii.gz", "a.nii.gz"]
    assert all(len(s["sha256"]) == 64 and s["size"] > 0 for s in sources)
    assert preprocess_dataset(raw, out, num_workers=1, quiet=True).skipped == ["a", "b"]

    edited = sphere_case(seed=0, value=300.0)[0]  # same label, brighter sphere
    write_nifti(raw / "imagesTr" / "a_0000.nii.gz", edited)
    with caplog.at_level(logging.WARNING):
        rep = preprocess_dataset(raw, out, num_workers=1, quiet=True)
    assert "a" in rep.done and not rep.failures
    assert any("case a: source(s) changed" in r.getMessage() and "a_0000.nii.gz" in r.getMessage()
               for r in caplog.records)
    fresh = tmp_path / "fresh"
    preprocess_dataset(raw, fresh, num_workers=1, quiet=True)
    for case in "ab":  # the rerun's cache is the cache of the edited dataset
        np.testing.assert_array_equal(load_case(out, case)[0], load_case(fresh, case)[0])


def test_a_source_only_touched_is_not_redone(raw, tmp_path):
    out = tmp_path / "out"
    preprocess_dataset(raw, out, num_workers=1, quiet=True)
    img = raw / "imagesTr" / "b_0000.nii.gz"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert preprocess_dataset(raw, out, num_workers=1, quiet=True).skipped == ["a", "b"]


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_written_files_keep_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~umask


def test_a_cache_is_readable_by_the_group(raw, tmp_path):
    old = os.umask(0o002)
    try:
        preprocess_dataset(raw, tmp_path / "out", num_workers=2, quiet=True)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o664}


def test_debug_adds_the_traceback_to_the_one_line(tmp_path, capsys):
    argv = ["evaluate", "--pred", str(tmp_path / "nope"), "--ref", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medvol evaluate: error: {tmp_path / 'nope'}: folder not found"]
    assert main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InputError" in err
    assert err.strip().splitlines()[-1] == f"medvol evaluate: error: {tmp_path / 'nope'}: folder not found"


@pytest.mark.parametrize("bug", [ZeroDivisionError("a bug"), KeyError("plans"), ConnectionResetError(104, "reset")])
def test_real_bugs_keep_their_traceback(monkeypatch, bug):
    def broken(args):
        raise bug

    monkeypatch.setitem(COMMANDS, "evaluate", broken)
    with pytest.raises(type(bug)):
        main(["evaluate", "--pred", "p", "--ref", "r"])


def test_an_unreadable_or_unwritable_path_is_one_line(monkeypatch, capsys):
    import errno

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/raw/a.nii.gz")

    monkeypatch.setitem(COMMANDS, "evaluate", denied)
    assert main(["evaluate", "--pred", "p", "--ref", "r"]) == 2
    assert capsys.readouterr().err.splitlines() == ["medvol evaluate: error: /data/raw/a.nii.gz: Permission denied"]


def test_one_file_hash_and_one_atomic_text_write(tmp_path, monkeypatch):
    """utils.sha256_file streams the files (a DICOM folder's names count with ``named``);
    utils.write_text leaves the old file whole when the write fails."""
    import hashlib

    from medvol.utils import sha256_file, write_text

    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    a.write_bytes(b"x" * (3 << 20) + b"end")
    b.write_bytes(b"second")
    assert sha256_file(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert sha256_file(a, b, named=True) == hashlib.sha256(
        b"a.dcm\0" + a.read_bytes() + b"b.dcm\0" + b.read_bytes()).hexdigest()
    assert sha256_file(a, b, named=True) != sha256_file(a, b)
    out = tmp_path / "page.html"
    write_text(out, "old")

    def fail(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", fail)
    with pytest.raises(Exception, match="disk full"):
        write_text(out, "new")
    monkeypatch.undo()
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm", "b.dcm", "page.html"]  # no temp file left


def test_a_killed_writers_temp_files_are_swept_and_no_other_file(tmp_path):
    """Temp files name their writer (host-pid): a dead writer's on this host are removed by the
    first atomic write into the folder; a live writer's, another host's and a user's are kept."""
    import subprocess
    import sys

    from medvol import utils

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    keep = [f".a.nii.gz.{utils._HOST}-{os.getpid()}.abcd_123.part.nii.gz",  # this (live) process
            f".a.nii.gz.otherhost-{dead.pid}.abcd_123.part.nii.gz",  # another host: cannot tell
            ".notes.part", "a.nii.gz.vm-1.part"]  # not medvol's temp names
    gone = [f".a.nii.gz.{utils._HOST}-{dead.pid}.x1y2z3_4.part.nii.gz",
            f".b.npy.{utils._HOST}-{dead.pid}.q1w2e3r4.part.npy"]
    for n in keep + gone:
        (tmp_path / n).write_bytes(b"x")
    utils._swept.discard(tmp_path)
    utils.write_json(tmp_path / "c.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "c.json"])
