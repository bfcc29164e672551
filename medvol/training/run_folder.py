"""The one resume rule of a run folder (``medvol train --resume``), for engine runs and for
drivers of several runs (Semi-Inf-Net) alike."""

from __future__ import annotations

from pathlib import Path

from medvol.errors import ConfigError

LATEST = "checkpoints/latest.pt"  # what an engine run resumes from
RESUME_VALUES = (False, True, "auto")


def resume_flag(out: str | Path, resume: bool | str, resume_file: str = LATEST) -> bool:
    """Whether the run in ``out`` continues (True) or starts fresh (False).

    ``resume_file`` (relative to ``out``) is what the run resumes from: the engine's
    ``checkpoints/latest.pt``, or a driver's state file. ``resume``: False starts fresh and
    refuses a folder that holds a run (``resume_file`` or ``checkpoints/latest.pt``); True
    continues and refuses a folder without ``resume_file``; ``"auto"`` continues when there is
    one and starts fresh otherwise (one job script for the first start and every requeue)."""
    if resume not in RESUME_VALUES:
        raise ConfigError(f"--resume: expected no value (continue) or 'auto', got {resume!r}")
    out = Path(out)
    has = (out / resume_file).exists()
    if resume == "auto":
        return has
    if resume and not has:
        raise ConfigError(f"{out}: nothing to resume (no {resume_file}); use --resume auto to start fresh when "
                          "there is none")
    if not resume and (has or (out / LATEST).exists()):
        raise ConfigError(f"{out}: holds a run already; pass --resume to continue it or choose another --out")
    return bool(resume)
