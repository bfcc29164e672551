"""docs/adding_a_method.md runs as written: its method file and recipe, copied out of the page
into a folder on the Python path, train on a small cache through `medvol train` (the recipe's
`trainer.name` is the class's import path), and the Tversky loss falls."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medvol.cli import main
from medvol.errors import ConfigError
from medvol.training import get_trainer

from conftest import metric_series, pinned

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(), re.S)


@pytest.fixture
def method_files(tmp_path, monkeypatch):
    (tmp_path / "my_methods").mkdir()
    (tmp_path / "my_methods" / "__init__.py").write_text("")
    (tmp_path / "my_methods" / "tversky.py").write_text(_blocks("python")[0])
    recipe = tmp_path / "tversky.yaml"
    recipe.write_text(_blocks("yaml")[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    return recipe


@pytest.mark.slow
def test_the_pages_method_is_one_file_and_one_recipe(method_files, brain_pre, tmp_path):
    run = tmp_path / "run"
    sets = ["model.base_features=4", "model.max_features=16", "data.patch_size=[32,32,32]", "data.batch_size=2",
            "data.num_workers=0", "trainer.steps=40", "trainer.val_every=40", "trainer.final_validation=false",
            "optimizer.lr=0.02", "trainer.log_every=1"]
    with pinned():
        rc = main(["train", str(method_files), "--data", str(brain_pre), "--out", str(run), "--device", "cpu",
                   "--quiet", *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    losses = np.array(metric_series(run)["train/loss"])
    # Measured (2 threads, seeds pinned, trainer.seed 0/1/2): the mean Tversky loss of the last
    # 8 steps is 0.828 / 0.849 / 0.814 of the first 8's; without learning it stays near 1.
    assert losses[-8:].mean() < 0.92 * losses[:8].mean()
    assert (run / "checkpoints" / "latest.pt").exists() and "val/dice_mean" in metric_series(run)


def test_a_mistyped_method_key_of_the_pages_method_fails_at_load(method_files):
    from medvol.training import load_recipe

    with pytest.raises(ConfigError, match=r"tversky\.yaml.*method\.alhpa"):
        load_recipe(method_files, ["method.alhpa=0.5"])
    assert get_trainer("my_methods.tversky:TverskyTrainer").name == "tversky"
    with pytest.raises(ConfigError, match="is not a trainer class"):
        get_trainer("my_methods.tversky:TverskyOptions")
