"""Training: the engine, method trainers (by recipe ``trainer.name``), schedules, checkpoints."""

from __future__ import annotations

from pathlib import Path

from medvol.errors import ConfigError

_TRAINERS: dict = {}


def register_trainer(cls):
    _TRAINERS[cls.name] = cls
    return cls


def get_trainer(name: str):
    from medvol.training import (  # noqa: F401  (register themselves)
        aggregator,
        canet,
        dcmt,
        dodnet,
        infnet,
        pcrl,
        semi_infnet,
        slice_classifier,
        supervised,
        ugpcl,
    )

    if name not in _TRAINERS:
        raise ConfigError(f"trainer.name '{name}' is unknown; known: {sorted(_TRAINERS)}")
    return _TRAINERS[name]


def train(recipe, data: str | Path, out: str | Path, resume: bool | str = False, device: str = "auto",
          stop_at: int | None = None, quiet: bool = False) -> dict:
    """Train ``recipe`` (a Recipe, or a path/name plus overrides already applied) on the
    preprocessing cache ``data``, writing the run folder ``out``. Joins a process group
    when started by torchrun. ``resume``: True continues ``out``'s ``latest.pt`` (which must
    exist); ``"auto"`` continues it when it exists and starts fresh otherwise, so one job
    script serves the first start and every requeue after a pre-emption."""
    from medvol.config import Recipe, load_recipe
    from medvol.training.distributed import setup, teardown
    from medvol.training.engine import fit

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    cls = get_trainer(recipe.trainer.name)
    driver = getattr(cls, "drive", None)  # several runs in one (Semi-Inf-Net): its own layout and resume rules
    if driver is None:
        resume = _resume_flag(out, resume)
    info = setup(device)
    try:
        if driver is not None:
            return driver(recipe, data, out, info, resume=resume, stop_at=stop_at, quiet=quiet)
        return fit(cls(recipe, data, out, info), resume=bool(resume), stop_at=stop_at, quiet=quiet)
    finally:
        teardown(info)


def _resume_flag(out: Path, resume: bool | str) -> bool:
    latest = out / "checkpoints" / "latest.pt"
    if resume == "auto":
        return latest.exists()
    if resume and not latest.exists():
        raise ConfigError(f"{out}: nothing to resume (no checkpoints/latest.pt); use --resume auto to start "
                          "fresh when there is none")
    if not resume and latest.exists():
        raise ConfigError(f"{out}: holds a run already; pass --resume to continue it or choose another --out")
    return bool(resume)
