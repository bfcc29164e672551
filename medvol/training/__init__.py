"""Training: the engine, method trainers (by recipe ``trainer.name``), schedules, checkpoints.

The registry maps each trainer name to a lazy ``"module:Class"`` string: a trainer's module is
imported only when that trainer is asked for (``get_trainer``), so ``medvol train`` loads the
one method it runs. ``register_trainer`` adds a trainer, as a class (a decorator) or as a lazy
string (third-party or user methods)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from medvol import config
from medvol.config import Recipe, from_dict
from medvol.errors import ConfigError

BUILTIN_TRAINERS: dict[str, str] = {
    "canet": "medvol.training.canet:CANetTrainer",
    "dcmt": "medvol.training.dcmt:DCMTTrainer",
    "de_dcgcn_ee": "medvol.training.de_dcgcn_ee:DEDCGCNEETrainer",
    "dodnet": "medvol.training.dodnet:DoDNetTrainer",
    "infnet": "medvol.training.infnet:InfNetTrainer",
    "mrnet": "medvol.training.mrnet:MRNetTrainer",
    "pcrl": "medvol.training.pcrl:PCRLTrainer",
    "semi_infnet": "medvol.training.semi_infnet:SemiInfNet",
    "slice_aggregator": "medvol.training.aggregator:SliceAggregatorTrainer",
    "slice_classifier": "medvol.training.slice_classifier:SliceClassifierTrainer",
    "supervised": "medvol.training.supervised:SupervisedTrainer",
    "ugpcl": "medvol.training.ugpcl:UGPCLTrainer",
    "cascade": "medvol.training.cascade:CascadeTrainer",
    "seran": "medvol.training.seran:SERANTrainer",
}
_TRAINERS: dict[str, str | type] = dict(BUILTIN_TRAINERS)  # name -> "module:Class", or the class once imported


def _lazy(trainer: str | type) -> str:
    """A trainer's ``"module:Class"`` string (what a class and its lazy entry have in common)."""
    return trainer if isinstance(trainer, str) else f"{trainer.__module__}:{trainer.__qualname__}"


def register_trainer(trainer, target: str | None = None):
    """Register a trainer: ``@register_trainer`` on a class (its ``name`` is the key), or
    ``register_trainer("name", "package.module:Class")``, imported when first asked for.
    A name already taken by another trainer is an error (a class registering itself under its
    own lazy string, as a module does when it is imported, is not)."""
    if target is not None:
        name, value = trainer, target
        if not isinstance(name, str) or not isinstance(target, str) or target.count(":") != 1:
            raise ConfigError(f"register_trainer({trainer!r}, {target!r}): expected a name and 'module:Class'")
    else:
        name, value = getattr(trainer, "name", None), trainer
        if not isinstance(trainer, type) or not isinstance(name, str):
            raise ConfigError(f"register_trainer({trainer!r}): expected a class with a string attribute 'name'")
    known = _TRAINERS.get(name)
    if known is not None and _lazy(known) != _lazy(value):
        raise ConfigError(f"trainer name '{name}' is taken by {_lazy(known)}; choose another name for {_lazy(value)}")
    if not (isinstance(known, type) and isinstance(value, str)):  # an imported class stays
        _TRAINERS[name] = value
    return trainer


def trainer_names() -> list[str]:
    """Every registered trainer name (no trainer module is imported)."""
    return sorted(_TRAINERS)


def get_trainer(name: str):
    """The trainer class registered as ``name``, importing its module (and only its) when needed.
    ``name`` may also be a trainer's own ``"package.module:Class"`` (a method in a file of
    yours, on the Python path): a new method is then one file and one recipe."""
    if name not in _TRAINERS:
        if name.count(":") == 1:
            return _import_trainer(name, name, None)
        raise ConfigError(f"trainer.name '{name}' is unknown; known: {trainer_names()}")
    value = _TRAINERS[name]
    if isinstance(value, str):
        _TRAINERS[name] = value = _import_trainer(value, name, name)
    return value


