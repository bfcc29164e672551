"""Recipes: parsing into dataclasses, unknown keys, overrides, the built-in recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medvol.cli import main
from medvol.config import Recipe, load_recipe, save_recipe, to_dict
from medvol.errors import ConfigError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def test_builtin_recipes_load():
    recipes = sorted(PIPELINES.glob("*.yaml"))
    assert recipes, "pipelines/ holds no recipe"
    for p in recipes:
        r = load_recipe(p)
        assert isinstance(r, Recipe) and r.name == p.stem
    assert load_recipe("quickstart").trainer.name == "supervised"  # by name


def test_every_builtin_method_section_parses_with_its_trainers_options():
    """What ``medvol train`` loads (medvol.training.load_recipe): each recipe's ``method:``
    section parsed by its trainer's ``Options``; every key the file states is a field."""
    from medvol.training import get_trainer, method_options
    from medvol.training import load_recipe as load_training_recipe

    parsed = {}
    for p in sorted(PIPELINES.glob("*.yaml")):
        r = load_training_recipe(p)
        cls = get_trainer(r.trainer.name)
        options = method_options(r)
        if cls.Options is None:
            assert options is None and r.method == {}, p
            continue
        assert isinstance(options, cls.Options), p
        assert _holds(r.method, to_dict(options)), p  # each stated value arrives (nested ones too)
        parsed[p.stem] = options
    assert {"canet_la", "dcmt", "infnet", "pcrl_pretrain", "semi_infnet", "slice_aggregator", "ugpcl"} <= set(parsed)
    assert parsed["canet_demo"].adv_ramp_div == 5 and parsed["semi_infnet_demo"].per_round == 4


def _holds(stated, parsed) -> bool:
    """Every value of the mapping ``stated`` is in ``parsed`` (a plain dict of the options)."""
    if isinstance(stated, dict):
        return isinstance(parsed, dict) and all(k in parsed and _holds(v, parsed[k]) for k, v in stated.items())
    return stated == parsed


def test_recipes_command_lists_each_builtin_recipe_with_its_purpose(capsys):
    assert main(["recipes"]) == 0
    rows = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()]
    expected = [[p.stem, yaml.safe_load(p.read_text())["description"]] for p in sorted(PIPELINES.glob("*.yaml"))]
    assert rows == expected and ["quickstart", load_recipe("quickstart").description] in rows


def test_unknown_recipe_name_lists_the_builtin_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found from anywhere, not only inside the checkout
    assert load_recipe("quickstart.yaml").name == "quickstart"
    with pytest.raises(ConfigError, match=r"quickstrat: recipe not found .*canet_demo, .*quickstart(, |; ).*"
                                          r"see `medvol recipes`"):
        load_recipe("quickstrat")


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: r\ntrainer:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'trainer.stepz'"):
        load_recipe(p)
    p.write_text("name: r\nmodle: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'modle'"):
        load_recipe(p)


