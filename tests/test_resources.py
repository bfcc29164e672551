"""Worker defaults from what the job may use: affinity, cgroup CPU quota, memory."""

from __future__ import annotations

import os

import pytest

from medvol import resources


def test_cgroup_v2_and_v1_cpu_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert resources.cgroup_cpu_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert resources.cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert resources.cgroup_cpu_quota(v1) == 1.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert resources.cgroup_cpu_quota(v1) is None


def test_usable_cpus_respects_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert resources.usable_cpus(tmp_path) == 6  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("250000 100000")
    assert resources.usable_cpus(tmp_path) == 2  # 2.5 CPUs of quota: 2 whole workers
    (tmp_path / "cpu.max").write_text("50000 100000")
    assert resources.usable_cpus(tmp_path) == 1


def test_available_memory_is_capped_by_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:   8000000 kB\n")
    assert resources.available_memory(tmp_path, meminfo) == 8_192_000_000
    (tmp_path / "memory.max").write_text("3000000000")
    (tmp_path / "memory.current").write_text("1000000000")
    assert resources.available_memory(tmp_path, meminfo) == 2_000_000_000


@pytest.mark.parametrize("cpus, mem, per_job, jobs, requested, expect", [
    (8, 64e9, 3e9, 100, None, 8),   # CPU-bound
    (8, 10e9, 3e9, 100, None, 3),   # memory guard: 3 cases of ~3 GB fit
    (8, 1e9, 3e9, 100, None, 1),    # never below one
    (8, 64e9, 3e9, 2, None, 2),     # no more workers than jobs
    (8, 1e9, 3e9, 100, 5, 5),       # -j wins
    (8, None, 3e9, 100, None, 8),   # memory unknown: CPUs only
])
def test_worker_count(cpus, mem, per_job, jobs, requested, expect, monkeypatch):
    monkeypatch.setattr(resources, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(resources, "available_memory", lambda: None if mem is None else int(mem))
    assert resources.worker_count(jobs, int(per_job), requested) == expect


def test_preprocess_estimates_a_case_from_its_headers(tmp_path):
    import numpy as np

    from medvol.preprocessing.pool import BYTES_PER_VOXEL, _case_bytes
    from medvol.preprocessing.raw import RawCase

    from conftest import write_nifti

    a = write_nifti(tmp_path / "a_0000.nii.gz", np.zeros((10, 20, 30), np.float32))
    b = write_nifti(tmp_path / "a_0001.nii.gz", np.zeros((10, 20, 30), np.float32))
    assert _case_bytes(RawCase("a", [a, b])) == 2 * 6000 * BYTES_PER_VOXEL
    assert _case_bytes(RawCase("d", [tmp_path])) is None  # a DICOM folder: unknown without reading it
