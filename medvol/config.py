"""Recipes: YAML files parsed into dataclasses. Unknown keys are errors naming the key and
the file; ``--set a.b=c`` overrides any value (parsed as YAML). A recipe may start from another
(``extends: canet_la``, a built-in name, or ``extends: base.yaml``, a path relative to the file)
and state only the keys that differ: mappings merge key by key, lists and scalars are replaced,
chains are followed, a cycle is an error; ``name`` and ``description`` are never inherited.
What a run saves (``save_recipe``) is the merged, fully resolved recipe, without ``extends``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medvol.errors import ConfigError


@dataclass
class ModelConfig:
    """The recipe's ``model:`` section: the network's registry ``name`` (``dynunet``, nnU-Net's
    U-Net, by default), its width (``base_features`` doubling per stage up to ``max_features``),
    whether it has ``deep_supervision`` heads, and architecture-specific keyword ``options``.
    The topology (kernels, strides) comes from the plan."""

    name: str = "dynunet"
    base_features: int = 32  # nnU-Net: 32 * 2**stage, capped at max_features
    max_features: int = 320
    deep_supervision: bool = True
    options: dict = field(default_factory=dict)  # architecture-specific keyword arguments


@dataclass
class AugmentConfig:
    """The ``data.augment:`` section: nnU-Net's default augmentation, with MONAI transforms.
    Each transform has a ``*_prob`` (per sample) and its range: rotation, scaling, elastic
    deformation, Gaussian noise and blur, brightness, contrast, low resolution, gamma, mirroring
    (``flip_axes``) and 90° turns; ``enabled: false`` turns them all off."""

    enabled: bool = True
    rotate_prob: float = 0.2
    rotate_deg: float = 30.0
    scale_prob: float = 0.2
    scale_range: tuple = (0.7, 1.4)
    elastic_prob: float = 0.0
    noise_prob: float = 0.1
    noise_std: float = 0.1
    blur_prob: float = 0.2
    blur_sigma: tuple = (0.5, 1.0)
    brightness_prob: float = 0.15
    brightness_range: tuple = (0.75, 1.25)
    contrast_prob: float = 0.15
    contrast_range: tuple = (0.75, 1.25)
    lowres_prob: float = 0.25
    lowres_zoom: tuple = (0.5, 1.0)
    gamma_prob: float = 0.3
    gamma_range: tuple = (0.7, 1.5)
    flip_prob: float = 0.5
    flip_axes: tuple = (0, 1, 2)
    rot90_prob: float = 0.0  # random multiples of 90 degrees in the plane of the first two axes


@dataclass
class DataConfig:
    """The recipe's ``data:`` section: what training reads from the preprocessing cache. The
    ``configuration`` (3D patches or 2D slices, with ``context`` neighbours), patch and batch
    size (the plan's when None), foreground oversampling, worker processes, the validation split
    (``val_fraction``, explicit ``val_cases`` or a cross-validation ``fold``), which cases keep
    labels (``labelled``) and how many unlabelled samples join each batch, and ``augment``."""

    configuration: str = "3d_fullres"  # nnU-Net's: 3d_fullres (3D patches) | 2d (slices of that cache) | 3d_lowres
    # | 3d_cascade_fullres (CONFIGURATIONS)
    context: int = 0  # 2d: this many neighbouring slices on each side come along as channels (2.5D)
    patch_size: list | None = None  # None: the plan's (of the configuration)
    batch_size: int | None = None  # per process; None: the plan's
    oversample_foreground: float = 0.33  # share of each global batch centred on foreground
    # graded slices (2d, slice_labels.csv): share of each batch's labelled slots drawn class-balanced
    # (a grade uniformly, then a slice of it; medvol.data.slices)
    oversample_grades: float = 0.0
    num_workers: int | None = None  # data worker processes; None: one per core but one, at most 12
    val_fraction: float = 0.2
    val_cases: list | None = None  # explicit validation case ids (overrides fold and val_fraction)
    fold: int | str | None = None  # cross-validation fold of PRE/splits_final.json (0-4 or "all"; --fold)
    labelled: int | list | None = None  # semi-supervised: how many (or which) training cases keep labels
    unlabelled_per_batch: int = 0  # two-stream batches: this many unlabelled samples in each batch
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # 3d_cascade_fullres: the 3d_lowres run folder, or its fold folders (each case's low-res
    # prediction from a fold that validated on it, when there is one)
    previous_stage: str | list | None = None


@dataclass
class OptimizerConfig:
    """The recipe's ``optimizer:`` section, for the main model: ``name`` (SGD with Nesterov
    momentum, nnU-Net's, or Adam/AdamW), learning rate, momentum, weight decay and Adam's
    ``betas``. A method's extra optimisers (a discriminator's) take their settings from its
    ``method:`` section."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    betas: tuple = (0.9, 0.999)


