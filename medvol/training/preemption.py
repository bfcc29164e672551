"""Pre-emption: SLURM (and most schedulers) announce the end of a job with SIGTERM, or a
chosen signal such as SIGUSR1 (``sbatch --signal=USR1@120``). While training, those signals
only set a flag; the loop finishes its step, writes ``latest.pt`` and stops with
:class:`medvol.errors.Preempted` (exit status 75). Under DDP the ranks agree on the flag after
every step (an all-reduce of one number), so all stop at the same step.

``medvol predict`` uses the same flag, with SIGINT among the signals: it finishes the case in
flight and stops before the next one; a second Ctrl-C stops at once (KeyboardInterrupt).
The end-of-run validation of ``medvol train``, ``medvol export`` and ``medvol cv`` hold it too
and stop at their safe point (:meth:`PreemptionFlag.stop_point`: before anything is renamed
into place) with one line saying what was written and what was not, exit status 75."""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as tdist

from medvol.errors import INTERRUPTED_EXIT, Stopped

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Context manager: catches ``signals`` (default :data:`SIGNALS`) inside the block (main
    thread only) and remembers the first one in ``signum``."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.raised = False
        self.signum: int | None = None  # the first signal caught
        self.signals = signals
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.raised:
                raise KeyboardInterrupt  # Ctrl-C twice: do not wait
            os.write(2, b"\nstopping at the next safe point (Ctrl-C again to stop at once)\n")
        self.raised = True
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def requested(self, device: torch.device, distributed: bool) -> bool:
        """Whether any process was signalled (all processes get the same answer)."""
        if not distributed:
            return self.raised
        flag = torch.tensor([float(self.raised)], device=device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())

    def stop_point(self, what: str, during: str | None = None) -> None:
        """A safe point of a command: when a signal was caught, stop with :class:`Stopped`,
        one line ``stopped by SIG... [during <during>]: <what>`` (``what``: what was written and
        what was not), exit status 75 (130 for Ctrl-C) as a pre-empted training run."""
        if self.signum is None:
            return
        stopped = Stopped(f"stopped by {signal.Signals(self.signum).name}{f' during {during}' if during else ''}: "
                          f"{what}")
        if self.signum == signal.SIGINT:
            stopped.exit_status = INTERRUPTED_EXIT
        raise stopped
