"""medvol.config and the recipe contract: unknown keys at every level, types, ``--set``
overrides, ``extends`` (merge, chains, cycles, relative paths) and the ``method:`` section
parsed by the method trainer's ``Options`` (medvol.training.load_recipe)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medvol.config import builtin_recipes, load_recipe, merge_recipe, read_recipe, save_recipe, to_dict
from medvol.errors import ConfigError


def write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


# ---------------------------------------------------------------- extends

def test_merge_recipe_merges_mappings_and_replaces_lists_and_scalars():
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1, "f": 2}}, "g": 1}
    child = {"a": {"c": [3], "d": {"f": 3}}, "h": None}
    assert merge_recipe(base, child) == {"a": {"b": 1, "c": [3], "d": {"e": 1, "f": 3}}, "g": 1, "h": None}
    assert base == {"a": {"b": 1, "c": [1, 2], "d": {"e": 1, "f": 2}}, "g": 1}  # unchanged
    assert merge_recipe({"a": {"b": 1}}, {"a": 5}) == {"a": 5}  # a scalar replaces a mapping


def test_extends_merges_sections_key_by_key(tmp_path):
    write(tmp_path, "base.yaml", "name: base\ndescription: the base\ntrainer:\n  steps: 10\n  seed: 3\n"
                                 "data:\n  patch_size: [8, 8, 8]\n  augment:\n    flip_prob: 0.1\n    noise_prob: 0.2\n"
                                 "method:\n  a: 1\n  nested: {x: 1, y: 2}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\ntrainer:\n  steps: 20\n"
                                          "data:\n  patch_size: [4, 4, 4]\n  augment:\n    flip_prob: 0.9\n"
                                          "method:\n  nested: {y: 5}\n")
    r = load_recipe(child)
    assert (r.name, r.description) == ("child", "")  # name and description are never inherited
    assert (r.trainer.steps, r.trainer.seed) == (20, 3)
    assert r.data.patch_size == [4, 4, 4]  # a list is replaced, not merged
    assert (r.data.augment.flip_prob, r.data.augment.noise_prob) == (0.9, 0.2)
    assert r.method == {"a": 1, "nested": {"x": 1, "y": 5}}


def test_extends_chain_and_a_builtin_name(tmp_path):
    write(tmp_path, "a.yaml", "extends: canet_la\nname: a\ntrainer:\n  steps: 7\n")
    write(tmp_path, "sub/b.yaml", "extends: ../a.yaml\nname: b\ntrainer:\n  seed: 5\nmethod:\n  beta: 0.5\n")
    r = load_recipe(tmp_path / "sub" / "b.yaml")
    la = load_recipe("canet_la")
    assert (r.trainer.steps, r.trainer.seed, r.trainer.name) == (7, 5, "canet")
    assert r.method == {**la.method, "beta": 0.5} and r.model == la.model and r.inference == la.inference
    _, source = read_recipe(tmp_path / "sub" / "b.yaml")  # what errors about the merged recipe name
    la_file = Path(str(builtin_recipes()["canet_la"]))
    assert source == f"{tmp_path / 'sub' / 'b.yaml'} (extends {tmp_path / 'sub' / '..' / 'a.yaml'} -> {la_file})"


def test_overrides_apply_after_the_merge(tmp_path):
    write(tmp_path, "base.yaml", "name: base\ntrainer:\n  steps: 10\n  seed: 3\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\ntrainer:\n  steps: 20\n")
    r = load_recipe(child, ["trainer.steps=30", "trainer.log_every=2"])
    assert (r.trainer.steps, r.trainer.seed, r.trainer.log_every) == (30, 3, 2)
    with pytest.raises(ConfigError, match=r"unknown key 'extends'"):  # not a recipe value: only files extend
        load_recipe(child, ["extends=quickstart"])


def test_extends_cycle_names_the_files(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path, "b.yaml", "extends: c.yaml\nname: b\n")
    write(tmp_path, "c.yaml", "extends: a.yaml\nname: c\n")
    with pytest.raises(ConfigError, match=r"a.yaml: 'extends' forms a cycle: .*a.yaml -> .*b.yaml -> .*c.yaml "
                                          r"-> .*a.yaml$"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path, "self.yaml", "extends: ./self.yaml\nname: s\n")
    with pytest.raises(ConfigError, match=r"self.yaml: 'extends' forms a cycle"):
        load_recipe(tmp_path / "self.yaml")


def test_extends_errors_name_the_file(tmp_path):
    p = write(tmp_path, "r.yaml", "extends: missing.yaml\nname: r\n")
    with pytest.raises(ConfigError, match=r"r.yaml: extends 'missing.yaml': no such file"):
        load_recipe(p)
    p.write_text("extends: canet_lla\nname: r\n")
    with pytest.raises(ConfigError, match=r"r.yaml: extends 'canet_lla': not a built-in recipe \(canet_demo, "):
        load_recipe(p)
    p.write_text("extends: [canet_la]\nname: r\n")
    with pytest.raises(ConfigError, match=r"r.yaml: 'extends' must be a built-in recipe's name or a path"):
        load_recipe(p)


def test_a_bad_key_in_an_extended_file_names_that_file(tmp_path):
    write(tmp_path, "base.yaml", "name: base\ntrainer:\n  stepz: 10\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\n")
    with pytest.raises(ConfigError, match=r"base.yaml: unknown key 'trainer.stepz'"):
        load_recipe(child)
    write(tmp_path, "base.yaml", "name: base\ntrainer:\n  steps: ten\n")
    with pytest.raises(ConfigError, match=r"base.yaml: 'trainer.steps' must be an integer"):
        load_recipe(child)


def test_a_run_saves_the_resolved_recipe(tmp_path):
    """Reproducible runs: the saved recipe holds every value and no ``extends``, so it loads to
    the same recipe wherever it is copied, whatever happens to the recipes it came from."""
    base = write(tmp_path, "base.yaml", "extends: canet_la\nname: base\ntrainer:\n  steps: 10\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\nmethod:\n  beta: 0.5\n")
    r = load_recipe(child, ["trainer.seed=4"])
    save_recipe(r, tmp_path / "run" / "recipe.yaml")
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert "extends" not in saved and saved == to_dict(r)
    base.unlink()
    assert load_recipe(tmp_path / "run" / "recipe.yaml") == r
    assert r.trainer.steps == 10 and r.trainer.seed == 4 and r.method["beta"] == 0.5


def test_builtin_recipes_that_extend_resolve_like_a_whole_file(tmp_path):
    """Each built-in recipe with ``extends`` loads to what it does when the chain is written
    out in one file (the resolved YAML, copied outside pipelines/)."""
    extending = [n for n, f in builtin_recipes().items() if "extends" in yaml.safe_load(f.read_text())]
    assert {"canet_demo", "quickstart_2d"} <= set(extending)
    for name in extending:
        r = load_recipe(name)
        save_recipe(r, tmp_path / f"{name}.yaml")
        assert load_recipe(tmp_path / f"{name}.yaml") == r and r.name == name
