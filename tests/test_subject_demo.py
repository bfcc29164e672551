"""Subject-level demo data (datasets/subjects.py): tiny real-data scans with lesions."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvol.datasets.subjects import build_subject_dataset
from medvol.io.slice_labels import SLICE_LABELS_FILE, read_slice_labels

N, SPACING, THRESHOLD = 4, 6.0, 80.0


def _build(root: Path, seed: int = 0) -> Path:
    return build_subject_dataset(root, n=N, spacing=SPACING, threshold_mm2=THRESHOLD, seed=seed)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("subjects") / "Dataset031_BrainLesionSubjects")


def _arrays(root: Path, folder: str) -> dict[str, tuple[np.ndarray, tuple]]:
    """``{case: (array, zooms)}`` of the NIfTIs in ``root/folder`` (image suffix dropped)."""
    out = {}
    for path in sorted((root / folder).glob("*.nii.gz")):
        img = nib.load(path)
        out[path.name.removesuffix(".nii.gz").removesuffix("_0000")] = (np.asanyarray(img.dataobj),
                                                                         img.header.get_zooms())
    return out


def _read_labels(root: Path):
    counts = {case: lab.shape[-1] for case, (lab, _) in _arrays(root, "labelsTr").items()}
    return read_slice_labels(root / SLICE_LABELS_FILE, counts), counts


def test_layout_and_csv_read_back(subjects):
    meta = json.loads((subjects / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "lesion": 1} and meta["numTraining"] == N
    images, labels = _arrays(subjects, "imagesTr"), _arrays(subjects, "labelsTr")
    assert sorted(images) == sorted(labels) == [f"subject_{i:03d}" for i in range(N)]
    assert all(images[c][0].shape == labels[c][0].shape for c in images)
    read, counts = _read_labels(subjects)
    assert set(read.subjects) == set(counts)
    for case, n in counts.items():  # every slice has a label
        assert (read.slice_targets(case, n) >= 0).all()


def test_labels_recomputed_from_the_lesion_maps(subjects):
    read, _ = _read_labels(subjects)
    for case, (lab, zooms) in _arrays(subjects, "labelsTr").items():
        assert set(np.unique(lab)) <= {0, 1}
        areas = (lab == 1).sum(axis=(0, 1)) * float(zooms[0]) * float(zooms[1])
        assert np.array_equal(read.slice_targets(case, lab.shape[-1]), (areas > 0).astype(np.int64))
        assert read.subjects[case] == int((areas >= THRESHOLD).any())


def test_both_classes_small_lesion_negatives_and_bright_lesions(subjects):
    read, _ = _read_labels(subjects)
    labels, images = _arrays(subjects, "labelsTr"), _arrays(subjects, "imagesTr")
    assert set(read.subjects.values()) == {0, 1}
    # a negative subject whose slices do hold lesion voxels: presence alone does not decide
    assert any(read.subjects[c] == 0 and labels[c][0].any() for c in labels)
    for case, (lab, _) in labels.items():
        image = images[case][0]
        if lab.any():
            assert image[lab == 1].mean() > np.percentile(image[image > 0], 95)


def test_deterministic_for_a_seed(subjects, tmp_path):
    again = _build(tmp_path / "again")
    assert (again / SLICE_LABELS_FILE).read_text() == (subjects / SLICE_LABELS_FILE).read_text()
    for folder in ("imagesTr", "labelsTr"):
        first, second = _arrays(subjects, folder), _arrays(again, folder)
        assert all(np.array_equal(first[c][0], second[c][0]) for c in first)


def test_graded_subject_stacks_for_dcmt(tmp_path):
    """build_graded_subjects: DC-MT's subject stacks (slices along axis 2, the 999 mm mark), slice
    grades by lesion cross-section, subject grade = the maximum, the brain as every slice's region."""
    from medvol.datasets.subjects import build_graded_subjects, slice_grades

    assert slice_grades(np.array([0.0, 10.0, 79.9, 80.0, 300.0]), 80.0).tolist() == [0, 1, 1, 2, 2]
    out, grades = build_graded_subjects(tmp_path / "raw", n=3, spacing=6.0, labelled=["subject_000"])
    assert sorted(grades.values()) == [0, 1, 2]  # one subject of each kind (large, small, none)
    images, labels = _arrays(out, "imagesTr"), _arrays(out, "labelsTr")
    table, _ = _read_labels(out)
    for case, (image, zooms) in images.items():
        region = labels[case][0]
        assert image.shape == region.shape and zooms[2] == 999.0
        assert (region.reshape(-1, image.shape[2]) > 0).any(0).all()  # a region on every slice
        assert table.slice_targets(case, image.shape[2]).max() == grades[case] == table.subjects[case]
        assert (image[region > 0] > 0).mean() > 0.9  # the region is the brain of the real T1
    assert json.loads((out / "dataset.json").read_text())["labelled_cases"] == ["subject_000"]
