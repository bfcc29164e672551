"""What this machine (or this job's slice of it) offers: usable CPUs and available memory.

Containers and batch schedulers limit a process through its CPU affinity mask and its cgroup
(CPU quota, memory limit) rather than the machine's totals; ``os.cpu_count()`` and the
machine's RAM would overcommit such a job.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs granted by the cgroup's quota (v2 ``cpu.max``, v1 ``cfs_quota/period``), or None."""
    v2 = _read(root / "cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    q, p = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if q and p and int(q) > 0:
        return int(q) / int(p)
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup's CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    return max(1, min(n, math.floor(quota)) if quota else n)


def available_memory(root: Path = CGROUP, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes this process can still allocate: the machine's MemAvailable, capped by the
    cgroup's limit minus its usage; None when neither can be read."""
    avail = None
    text = _read(meminfo)
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    limit, used = _read(root / "memory.max"), _read(root / "memory.current")
    if limit and limit != "max" and used:
        left = max(int(limit) - int(used), 0)
        avail = left if avail is None else min(avail, left)
    return avail


def worker_count(n_jobs: int, bytes_per_job: int | None, requested: int | None = None) -> int:
    """Processes to run ``n_jobs`` jobs with: ``requested`` when given; else the usable CPUs,
    no more than the jobs, and no more than the available memory holds at ``bytes_per_job``."""
    if requested is not None:
        return max(1, requested)
    n = max(1, min(usable_cpus(), n_jobs))
    mem = available_memory()
    if bytes_per_job and mem is not None:
        fit = max(1, mem // bytes_per_job)
        if fit < n:
            log.info("memory guard: %d worker(s) instead of %d (%.1f GB available, ~%.1f GB per case)",
                     fit, n, mem / 1e9, bytes_per_job / 1e9)
            n = int(fit)
    return n