@dataclass
class ScheduleConfig:
    """The recipe's ``schedule:`` section, the learning rate over the steps: ``poly`` (nnU-Net's,
    with ``power``), ``step`` (×``gamma`` at each of ``milestones``), ``cosine`` or ``constant``,
    after ``warmup_steps`` of linear warm-up, never below ``min_lr``."""

    name: str = "poly"  # poly | step | cosine | constant
    power: float = 0.9
    milestones: list = field(default_factory=list)  # step schedule: steps at which lr *= gamma
    gamma: float = 0.1
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class TrainerConfig:
    """The recipe's ``trainer:`` section: which method trains (``name``, a registered trainer or
    ``module:Class``), for how many ``steps``, how often it validates (``val_every``, writing
    ``latest.pt``/``best.pt``) and logs, the loss, gradient clipping, precision, the seed, the
    validation windows' overlap, freezing loaded weights, extra checkpoints for pre-emptible
    clusters and the final validation from the raw scans."""

    name: str = "supervised"
    steps: int = 1000
    val_every: int = 250
    log_every: int = 10
    loss: str = "dice_ce"  # dice_ce | ce | dice
    batch_dice: bool | None = None  # Dice pooled over the batch or per sample; null: the plan's (nnU-Net's rule)
    grad_clip: float | None = 12.0
    amp: bool = True  # false: fp32 whatever precision says "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (medvol/precision.py; --precision)
    seed: int = 0
    val_overlap: float = 0.5
    freeze_init_steps: int = 0  # with init_from: the loaded tensors get no update for this many steps
    checkpoint_every: int | None = None  # also write latest.pt every N steps (pre-emptible clusters)
    final_validation: bool = True  # at the end: predict the validation cases from their raw scans, evaluate


@dataclass
class InferenceConfig:
    """The recipe's ``inference:`` section: how ``medvol predict`` runs a trained model (its
    command-line options override these): mirroring TTA, the sliding window's overlap or step
    and its blending, post-processing (largest component, DoDNet's rules), precision, and
    whether windows outside the body mask run."""

    tta: bool = False  # mirroring test-time augmentation over the trained flip axes
    overlap: float = 0.5  # sliding-window overlap fraction
    step: list | None = None  # window step in voxels per axis (papers' "stride"); replaces overlap
    largest_component: bool = False  # keep each label's largest connected component
    dodnet_postprocess: bool = False  # DoDNet's rules (task-conditioned models only)
    blend: str = "gaussian"  # window weighting: gaussian (nnU-Net) | constant (uniform averaging)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (medvol/precision.py; --precision)
    all_windows: bool = False  # also run windows outside the scan's nonzero (body) mask (--all-windows)


