"""3d_lowres and the cascade end to end on the tiny brain data: the lowres cache, training on it,
the second stage's extra one-hot channels, and ``medvol predict`` running both stages.

The tiny brain data's fullres patch covers its median image at the default memory target (no
3d_lowres, as on the demo data: tests/test_cascade_plans.py); a 0.02 GB target shrinks the
fullres patch to 16 x 20 x 20 of a 37 x 45 x 39 median, 11 %, and nnU-Net's rule makes a
3d_lowres configuration at ~5.56 mm.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medvol.cache import configuration_cache, list_cases, load_case, load_plans, plans_digest
from medvol.config import load_recipe
from medvol.data.cascade import CascadePatchDataset, load_previous_stage, onehot
from medvol.data.dataset import Streams
from medvol.data.sampling import patch_bounds
from medvol.errors import ConfigError
from medvol.plans import Plans
from medvol.resampling import compute_new_shape, resample_label

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["model.base_features=4", "model.max_features=8", "data.num_workers=0", "trainer.steps=2",
        "trainer.val_every=2", "data.val_cases=[brain_004]"]


@pytest.fixture(scope="module")
def lowres_pre(brain_raw, tmp_path_factory):
    from medvol.preprocessing import preprocess_dataset

    out = tmp_path_factory.mktemp("pre_lowres")
    report = preprocess_dataset(brain_raw, out, num_workers=1, quiet=True, gpu_memory_gb=0.02)
    assert not report.failures
    return out


@pytest.fixture(scope="module")
def lowres_run(lowres_pre, tmp_path_factory):
    from medvol.training import train

    run = tmp_path_factory.mktemp("runs") / "lowres"
    train(load_recipe("quickstart_lowres", TINY), lowres_pre, run, device="cpu", quiet=True)
    return run


@pytest.fixture(scope="module")
def cascade_run(lowres_pre, lowres_run, tmp_path_factory):
    from medvol.training import train

    run = tmp_path_factory.mktemp("runs") / "cascade"
    train(load_recipe("quickstart_cascade", TINY + [f"data.previous_stage={lowres_run}"]), lowres_pre, run,
          device="cpu", quiet=True)
    return run


def test_preprocess_caches_the_lowres_cases_beside_the_fullres_ones(lowres_pre):
    plans = load_plans(lowres_pre)
    low_dir = configuration_cache(lowres_pre, "3d_lowres")
    assert low_dir == lowres_pre / "3d_lowres" and configuration_cache(lowres_pre, "3d_fullres") == lowres_pre
    low = load_plans(low_dir)
    spacing = plans["configurations"]["3d_lowres"]["spacing"]
    assert low["configuration"] == "3d_lowres" and low["target_spacing"] == spacing
    assert min(spacing) > max(plans["target_spacing"]) * 1.3  # coarser on every axis (isotropic-ish data)
    assert low["patch_size"] == plans["configurations"]["3d_lowres"]["patch_size"]
    assert list_cases(low_dir) == list_cases(lowres_pre)
    for case in list_cases(low_dir):
        image, label, props = load_case(low_dir, case)
        _, _, full = load_case(lowres_pre, case)
        assert props["plans_digest"] == plans_digest(low) != full["plans_digest"]
        # the same crop at the lowres spacing
        assert props["crop_bbox"] == full["crop_bbox"]
        assert list(image.shape[1:]) == [int(s) for s in compute_new_shape(full["shape_after_crop"],
                                                                             full["original_spacing"], spacing)]
        assert label.shape[1:] == image.shape[1:]
    with pytest.raises(ConfigError, match="3d_lowres cache"):
        configuration_cache(low_dir, "3d_fullres")


def test_lowres_is_refused_where_the_plan_has_none(brain_pre):
    with pytest.raises(ConfigError, match="no 3d_lowres configuration"):
        configuration_cache(brain_pre, "3d_lowres")


@pytest.mark.slow  # trains the two stages (about 25 s together, once per module)
def test_lowres_run_trains_on_the_lowres_cache(lowres_pre, lowres_run):
    from medvol.checkpoint import load_run
    from medvol.utils import read_json

    run = load_run(lowres_run, torch.device("cpu"), "latest")
    assert run.plans.target_spacing == load_plans(lowres_pre)["configurations"]["3d_lowres"]["spacing"]
    assert read_json(lowres_run / "plans.json")["configuration"] == "3d_lowres"
    # the end-of-run validation predicted the raw validation scan in its own geometry
    summary = read_json(lowres_run / "validation" / "summary.json")
    assert summary["validation"]["configuration"] == "3d_lowres"


@pytest.mark.slow  # trains the two stages (about 25 s together, once per module)
def test_cascade_channels_are_the_resampled_lowres_prediction(lowres_pre, lowres_run, cascade_run):
    from medvol.checkpoint import load_run
    from medvol.inference.postprocess import argmax_labels
    from medvol.inference.predictor import case_probabilities, run_settings
    from medvol.resampling import resample_probabilities

    case = "brain_001"
    image, label, props = load_case(lowres_pre, case)
    low_image, _, low_props = load_case(lowres_pre / "3d_lowres", case)
    # by hand: the low-res run on the low-res cached image, probabilities resampled linearly onto
    # the fullres cached grid, argmax
    low = load_run(lowres_run, torch.device("cpu"))
    probs = case_probabilities(low, torch.from_numpy(np.array(low_image, np.float16)), torch.device("cpu"),
                               run_settings([low])[0])
    expected = argmax_labels(resample_probabilities(probs.float(), props["shape_after_resampling"],
                                                    low_props["target_spacing"], props["target_spacing"]).numpy())
    stored = load_previous_stage(cascade_run, case, image.shape[1:], mmap=False)
    assert stored.shape == (1, *image.shape[1:])
    np.testing.assert_array_equal(stored[0], expected)
    assert len(np.unique(expected)) > 1  # the low-res model predicts some foreground after 2 steps

    # a batch sample of the whole case (patch >= the case: the start is fixed, no augmentation):
    # image channel, then one channel per foreground label = the stored map, one-hot
    labels = sorted(Plans.from_dict(load_plans(lowres_pre)).class_names)
    assert labels == [1, 2]
    patch = [s + 2 for s in image.shape[1:]]
    ds = CascadePatchDataset(lowres_pre, Streams([case], [], 1, 0, 1), patch, cascade_run, labels, oversample=0.0)
    sample = ds.sample(0, 0, np.random.default_rng(0))
    start = patch_bounds(image.shape[1:], patch)[0]
    inner = (slice(None),) + tuple(slice(-a, -a + s) for a, s in zip(start, image.shape[1:]))
    assert sample["image"].shape == (1 + len(labels), *patch)
    np.testing.assert_allclose(sample["image"][inner][0].numpy(), image[0])
    np.testing.assert_array_equal(sample["image"][inner][1:].numpy(), onehot(expected, labels).numpy())
    np.testing.assert_array_equal(sample["label"][inner][0].numpy(), np.maximum(label[0], 0))


@pytest.mark.slow  # trains the two stages (about 25 s together, once per module)
def test_augmented_cascade_channels_stay_one_hot_and_follow_the_label(lowres_pre, cascade_run):
    from medvol.config import AugmentConfig
    from medvol.data.augment import build_augmentation

    aug = build_augmentation(AugmentConfig(rotate_prob=1.0, scale_prob=1.0, noise_prob=1.0, brightness_prob=1.0,
                                           gamma_prob=1.0, flip_prob=0.5))
    ds = CascadePatchDataset(lowres_pre, Streams(["brain_000", "brain_001"], [], 2, 0, 2), [16, 20, 20], cascade_run,
                             [1, 2], augment=aug)
    for step in range(3):
        s = ds.item(step, 0)
        extra = s["image"][1:]
        # spatially transformed with the label (nearest), never by the intensity transforms
        assert set(torch.unique(extra).tolist()) <= {0.0, 1.0} and float(extra.sum(0).max()) <= 1.0
        assert s["label"].shape == (1, 16, 20, 20)


@pytest.mark.slow  # trains the two stages (about 25 s together, once per module)
def test_cascade_run_records_its_lowres_run_and_takes_the_extra_channels(lowres_run, cascade_run):
    from medvol.checkpoint import load_run
    from medvol.utils import read_json

    assert read_json(cascade_run / "previous_stage.json")["runs"] == [str(lowres_run.resolve())]
    run = load_run(cascade_run, torch.device("cpu"), "latest")
    assert [p.run_dir for p in run.previous_stage] == [lowres_run.resolve()]
    first = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.in_channels == 1 + (run.plans.num_classes - 1)


@pytest.mark.slow  # trains the two stages (about 25 s together, once per module)
def test_cascade_predict_runs_both_stages_in_scan_geometry(brain_raw, lowres_run, cascade_run, tmp_path):
    from medvol.checkpoint import load_run
    from medvol.inference.geometry import restore_geometry
    from medvol.inference.postprocess import argmax_labels
    from medvol.inference.predictor import case_probabilities, predict, previous_stage_channels, run_settings
    from medvol.io import read_volume
    from medvol.preprocessing import preprocess_case

    scans = brain_raw / "imagesTs"
    predict(cascade_run, scans, tmp_path / "cascade", device="cpu", quiet=True, step=[8, 8, 8])
    predict(lowres_run, scans, tmp_path / "low", device="cpu", quiet=True)
    src = sorted(scans.glob("*.nii.gz"))[0]
    case = src.name.replace("_0000.nii.gz", "")
    out, ref = nib.load(tmp_path / "cascade" / f"{case}.nii.gz"), nib.load(src)
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    # by hand: the low-res run's written prediction, moved onto the preprocessed grid, one-hot,
    # appended to the preprocessed scan, the cascade model's window path, restored, argmax
    run = load_run(cascade_run, torch.device("cpu"))
    settings = run_settings([run], step=[8, 8, 8])[0]
    image, props = preprocess_case(read_volume(src), run.plans.raw, body_mask=True)
    mask = props.pop("body_mask")
    low_seg = np.asarray(nib.load(tmp_path / "low" / f"{case}.nii.gz").dataobj)
    (x0, x1), (y0, y1), (z0, z1) = props["crop_bbox"]
    assert [x1 - x0, y1 - y0, z1 - z0] != list(low_seg.shape)  # the crop matters for this scan
    on_grid = resample_label(low_seg[None, x0:x1, y0:y1, z0:z1], image.shape[1:], props["original_spacing"],
                             props["target_spacing"])[0]
    extra = torch.from_numpy(np.stack([on_grid == 1, on_grid == 2])).half()
    assert torch.equal(extra, previous_stage_channels(low_seg, props, run.plans).half())
    x = torch.cat([torch.from_numpy(image).half(), extra])
    probs = case_probabilities(run, x, torch.device("cpu"), settings, mask=mask)
    expected = argmax_labels(restore_geometry(probs, props, dtype=np.float16))
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)


def test_cascade_recipe_errors(lowres_pre, tmp_path):
    from medvol.training import train

    with pytest.raises(ConfigError, match="trainer.name"):
        load_recipe("quickstart", ["data.configuration=3d_cascade_fullres"])
    with pytest.raises(ConfigError, match="previous_stage"):
        load_recipe("quickstart", ["data.previous_stage=somewhere"])
    with pytest.raises(ConfigError, match="data.previous_stage is not set"):  # left unset
        train(load_recipe("quickstart_cascade", TINY), lowres_pre, tmp_path / "r1", device="cpu", quiet=True)
    with pytest.raises(ConfigError, match="no recipe.yaml"):
        train(load_recipe("quickstart_cascade", TINY + [f"data.previous_stage={tmp_path}"]), lowres_pre,
              tmp_path / "r2", device="cpu", quiet=True)


def test_each_case_takes_the_lowres_fold_that_validated_on_it(tmp_path):
    from medvol.training.cascade import _validating_run
    from medvol.utils import write_json

    folds = []
    for k, val in enumerate((["a", "b"], ["c"])):
        run = tmp_path / f"fold_{k}"
        run.mkdir()
        write_json(run / "split.json", {"labelled": [], "unlabelled": [], "validation": val})
        folds.append(run)
    assert _validating_run("c", folds) == (folds[1], True)
    assert _validating_run("a", folds) == (folds[0], True)
    assert _validating_run("z", folds) == (folds[0], False)  # no fold validated on it: the first, flagged


@pytest.mark.slow  # preprocesses the tiny data twice (about 15 s)
def test_overwrite_removes_the_lowres_cache_but_not_foreign_files(brain_raw, tmp_path):
    from medvol.errors import InputError
    from medvol.preprocessing import preprocess_dataset

    out = tmp_path / "pre"
    preprocess_dataset(brain_raw, out, num_workers=1, quiet=True, gpu_memory_gb=0.02)
    stale = out / "3d_lowres" / "cases" / "brain_000.npy"
    before = stale.stat().st_mtime_ns
    preprocess_dataset(brain_raw, out, num_workers=1, quiet=True, gpu_memory_gb=0.02, overwrite=True)
    assert stale.stat().st_mtime_ns != before and len(list_cases(out / "3d_lowres")) == 5
    (out / "3d_lowres" / "mine.txt").write_text("not medvol's")
    with pytest.raises(InputError, match="mine.txt"):
        preprocess_dataset(brain_raw, out, num_workers=1, quiet=True, gpu_memory_gb=0.02, overwrite=True)
    assert (out / "3d_lowres" / "mine.txt").exists() and stale.exists()  # refused: nothing removed


@pytest.mark.slow  # needs the trained cascade run
def test_export_refuses_a_cascade_run(cascade_run, tmp_path):
    from medvol.errors import InputError
    from medvol.export import export_model

    with pytest.raises(InputError, match="3d_lowres run"):
        export_model(cascade_run, tmp_path / "model.zip", checkpoint="latest")
    assert not (tmp_path / "model.zip").exists()


def test_a_cascade_on_an_ignore_label_dataset_is_refused(lowres_pre, lowres_run, tmp_path):
    """The previous-stage channels are an argmax of plain labels: regions and an ignore label
    are refused with one ConfigError, not trained wrongly."""
    import json
    import shutil

    from medvol.training import train

    pre = tmp_path / "pre"
    shutil.copytree(lowres_pre, pre)
    plans = json.loads((pre / "plans.json").read_text())
    plans["labels"] = {**plans["labels"], "ignore": max(plans["labels"].values()) + 1}
    (pre / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ConfigError, match="regions and an ignore label are not supported"):
        train(load_recipe("quickstart_cascade", TINY + [f"data.previous_stage={lowres_run}"]), pre, tmp_path / "r",
              device="cpu", quiet=True)
