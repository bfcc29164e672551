"""Exception families. Each message names the file (or key) and says what to fix.

The CLI prints these without a traceback and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path


class MedvolError(Exception):
    """Base class of every error medvol raises on purpose."""


class InputError(MedvolError):
    """A scan, label or dataset file is unreadable or inconsistent."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # picklable, so worker processes can pass it back and forth
        return (type(self), (self.path, self.problem))


class ConfigError(MedvolError):
    """A recipe, plan or command-line setting is wrong (unknown key, bad value)."""


class CacheError(MedvolError):
    """The preprocessing cache is missing, incomplete or from another version."""


class OutputError(MedvolError):
    """An output could not be written: read-only folder, disk full, no permission.

    Not a property of any one case, so a dataset run stops at the first one (a rerun resumes)."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):
        return (type(self), (self.path, self.problem))


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; a job script requeues on it


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after finishing its step and writing ``latest.pt``
    (how SLURM announces pre-emption); ``medvol train --resume auto`` continues it."""

    def __init__(self, step: int, checkpoint: str | Path):
        self.step, self.checkpoint = step, str(checkpoint)
        super().__init__(f"pre-empted after step {step}: {checkpoint} written; rerun with --resume auto to continue")
