"""The 2D path: nnU-Net's 2d configuration trained on slices of the 3D cache, predicted over
whole scans through the one sliding-window path, evaluated like the 3D path; semi-supervised
raw datasets with unlabelled cases; slice labels carried into the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medvol.cli import main
from medvol.config import load_recipe
from medvol.errors import ConfigError
from medvol.io import Volume, read_volume
from medvol.preprocessing import load_case, preprocess_dataset
from medvol.training import train

from conftest import pinned, sphere_case, write_v2_dataset

TINY_2D = ["model.base_features=8", "model.max_features=16", "data.batch_size=8", "data.num_workers=0",
           "trainer.steps=60", "trainer.val_every=30", "data.val_cases=[s3]"]


def _spheres(root: Path, n: int = 4, **extra) -> Path:
    cases = {f"s{i}": ([sphere_case(seed=i)[0]], sphere_case(seed=i)[1], np.diag([0.9, 0.9, 1.1, 1.0]))
             for i in range(n)}
    return write_v2_dataset(root, cases, **extra)


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory):
    """quickstart_2d (tiny, 2.5D context 1) trained 60 steps on 3 spheres; s3 held out."""
    tmp = tmp_path_factory.mktemp("q2d")
    raw = _spheres(tmp / "Dataset010_Spheres")
    preprocess_dataset(raw, tmp / "pre", num_workers=1, quiet=True)
    with pinned(0):
        metrics = train(load_recipe("quickstart_2d", TINY_2D + ["data.context=1"]), tmp / "pre", tmp / "run",
                        device="cpu", quiet=True)
    return raw, tmp / "pre", tmp / "run", metrics


def test_quickstart_2d_learns_and_predicts_in_the_scans_geometry(run_2d, tmp_path):
    raw, _, run, metrics = run_2d
    # measured (trainer.seed 0/1/2/3, threads pinned): validation Dice 0.814 / 0.816 / 0.794 / 0.775
    # after 60 steps (an untrained net scores ~0.1 here)
    assert metrics["val/dice_fg"] > 0.6
    plans = json.loads((run / "plans.json").read_text())
    assert plans["configurations"]["2d"]["slice_axis"] == 2  # the run keeps the whole plan
    out = tmp_path / "pred"
    assert main(["predict", "-m", str(run), "-i", str(raw / "imagesTr"), "-o", str(out), "--device", "cpu",
                 "--quiet", "--no-pictures"]) == 0
    src, pred = read_volume(raw / "imagesTr" / "s3_0000.nii.gz"), read_volume(out / "s3.nii.gz")
    assert pred.spatial_shape == src.spatial_shape
    np.testing.assert_allclose(pred.affine, src.affine)
    # evaluated like the 3D predictions
    assert main(["evaluate", "--pred", str(out), "--ref", str(raw / "labelsTr"), "-o", str(tmp_path / "metrics"),
                 "--quiet"]) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["cases"]["s3"]["fg"]["dice"] > 0.6


def test_validation_equals_predict_for_a_2d_model(run_2d):
    """Training's validation and predict run the same 2D windows on the same cached image."""
    from medvol.checkpoint import load_run
    from medvol.config import InferenceConfig
    from medvol.inference.predictor import case_probabilities
    from medvol.inference.sliding_window import sliding_window_probabilities

    _, pre, run, _ = run_2d
    rm = load_run(run, torch.device("cpu"), "latest")
    assert rm.slice_axis == 2 and rm.context == 1 and rm.patch_size == [20, 20]
    image, _, _ = load_case(pre, "s3")
    a = case_probabilities(rm, torch.from_numpy(np.array(image)), torch.device("cpu"), InferenceConfig(overlap=0.5))
    b = sliding_window_probabilities(rm.model, np.array(image, np.float16), [20, 20], torch.device("cpu"),
                                     slice_axis=2, context=1)
    torch.testing.assert_close(a, b)


def test_2d_tta_mirrors_the_in_plane_axes(run_2d):
    from medvol.checkpoint import load_run

    rm = load_run(run_2d[2], torch.device("cpu"), "latest")
    assert rm.mirror_axes == (0, 1)


