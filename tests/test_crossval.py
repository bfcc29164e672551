"""End-of-fold validation in the scans' own geometry, and `medvol cv` over the folds."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medvol.cli import main
from medvol.config import load_recipe
from medvol.evaluation.crossval import cross_validation
from medvol.evaluation.metrics import METRICS
from medvol.io import read_volume
from medvol.training import train

from conftest import medvol_argv, run_killed_at, sphere_case, write_v2_dataset

TINY = ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
        "data.num_workers=0", "trainer.steps=2", "trainer.val_every=2"]
SPLITS = [{"train": ["s0", "s1"], "val": ["s2", "s3"]}, {"train": ["s2", "s3"], "val": ["s0", "s1"]}]


def _oblique(spacing, degrees, flip_x=False, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing) @ np.diag([-1 if flip_x else 1, 1, 1])
    aff[:3, 3] = offset
    return aff


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """Four spheres on four different grids (shapes, spacings, an oblique flipped one), a
    2-fold splits_final.json, and both folds trained 2 steps into CV/fold_0, CV/fold_1."""
    tmp = tmp_path_factory.mktemp("cv")
    grids = {"s0": ((24, 24, 20), np.eye(4)), "s1": ((22, 26, 18), _oblique((1.2, 1.0, 1.5), 0, offset=(5, -3, 2))),
             "s2": ((24, 24, 20), _oblique((1.0, 1.0, 1.0), 10, flip_x=True)),
             "s3": ((20, 22, 24), _oblique((0.9, 0.9, 1.1), 0))}
    cases = {}
    for i, (cid, (shape, aff)) in enumerate(grids.items()):
        image, label, _ = sphere_case(shape=shape, radius=5.0 + i, seed=i)
        cases[cid] = ([image], label, aff)
    raw = write_v2_dataset(tmp / "Dataset011_CV", cases)
    from medvol.preprocessing import preprocess_dataset

    assert not preprocess_dataset(raw, tmp / "pre", num_workers=1, quiet=True).failures
    (tmp / "pre" / "splits_final.json").write_text(json.dumps(SPLITS))
    for k in (0, 1):
        train(load_recipe("quickstart", TINY + [f"data.fold={k}"]), tmp / "pre", tmp / "CV" / f"fold_{k}",
              device="cpu", quiet=True)
    return raw, tmp / "pre", tmp / "CV"


def _summary(run: Path) -> dict:
    return json.loads((run / "validation" / "summary.json").read_text())


def test_a_finished_fold_validates_its_cases_in_their_scans_geometry(folds, tmp_path):
    raw, _, cv = folds
    run = cv / "fold_0"
    s = _summary(run)
    assert s["validation"]["cases"] == ["s2", "s3"] and s["validation"]["fold"] == 0
    assert s["validation"]["step"] == 2 and s["validation"]["checkpoint"] == "latest"
    for case in ("s2", "s3"):
        src, pred = read_volume(raw / "imagesTr" / f"{case}_0000.nii.gz"), read_volume(run / "validation" /
                                                                                      f"{case}.nii.gz")
        assert pred.spatial_shape == src.spatial_shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    # the numbers are medvol evaluate's on the same files
    ref = tmp_path / "ref"
    ref.mkdir()
    for case in ("s2", "s3"):
        shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", ref)
    assert main(["evaluate", "--pred", str(run / "validation"), "--ref", str(ref), "-o", str(tmp_path / "m"),
                 "--quiet"]) == 0
    ev = json.loads((tmp_path / "m.json").read_text())
    # (evaluate names the class class_1: the copied references lack the raw dataset.json)
    assert {c: m["fg"]["dice"] for c, m in s["cases"].items()} == \
        {c: m["class_1"]["dice"] for c, m in ev["cases"].items()}
    assert s["summary"]["fg"]["dice"]["mean"] == ev["summary"]["class_1"]["dice"]["mean"]
    # and the predictions are medvol predict's with the final checkpoint
    assert main(["predict", "-m", str(run), "--checkpoint", "latest", "-i", str(raw / "imagesTr" / "s2_0000.nii.gz"),
                 "-o", str(tmp_path / "p"), "--device", "cpu", "--quiet", "--no-pictures"]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "p" / "s2.nii.gz").array,
                                  read_volume(run / "validation" / "s2.nii.gz").array)


def test_cv_merges_the_folds(folds, capsys):
    _, _, cv = folds
    assert main(["cv", str(cv), "--quiet"]) == 0
    res = json.loads((cv / "cv_summary.json").read_text())
    dice = {k: [m["fg"]["dice"] for m in _summary(cv / f"fold_{k}")["cases"].values()] for k in (0, 1)}
    fold_means = [float(np.mean(dice[k])) for k in (0, 1)]
    for k in (0, 1):
        assert res["folds"][f"fold_{k}"]["summary"]["fg"]["dice"]["mean"] == pytest.approx(fold_means[k], abs=1e-12)
        assert res["folds"][f"fold_{k}"]["fold"] == k
    # two folds of two cases: the pooled mean is the mean of the folds' means
    assert res["all_cases"]["summary"]["fg"]["dice"]["mean"] == pytest.approx(np.mean(fold_means), abs=1e-12)
    assert res["mean_of_folds"]["summary"]["fg"]["dice"]["mean"] == pytest.approx(np.mean(fold_means), abs=1e-12)
    assert res["mean_of_folds"]["summary"]["fg"]["dice"]["std"] == pytest.approx(np.std(fold_means), abs=1e-12)
    assert res["all_cases"]["summary"]["foreground_mean"]["dice"]["mean"] == pytest.approx(np.mean(fold_means))
    rows = list(csv.DictReader(open(cv / "cv_summary.csv")))
    assert [(r["row"], r["class"]) for r in rows] == [(g, c) for g in ("fold 0", "fold 1", "all cases", "mean of folds")
                                                      for c in ("fg", "foreground_mean")]
    assert float(rows[0]["dice_mean"]) == pytest.approx(fold_means[0], abs=1e-6)
    page = (cv / "cv_summary.html").read_text()
    assert f"{np.mean(fold_means):.4f}" in page and "data:image/png;base64," in page
    assert (cv / "cv_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fg: Dice" in capsys.readouterr().out
    # several run folders need an output folder
    assert main(["cv", str(cv / "fold_0"), str(cv / "fold_1"), "--quiet"]) == 2
    assert "-o OUT" in capsys.readouterr().err


def _fake_fold(src: Path, dst: Path, dice: list[float], hd95: list[float], cases: list[str]) -> Path:
    """A copy of a fold that validated ``cases`` of the dataset (s0-s3) with the given metrics and
    trained on the others, as its split.json says: a fold of another split of the same data."""
    shutil.copytree(src, dst)
    s = _summary(dst)
    s["cases"] = {c: {"fg": {**{k: 0.0 for k in METRICS}, "dice": d, "hd95": h}}
                  for c, d, h in zip(cases, dice, hd95)}
    s["validation"]["cases"] = cases
    (dst / "validation" / "summary.json").write_text(json.dumps(s))
    split = {"labelled": [c for c in ("s0", "s1", "s2", "s3") if c not in cases], "unlabelled": [], "validation": cases}
    (dst / "split.json").write_text(json.dumps(split))
    return dst


def test_cv_pools_cases_and_averages_folds_as_documented(folds, tmp_path):
    _, _, cv = folds
    a = _fake_fold(cv / "fold_0", tmp_path / "a", [1.0, 0.5, 0.0], [1.0, math.nan, 3.0], ["s0", "s1", "s2"])
    b = _fake_fold(cv / "fold_1", tmp_path / "b", [0.8], [2.0], ["s3"])
    res = cross_validation([a, b])
    pooled, folds_ = res["all_cases"]["summary"]["fg"], res["mean_of_folds"]["summary"]["fg"]
    assert pooled["dice"]["mean"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.8) / 4)  # case-weighted
    assert folds_["dice"]["mean"] == pytest.approx((0.5 + 0.8) / 2)  # fold-weighted
    assert folds_["dice"]["std"] == pytest.approx(0.15)
    assert pooled["hd95"]["mean"] == pytest.approx(2.0) and pooled["hd95"]["n_undefined"] == 1
    assert res["folds"]["a"]["summary"]["fg"]["hd95"]["mean"] == pytest.approx(2.0)


def test_cv_refuses_what_is_no_cross_validation(folds, tmp_path, capsys):
    _, _, cv = folds

    def err(*runs):
        assert main(["cv", *map(str, runs), "-o", str(tmp_path / "out"), "--quiet"]) == 2
        return capsys.readouterr().err

    bare = tmp_path / "bare"
    shutil.copytree(cv / "fold_1", bare)
    shutil.rmtree(bare / "validation")
    assert str(bare / "validation" / "summary.json") in err(cv / "fold_0", bare)
    other = tmp_path / "other_plan"
    shutil.copytree(cv / "fold_1", other)
    plans = json.loads((other / "plans.json").read_text())
    plans["target_spacing"] = [2.0, 2.0, 2.0]
    (other / "plans.json").write_text(json.dumps(plans))
    assert "target_spacing" in err(cv / "fold_0", other)
    data = tmp_path / "other_data"
    shutil.copytree(cv / "fold_1", data)
    ds = json.loads((data / "dataset.json").read_text())
    ds["training_cases"] = ds["training_cases"][:3]
    (data / "dataset.json").write_text(json.dumps(ds))
    assert "another dataset" in err(cv / "fold_0", data)
    twice = tmp_path / "fold_0_again"
    shutil.copytree(cv / "fold_0", twice)
    assert "case s2 is validated by both" in err(cv / "fold_0", twice)
    # one fold of the two: its training cases are validated by no fold given, and the missing
    # fold is named from the cache's splits_final.json
    missing = err(cv / "fold_0")
    assert "case(s) ['s0', 's1'] of the dataset are validated by no fold given" in missing
    assert "pass the run(s) of fold(s) 1 of" in missing and "splits_final.json too" in missing
    stale = tmp_path / "stale"
    shutil.copytree(cv / "fold_1", stale)
    s = _summary(stale)
    s["validation"]["step"] = 1
    (stale / "validation" / "summary.json").write_text(json.dumps(s))
    assert "written at step 1, but the run trained to step 2" in err(cv / "fold_0", stale)
    assert not (tmp_path / "out").exists()


def test_a_resumed_finished_fold_validates_only_when_it_has_no_summary(folds, tmp_path, monkeypatch):
    from medvol.inference import predictor

    _, pre, cv = folds
    run = tmp_path / "run"
    shutil.copytree(cv / "fold_0", run)
    before = (run / "validation" / "summary.json").read_text()
    real = predictor.predict_cases
    calls = []
    monkeypatch.setattr(predictor, "predict_cases", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = load_recipe("quickstart", TINY + ["data.fold=0"])
    train(recipe, pre, run, resume=True, device="cpu", quiet=True)
    assert calls == [] and (run / "validation" / "summary.json").read_text() == before
    (run / "validation" / "summary.json").unlink()  # e.g. pre-empted while validating
    train(recipe, pre, run, resume=True, device="cpu", quiet=True)
    assert calls == [1] and _summary(run)["cases"] == json.loads(before)["cases"]


def test_unreachable_raw_data_warns_and_the_run_still_succeeds(folds, tmp_path, caplog):
    raw, pre, _ = folds
    moved = tmp_path / "pre"
    shutil.copytree(pre, moved)
    ds = json.loads((moved / "dataset.json").read_text())
    ds["raw_root"] = str(tmp_path / "gone")
    (moved / "dataset.json").write_text(json.dumps(ds))
    recipe = load_recipe("quickstart", TINY + ["data.fold=1", "trainer.steps=1", "trainer.val_every=1"])
    with caplog.at_level(logging.WARNING):
        assert "val/dice_fg" in train(recipe, moved, tmp_path / "run", device="cpu", quiet=True)
    assert "final validation skipped" in caplog.text and "is not reachable" in caplog.text
    assert not (tmp_path / "run" / "validation").exists()
    ds["raw_root"] = str(raw)  # the data is back: --resume validates the finished run
    (moved / "dataset.json").write_text(json.dumps(ds))
    train(recipe, moved, tmp_path / "run", resume=True, device="cpu", quiet=True)
    assert _summary(tmp_path / "run")["validation"]["cases"] == ["s0", "s1"]


def test_no_final_validation_switch(folds, tmp_path):
    _, pre, _ = folds
    sets = sum((["--set", s] for s in TINY + ["trainer.steps=1", "trainer.val_every=1"]), [])
    assert main(["train", "quickstart", "--data", str(pre), "--out", str(tmp_path / "run"), "--fold", "0",
                 "--no-final-validation", "--device", "cpu", "--quiet", *sets]) == 0
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").exists()
    assert not (tmp_path / "run" / "validation").exists()


def test_a_2d_fold_validates_in_the_scans_geometry(folds, tmp_path):
    raw, pre, _ = folds
    recipe = load_recipe("quickstart_2d", ["model.base_features=4", "model.max_features=8", "data.batch_size=4",
                                           "data.num_workers=0", "trainer.steps=2", "trainer.val_every=2",
                                           "data.fold=1"])
    train(recipe, pre, tmp_path / "run2d", device="cpu", quiet=True)
    s = _summary(tmp_path / "run2d")
    assert s["validation"]["configuration"] == "2d" and sorted(s["cases"]) == ["s0", "s1"]
    for case in ("s0", "s1"):
        src = read_volume(raw / "imagesTr" / f"{case}_0000.nii.gz")
        pred = read_volume(tmp_path / "run2d" / "validation" / f"{case}.nii.gz")
        assert pred.spatial_shape == src.spatial_shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)


def test_sigkill_while_cv_renames_its_files_and_the_rerun_writes_the_whole_set(folds, tmp_path):
    """Issue 35, 3: SIGKILL between cv's renames (png and html renamed, csv and json not): the
    same command run again writes all four as an unkilled run does, with no temp file left."""
    _, _, cv = folds
    runs = [str(cv / f"fold_{k}") for k in (0, 1)]
    out, ref = tmp_path / "out", tmp_path / "ref"
    argv = medvol_argv("cv", *runs, "-o", str(out), "--quiet")
    run_killed_at("cv_summary.csv", argv, tmp_path / "hook")
    assert {"cv_summary.html", "cv_dice.png"} <= {p.name for p in out.iterdir()}
    assert not (out / "cv_summary.csv").exists() and list(out.glob(".cv_summary.csv.*.part*"))
    assert main(["cv", *runs, "-o", str(out), "--quiet"]) == 0
    assert main(["cv", *runs, "-o", str(ref), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for name in ("cv_summary.json", "cv_summary.csv"):
        assert (out / name).read_text() == (ref / name).read_text()


def test_sigkill_during_the_final_validation_and_resume_validates_every_case(folds, tmp_path):
    """Issue 35, 3: a finished fold killed (SIGKILL) just before its second validation case's
    prediction is renamed into place: `--resume auto` trains no further, predicts every case
    again, sweeps the killed writer's temp file and writes the summary the fold had."""
    _, pre, cv = folds
    run = tmp_path / "run"
    shutil.copytree(cv / "fold_0", run)
    before = _summary(run)
    shutil.rmtree(run / "validation")
    argv = medvol_argv("train", "quickstart", "--data", str(pre), "--out", str(run), "--device", "cpu", "--quiet",
                       "--resume", "auto", *sum((["--set", s] for s in [*TINY, "data.fold=0"]), []))
    run_killed_at("s3.nii.gz", argv, tmp_path / "hook")
    assert not (run / "validation" / "summary.json").exists()
    assert list((run / "validation").rglob(".s3.nii.gz.*.part*"))
    assert subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode == 0
    after = _summary(run)
    assert after["cases"] == before["cases"] and after["validation"]["step"] == before["validation"]["step"] == 2
    assert not [p for p in run.rglob("*") if ".part" in p.name]