@dataclass
class Recipe:
    """A whole recipe (one YAML file in ``pipelines/``, or a file of yours): its ``name`` and
    ``description``, the sections above (``model``, ``data``, ``optimizer``, ``schedule``,
    ``trainer``, ``inference``), the method's own ``method:`` mapping (parsed by the trainer's
    ``Options`` in :func:`medvol.training.load_recipe`) and ``init_from``, weights to start from."""

    name: str = "unnamed"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    method: dict = field(default_factory=dict)  # method-specific options, checked by the method's trainer
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    init_from: str | None = None  # weights to start from (loaded by name and shape; e.g. PCRL's encoder.pt)


_PLAIN = {dict: "a mapping", bool: "true or false", str: "a string"}  # checked by isinstance only


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """``value`` checked against (and converted to) the field type ``tp``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping, got {value!r}")
        return from_dict(tp, value, source, where)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), where, source)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{where}' must be a list, got {value!r}")
        return tuple(value) if (tp is tuple or origin is tuple) else list(value)
    if tp in _PLAIN:
        if not isinstance(value, tp):
            raise ConfigError(f"{source}: '{where}' must be {_PLAIN[tp]}, got {value!r}")
        return dict(value) if tp is dict else value
    if tp in (int, float):
        return _coerce_number(value, tp, where, source)
    return value


def _coerce_union(value: Any, args: tuple, where: str, source: str) -> Any:
    """The first member of the union that takes ``value``; else the first member's error."""
    if value is None and type(None) in args:
        return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(value, a, where, source)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{source}: bad value for '{where}': {value!r}")


def _coerce_number(value: Any, tp: type, where: str, source: str) -> int | float:
    """An int (never a bool) for ``int``; any number for ``float``, which YAML 1.1 may hand
    over as a string ("1e-3" without a dot)."""
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{where}' must be an integer, got {value!r}")
        return value
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: '{where}' must be a number, got {value!r}")
    if not math.isfinite(value):  # NaN would pass every later `<` check unnoticed
        raise ConfigError(f"{source}: '{where}' must be a finite number, got {value!r}")
    return float(value)


