"""Small helpers shared by every stage: atomic writes (text, JSON, arrays), JSON of numpy values,
files' SHA-256."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# A temp file names its writer, "<host>-<pid>", so that a later write into the same folder can
# tell the debris of a killed writer on this host from a live writer's file (kept, on any host).
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_PART = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[a-z0-9_]{8}\.part")
_swept: set[Path] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_parts(folder: Path) -> list[Path]:
    """Remove the temp files in ``folder`` that a writer on this host left when it was killed
    (SIGKILL, out of memory: no handler ran); their writer's process is gone. Returns them."""
    gone = []
    for p in folder.glob(".*.part*"):
        m = _PART.match(p.name)
        if m and m["host"] == _HOST and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _tmp_name(path: Path) -> Path:
    # The temp file keeps the real suffixes (".nii.gz", ".npy") because some writers pick
    # their format from the name; the leading dot and ".part" tag mark it as unfinished.
    # The first write of this process into a folder first sweeps a killed writer's temp files.
    if path.parent not in _swept:
        remove_dead_parts(path.parent)
        _swept.add(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.",
                               suffix=".part" + "".join(path.suffixes[-2:]), dir=path.parent)
    os.close(fd)
    return Path(tmp)


# Write failures that come from the place written to, not from medvol: reported as one line.
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                      errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}


def output_error(e: OSError, path: str | Path):
    """``e`` as an :class:`OutputError` naming ``path`` when it is an environment problem
    (disk full, read-only, no permission), else None."""
    from medvol.errors import OutputError

    if e.errno not in ENVIRONMENT_ERRNOS:
        return None
    return OutputError(path or e.filename, f"cannot write: {ENVIRONMENT_ERRNOS[e.errno]} "
                                           "(free space or fix permissions, then rerun)")


def _umask() -> int:
    """The process umask; read from /proc where it can be (setting and restoring it would
    briefly change it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed, so no half-written file is left. The
    file gets the mode an ordinary ``open`` would give (0666 less the umask), not mkstemp's
    0600. Disk-full and permission errors become :class:`medvol.errors.OutputError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        err = output_error(e, path) if isinstance(e, OSError) else None
        if err is not None:
            raise err from None
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; on success rename it onto ``path``, which must not
    exist yet or be an empty folder (else :class:`medvol.errors.OutputError`, nothing written).
    On any exception the sibling is removed: a bad input leaves nothing behind."""
    import shutil

    from medvol.errors import OutputError

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputError(path, "exists and is not an empty folder: choose a new one (nothing is overwritten)")
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    staging.mkdir(parents=True)  # the user's umask
    try:
        yield staging
        if path.exists():
            path.rmdir()
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples inside ``obj`` to plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`): a reader sees the old file or
    the whole new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(to_jsonable(obj), indent=1))


def read_json(path: str | Path) -> Any:
    """The JSON document at ``path``; a damaged file is one error naming it (JSONFileError)."""
    from medvol.errors import JSONFileError

    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise JSONFileError(path, f"invalid JSON{where}: damaged or not written by medvol") from None


def read_input_json(path: str | Path, missing: str) -> Any:
    """:func:`read_json` of a file the user names or a run must hold: a missing one is one
    InputError ``<path>: not found: <missing>``, an unreadable one ``<path>: unreadable (...)``."""
    from medvol.errors import InputError

    try:
        return read_json(path)
    except FileNotFoundError:
        raise InputError(path, f"not found: {missing}") from None
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable ({e})") from None


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))




def sha256_file(*paths: str | Path, named: bool = False) -> str:
    """The SHA-256 of the files' bytes, in the order given, read 1 MiB at a time (a file is never
    whole in memory). ``named``: each file's name and a NUL byte go before its bytes (a DICOM
    series folder's hash, in which a renamed slice is a change)."""
    h = hashlib.sha256()
    for path in map(Path, paths):
        if named:
            h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
