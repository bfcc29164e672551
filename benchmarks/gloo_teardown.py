"""Do the processes of a gloo group end cleanly when one is done before the other?

At the end of a multi-process CPU run each process leaves the group and exits, the main one a
moment later than the rest (it writes the summary and the plot). In a CI run of
``tests/test_pcrl.py``'s two-process test, rank 1 died at that point with SIGABRT ("terminate
called without an active exception"): a gloo worker thread was still freeing the last
collective's tensors when the interpreter shut down (gdb: ``~AsyncAllgatherWork`` ->
``decref_pyobject`` -> ``take_gil`` -> thread exit -> ``std::terminate``). The group outlives
``destroy_process_group`` once DistributedDataParallel was built on it, so its threads do too.

This launches ``--runs`` two-process jobs (torchrun, one thread each) per way of ending: a DDP
model takes three steps with the collectives training uses and is dropped, rank 0 waits up to
0.3 s (its end-of-run writing), then each process ends ``--how``: ``destroy``
(``destroy_process_group`` alone, medvol before the fix), ``error`` (``teardown`` without the
barrier, as after an error), ``together`` (``teardown`` with it, as ``train()`` ends) and
``cli`` (``teardown``, then ``exit_process``, as ``medvol train --nproc N`` ends). It prints
how many jobs died each way.

    python benchmarks/gloo_teardown.py [--runs 30] [--how destroy cli]

About 8 s per job on the idle 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import time


def steps(info) -> None:
    """Three DDP steps with the collectives training uses; the model is gone when it returns,
    as a trainer is when ``fit`` returns."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    net = DistributedDataParallel(torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4),
                                                      torch.nn.Conv3d(4, 2, 1)))
    opt = torch.optim.SGD(net.parameters(), 0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(2, 1, 8, 8, 8)).mean().backward()
        opt.step()
        dist.all_gather([torch.empty(8) for _ in range(info.world_size)], torch.randn(8))
        dist.all_reduce(torch.zeros(1))


def worker(how: str) -> None:
    import torch.distributed as dist

    from medvol.training.distributed import exit_process, setup, teardown

    info = setup("cpu")
    steps(info)
    if info.is_main:
        time.sleep(random.random() * 0.3)
    if how == "destroy":
        dist.destroy_process_group()
    else:
        teardown(info, together=how != "error")
    if how == "cli":
        exit_process(0)


HOW = {"destroy": "destroy_process_group alone (teardown before the fix)",
       "error": "teardown(together=False), as after an error",
       "together": "teardown(together=True), as train() ends a run",
       "cli": "teardown(together=True), then exit_process, as the CLI ends a run"}


def job(how: str) -> tuple[int, bool]:
    """(exit status, whether a process aborted) of one two-process job."""
    with socket.socket() as s:  # a static rendezvous on a free port (--standalone's takes ~20 s)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={port}", __file__, "--worker", how]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    return r.returncode, "terminate called" in r.stderr or "SIGABRT" in r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--how", nargs="+", choices=list(HOW), default=list(HOW))
    ap.add_argument("--worker", choices=list(HOW), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        return worker(a.worker)
    for how in a.how:
        died = 0
        for i in range(a.runs):
            rc, aborted = job(how)
            died += rc != 0
            print(f"  {how} job {i + 1}: exit {rc}{' (SIGABRT)' if aborted else ''}", flush=True)
        print(f"{HOW[how]}: {died} of {a.runs} jobs died", flush=True)


if __name__ == "__main__":
    main()
