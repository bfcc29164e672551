"""The dataset driver's machinery: worker pool, shards, staging and partial-write cleanup.

Cases run in forked worker processes (``-j``: as asked, or the usable CPUs kept within the
available memory); ``--shard K/N`` takes cases K, K+N, ...; the fingerprint pass keeps each
case's cropped arrays in ``OUT/staging`` for the preprocessing pass.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from medvol.errors import MedvolError
from medvol.preprocessing.raw import RawCase
from medvol.resources import worker_count

log = logging.getLogger(__name__)


@dataclass
class Report:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)

    def merge(self, other: "Report") -> "Report":
        self.done += other.done
        self.skipped += other.skipped
        self.failures.update(other.failures)
        return self


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """'K/N' -> (K, N): this process takes cases K, K+N, K+2N, ... (K counts from 0)."""
    if not shard:
        return None
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise MedvolError(f"--shard must look like K/N (e.g. 0/4), got {shard!r}") from None
    if n < 1 or not 0 <= k < n:
        raise MedvolError(f"--shard {shard}: need 0 <= K < N")
    return k, n


def select_shard(cases: list[RawCase], shard) -> list[RawCase]:
    return cases if shard is None else cases[shard[0]::shard[1]]


def staging_paths(out: Path, case_id: str) -> tuple[Path, Path, Path]:
    d = out / "staging"
    return d / f"{case_id}_image.npy", d / f"{case_id}_seg.npy", d / f"{case_id}.json"


def failure_path(out: Path, case_id: str) -> Path:
    return out / "fingerprints" / f"{case_id}.failed.txt"


def _worker_init() -> None:
    """One torch thread per worker (the workers are the parallelism), when torch is loaded:
    preprocessing itself runs on numpy and scipy."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


BYTES_PER_VOXEL = 40  # peak bytes of one worker per voxel and channel (arrays, copies, resampling)


def _case_bytes(case: RawCase) -> int | None:
    """A worker's peak memory for this case, from the NIfTI headers (None when unknown)."""
    from medvol.io import is_nifti

    if not all(is_nifti(p) for p in case.images):
        return None
    import nibabel as nib

    try:
        voxels = [int(np.prod(nib.load(str(p)).shape)) for p in case.images]  # type: ignore[attr-defined]
        return sum(voxels) * BYTES_PER_VOXEL
    except Exception:  # noqa: BLE001 - an unreadable header is reported when the case is read
        return None


def _workers(cases: list[RawCase], requested: int | None) -> int:
    """-j: as asked, or the usable CPUs kept within the available memory (largest case)."""
    if requested is not None:
        return requested
    sizes = [b for b in (_case_bytes(c) for c in cases) if b]
    return worker_count(len(cases), max(sizes) if sizes else None)


def run_jobs(fn: Callable, cases: list[RawCase], args: tuple, num_workers: int | None, desc: str,
              quiet: bool) -> Report:
    report = Report()
    if not cases:
        return report
    num_workers = _workers(cases, num_workers)
    from tqdm import tqdm

    bar = tqdm(total=len(cases), desc=desc, unit="case", disable=quiet or not sys.stderr.isatty())
    results = []
    if num_workers <= 1 or len(cases) == 1:
        for c in cases:
            results.append(fn(c, *args))
            bar.set_postfix_str(c.case_id)
            bar.update()
    else:
        # fork: workers inherit the imported modules (fast start); the parent runs no torch
        # kernels before this point, so no OpenMP pool is forked.
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx, initializer=_worker_init) as ex:
            futs = {ex.submit(fn, c, *args): c for c in cases}
            try:
                for f in as_completed(futs):
                    results.append(f.result())
                    bar.set_postfix_str(futs[f].case_id)
                    bar.update()
            except BrokenProcessPool:
                raise MedvolError(f"{desc}: a worker process died (killed, or out of memory?) while "
                                  f"{len(cases) - len(results)} case(s) were unfinished; finished cases are kept: "
                                  "rerun the same command to resume (with fewer -j workers if memory ran out)") \
                from None
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    for case_id, err in results:
        if err:
            report.failures[case_id] = err
            log.error(err)
        else:
            report.done.append(case_id)
    return report


def clean_partial(out: Path, case_ids: list[str]) -> None:
    """Remove temp files of these cases' writes cut short by a kill (atomic writes rename
    only when complete). Other cases' temp files may belong to a running shard: kept."""
    suffixes = (".npy", "_seg.npy", ".json", "_image.npy", "_intensities.npy")
    prefixes = tuple(f".{cid}{suf}." for cid in case_ids for suf in suffixes)
    for sub in ("cases", "fingerprints", "staging"):
        if (out / sub).is_dir():
            for junk in (out / sub).glob(".*.part*"):
                if junk.name.startswith(prefixes):
                    junk.unlink(missing_ok=True)