@pytest.mark.slow
def test_a_dicom_series_predicted_by_a_2d_model_keeps_the_series_geometry(run_2d, tmp_path):
    from medvol.datasets.dicom import write_dicom_series

    raw, _, run, _ = run_2d
    src = read_volume(raw / "imagesTr" / "s2_0000.nii.gz")
    oblique = src.affine.copy()
    oblique[:3, :3] = oblique[:3, :3] @ _rotation_z(0.2)
    oblique[:3, 3] = [-10.0, 5.0, 30.0]
    write_dicom_series(Volume(np.round(src.array).astype(np.float32), oblique), tmp_path / "series" / "s2",
                       modality="MR", intercept=0.0)
    out = tmp_path / "pred"
    assert main(["predict", "-m", str(run), "-i", str(tmp_path / "series" / "s2"), "-o", str(out),
                 "--device", "cpu", "--quiet", "--no-pictures"]) == 0
    dicom, pred = read_volume(tmp_path / "series" / "s2"), read_volume(out / "s2.nii.gz")
    assert pred.spatial_shape == dicom.spatial_shape
    np.testing.assert_allclose(pred.affine, dicom.affine, atol=1e-4)
    ref = sphere_case(seed=2)[1]  # the sphere is where it was, in voxels
    inter = np.logical_and(pred.array == 1, ref == 1).sum()
    assert 2 * inter / ((pred.array == 1).sum() + ref.sum()) > 0.6


def _rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def test_2d_patch_override_gets_its_own_topology(run_2d, tmp_path):
    from medvol.plans import Plans
    from medvol.training.sources import plans_for_patch

    plans = Plans.from_dict(json.loads((run_2d[1] / "plans.json").read_text())).for_2d()
    assert plans.patch_size == [20, 20] and plans.slice_axis == 2 and len(plans.topology["strides"][0]) == 2
    bigger = plans_for_patch(plans, [32, 32])
    assert bigger.patch_size == [32, 32] and bigger.slice_axis == 2
    assert len(bigger.topology["strides"]) > len(plans.topology["strides"])
    assert bigger.raw["patch_size"] == plans.raw["patch_size"]  # the 3d plan is untouched
    with pytest.raises(ConfigError, match="data.patch_size"):
        load_recipe("quickstart_2d", ["data.patch_size=[16, 16, 16]"])
    with pytest.raises(ConfigError, match="data.context"):
        load_recipe("quickstart", ["data.context=1"])


def test_unlabelled_cases_of_a_semi_supervised_dataset_are_cached_without_labels(tmp_path):
    """A case outside dataset.json's labelled_cases may come without a label file: it is
    cached as unlabelled, feeds the unlabelled stream, and its intensities stay out of the
    foreground statistics (nnU-Net's CT normalisation would otherwise shift)."""
    from medvol.config import DataConfig
    from medvol.data import training_cases

    img, lab, aff = sphere_case(seed=0)
    bright = img * 10  # an unlabelled case far brighter: it must not move the statistics
    cases = {"a": ([img], lab, aff), "b": ([sphere_case(seed=1)[0]], sphere_case(seed=1)[1], aff),
             "u": ([bright], None, aff)}
    raw = write_v2_dataset(tmp_path / "raw", cases, channel_names={"0": "CT"},
                           extra_json={"labelled_cases": ["a", "b"]})
    report = preprocess_dataset(raw, tmp_path / "pre", num_workers=1, quiet=True)
    assert not report.failures
    assert load_case(tmp_path / "pre", "u")[2]["has_label"] is False
    labelled, unlabelled, _ = training_cases(tmp_path / "pre", DataConfig(val_fraction=0.0), 0)
    assert labelled == ["a", "b"] and unlabelled == ["u"]
    for seed in range(6):  # a seeded validation fraction never draws the unlabelled case
        labelled, unlabelled, val = training_cases(tmp_path / "pre", DataConfig(val_fraction=0.5), seed)
        assert len(val) == 1 and unlabelled == ["u"] and sorted(labelled + val) == ["a", "b"]
    with pytest.raises(ConfigError, match=r"val_cases.*\['u'\]"):
        training_cases(tmp_path / "pre", DataConfig(val_cases=["u"]), 0)
    (tmp_path / "pre" / "splits_final.json").write_text(json.dumps([{"train": ["a", "b"], "val": ["u"]}]))
    labelled, unlabelled, val = training_cases(tmp_path / "pre", DataConfig(fold=0), 0)
    assert val == [] and unlabelled == ["u"]  # a fold's unlabelled case joins the unlabelled pool
    stats = json.loads((tmp_path / "pre" / "fingerprint.json").read_text())
    assert stats["foreground_intensity_properties_per_channel"]["0"]["max"] < 200
    # without the declaration a missing label is still an error naming the file
    (raw / "dataset.json").write_text(json.dumps({**json.loads((raw / "dataset.json").read_text()),
                                                  "labelled_cases": None}))
    meta = json.loads((raw / "dataset.json").read_text())
    del meta["labelled_cases"]
    (raw / "dataset.json").write_text(json.dumps(meta))
    report = preprocess_dataset(raw, tmp_path / "pre2", num_workers=1, quiet=True)
    assert "u" in report.failures and "labelsTr/u.nii.gz" in report.failures["u"]