def _import_trainer(value: str, where: str, name: str | None) -> type:
    """The class ``value`` (``"module:Class"``) names; ``name``: the ``.name`` it must have."""
    module, _, qualname = value.partition(":")
    obj: Any
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"trainer '{where}': cannot import {value} ({type(e).__name__}: {e})") from e
    from medvol.training.engine import Trainer

    ok = isinstance(obj, type) and (issubclass(obj, Trainer) or hasattr(obj, "drive"))
    if not ok or (name is not None and getattr(obj, "name", None) != name):
        raise ConfigError(f"trainer '{where}': {value} is not a trainer class" + (f" named '{name}'" if name else "")
                          + f" (its name: {getattr(obj, 'name', None)!r})")
    return obj


def parse_method(trainer: type, method: dict, source: str):
    """A recipe's ``method:`` section parsed by ``trainer.Options`` (a dataclass; nested
    dataclasses for nested mappings): an unknown key or a value of the wrong type is a
    ConfigError naming ``source`` and the key (``method.beta``). A trainer without ``Options``
    takes an empty section only (None). Checks in ``Options.__post_init__`` that raise
    ConfigError run here too, so they fail when the recipe is loaded."""
    options = getattr(trainer, "Options", None)
    if options is None:
        if method:
            name = getattr(trainer, "name", trainer.__name__)
            raise ConfigError(f"{source}: unknown key 'method.{sorted(method)[0]}': trainer '{name}' takes none "
                              "(leave the recipe's method section empty)")
        return None
    return from_dict(options, method, source, "method")


def method_options(recipe: Recipe, source: str | None = None):
    """``recipe.method`` parsed by the ``Options`` of the trainer ``recipe.trainer.name`` names
    (found through the lazy registry: only that trainer's module is imported)."""
    return parse_method(get_trainer(recipe.trainer.name), recipe.method, source or f"recipe '{recipe.name}'")


def check_recipe(recipe: Recipe, source: str = "<recipe>") -> Recipe:
    """:func:`medvol.config.check_recipe` and the ``method:`` section (:func:`method_options`)."""
    method_options(config.check_recipe(recipe, source), source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """:func:`medvol.config.load_recipe` (``extends`` merged, overrides applied, sections typed
    and checked) plus the ``method:`` section parsed by the method trainer's ``Options``: what
    ``medvol train`` loads, so a mistyped method key fails before any process is spawned."""
    data, source = config.read_recipe(path, overrides)
    return check_recipe(from_dict(Recipe, data, source), source)


def train(recipe, data: str | Path, out: str | Path, resume: bool | str = False, device: str = "auto",
          stop_at: int | None = None, quiet: bool = False) -> dict:
    """Train ``recipe`` (a Recipe, or a path/name plus overrides already applied) on the
    preprocessing cache ``data``, writing the run folder ``out``. Joins a process group
    when started by torchrun. ``resume``: True continues the run in ``out`` (its
    ``latest.pt``, which must exist); ``"auto"`` continues it when it exists and starts fresh
    otherwise, so one job script serves the first start and every requeue after a pre-emption
    (:func:`medvol.training.run_folder.resume_flag`, the one rule for every trainer; a driver
    of several runs names the file it resumes from as ``resume_file``)."""
    from medvol.errors import Preempted
    from medvol.training.distributed import setup, teardown
    from medvol.training.engine import fit
    from medvol.training.run_folder import LATEST, resume_flag

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    cls = get_trainer(recipe.trainer.name)
    parse_method(cls, recipe.method, f"recipe '{recipe.name}'")  # before a process group or a run folder
    resume = resume_flag(out, resume, getattr(cls, "resume_file", LATEST))
    driver = getattr(cls, "drive", None)  # several runs in one (Semi-Inf-Net): its own layout
    info = setup(device)
    together = False  # whether every process ends here at the same point
    try:
        if driver is not None:
            result = driver(recipe, data, out, info, resume=resume, stop_at=stop_at, quiet=quiet)
        else:
            result = fit(cls(recipe, data, out, info), resume=resume, stop_at=stop_at, quiet=quiet)
        together = True
        return result
    except Preempted:
        together = True  # every process stops after the same step
        raise
    finally:
        teardown(info, together)
