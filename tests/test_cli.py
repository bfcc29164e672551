"""The CLI as a new user meets it: help text, predict's switches and output names."""

from __future__ import annotations

import numpy as np
import pytest

from medvol import cli
from medvol.io import read_volume

from conftest import sphere_case, write_nifti


def test_help_opens_with_a_user_facing_description(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.startswith("medvol: 3D medical image segmentation")
    assert "``" not in out and "thin layer" not in out  # not the module docstring
    assert "medvol predict -m RUN" in out


@pytest.mark.parametrize("flags, tta, lcc", [([], None, None), (["--tta"], True, None), (["--no-tta"], False, None),
                                             (["--no-largest-component"], None, False)])
def test_predict_switches_override_the_recipe_both_ways(flags, tta, lcc, monkeypatch):
    import medvol.inference

    seen = {}
    monkeypatch.setattr(medvol.inference, "predict",
                        lambda *a, **k: seen.update(tta=a[4], lcc=k["largest_component_only"]) or [])
    assert cli.main(["predict", "-m", "run", "-i", "in", "-o", "out", "--no-pictures", *flags]) == 0
    assert seen == {"tta": tta, "lcc": lcc}


def test_predict_options_override_the_recipes_inference_settings(tiny_run, tmp_path):
    """The rule for real (predictor._settings through `medvol predict`): an option given
    replaces the recipe's value, either way; one not given keeps it; an explicit --overlap
    without --step sets the recipe's step aside; --step beats any overlap. What was used is
    predict.json's record, and the probabilities show that it was used."""
    import json
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["inference"] = dict(recipe["inference"], tta=True, overlap=0.25, step=[5, 5, 5], largest_component=True,
                               precision="fp32", all_windows=True, blend="constant")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    inp = tmp_path / "imagesTs"
    write_nifti(inp / "brain_008_0000.nii.gz", sphere_case()[0])

    def predict(name, *flags):
        out = tmp_path / name
        assert cli.main(["predict", "-m", str(run), "-i", str(inp), "-o", str(out), "--device", "cpu", "--quiet",
                         "--no-pictures", "--save-probabilities", *flags]) == 0
        used = json.loads((out / "predict.json").read_text())["settings"]
        return {k: used[k] for k in ("tta", "overlap", "step", "largest_component", "precision", "all_windows",
                                     "blend")}, np.load(out / "brain_008.npz")["probabilities"]

    base = dict(tta=True, overlap=0.25, step=[5, 5, 5], largest_component=True, precision="fp32", all_windows=True,
                blend="constant")
    recipes, p_recipe = predict("recipe")
    assert recipes == base
    given, p_given = predict("given", "--no-tta", "--overlap", "0.5", "--no-largest-component")
    assert given == dict(base, tta=False, overlap=0.5, step=None, largest_component=False)
    steps, _ = predict("step", "--step", "4", "4", "4")
    assert steps == dict(base, step=[4, 4, 4])
    both, _ = predict("both", "--overlap", "0.5", "--step", "4", "4", "4")
    assert both == dict(base, overlap=0.5, step=[4, 4, 4])
    again, p_again = predict("again", "--tta", "--step", "5", "5", "5")
    assert again == base
    np.testing.assert_array_equal(p_again, p_recipe)  # the recipe's settings, given or not: the same output
    assert np.abs(p_given.astype(np.float32) - p_recipe.astype(np.float32)).max() > 1e-3  # the options took effect


def test_a_file_and_its_folder_give_the_same_output_name(tiny_run, tmp_path):
    inp = tmp_path / "imagesTs"
    write_nifti(inp / "brain_008_0000.nii.gz", sphere_case()[0])
    args = ["-m", str(tiny_run), "--device", "cpu", "--quiet", "--no-pictures"]
    assert cli.main(["predict", *args, "-i", str(inp), "-o", str(tmp_path / "a")]) == 0
    assert cli.main(["predict", *args, "-i", str(inp / "brain_008_0000.nii.gz"), "-o", str(tmp_path / "b")]) == 0
    assert [p.name for p in (tmp_path / "a").glob("*.nii.gz")] == ["brain_008.nii.gz"]
    assert [p.name for p in (tmp_path / "b").glob("*.nii.gz")] == ["brain_008.nii.gz"]
    np.testing.assert_array_equal(read_volume(tmp_path / "a" / "brain_008.nii.gz").array,
                                  read_volume(tmp_path / "b" / "brain_008.nii.gz").array)


def test_train_fold_option_sets_the_recipes_fold(monkeypatch, tmp_path):
    import medvol.training

    seen = {}
    monkeypatch.setattr(medvol.training, "train", lambda recipe, *a, **k: seen.update(fold=recipe.data.fold) or {})
    assert cli.main(["train", "quickstart", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--fold", "3",
                     "--quiet"]) == 0
    assert seen == {"fold": 3}
    assert cli.main(["train", "quickstart", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--fold", "x",
                     "--quiet"]) == 2


def test_every_command_takes_quiet_and_debug():
    """main() reads args.quiet and args.debug for every command: a subcommand without them
    fails on its first use (as `best` did after a merge)."""
    import argparse

    from medvol.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for name, p in sub.choices.items():
        opts = {o for a in p._actions for o in a.option_strings}
        assert {"--quiet", "--debug"} <= opts, name
