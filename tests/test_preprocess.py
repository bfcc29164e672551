"""End-to-end preprocessing on small real data: cache contents, API, resume, shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medvol.io import read_volume
from medvol.preprocessing import (
    fingerprint_dataset,
    list_cases,
    load_case,
    load_plans,
    plan_dataset,
    preprocess_case,
    preprocess_dataset,
)
from medvol.resampling import compute_new_shape


def test_cache_holds_every_training_case_with_consistent_properties(brain_raw, brain_pre):
    cases = list_cases(brain_pre)
    assert cases == [f"brain_{i:03d}" for i in range(5)]
    plans = load_plans(brain_pre)
    for case in cases:
        image, label, props = load_case(brain_pre, case)
        assert image.dtype == np.float32 and image.ndim == 4 and image.shape[0] == 1
        assert label.dtype == np.int8 and label.shape == (1,) + image.shape[1:]
        assert set(np.unique(label)) <= {-1, 0, 1, 2}
        src = read_volume(brain_raw / "imagesTr" / f"{case}_0000.nii.gz")
        assert props["original_shape"] == list(src.spatial_shape)
        np.testing.assert_allclose(props["original_affine"], src.affine, atol=1e-6)
        box = props["crop_bbox"]
        assert [b - a for a, b in box] == props["shape_after_crop"]
        expect = compute_new_shape(props["shape_after_crop"], props["original_spacing"], plans["target_spacing"])
        assert list(image.shape[1:]) == list(expect) == props["shape_after_resampling"]
        for cls, locs in props["class_locations"].items():
            locs = np.asarray(locs)
            assert len(locs) > 0
            assert np.all(label[0][tuple(locs.T)] == int(cls))


def test_plan_is_nnunet_shaped(brain_pre):
    plans = load_plans(brain_pre)
    fp = json.loads((brain_pre / "fingerprint.json").read_text())
    assert len(plans["target_spacing"]) == 3 and plans["batch_size"] >= 2
    spacings = np.array(fp["spacings"])
    np.testing.assert_allclose(plans["target_spacing"], np.median(spacings, 0))  # isotropic-ish: plain median
    net = plans["network"]
    assert len(net["strides"]) == len(net["kernel_sizes"]) == net["n_stages"]
    div = np.prod(np.array(net["strides"]), axis=0)
    assert np.all(np.array(plans["patch_size"]) % div == 0)
    norm = plans["normalization"][0]
    assert norm["scheme"] == "ZScoreNormalization"
    assert norm["use_mask_for_norm"] == (fp["median_relative_size_after_cropping"] < 0.75)


def test_normalised_inside_the_mask(brain_pre):
    image, label, _ = load_case(brain_pre, "brain_000")
    inside = np.asarray(image[0])[np.asarray(label[0]) >= 0]
    assert abs(inside.mean()) < 0.1 and 0.85 < inside.std() < 1.15


def test_preprocess_case_reproduces_the_cache(brain_raw, brain_pre):
    plans = load_plans(brain_pre)
    vol = read_volume(brain_raw / "imagesTr" / "brain_002_0000.nii.gz")
    image, props = preprocess_case(vol, plans)
    cached, _, cprops = load_case(brain_pre, "brain_002")
    assert image.shape == cached.shape
    assert props["crop_bbox"] == cprops["crop_bbox"]
    np.testing.assert_allclose(image, cached, atol=1e-3)


def test_rerun_skips_finished_and_redoes_broken_cases(brain_raw, brain_pre, tmp_path):
    out = tmp_path / "pre"
    shutil.copytree(brain_pre, out)
    before, _, _ = load_case(out, "brain_001", mmap=False)
    # a case whose arrays were cut short and whose properties never got written
    (out / "cases" / "brain_001.json").unlink()
    np.save(out / "cases" / "brain_001.npy", np.zeros(3))
    rep = preprocess_dataset(brain_raw, out, num_workers=1, quiet=True)
    assert rep.done == ["brain_001"] and sorted(rep.skipped) == ["brain_000", "brain_002", "brain_003", "brain_004"]
    after, _, _ = load_case(out, "brain_001", mmap=False)
    np.testing.assert_array_equal(before, after)


@pytest.mark.slow
def test_kill_mid_run_then_resume_gives_a_complete_cache(brain_raw, brain_pre, tmp_path):
    out = tmp_path / "killed"
    args = ["preprocess", str(brain_raw), "-o", str(out), "-j", "1", "--quiet"]
    # The child pauses 2 s after each finished case, so the kill lands mid-run however fast
    # the machine preprocesses (the cases themselves take well under a second).
    slow = ("import sys, time\nfrom medvol.preprocessing import preprocessor as p\norig = p._preprocess_job\n"
            "def job(*a, **k):\n    r = orig(*a, **k)\n    time.sleep(2)\n    return r\n"
            "p._preprocess_job = job\nfrom medvol.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    cmd = [sys.executable, "-m", "medvol", *args]
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "cases").glob("*.json"))) < 1:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((out / "cases").glob("*.json"))) < 5, "the run finished before it could be killed"
    rc = subprocess.run(cmd, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert list_cases(out) == list_cases(brain_pre)
    assert not list((out / "cases").glob(".*.part*"))
    for case in list_cases(out):
        a, la, _ = load_case(out, case)
        b, lb, _ = load_case(brain_pre, case)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


def test_shards_merge_into_the_same_plan(brain_raw, brain_pre, tmp_path):
    out = tmp_path / "sharded"
    for k in range(3):  # e.g. a SLURM array of 3
        rep = fingerprint_dataset(brain_raw, out, num_workers=1, shard=f"{k}/3", quiet=True)
        assert not rep.failures
    plans = plan_dataset(out)
    assert plans == load_plans(brain_pre)
    for k in range(3):
        preprocess_dataset(brain_raw, out, num_workers=1, shard=f"{k}/3", quiet=True)
    assert list_cases(out) == list_cases(brain_pre)
    for case in list_cases(out):
        np.testing.assert_array_equal(load_case(out, case)[0], load_case(brain_pre, case)[0])


def test_sharded_preprocess_without_plan_says_what_to_do(brain_raw, tmp_path):
    from medvol.errors import CacheError

    with pytest.raises(CacheError, match="medvol plan"):
        preprocess_dataset(brain_raw, tmp_path / "x", shard="0/2")
    with pytest.raises(Exception, match="K/N"):
        preprocess_dataset(brain_raw, tmp_path / "x", shard="2")


def test_preprocess_case_leaves_the_callers_volume_alone(brain_raw, brain_pre):
    plans = load_plans(brain_pre)
    vol = read_volume(brain_raw / "imagesTs" / "brain_005_0000.nii.gz")
    vol.array = vol.array.astype(np.float32)
    before = vol.array.copy()
    a, _ = preprocess_case(vol, plans)
    np.testing.assert_array_equal(vol.array, before)
    b, _ = preprocess_case(vol, plans, inplace=True)  # may reuse the array: same result
    np.testing.assert_allclose(a, b)


def test_foreground_locations_live_beside_the_case_not_in_its_json(brain_pre, tmp_path):
    import json
    import shutil

    from medvol.cache import CACHE_VERSION, locations_path, plans_digest

    case = list_cases(brain_pre)[0]
    raw_props = json.loads((brain_pre / "cases" / f"{case}.json").read_text())
    assert "class_locations" not in raw_props and raw_props["cache_version"] == CACHE_VERSION == 3
    with np.load(locations_path(brain_pre, case)) as z:
        assert sorted(z.files) == ["1", "2"] and all(z[k].dtype == np.int32 and z[k].shape[1] == 3 for k in z.files)
    # a case written by the format before (locations inside the JSON, digest without the
    # version) is not complete for this version: a rerun redoes it instead of misreading it
    from medvol.cache import case_is_complete

    old = tmp_path / "old"
    shutil.copytree(brain_pre, old)
    props = json.loads((old / "cases" / f"{case}.json").read_text())
    plans = json.loads((old / "plans.json").read_text())
    import hashlib

    props["plans_digest"] = hashlib.sha1(json.dumps(plans, sort_keys=True).encode()).hexdigest()[:16]
    (old / "cases" / f"{case}.json").write_text(json.dumps(props))
    assert case_is_complete(old, case, plans_digest(plans)) is False
    assert case_is_complete(brain_pre, case, plans_digest(plans)) is True
    locations_path(old, list_cases(old)[1]).unlink()
    assert case_is_complete(old, list_cases(old)[1], plans_digest(plans)) is False


def test_sources_recorded_from_a_relative_path_match_the_same_files_by_absolute_path(tmp_path, monkeypatch):
    """A cache made with a relative raw path (`medvol preprocess raw/X -o pre/X`): the end-of-run
    validation reaches the same files through the absolute raw root and must not call them
    changed; an edited file still is."""
    from pathlib import Path

    from medvol.preprocessing.sources import changed_sources, record_sources

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.nii.gz").write_bytes(b"abc")
    monkeypatch.chdir(tmp_path)
    record = record_sources([Path("raw/a.nii.gz")])
    assert changed_sources(record, [tmp_path / "raw" / "a.nii.gz"]) == []
    assert changed_sources(record, [Path("raw/a.nii.gz")]) == []
    (tmp_path / "raw" / "a.nii.gz").write_bytes(b"abcd")
    assert changed_sources(record, [tmp_path / "raw" / "a.nii.gz"]) == [str(tmp_path / "raw" / "a.nii.gz")]
