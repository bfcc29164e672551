"""Ensembles: predict -m A -m B (or a folder of fold_* runs) averages the models' probabilities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medvol.cli import main

from conftest import sphere_case, write_nifti


@pytest.fixture(scope="module")
def second_run(tiny_run, tmp_path_factory):
    from medvol.config import load_recipe
    from medvol.training import train

    out = tmp_path_factory.mktemp("ens") / "run_b"
    r = load_recipe("quickstart", ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]",
                                   "data.batch_size=2", "data.num_workers=0", "trainer.steps=2",
                                   "trainer.val_every=2", "data.val_cases=[s1]", "trainer.seed=7"])
    train(r, tiny_run.parent / "pre", out, device="cpu", quiet=True)
    return out


def _probs(models, inp, out):
    args = sum((["-m", str(m)] for m in models), [])
    assert main(["predict", *args, "-i", str(inp), "-o", str(out), "--device", "cpu", "--quiet", "--no-tta",
                 "--save-probabilities", "--no-pictures"]) == 0
    with np.load(out / "scan.npz") as z:
        return z["probabilities"].astype(np.float32)


def test_an_ensemble_is_the_mean_of_its_models(tiny_run, second_run, tmp_path):
    inp = tmp_path / "in"
    write_nifti(inp / "scan.nii.gz", sphere_case(seed=4)[0])
    a, b = _probs([tiny_run], inp, tmp_path / "a"), _probs([second_run], inp, tmp_path / "b")
    assert np.abs(a - b).max() > 1e-2  # two different models
    both = _probs([tiny_run, second_run], inp, tmp_path / "ab")
    np.testing.assert_allclose(both, (a + b) / 2, atol=2e-3)  # float16 storage of each map
    folds = tmp_path / "folds"
    shutil.copytree(tiny_run, folds / "fold_0")
    shutil.copytree(second_run, folds / "fold_1")
    np.testing.assert_allclose(_probs([folds], inp, tmp_path / "f"), both, atol=1e-6)


def test_models_planned_differently_are_refused(tiny_run, second_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(second_run, other)
    plans = json.loads((other / "plans.json").read_text())
    plans["target_spacing"] = [2.0, 2.0, 2.0]
    (other / "plans.json").write_text(json.dumps(plans))
    inp = tmp_path / "in"
    write_nifti(inp / "scan.nii.gz", sphere_case()[0])
    assert main(["predict", "-m", str(tiny_run), "-m", str(other), "-i", str(inp), "-o", str(tmp_path / "p"),
                 "--device", "cpu", "--quiet"]) == 2
    assert "target_spacing" in capsys.readouterr().err