def test_slice_labels_beside_the_raw_dataset_reach_the_2d_batches(tmp_path):
    raw = _spheres(tmp_path / "raw", n=2)
    (raw / "slice_labels.csv").write_text("subject,slice_index,label\ns0,10,1\ns0,0,0\ns0,,1\ns1,,0\n")
    preprocess_dataset(raw, tmp_path / "pre", num_workers=1, quiet=True)
    assert (tmp_path / "pre" / "slice_labels.csv").exists()
    from medvol.config import load_recipe as lr
    from medvol.training import get_trainer
    from medvol.training.distributed import DistInfo

    r = lr("quickstart_2d", TINY_2D[:4] + ["data.val_cases=[s1]", "data.augment.enabled=false"])
    trainer = get_trainer("supervised")(r, tmp_path / "pre", tmp_path / "run", DistInfo())
    ds = trainer.make_dataset()
    seen = {}
    for step in range(60):
        b = ds.item(step, 0)
        seen[int(b["slice_index"])] = (int(b["class"]), int(b["subject_class"]))
    from medvol.data.slices import raw_slice_of

    raw_of = raw_slice_of(load_case(tmp_path / "pre", "s0")[2], 2)  # the crop moved the slices
    want = {10: 1, 0: 0}
    for index, (cls, sub) in seen.items():
        assert sub == 1 and cls == want.get(int(raw_of[index]), -1)
    assert 10 in {int(raw_of[i]) for i in seen} and any(cls == -1 for cls, _ in seen.values())
    bad = raw / "slice_labels.csv"
    bad.write_text("subject,slice_index,label\ns0,99,1\n")
    with pytest.raises(Exception, match="slice_index 99 is out of range"):
        preprocess_dataset(raw, tmp_path / "pre3", num_workers=1, quiet=True)


def test_a_raw_splits_file_reaches_the_cache_and_its_folds(tmp_path):
    """Dataset adapters write the published split beside dataset.json: preprocessing copies it
    into the cache (when the cache has none) and --fold uses it."""
    from medvol.config import DataConfig
    from medvol.data import training_cases

    raw = _spheres(tmp_path / "raw", n=4)
    (raw / "splits_final.json").write_text(json.dumps([{"train": ["s0", "s1", "s2"], "val": ["s3"]}]))
    preprocess_dataset(raw, tmp_path / "pre", num_workers=1, quiet=True)
    labelled, _, val = training_cases(tmp_path / "pre", DataConfig(fold=0), 0)
    assert labelled == ["s0", "s1", "s2"] and val == ["s3"]


def test_a_2d_and_a_3d_model_ensemble_on_the_3d_grid(run_2d, tmp_path):
    from medvol.inference import predict

    raw, pre, run2d, _ = run_2d
    r3 = load_recipe("quickstart", ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]",
                                    "data.batch_size=2", "data.num_workers=0", "trainer.steps=2", "trainer.val_every=2",
                                    "data.val_cases=[s3]", "trainer.final_validation=false"])
    train(r3, pre, tmp_path / "run3d", device="cpu", quiet=True)
    scan = raw / "imagesTr" / "s3_0000.nii.gz"
    out = predict([run2d, tmp_path / "run3d"], scan, tmp_path / "ens", device="cpu", quiet=True)
    src, pred = read_volume(scan), read_volume(out[0])
    assert pred.spatial_shape == src.spatial_shape
    np.testing.assert_allclose(pred.affine, src.affine)