def test_type_errors_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: r\ntrainer:\n  steps: ten\n")
    with pytest.raises(ConfigError, match="'trainer.steps' must be an integer"):
        load_recipe(p)
    p.write_text("name: r\n")
    r = load_recipe(p, ["trainer.steps=7", "optimizer.lr=1e-3", "data.patch_size=[32, 32, 16]",
                        "data.augment.enabled=false"])
    assert r.trainer.steps == 7 and r.optimizer.lr == 1e-3 and r.data.patch_size == [32, 32, 16]
    assert r.data.augment.enabled is False
    with pytest.raises(ConfigError, match="unknown key 'trainer.nope'"):
        load_recipe(p, ["trainer.nope=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_recipe(p, ["trainer.steps"])


def test_saved_recipe_round_trips(tmp_path):
    r = load_recipe("quickstart", ["trainer.steps=3"])
    save_recipe(r, tmp_path / "x.yaml")
    assert load_recipe(tmp_path / "x.yaml") == r


def test_method_section_is_checked_by_train_before_anything_starts(tmp_path):
    """A Recipe handed to ``train`` has its method section parsed before any data is read, a
    process group joined or the run folder made."""
    from medvol.training import train

    r = load_recipe("quickstart", ["method.beta=0.3"])
    with pytest.raises(ConfigError, match="recipe 'quickstart': unknown key 'method.beta': trainer 'supervised' "
                                          "takes none"):
        train(r, tmp_path / "no_cache", tmp_path / "run", device="cpu")
    with pytest.raises(ConfigError, match="recipe 'canet_demo': unknown key 'method.betta'"):
        train(load_recipe("canet_demo", ["method.betta=0.3"]), tmp_path / "no_cache", tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


def test_inference_section_is_typed_and_checked(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: r\ninference:\n  overlap: 0.25\n  step: [18, 18, 4]\n  tta: true\n")
    inf = load_recipe(p).inference
    assert (inf.overlap, inf.step, inf.tta, inf.largest_component) == (0.25, [18, 18, 4], True, False)
    p.write_text("name: r\ninference:\n  overlapp: 0.25\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'inference.overlapp'"):
        load_recipe(p)
    p.write_text("name: r\ninference:\n  tta: 0.5\n")
    with pytest.raises(ConfigError, match="'inference.tta' must be true or false"):
        load_recipe(p)
    assert load_recipe("canet_la").inference.step == [18, 18, 4]


# ---------------------------------------------------------------- the trainer registry

def test_get_trainer_imports_only_the_trainer_it_returns():
    """``medvol train`` loads one method: no other trainer module, and not the preprocessing
    driver (Semi-Inf-Net imports it), in a fresh process."""
    code = ("import sys\nfrom medvol.training import get_trainer\n"
            "cls = get_trainer('supervised')\n"
            "print(cls.__name__, sorted(m for m in sys.modules if m in {'medvol.training.pcrl', "
            "'medvol.training.semi_infnet', 'medvol.training.canet', 'medvol.preprocessing.preprocessor'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "SupervisedTrainer []"


def test_every_lazy_trainer_resolves_to_a_class_of_that_name():
    from medvol.training import BUILTIN_TRAINERS, get_trainer

    assert len(BUILTIN_TRAINERS) == 13
    for name, target in BUILTIN_TRAINERS.items():
        cls = get_trainer(name)
        assert isinstance(cls, type) and cls.name == name, target
        assert f"{cls.__module__}:{cls.__qualname__}" == target
    recipes = {load_recipe(p).trainer.name for p in PIPELINES.glob("*.yaml")}
    assert recipes <= set(BUILTIN_TRAINERS), recipes - set(BUILTIN_TRAINERS)


def test_register_trainer_takes_a_class_or_a_lazy_string(monkeypatch):
    import medvol.training as training
    from medvol.training import get_trainer, register_trainer, trainer_names

    monkeypatch.setattr(training, "_TRAINERS", dict(training._TRAINERS))

    @register_trainer
    class Toy:
        name = "toy"

    assert get_trainer("toy") is Toy and "toy" in trainer_names()
    register_trainer("toy2", "medvol.training.supervised:SupervisedTrainer")
    with pytest.raises(ConfigError, match=r"trainer 'toy2': .*SupervisedTrainer is not a trainer class named 'toy2'"):
        get_trainer("toy2")
    register_trainer("toy3", "medvol.training.nowhere:Toy")
    with pytest.raises(ConfigError, match=r"trainer 'toy3': cannot import medvol.training.nowhere:Toy"):
        get_trainer("toy3")
    with pytest.raises(ConfigError, match=r"trainer name 'supervised' is taken by "
                                          r"medvol.training.supervised:SupervisedTrainer"):
        register_trainer("supervised", "mypackage.trainers:Mine")
    with pytest.raises(ConfigError, match=r"expected a name and 'module:Class'"):
        register_trainer("toy4", "mypackage.trainers.Mine")
    with pytest.raises(ConfigError, match=r"trainer.name 'toy5' is unknown; known: \[.*'supervised'"):
        get_trainer("toy5")


def test_every_network_names_an_option_it_does_not_take():
    """One line naming the key, from every builder, instead of a TypeError from a constructor."""
    from medvol.config import ModelConfig
    from medvol.errors import ConfigError
    from medvol.networks import _REGISTRY, build_model

    build_model(ModelConfig(name="slice_cnn"), None, 1, 2)  # registers every builder
    for name in sorted(_REGISTRY):
        with pytest.raises(ConfigError, match=rf"'model.options': {name} does not take \['no_such_option'\]"):
            build_model(ModelConfig(name=name, options={"no_such_option": 1}), None, 1, 2)
