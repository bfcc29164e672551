"""The MOTS adapter on tiny files written in each original layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvol.datasets.mots import build_mots
from medvol.errors import InputError
from medvol.preprocessing import load_case, open_raw_dataset, preprocess_dataset

from conftest import write_nifti


def _case(seed, values):
    rng = np.random.default_rng(seed)
    img = rng.normal(40, 20, (16, 16, 12)).astype(np.float32)
    lab = np.zeros((16, 16, 12), np.uint8)
    lab[4:10, 4:10, 3:8] = values[0]
    if len(values) > 1:
        lab[6:8, 6:8, 4:6] = values[1]
    return img, lab


@pytest.fixture()
def sources(tmp_path):
    aff = np.diag([0.8, 0.8, 1.5, 1.0])
    for n in range(3):  # LiTS: volume-N.nii / segmentation-N.nii in a batch folder
        img, lab = _case(n, (1, 2))
        write_nifti(tmp_path / "LiTS" / "Training Batch 1" / f"volume-{n}.nii", img, aff)
        write_nifti(tmp_path / "LiTS" / "Training Batch 1" / f"segmentation-{n}.nii", lab, aff)
    for n in range(2):  # KiTS19
        img, lab = _case(10 + n, (1, 2))
        write_nifti(tmp_path / "kits19" / f"case_{n:05d}" / "imaging.nii.gz", img, aff)
        write_nifti(tmp_path / "kits19" / f"case_{n:05d}" / "segmentation.nii.gz", lab, aff)
    write_nifti(tmp_path / "kits19" / "case_00300" / "imaging.nii.gz", _case(99, (1,))[0], aff)  # test case
    for task, vals in (("Task09_Spleen", (1,)), ("Task10_Colon", (1,))):
        for n in range(2):
            img, lab = _case(20 + n, vals)
            write_nifti(tmp_path / task / "imagesTr" / f"x_{n:03d}.nii.gz", img, aff)
            write_nifti(tmp_path / task / "labelsTr" / f"x_{n:03d}.nii.gz", lab, aff)
    return tmp_path


def test_build_mots_from_the_original_layouts(sources, tmp_path):
    out = build_mots(tmp_path / "raw" / "Dataset020_MOTS", lits=sources / "LiTS", kits19=sources / "kits19",
                     decathlon=[sources / "Task09_Spleen", sources / "Task10_Colon"])
    meta = json.loads((out / "dataset.json").read_text())
    tasks = {c: v["task_id"] for c, v in meta["case_tasks"].items()}
    assert sorted(set(tasks.values())) == [0, 1, 4, 6]
    assert sum(t == 0 for t in tasks.values()) == 3 and sum(t == 1 for t in tasks.values()) == 2
    assert all(meta["case_tasks"][c]["annotated"] == [1, 0] for c, t in tasks.items() if t == 6)  # spleen: organ only
    assert all(meta["case_tasks"][c]["annotated"] == [0, 1] for c, t in tasks.items() if t == 4)  # colon: tumour only
    ds = open_raw_dataset(out)
    pre = tmp_path / "pre"
    rep = preprocess_dataset(out, pre, num_workers=1, quiet=True)
    assert not rep.failures and len(rep.done) == ds.dataset_json()["numTraining"]
    for case in rep.done:
        _, label, props = load_case(pre, case)
        assert props["task_id"] == tasks[case] and props["annotated"] == meta["case_tasks"][case]["annotated"]


def test_mots_errors_name_the_folder(sources, tmp_path):
    (sources / "LiTS" / "Training Batch 1" / "segmentation-2.nii").unlink()
    with pytest.raises(InputError, match="volume-2.nii: LiTS volume without segmentation-2"):
        build_mots(tmp_path / "o", lits=sources / "LiTS")
    (sources / "Task99_Brain").mkdir()
    with pytest.raises(InputError, match="Task99_Brain: not one of the Decathlon tasks"):
        build_mots(tmp_path / "o", decathlon=[sources / "Task99_Brain"])
