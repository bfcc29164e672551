"""What a cached case was made from: each source file's size, mtime and content hash.

A rerun compares the record with the files as they are now; a case whose sources changed is
redone (an edited raw image must not stay "already done" with its stale array). Size and
mtime decide cheaply that nothing changed; when either differs the content hash decides, so
a file only touched or copied back is not counted as changed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from medvol.utils import sha256_file

log = logging.getLogger(__name__)


def _files(path: Path) -> list[Path]:
    """A file, or the files of a DICOM series folder, in a fixed order."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def _stat(path: Path) -> tuple[int, int]:
    stats = [p.stat() for p in _files(path)]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def _sha256(path: Path) -> str:
    return sha256_file(*_files(path), named=path.is_dir())


def record_sources(paths: Iterable[Path | None]) -> list[dict]:
    """``[{path (absolute), size, mtime_ns, sha256}]`` of a case's image and label sources."""
    out = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        size, mtime = _stat(p)
        out.append({"path": str(p.absolute()), "size": size, "mtime_ns": mtime, "sha256": _sha256(p)})
    return out


def changed_sources(record: list[dict] | None, paths: Iterable[Path | None]) -> list[str]:
    """Paths among ``paths`` that differ from ``record`` (new, gone, or other content).
    A record from before sources were recorded (None) counts as unchanged."""
    if record is None:
        return []
    # absolute paths: a cache made with a relative raw path is checked from anywhere (the end-of-run
    # validation reads the raw dataset through its absolute root)
    wanted = [str(Path(p).absolute()) for p in paths if p is not None]
    known = {str(Path(r["path"]).absolute()): r for r in record}
    changed = [p for p in wanted if p not in known] + [p for p in known if p not in wanted]
    for p in wanted:
        r = known.get(p)
        if r is None:
            continue
        try:
            if _stat(Path(p)) != (r["size"], r["mtime_ns"]) and _sha256(Path(p)) != r["sha256"]:
                changed.append(p)
        except OSError:
            changed.append(p)
    return changed


def log_changed(case_id: str, changed: list[str], stage: str) -> None:
    names = ", ".join(Path(p).name for p in changed[:3]) + ("..." if len(changed) > 3 else "")
    log.warning("case %s: source(s) changed since its %s (%s): redoing it", case_id, stage, names)
