"""Output folders that know what medvol wrote into them.

Every folder medvol writes into (a preprocessing cache, a prediction folder) holds
``.medvol-manifest.json``: the kind of output, the top-level entries medvol owns there and
the case ids whose files it wrote inside them. ``--overwrite`` removes only what the
manifest lists, and only after checking that nothing else has moved in; a folder that is
not empty and has no manifest is never written into, so a mistyped ``-o`` cannot replace or
delete a user's files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from medvol.errors import InputError
from medvol.utils import write_json

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
                      if p.name not in owned and not p.name.startswith(f"{MANIFEST}.")
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
    out = OutputFolder(folder, "files", ())
    out.claim(exclusive=False)
    out.ensure_writable(names)
