"""Exception families. Each message names the file (or key) and says what to fix.

The CLI prints these without a traceback and exits with status 2; a :class:`Stopped` run
(a signal, handled at a safe point) as one line with its own status (75, or 130 for Ctrl-C).
"""

from __future__ import annotations

import signal
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


class JSONFileError(InputError, ValueError):
    """A JSON file medvol reads is not valid JSON (still a ValueError, as json's own error is)."""


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
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class Stopped(Exception):
    """A command stopped on a signal at a safe point, its outputs whole; the message says what
    was written and how to go on. The CLI prints it as one line and exits ``exit_status``."""

    exit_status = PREEMPTED_EXIT


class Preempted(Stopped):
    """Training stopped on SIGTERM/SIGUSR1 after finishing its step and writing ``latest.pt``
    (how SLURM announces pre-emption); ``medvol train --resume auto`` continues it."""

    def __init__(self, step: int, checkpoint: str | Path):
        self.step, self.checkpoint = step, str(checkpoint)
        super().__init__(f"pre-empted after step {step}: {checkpoint} written; rerun with --resume auto to continue")


class PredictionStopped(Stopped):
    """``medvol predict`` stopped on SIGTERM/SIGUSR1 (exit 75) or Ctrl-C (exit 130) between
    two cases: the finished cases' files are complete, the others were not started."""

    SHOWN = 10  # case ids named in the message

    def __init__(self, signum: int, out_dir: str | Path, done: int, not_done: list[str]):
        self.exit_status = INTERRUPTED_EXIT if signum == signal.SIGINT else PREEMPTED_EXIT
        self.done, self.not_done = done, not_done
        more = f" and {len(not_done) - self.SHOWN} more" if len(not_done) > self.SHOWN else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}: {done} of {done + len(not_done)} case(s) "
                         f"written to {out_dir}, not written: {', '.join(not_done[:self.SHOWN])}{more}; rerun "
                         "the same command to predict them (it predicts every case again)")
