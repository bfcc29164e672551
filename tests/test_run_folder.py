"""The one resume rule (medvol.training.run_folder.resume_flag): an engine run and a driver of
several runs (Semi-Inf-Net, resuming from its semi_state.json) accept and refuse the same
``--resume`` values and folders, with the same messages."""

from __future__ import annotations

import re

import pytest

from medvol.errors import ConfigError
from medvol.training import load_recipe, train
from medvol.training.run_folder import LATEST, resume_flag

STATE = "semi_state.json"


@pytest.mark.parametrize("resume_file", [LATEST, STATE])
def test_resume_values_and_folders(tmp_path, resume_file):
    empty, held = tmp_path / "empty", tmp_path / "held"
    (held / resume_file).parent.mkdir(parents=True)
    (held / resume_file).write_text("")
    assert resume_flag(empty, False, resume_file) is False and resume_flag(empty, "auto", resume_file) is False
    assert resume_flag(held, True, resume_file) is True and resume_flag(held, "auto", resume_file) is True
    e, h = re.escape(str(empty)), re.escape(str(held))
    with pytest.raises(ConfigError, match=rf"^{e}: nothing to resume \(no {resume_file}\); use --resume auto"):
        resume_flag(empty, True, resume_file)
    with pytest.raises(ConfigError, match=rf"^{h}: holds a run already; pass --resume to continue it"):
        resume_flag(held, False, resume_file)
    with pytest.raises(ConfigError, match=r"^--resume: expected no value \(continue\) or 'auto', got 'yes'"):
        resume_flag(held, "yes", resume_file)


def test_a_driver_refuses_a_folder_holding_an_engine_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / LATEST).write_text("")
    with pytest.raises(ConfigError, match="holds a run already"):
        resume_flag(tmp_path, False, STATE)
    with pytest.raises(ConfigError, match=rf"nothing to resume \(no {STATE}\)"):
        resume_flag(tmp_path, True, STATE)  # an engine run's latest.pt is no loop to continue


@pytest.mark.parametrize("recipe", ["infnet_demo", "semi_infnet_demo"])
def test_train_applies_the_rule_to_every_trainer_before_it_starts(tmp_path, recipe):
    r = load_recipe(recipe)
    resumed = "checkpoints/latest.pt" if recipe == "infnet_demo" else STATE
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'out'))}: nothing to resume \(no {resumed}\)"):
        train(r, tmp_path / "no_cache", tmp_path / "out", resume=True, device="cpu", quiet=True)
    with pytest.raises(ConfigError, match=r"^--resume: expected no value \(continue\) or 'auto', got 'always'"):
        train(r, tmp_path / "no_cache", tmp_path / "out", resume="always", device="cpu", quiet=True)
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    (tmp_path / "out" / LATEST).write_text("")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'out'))}: holds a run already"):
        train(r, tmp_path / "no_cache", tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out" / "recipe.yaml").exists()  # refused before anything was written
