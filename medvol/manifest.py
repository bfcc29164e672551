"""Output folders that know what medvol wrote into them.

Every folder medvol writes into (a preprocessing cache, a prediction folder) holds
``.medvol-manifest.json``: the kind of output, the top-level entries medvol owns there and
the case ids whose files it wrote inside them. ``--overwrite`` removes only what the
manifest lists, and only after checking that nothing else has moved in; a folder that is
not empty and has no manifest is never written into, so a mistyped ``-o`` cannot replace or
delete a user's files.

A command that writes into a folder may also hold ``.medvol-<command>.lock`` there while it
runs (:func:`locked`): a second run into the same folder is refused, naming the first one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from medvol.errors import InputError
from medvol.utils import output_error, write_json

log = logging.getLogger(__name__)

MANIFEST = ".medvol-manifest.json"


def _related(a: Path, b: Path) -> str | None:
    """How folder ``a`` sits relative to ``b``: 'is', 'contains', 'lies inside' or None."""
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return None


def refuse_overlap(out: Path, protected: Iterable[Path], what: str = "the raw dataset") -> None:
    """One-line error when the output folder is, contains or lies inside a protected folder."""
    o = Path(out).resolve()
    for p in protected:
        rel = _related(o, Path(p).resolve())
        if rel:
            raise InputError(out, f"output folder {rel} {what} {p}: choose a folder outside it")


def _owns(name: str, case_ids: Iterable[str]) -> bool:
    bare = name.lstrip(".")  # atomic writes' temp files: .<name>.<random>.part...
    return any(bare.startswith(c) and bare[len(c):len(c) + 1] in (".", "_") for c in case_ids)


class OutputFolder:
    """A folder medvol writes into, with its manifest.

    ``entries`` are the top-level names this kind of output owns (files or folders); files
    inside an owned folder belong to medvol when their names start with a recorded case id.
    """

    def __init__(self, path: str | Path, kind: str, entries: Iterable[str]):
        self.path = Path(path)
        self.kind = kind
        self.entries = sorted(set(entries))

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            m = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(self.manifest_path, "unreadable medvol manifest; delete the folder yourself") from None
        if not isinstance(m, dict) or not isinstance(m.get("entries"), list):
            raise InputError(self.manifest_path, "unreadable medvol manifest; delete the folder yourself")
        return m

    def claim(self, case_ids: Iterable[str] = (), exclusive: bool = True, adopt: bool = False) -> None:
        """Make (or adopt) the folder and record ``case_ids`` as written here.

        ``exclusive``: a folder that holds files but no manifest is refused (a cache owns its
        folder); otherwise medvol may share the folder and only refuses, in
        :meth:`ensure_writable`, to replace a file it did not write. ``adopt``: a folder
        written by a medvol from before manifests (all its entries are ours) is taken over."""
        m = self.read()
        if m is not None and exclusive and m.get("kind") != self.kind:
            raise InputError(self.path, f"holds a medvol '{m.get('kind')}' output, not a '{self.kind}' one: "
                                        "choose another folder")
        if m is None:
            foreign = self._foreign_top_level({"entries": self.entries} if adopt else {})
            if exclusive and foreign:
                raise InputError(self.path, f"is not empty and was not written by medvol (e.g. {foreign[0].name}): "
                                            "choose a new or empty folder")
            m = {"entries": [], "case_ids": []}
        self._write(sorted(set(m.get("entries", [])) | set(self.entries)),
                    sorted(set(m.get("case_ids", [])) | set(case_ids)), m)

    def _write(self, entries: list[str], cases: list[str], old: dict) -> None:
        if entries != old.get("entries") or cases != old.get("case_ids") or not self.manifest_path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.manifest_path, {"kind": old.get("kind", self.kind), "written_by": "medvol",
                                            "entries": entries,
                                            "case_ids": cases})

    def check_writable(self, names: Iterable[str]) -> dict:
        """Refuse (naming it) a top-level name that exists already and was not written by
        medvol; writes nothing. Returns the manifest read."""
        m = self.read() or {"entries": [], "case_ids": []}
        for n in names:
            p = self.path / n
            if (p.exists() or p.is_symlink()) and n not in m["entries"]:
                raise InputError(p, "exists and was not written by medvol: refusing to replace it "
                                    "(move it away or choose another output folder)")
        return m

    def ensure_writable(self, names: Iterable[str]) -> None:
        """:meth:`check_writable`, then record ``names`` as medvol's before they are written."""
        names = list(names)
        m = self.check_writable(names)
        self._write(sorted(set(m["entries"]) | set(names)), m.get("case_ids", []), m)

    def _foreign_top_level(self, m: dict) -> list[Path]:
        if not self.path.is_dir():
            return []
        owned = set(m.get("entries", [])) | {MANIFEST}
        return sorted(p for p in self.path.iterdir()
                      if p.name not in owned and not p.name.startswith(f"{MANIFEST}.") and not _is_lock(p.name)
                      and not (p.name.startswith(f".{MANIFEST}.") and p.name.endswith(".part")))

    def foreign_files(self) -> list[Path]:
        """Files in the owned entries (and beside them) that medvol did not write."""
        m = self.read() or {}
        out = self._foreign_top_level(m)
        cases = m.get("case_ids", [])
        for e in m.get("entries", []):
            p = self.path / e
            if p.is_dir() and not p.is_symlink():
                out += [f for f in sorted(p.rglob("*")) if not f.is_dir() and not _owns(f.name, cases)]
            elif p.is_symlink() or (p.exists() and not p.is_file()):
                out.append(p)
        return out

    def clear(self) -> None:
        """Remove what the manifest lists; refuse (removing nothing) when anything else is there."""
        m = self.read()
        if m is None:
            if self._foreign_top_level({}):
                raise InputError(self.path, "was not written by medvol (no manifest): --overwrite removes only "
                                            "what medvol wrote; delete the folder yourself or choose another one")
            return
        foreign = self.foreign_files()
        if foreign:
            raise InputError(foreign[0], f"was not written by medvol ({len(foreign)} such file(s) in {self.path}); "
                                         "--overwrite refuses to delete them: move them away first")
        for e in m.get("entries", []):
            p = self.path / e
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                os.remove(p)


