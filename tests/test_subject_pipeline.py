"""The two-stage subject pipeline on the subject demo data: slice classifier -> extract-features
-> slice aggregator -> medvol predict (subjects.csv, slices.csv)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medvol.checkpoint import load_checkpoint, load_run, save_checkpoint
from medvol.cli import main
from medvol.config import load_recipe
from medvol.data.slices import cached_slice_labels, extract_slices, raw_slice_of
from medvol.datasets.dicom import write_dicom_series
from medvol.datasets.subjects import build_subject_dataset
from medvol.errors import ConfigError, InputError
from medvol.inference.subjects import extract_features, subject_probabilities
from medvol.io import Volume, read_volume, write_volume
from medvol.io.slice_features import read_features
from medvol.manifest import MANIFEST
from medvol.networks.aggregator import GRUSliceAggregator
from medvol.training import train

from conftest import AGGREGATOR_STEP_RECIPE, pinned

TINY_CNN = "model.options={widths: [4, 8]}"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """8 demo subjects (6 mm in-plane, 9 mm slices) preprocessed, a tiny slice classifier
    trained on them for a few steps, and its features of the cache."""
    from medvol.preprocessing import preprocess_dataset

    tmp = tmp_path_factory.mktemp("subjects")
    raw = build_subject_dataset(tmp / "raw" / "Dataset031_BrainLesionSubjects", n=8, spacing=6.0, seed=0)
    assert not preprocess_dataset(raw, tmp / "pre", num_workers=1, quiet=True).failures
    recipe = load_recipe("slice_classifier_demo", [TINY_CNN, "trainer.steps=4", "trainer.val_every=4",
                                                   "data.batch_size=4", "data.val_cases=[subject_000, subject_001]"])
    with pinned(0, threads=1):
        train(recipe, tmp / "pre", tmp / "clf", device="cpu", quiet=True)
        features = extract_features(tmp / "clf", tmp / "pre", tmp / "features", device="cpu", quiet=True)
    return {"raw": raw, "pre": tmp / "pre", "clf": tmp / "clf", "features": features, "tmp": tmp}


def _agg_recipe(steps: int = 4):
    return load_recipe("slice_aggregator", [*AGGREGATOR_STEP_RECIPE, "model.options={hidden: [8, 8], gru_hidden: 4}",
                                            f"trainer.steps={steps}", f"trainer.val_every={steps}",
                                            "data.batch_size=4", "data.val_cases=[subject_000, subject_001]"])


@pytest.fixture(scope="module")
def aggregator_run(stage_one):
    out = stage_one["tmp"] / "agg"
    with pinned(0, threads=1):
        train(_agg_recipe(), stage_one["features"].parent, out, device="cpu", quiet=True)
    return out


def test_classifier_run_records_its_slice_classes(stage_one):
    assert load_checkpoint(stage_one["clf"] / "checkpoints" / "latest.pt")["num_classes"] == 2
    run = load_run(stage_one["clf"], CPU)
    assert run.slice_axis == 2 and run.model(torch.zeros(1, 1, 32, 32))["logits"].shape == (1, 2)
    names = {r["name"] for r in csv.DictReader(open(stage_one["clf"] / "metrics.csv"))}
    assert {"val/accuracy", "val/balanced_accuracy", "val/auc"} <= names


def test_features_equal_a_plain_per_slice_loop(stage_one):
    """Every subject's features and logits are the model's on each training-shaped slice."""
    pre = stage_one["pre"]
    data = read_features(stage_one["features"])
    run = load_run(stage_one["clf"], CPU)
    labels = cached_slice_labels(pre, 2)
    assert data.meta["classifier"] == str(stage_one["clf"].resolve()) and data.meta["slice_axis"] == 2
    assert len(data.meta["checkpoint_sha256"]) == 64 and data.feature_dim == 16
    assert sorted(data.subjects) == sorted(labels.subjects)
    for item in data.items:
        image = np.load(pre / "cases" / f"{item.subject}.npy")
        props = json.loads((pre / "cases" / f"{item.subject}.json").read_text())
        patch = np.array(run.patch_size)
        start = -(np.maximum(patch - image.shape[1:3], 0) // 2)  # a slice smaller than the patch, as training pads it
        with torch.no_grad():
            outs = [run.model(torch.from_numpy(extract_slices(image, 2, z, start, patch, 0, 0.0))[None])
                    for z in range(image.shape[3])]
        assert np.allclose(item.features, torch.cat([o["features"] for o in outs]).numpy(), atol=1e-5)
        assert np.allclose(item.logits, torch.cat([o["logits"] for o in outs]).numpy(), atol=1e-5)
        assert np.array_equal(item.slice_index, np.arange(image.shape[3]))
        assert np.array_equal(item.raw_slice, raw_slice_of(props, 2))
        assert item.subject_class == labels.subjects[item.subject]


def test_features_of_the_raw_scans_equal_those_of_the_cache(stage_one, tmp_path):
    """The scan path preprocesses as the cache did; subject classes from --labels."""
    raw = stage_one["raw"]
    assert main(["extract-features", str(stage_one["clf"]), "--data", str(raw / "imagesTr"), "-o", str(tmp_path),
                 "--labels", str(raw / "slice_labels.csv"), "--device", "cpu", "-q"]) == 0
    from_scans, from_cache = read_features(tmp_path).by_subject(), read_features(stage_one["features"]).by_subject()
    assert sorted(from_scans) == sorted(from_cache)
    for subject, a in from_scans.items():
        b = from_cache[subject]
        assert a.subject_class == b.subject_class and np.array_equal(a.raw_slice, b.raw_slice)
        assert np.allclose(a.features, b.features, atol=1e-4)
    assert "features.npz" in json.loads((tmp_path / MANIFEST).read_text())["entries"]


def test_extract_features_refuses_what_it_cannot_use(stage_one, tmp_path, tiny_run):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "features.npz").write_text("my own file")
    with pytest.raises(InputError, match="not written by medvol"):
        extract_features(stage_one["clf"], stage_one["pre"], tmp_path / "mine", device="cpu", quiet=True)
    with pytest.raises(ConfigError, match="a 3D model"):
        extract_features(tiny_run, stage_one["pre"], tmp_path / "x", device="cpu", quiet=True)
    assert not (tmp_path / "x" / "features.npz").exists()


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_writes_one_row_per_subject_with_probabilities(stage_one, aggregator_run, tmp_path):
    info = json.loads((aggregator_run / "aggregator.json").read_text())
    assert info["classifier"] == str(stage_one["clf"].resolve()) and info["num_classes"] == 2
    scans = stage_one["raw"] / "imagesTr"
    assert main(["predict", "-m", str(aggregator_run), "-i", str(scans), "-o", str(tmp_path / "out"),
                 "--device", "cpu", "-q"]) == 0
    subjects = _rows(tmp_path / "out" / "subjects.csv")
    assert [r["subject"] for r in subjects] == sorted(p.name[:-12] for p in scans.glob("*_0000.nii.gz"))
    features = read_features(stage_one["features"]).by_subject()
    agg = GRUSliceAggregator(2, 16, hidden=(8, 8), gru_hidden=4)
    agg.load_state_dict(load_checkpoint(aggregator_run / "checkpoints" / "best.pt")["models"]["model"])
    for r in subjects:
        p = np.array([float(r["p_0"]), float(r["p_1"])])
        assert p.sum() == pytest.approx(1.0, abs=1e-5) and int(r["predicted"]) == p.argmax()
        want = subject_probabilities(agg, [features[r["subject"]].features], CPU)[0]
        assert np.allclose(p, want, atol=1e-4)  # predict = the aggregator on the extracted features
    slices = _rows(tmp_path / "out" / "slices.csv")
    assert len(slices) == sum(len(s.features) for s in features.values())
    first = [r for r in slices if r["subject"] == "subject_000"]
    assert [int(r["raw_slice"]) for r in first] == list(features["subject_000"].raw_slice)
    for r in slices:
        assert float(r["p_0"]) + float(r["p_1"]) == pytest.approx(1.0, abs=1e-5)
    assert {"subjects.csv", "slices.csv"} <= set(json.loads((tmp_path / "out" / MANIFEST).read_text())["entries"])


def test_predict_refuses_segmentation_options_and_a_changed_classifier(stage_one, aggregator_run, tmp_path, capsys):
    scans = str(stage_one["raw"] / "imagesTr" / "subject_003_0000.nii.gz")
    assert main(["predict", "-m", str(aggregator_run), "-i", scans, "-o", str(tmp_path / "a"), "--tta"]) == 2
    assert "--tta" in capsys.readouterr().err
    clf = tmp_path / "clf"
    shutil.copytree(stage_one["clf"], clf)
    agg = tmp_path / "agg"
    shutil.copytree(aggregator_run, agg)
    info = json.loads((agg / "aggregator.json").read_text())
    (agg / "aggregator.json").write_text(json.dumps({**info, "classifier": str(clf)}))
    assert main(["predict", "-m", str(agg), "-i", scans, "-o", str(tmp_path / "b"), "--device", "cpu", "-q"]) == 0
    ckpt_path = clf / "checkpoints" / f"{info['classifier_checkpoint']}.pt"
    ckpt = load_checkpoint(ckpt_path)
    ckpt["models"]["model"]["classifier.bias"] += 1.0  # the classifier was trained further since
    save_checkpoint(ckpt_path, ckpt)
    assert main(["predict", "-m", str(agg), "-i", scans, "-o", str(tmp_path / "c"), "--device", "cpu"]) == 2
    assert "not the checkpoint the aggregator's features were extracted with" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="a slice aggregator's run"):
        load_run(agg, CPU)
    # the classifier itself writes no label map: one clear error, nothing written
    assert main(["predict", "-m", str(clf), "-i", scans, "-o", str(tmp_path / "d"), "--device", "cpu"]) == 2
    assert "grades slices and writes no label map; run `medvol extract-features`" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_predict_a_dicom_series(stage_one, aggregator_run, tmp_path):
    """A DICOM series goes through the same discovery, reading and preprocessing as a NIfTI:
    the same subject prediction as its NIfTI (intensities rounded to the stored integers)."""
    src = read_volume(stage_one["raw"] / "imagesTr" / "subject_003_0000.nii.gz")
    write_dicom_series(Volume(np.round(src.array).astype(np.float32), src.affine), tmp_path / "series" / "s3",
                       modality="MR", intercept=0.0)
    rounded = tmp_path / "nifti" / "s3.nii.gz"
    write_volume(Volume(np.round(src.array).astype(np.float32), src.affine), rounded)
    for name, scan in (("dicom", tmp_path / "series" / "s3"), ("nifti", rounded)):
        assert main(["predict", "-m", str(aggregator_run), "-i", str(scan), "-o", str(tmp_path / name),
                     "--device", "cpu", "-q"]) == 0
    dicom, nifti = _rows(tmp_path / "dicom" / "subjects.csv"), _rows(tmp_path / "nifti" / "subjects.csv")
    assert [r["subject"] for r in dicom] == ["s3"] and [r["subject"] for r in nifti] == ["s3"]
    assert float(dicom[0]["p_1"]) == pytest.approx(float(nifti[0]["p_1"]), abs=1e-4)
    assert len(_rows(tmp_path / "dicom" / "slices.csv")) == len(_rows(tmp_path / "nifti" / "slices.csv"))


def test_slice_cnn_outputs_and_options():
    from medvol.config import ModelConfig
    from medvol.networks import build_model

    model = build_model(ModelConfig(name="slice_cnn", options={"widths": [4, 8, 6]}), None, 3, 5).eval()
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        out, h = model(x), model.body(x)
    assert out["logits"].shape == (2, 5) and out["features"].shape == (2, 12) and model.feature_dim == 12
    assert h.shape == (2, 6, 5, 7)  # two stride-2 stages
    assert torch.equal(out["features"], torch.cat([h.amax((2, 3)), h.mean((2, 3))], 1))  # max, then mean
    with pytest.raises(ConfigError, match=r"'model.options': slice_cnn does not take \['depth'\]"):
        build_model(ModelConfig(name="slice_cnn", options={"depth": 3}), None, 1, 2)
