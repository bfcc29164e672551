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


# ---------------------------------------------------------------- unknown keys and types

@pytest.mark.parametrize("text, key", [
    ("modle: {}\n", "modle"),
    ("trainer:\n  stepz: 10\n", "trainer.stepz"),
    ("data:\n  augment:\n    flip_probb: 0.5\n", "data.augment.flip_probb"),
    ("inference:\n  overlapp: 0.5\n", "inference.overlapp"),
])
def test_unknown_keys_at_each_level_name_the_file_and_the_key(tmp_path, text, key):
    p = write(tmp_path, "r.yaml", "name: r\n" + text)
    with pytest.raises(ConfigError, match=rf"r.yaml: unknown key '{key}' \(known keys"):
        load_recipe(p)


@pytest.mark.parametrize("text, message", [
    ("trainer:\n  steps: ten\n", "'trainer.steps' must be an integer, got 'ten'"),
    ("trainer:\n  steps: 10.5\n", "'trainer.steps' must be an integer, got 10.5"),
    ("trainer:\n  steps: true\n", "'trainer.steps' must be an integer, got True"),
    ("optimizer:\n  lr: fast\n", "'optimizer.lr' must be a number, got 'fast'"),
    ("optimizer:\n  lr: .nan\n", "'optimizer.lr' must be a finite number, got nan"),
    ("data:\n  augment:\n    enabled: 1\n", "'data.augment.enabled' must be true or false, got 1"),
    ("data:\n  patch_size: 32\n", "'data.patch_size' must be a list, got 32"),
    ("model:\n  options: [1]\n", "'model.options' must be a mapping, got \\[1\\]"),
    ("data: 3\n", "'data' must be a mapping, got 3"),
    ("name: 3\n", "'name' must be a string, got 3"),
])
def test_type_errors_name_the_file_and_the_key(tmp_path, text, message):
    p = write(tmp_path, "r.yaml", text)
    with pytest.raises(ConfigError, match=rf"r.yaml: {message}$"):
        load_recipe(p)


