"""``medvol check``: nnU-Net's ``--verify_dataset_integrity`` on a raw dataset, writing nothing.

The checks are the ones preprocessing runs (:mod:`medvol.preprocessing.raw`): ``dataset.json``
(keys, labels declared 0..N-1 consecutively, ``numTraining``) when the dataset is opened, then
per case its channel files present and readable, channels and label on one voxel grid (shape,
spacing, origin, direction within nnU-Net's tolerance), intensities finite, label values integer
and declared. Here they are collected instead of raised: every case is read and the report
lists each case's problem. A problem of ``dataset.json`` itself stops the check (the cases
cannot be listed without it), as nnU-Net's asserts do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medvol.errors import InputError
from medvol.preprocessing.raw import load_raw_case, open_raw_dataset


@dataclass
class IntegrityReport:
    root: Path
    layout: str
    checked: list[str] = field(default_factory=list)  # "imagesTr/<case>" / "imagesTs/<case>"
    problems: dict[str, str] = field(default_factory=dict)  # same key -> the case's first problem

    @property
    def ok(self) -> bool:
        return not self.problems


def check_raw_dataset(path: str | Path) -> IntegrityReport:
    """Read every training and test case of the raw dataset at ``path``; a case's problem is
    recorded and the next case read. Raises only for a problem of the dataset as a whole."""
    ds = open_raw_dataset(path)
    report = IntegrityReport(Path(path), ds.layout)
    for where, cases in (("training", ds.training), ("test", ds.test)):
        for case in cases:
            key = f"{where}/{case.case_id}"
            report.checked.append(key)
            try:
                load_raw_case(case, ds)
            except InputError as e:
                report.problems[key] = str(e)
    return report