def from_dict(cls, data: dict, source: str = "<recipe>", prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{source}: unknown key '{where}' (known keys{' of ' + prefix if prefix else ''}: "
                          f"{', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a check in the dataclass's __post_init__: name the file too
        if str(e).startswith(f"{source}: "):
            raise
        raise ConfigError(f"{source}: {e}") from None


def to_dict(obj) -> dict:
    d = dataclasses.asdict(obj)

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(d)


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """``["trainer.steps=50", "optimizer.lr=1e-3"]`` applied onto the raw recipe dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = data
        keys = path.strip().split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{k}' is not a section")
        node[keys[-1]] = value
    return data


def builtin_recipes() -> dict:
    """The recipes shipped with medvol, name -> file: the top-level ``pipelines/`` folder,
    installed as the package data of ``medvol.pipelines``."""
    from importlib import resources

    try:
        folder = resources.files("medvol.pipelines")
    except ModuleNotFoundError:  # an editable install made before medvol.pipelines existed
        folder = Path(__file__).resolve().parent.parent / "pipelines"
    return {f.name[: -len(".yaml")]: f for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def recipe_purposes() -> dict[str, str]:
    """Built-in recipe name -> its one-line purpose (the recipe's ``description``)."""
    return {name: str((yaml.safe_load(f.read_text()) or {}).get("description", "")).strip()
            for name, f in builtin_recipes().items()}


def find_recipe(path: str | Path):
    """``path`` when it exists, else the built-in recipe of that name (``quickstart``)."""
    path = Path(path)
    if path.exists():
        return path
    builtin = builtin_recipes()
    found = builtin.get(path.name.removesuffix(".yaml"))
    if found is None:
        raise ConfigError(f"{path}: recipe not found (a path, or a built-in recipe: {', '.join(builtin)}; "
                          "see `medvol recipes`)")
    return found


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe ``path`` (a file or a built-in name), its ``extends`` chain merged in and
    ``overrides`` applied, typed and checked. The ``method:`` section stays a mapping here:
    :func:`medvol.training.load_recipe` also parses it with the method trainer's ``Options``."""
    data, source = read_recipe(path, overrides)
    return check_recipe(from_dict(Recipe, data, source), source)


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[dict, str]:
    """The recipe's raw mapping, fully resolved: the ``extends`` chain merged (see
    :func:`merge_recipe`), then ``overrides``; and the source to name in errors (the file, and
    the files it extends). Each file's own keys are checked against the recipe's sections first,
    so an unknown key or a bad type names the file that holds it."""
    chain = _extends_chain(Path(find_recipe(path)))
    data: dict = {}
    for i, (_, own) in enumerate(chain):
        if i < len(chain) - 1:  # a recipe's name and description are its own, never inherited
            own = {k: v for k, v in own.items() if k not in ("name", "description")}
        data = merge_recipe(data, own)
    source = str(chain[-1][0])
    if len(chain) > 1:
        source += " (extends " + " -> ".join(str(f) for f, _ in reversed(chain[:-1])) + ")"
    return apply_overrides(data, overrides or [], source), source


def merge_recipe(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merged key by key (at any depth), anything else (lists,
    numbers, strings, null) replaced by the child's value. Neither argument is changed."""
    out = dict(base)
    for k, v in child.items():
        out[k] = merge_recipe(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections")
    return data


def _extends_chain(path: Path) -> list[tuple[Path, dict]]:
    """``[(file, its own keys)]`` from the root recipe down to ``path``: each file's ``extends``
    (a built-in recipe's name, or a path ending in .yaml relative to the file) followed."""
    chain: list[tuple[Path, dict]] = []
    while True:
        if any(path.resolve() == f.resolve() for f, _ in chain):
            files = " -> ".join(str(f) for f, _ in reversed(chain))
            raise ConfigError(f"{chain[-1][0]}: 'extends' forms a cycle: {files} -> {path}")
        data = _read_yaml(path)
        parent = data.pop("extends", None)
        from_dict(Recipe, data, str(path))  # the file's own keys and types, named with the file
        chain.insert(0, (path, data))
        if parent is None:
            return chain
        path = _extended_file(parent, path)


def _extended_file(parent: Any, child: Path) -> Path:
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{child}: 'extends' must be a built-in recipe's name or a path to a .yaml file, "
                          f"got {parent!r}")
    if parent.endswith((".yaml", ".yml")) or "/" in parent or "\\" in parent:
        file = child.parent / Path(parent).expanduser()  # an absolute path stays absolute
        if not file.is_file():
            raise ConfigError(f"{child}: extends {parent!r}: no such file ({file})")
        return file
    builtin = builtin_recipes()
    if parent not in builtin:
        raise ConfigError(f"{child}: extends {parent!r}: not a built-in recipe ({', '.join(builtin)}); "
                          "a path to a file ends in .yaml")
    return Path(str(builtin[parent]))


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # medvol.precision.PRECISIONS (kept free of torch here)
# data.configuration -> spatial dims of the model (nnU-Net's names; 3d_lowres trains on the cache's 3d_lowres/,
# 3d_cascade_fullres on the fullres cache with data.previous_stage's predictions as extra one-hot channels)
CONFIGURATIONS = {"3d_fullres": 3, "2d": 2, "3d_lowres": 3, "3d_cascade_fullres": 3}


def check_recipe(recipe: Recipe, source: str = "<recipe>") -> Recipe:
    """Values a type alone does not catch: each bad one is a ConfigError naming the key."""
    def bad(key, want, value):
        raise ConfigError(f"{source}: '{key}' must be {want}, got {value!r}")

    t, o, d = recipe.trainer, recipe.optimizer, recipe.data
    if t.steps < 1:
        bad("trainer.steps", ">= 1", t.steps)
    if t.checkpoint_every is not None and t.checkpoint_every < 1:
        bad("trainer.checkpoint_every", ">= 1 (or null)", t.checkpoint_every)
    if t.val_every < 1 or t.log_every < 1:
        bad("trainer.val_every/log_every", ">= 1", (t.val_every, t.log_every))
    if not o.lr > 0:
        bad("optimizer.lr", "> 0", o.lr)
    _check_data(d, bad)
    _check_cascade(d, t.name, bad)
    if not 0 <= t.val_overlap < 1:
        bad("trainer.val_overlap", "in [0, 1)", t.val_overlap)
    inf = recipe.inference
    for key, value in (("trainer.precision", t.precision), ("inference.precision", inf.precision)):
        if value not in PRECISIONS:
            bad(key, f"one of {', '.join(PRECISIONS)}", value)
    if inf.blend not in ("gaussian", "constant"):
        bad("inference.blend", "'gaussian' or 'constant'", inf.blend)
    if not 0 <= inf.overlap < 1:
        bad("inference.overlap", "in [0, 1)", inf.overlap)
    if inf.step is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in inf.step):
        bad("inference.step", "positive integers (voxels per axis)", inf.step)
    return recipe


def _check_cascade(d: DataConfig, trainer: str, bad) -> None:
    """``data.previous_stage`` (the 3d_lowres run folder(s)) only for the cascade's second stage,
    whose batches hold only labelled samples (training refuses it unset: the recipe may leave it
    to ``--set``)."""
    cascade = d.configuration == "3d_cascade_fullres"
    stages = [d.previous_stage] if isinstance(d.previous_stage, str) else d.previous_stage
    if cascade and stages is not None and (not stages or not all(isinstance(s, str) and s for s in stages)):
        bad("data.previous_stage", "the 3d_lowres run folder (or a list of its fold folders) for "
            "data.configuration 3d_cascade_fullres", d.previous_stage)
    if not cascade and d.previous_stage is not None:
        bad("data.previous_stage", "null unless data.configuration is 3d_cascade_fullres", d.previous_stage)
    if cascade and trainer == "supervised":
        bad("trainer.name", "cascade for data.configuration 3d_cascade_fullres (it feeds the previous stage)", trainer)
    if cascade and d.unlabelled_per_batch:
        bad("data.unlabelled_per_batch", "0 for data.configuration 3d_cascade_fullres", d.unlabelled_per_batch)


def _check_data(d: DataConfig, bad) -> None:
    if d.configuration not in CONFIGURATIONS:
        bad("data.configuration", f"one of {sorted(CONFIGURATIONS)}", d.configuration)
    dims = CONFIGURATIONS.get(d.configuration, 3)
    if d.patch_size is not None and (len(d.patch_size) != dims or not all(
            isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in d.patch_size)):
        bad("data.patch_size", f"{dims} positive integers (data.configuration {d.configuration} is {dims}D)",
            d.patch_size)
    if isinstance(d.context, bool) or not isinstance(d.context, int) or d.context < 0:
        bad("data.context", "a whole number >= 0", d.context)
    if d.context and d.configuration != "2d":
        bad("data.context", "0 unless data.configuration is 2d (neighbouring slices as channels)", d.context)
    if d.batch_size is not None and d.batch_size < 1:
        bad("data.batch_size", ">= 1", d.batch_size)
    if d.fold is not None and str(d.fold) != "all" and not (str(d.fold).isdigit() and not isinstance(d.fold, bool)):
        bad("data.fold", "a fold index >= 0 or 'all'", d.fold)
    if not 0 <= d.val_fraction < 1:
        bad("data.val_fraction", "in [0, 1)", d.val_fraction)
    if not 0 <= d.oversample_foreground <= 1:
        bad("data.oversample_foreground", "in [0, 1]", d.oversample_foreground)
    if not 0 <= d.oversample_grades <= 1:
        bad("data.oversample_grades", "in [0, 1]", d.oversample_grades)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    from medvol.utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
