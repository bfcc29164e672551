"""torch.distributed set-up: torchrun / SLURM environment, NCCL on GPU, gloo on CPU."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, NoReturn

import torch
import torch.distributed as dist

_joined = False  # set by setup() when this process joins a group of several


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return default


def setup(device: str = "auto") -> DistInfo:
    """Read torchrun's (or SLURM's) variables and join the process group if there is one."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # srun without torchrun: one task per process; MASTER_ADDR/PORT must be exported by the job script
        if "MASTER_ADDR" not in os.environ:
            from medvol.errors import ConfigError

            raise ConfigError("SLURM job with several tasks: export MASTER_ADDR and MASTER_PORT (or use torchrun)")
        os.environ.update(WORLD_SIZE=os.environ["SLURM_NTASKS"], RANK=os.environ["SLURM_PROCID"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0].split(",")[0]  # e.g. "4(x2)"
        if per_node.isdigit():
            os.environ.setdefault("LOCAL_WORLD_SIZE", per_node)
    world = _env_int("WORLD_SIZE", default=1)
    rank = _env_int("RANK", default=0)
    local = _env_int("LOCAL_RANK", default=0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            from medvol.errors import ConfigError

            raise ConfigError("--device cuda: no CUDA device is available here")
        dev = torch.device("cuda", local if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        global _joined
        _joined = True
        if dev.type == "cpu":  # share the cores between the processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // _env_int("LOCAL_WORLD_SIZE", default=world)))
    return DistInfo(rank, world, local, dev)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def run_on_main(info: DistInfo, fn: Callable[[], object], wait_hours: float = 24.0) -> None:
    """``fn()`` on the main process alone while the other processes wait for it, however long
    it takes: they wait in a gloo group of their own with a timeout of ``wait_hours`` (the
    default group's barrier gives up after 10-30 minutes). Every process must call it."""
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=wait_hours)) if info.distributed else None
    try:
        if info.is_main:
            fn()
    finally:
        if group is not None:
            dist.barrier(group=group)


def teardown(info: DistInfo, together: bool = False) -> None:
    """Leave the process group. ``together``: every process got here at the same point (the
    command ended, or all stopped at one step), so they first meet at a barrier; not after an
    error on one process, where the others may be inside a collective the barrier would never
    match. The barrier makes the exit abort below rarer (``benchmarks/gloo_teardown.py``); only
    :func:`exit_process` rules it out."""
    if info.distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def joined_a_group() -> bool:
    """Whether :func:`setup` made this process one of several."""
    return _joined


def exit_process(code: int) -> NoReturn:
    """End a process that was one of a gloo group without interpreter finalization.

    A group that DistributedDataParallel was built on outlives ``destroy_process_group`` (the
    wrapper leaves references to it behind), and so do its worker threads. One of them may still
    be freeing the tensors of the last collective when the interpreter shuts down; it cannot
    take the GIL then, and the process dies with SIGABRT ("terminate called without an active
    exception") after its work was done and written. So the outputs are flushed and the
    process leaves at once with its own status (what the CLI does after a multi-process
    command)."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def params_identical_across_ranks(module: torch.nn.Module, info: DistInfo) -> bool:
    """All ranks hold bit-identical parameters (a cheap checksum compared across ranks)."""
    if not info.distributed:
        return True
    with torch.no_grad():
        flat = torch.cat([p.detach().float().reshape(-1) for p in module.parameters()])
        sig = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device) % 9973).sum(),
                           flat.abs().max()]).double().to(info.device)
    gathered = [torch.zeros_like(sig) for _ in range(info.world_size)]
    dist.all_gather(gathered, sig)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run ``medvol <argv>`` under torchrun with ``nproc`` processes on this node."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from medvol.errors import PREEMPTED_EXIT

    try:
        torchrun_main(["--standalone", f"--nproc-per-node={nproc}", "-m", "medvol", *argv])
    except ChildFailedError as e:  # a worker's own status: pre-empted (75), a medvol error (2), ...
        codes = {f.exitcode for f in e.failures.values()}
        return PREEMPTED_EXIT if PREEMPTED_EXIT in codes else max(codes)
    except SignalException:  # torchrun itself was signalled: it passed the signal on to the workers,
        return PREEMPTED_EXIT  # which finished their step and wrote latest.pt
    return 0