def check_files(folder: str | Path, names: Iterable[str]) -> None:
    """Before a run: would writing ``names`` replace a file medvol did not write? Writes nothing."""
    OutputFolder(folder, "files", ()).check_writable(names)


def claim_files(folder: str | Path, names: Iterable[str]) -> None:
    """Before writing ``names`` into a folder medvol shares with other files (predictions,
    pictures, metrics): refuse to replace any that medvol did not write, then record them."""
    names = list(names)
    out = OutputFolder(folder, "files", ())
    out.check_writable(names)  # a refusal leaves the folder as it was (no manifest written)
    out.claim(exclusive=False)
    out.ensure_writable(names)


# --------------------------------------------------------------------------- one run at a time
def _is_lock(name: str) -> bool:
    return name.startswith(".medvol-") and name.endswith(".lock")


@contextmanager
def locked(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold ``folder/.medvol-<command>.lock`` (an exclusive ``flock``, the holder's pid inside)
    for the block; a second holder is refused with an InputError naming the first one's pid.
    The kernel drops the lock of a process that dies, so a lock file left by a killed run is
    taken over with a warning. The file is removed at the end, on errors too, and so is
    ``folder`` when this made it and it is still empty."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "is a file, not a folder: choose an output folder")
    made = not folder.exists()
    path = folder / f".medvol-{command}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, command)
    except OSError as e:
        if made:
            _remove_if_empty(folder)
        raise output_error(e, path) or e from None
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if made:
            _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (or gone): leave it
        pass


def _acquire(path: Path, command: str) -> int:
    """The open lock file, flocked by this process, with our record written into it."""
    fd = _flocked(path, command)
    if fd is None:  # a file system without flock: run, but say that nothing guards the folder
        log.warning("%s: this file system cannot lock files; a second medvol %s into the folder would not be "
                    "noticed", path, command)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    elif stale := _holder(fd):
        log.warning("%s: taking over the lock of a medvol %s that is no longer running (%s)", path, command, stale)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": f"medvol {command}",
                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except OSError:  # a full disk: leave no empty lock file behind
        path.unlink(missing_ok=True)
        os.close(fd)
        raise
    return fd


def _flocked(path: Path, command: str) -> int | None:
    """``path`` opened (made when missing) and flocked; None where the file system has no flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd, wait=1.0)
            os.close(fd)
            raise InputError(path.parent, f"another medvol {command} ({holder}) is writing into this folder: "
                                          "wait for it to end or choose another output folder") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        if path.exists() and os.path.samestat(os.fstat(fd), os.stat(path)):
            return fd
        os.close(fd)  # the holder removed the file between our open and flock: open the new one


def _holder(fd: int, wait: float = 0.0) -> str:
    """Who holds (or held) the lock, from the file's record: 'pid N on HOST since T'; '' for an
    empty file. ``wait``: how long to wait for a holder that has not written its record yet."""
    deadline = time.monotonic() + wait
    while True:
        try:
            rec = json.loads(os.pread(fd, 4096, 0) or b"null")
            if isinstance(rec, dict):
                return f"pid {rec.get('pid')} on {rec.get('host')} since {rec.get('since')}"
        except (ValueError, UnicodeDecodeError):
            pass
        if time.monotonic() >= deadline:
            return "pid unknown" if wait else ""
        time.sleep(0.05)
