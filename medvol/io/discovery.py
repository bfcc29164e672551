"""Finding scans in folders: one set of rules for every caller.

- A *scan file* is a NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mhd``, ``.mha``) or NRRD
  (``.nrrd``, ``.nhdr``) file whose name does not start with a dot (macOS ``._`` forks, temp
  files of unfinished writes).
- A *DICOM series folder* is a folder that directly holds DICOM files (DICM preamble or
  ``.dcm``; ``DICOMDIR`` is not a slice).
- A file's *stem* is its name without the scan suffix; a scan's *id* under a root folder is
  its relative path without the suffix, ``/`` written ``__``.
- Channel files are ``<case>_<cccc><suffix>`` (nnU-Net): :func:`split_channel` is the one rule
  (the raw layouts' ``imagesTr`` too), :func:`group_channels` gathers them.

The raw layouts, ``medvol predict``/``evaluate``, PCRL's scan folders and the demo all use
these functions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from medvol.errors import InputError
from medvol.io.dicom import list_dicom_files

SCAN_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr")
_CHANNEL = re.compile(r"(.+)_([0-9]{4})")


def scan_suffix(name: str) -> str:
    """The scan suffix of ``name`` as written (``""`` when it has none)."""
    low = name.lower()
    return next((name[-len(s):] for s in SCAN_SUFFIXES if low.endswith(s)), "")


def scan_stem(name: str) -> str:
    """``name`` without its scan suffix (``brain_0000.nii.gz`` -> ``brain_0000``)."""
    suffix = scan_suffix(name)
    return name[: -len(suffix)] if suffix else name


def split_channel(stem: str) -> tuple[str, int] | None:
    """``(case, channel)`` of a channel file's stem ``<case>_<cccc>`` (nnU-Net's rule: a non-empty
    case id, an underscore and the channel as 4 digits), None for any other stem."""
    m = _CHANNEL.fullmatch(stem)
    return (m.group(1), int(m.group(2))) if m else None


def is_scan_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and bool(scan_suffix(path.name))


def is_dicom_series(folder: Path) -> bool:
    """The one rule for DICOM: a folder that directly holds DICOM files."""
    return folder.is_dir() and bool(list_dicom_files(folder))


def find_scans(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Scan files and DICOM series folders in ``folder`` (its direct children, or with
    ``recursive`` the whole tree), sorted; ``folder`` itself first when it is a series."""
    folder = Path(folder)
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    found = [p for p in entries if not any(part.startswith(".") for part in p.relative_to(folder).parts)
             and (is_scan_file(p) or is_dicom_series(p))]
    return ([folder] if is_dicom_series(folder) else []) + found


def scan_id(root: Path, scan: Path) -> str:
    """The id of ``scan`` under ``root``: relative path minus the scan suffix, ``/`` -> ``__``
    (``root`` itself, a series, is named by its folder name)."""
    if scan == root:
        return root.name
    return scan_stem(scan.relative_to(root).as_posix()).replace("/", "__")


def group_channels(files: Iterable[Path], num_channels: int) -> list[tuple[str, list[Path]]]:
    """(case id, channel files in channel order) for scan files named ``<case>_<cccc>``.

    With one channel only ``_0000`` is read as a channel suffix (``scan_0001`` is a case of its
    own); a file without a suffix is a case holding all its channels in one file. A case
    missing some of its ``num_channels`` channels is an error naming the first missing file,
    and so are two files of one case and channel (``x.nii`` and ``x.nii.gz``).
    """
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        split = split_channel(scan_stem(p.name))
        case, channel = split if split and (num_channels > 1 or split[1] == 0) else (scan_stem(p.name), 0)
        other = groups.setdefault(case, {}).setdefault(channel, p)
        if other != p:  # x.nii beside x.nii.gz: one would silently replace the other
            raise InputError(p, f"maps to the same case '{case}' (channel {channel}) as {other.name}: "
                                "rename or move one of them")
    out = []
    for case, chans in sorted(groups.items()):
        missing = [c for c in range(num_channels) if c not in chans]
        if missing and not (len(chans) == 1 and num_channels > 1):
            first = next(iter(chans.values()))
            raise InputError(first.parent / f"{case}_{missing[0]:04d}{scan_suffix(first.name)}",
                             f"case '{case}' lacks channel(s) {missing}")
        out.append((case, [chans[c] for c in sorted(chans)]))
    return out


def input_cases(path: str | Path, num_channels: int) -> list[tuple[str, list[Path]]]:
    """The cases of a prediction input: a scan file, a DICOM series folder, or a folder of
    scan files (channels grouped) and DICOM series folders."""
    path = Path(path)
    if path.is_file():
        if not is_scan_file(path):
            raise InputError(path, "expected a scan file (NIfTI, MetaImage, NRRD), a folder of them, "
                                   "or a DICOM series folder")
        split = split_channel(scan_stem(path.name))  # named as in a folder: <case>_0000 -> <case>
        return [(split[0] if split and split[1] == 0 else scan_stem(path.name), [path])]
    if not path.is_dir():
        raise InputError(path, "input not found")
    if is_dicom_series(path):
        return [(path.name, [path])]
    scans = find_scans(path)
    if not scans:
        raise InputError(path, "no scan files (NIfTI, MetaImage, NRRD) or DICOM series here")
    series = [(d.name, [d]) for d in scans if d.is_dir()]
    return sorted(group_channels([p for p in scans if p.is_file()], num_channels) + series)