def test_types_are_coerced(tmp_path):
    p = write(tmp_path, "r.yaml", "name: r\noptimizer:\n  lr: 1e-3\n  betas: [0.5, 0.9]\ndata:\n  fold: all\n")
    r = load_recipe(p)
    assert r.optimizer.lr == 1e-3 and isinstance(r.optimizer.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert r.optimizer.betas == (0.5, 0.9) and r.data.fold == "all"
    assert load_recipe(p, ["optimizer.lr=1"]).optimizer.lr == 1.0
    assert isinstance(load_recipe(p, ["optimizer.lr=1"]).optimizer.lr, float)


# ---------------------------------------------------------------- overrides

def test_overrides_are_applied_at_any_depth_and_parsed_as_yaml(tmp_path):
    p = write(tmp_path, "r.yaml", "name: r\n")
    r = load_recipe(p, ["data.augment.flip_axes=[0, 1]", "trainer.grad_clip=null", "model.options={a: 1}",
                        "description=two words", "trainer.steps=5", "trainer.steps=6"])
    assert r.data.augment.flip_axes == (0, 1) and r.trainer.grad_clip is None
    assert r.model.options == {"a": 1} and r.description == "two words"
    assert r.trainer.steps == 6  # the last one wins


@pytest.mark.parametrize("item, message", [
    ("trainer.steps", r"--set 'trainer.steps': expected key.path=value"),
    ("trainer.steps=[1", r"--set 'trainer.steps=\[1': value is not valid YAML"),
    ("trainer.steps.x=1", r"--set 'trainer.steps.x=1': 'steps' is not a section"),
    ("trainer.nope=1", r"r.yaml: unknown key 'trainer.nope'"),
    ("nope.x=1", r"r.yaml: unknown key 'nope'"),
    ("trainer.steps=many", r"r.yaml: 'trainer.steps' must be an integer, got 'many'"),
    ("trainer.steps=0", r"r.yaml: 'trainer.steps' must be >= 1, got 0"),
])
def test_bad_overrides_are_rejected(tmp_path, item, message):
    p = write(tmp_path, "r.yaml", "name: r\ntrainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=message):
        load_recipe(p, [item])
    assert load_recipe(p).trainer.steps == 3  # the file is never changed


# ---------------------------------------------------------------- the method: section

def test_method_keys_are_checked_when_the_recipe_is_loaded(tmp_path):
    from medvol.training import load_recipe as load_training_recipe

    p = write(tmp_path, "r.yaml", "extends: canet_demo\nname: r\nmethod:\n  betta: 0.3\n")
    assert load_recipe(p).method["betta"] == 0.3  # medvol.config leaves the section to the trainer
    with pytest.raises(ConfigError, match=r"r.yaml \(extends .*canet_demo.yaml -> .*canet_la.yaml\): unknown key "
                                          r"'method.betta' \(known keys of method: .*beta"):
        load_training_recipe(p)
    with pytest.raises(ConfigError, match=r"canet_demo.yaml.*: 'method.beta' must be a number, got 'high'$"):
        load_training_recipe("canet_demo", ["method.beta=high"])
    with pytest.raises(ConfigError, match=r"pcrl_demo.yaml: unknown key 'method.pretext.spacin' \(known keys of "
                                          r"method.pretext: "):
        load_training_recipe("pcrl_demo", ["method.pretext.spacin=[1, 1, 1]"])
    with pytest.raises(ConfigError, match=r"semi_infnet_demo.yaml.*: 'method.initial.epochs' must be a number"):
        load_training_recipe("semi_infnet_demo", ["method.initial.epochs=many"])
    with pytest.raises(ConfigError, match=r"quickstart.yaml: unknown key 'method.beta': trainer 'supervised' takes "
                                          r"none"):
        load_training_recipe("quickstart", ["method.beta=0.3"])
    assert load_training_recipe("canet_demo", ["method.beta=0.5"]).method["beta"] == 0.5


def test_check_recipe_and_the_trainer_use_the_same_parser():
    from medvol.training import check_recipe, get_trainer, method_options, parse_method

    r = load_recipe("ugpcl_demo", ["method.contrast_strat=5"])
    with pytest.raises(ConfigError, match=r"recipe 'ugpcl_demo': unknown key 'method.contrast_strat'"):
        check_recipe(r, "recipe 'ugpcl_demo'")
    cls = get_trainer("ugpcl")
    with pytest.raises(ConfigError, match=r"recipe 'ugpcl_demo': unknown key 'method.contrast_strat'"):
        trainer = cls.__new__(cls)  # the engine's own method, on a trainer with a recipe and nothing else
        trainer.recipe = r
        trainer._parse_options()
    good = load_recipe("ugpcl_demo")
    assert method_options(good) == parse_method(cls, good.method, "x") and method_options(good).contrast_start == 50


def test_options_post_init_checks_run_at_load_time_and_name_the_file(tmp_path, monkeypatch):
    """A method's own value checks (``Options.__post_init__`` raising ConfigError) fail when
    the recipe is loaded, with the file named."""
    import dataclasses

    import medvol.training as training
    from medvol.training import load_recipe as load_training_recipe

    @dataclasses.dataclass
    class ToyOptions:
        rounds: int = 1

        def __post_init__(self):
            if self.rounds < 1:
                raise ConfigError(f"'method.rounds' must be >= 1, got {self.rounds}")

    class Toy:
        name = "toy_checked"
        Options = ToyOptions

    monkeypatch.setattr(training, "_TRAINERS", {**training._TRAINERS, "toy_checked": Toy})
    p = write(tmp_path, "r.yaml", "name: r\ntrainer:\n  name: toy_checked\nmethod:\n  rounds: 0\n")
    with pytest.raises(ConfigError, match=r"^\S*r.yaml: 'method.rounds' must be >= 1, got 0$"):
        load_training_recipe(p)
    assert load_training_recipe(p, ["method.rounds=2"]).method == {"rounds": 2}


def test_train_command_fails_on_a_method_key_before_spawning_processes(tmp_path, monkeypatch, capsys):
    import medvol.training.distributed as distributed
    from medvol.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("processes spawned"))
    rc = main(["train", "canet_demo", "--data", str(tmp_path / "pre"), "--out", str(tmp_path / "run"),
               "--nproc", "2", "--set", "method.betta=0.3"])
    err = capsys.readouterr().err
    assert rc == 2 and "canet_demo.yaml" in err and "unknown key 'method.betta'" in err
    assert not (tmp_path / "run").exists()
