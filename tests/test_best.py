"""`medvol best`: nnU-Net's best configuration and post-processing decision, on constructed
predictions whose answer is known, and `medvol predict --postprocessing` applying it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medvol.cli import main
from medvol.inference.best import determine_postprocessing
from medvol.inference.postprocess import apply_postprocessing, keep_largest_region, read_postprocessing
from medvol.io import read_volume

from conftest import sphere_case, write_nifti, write_v2_dataset

LABELS = {"background": 0, "organ": 1, "tumour": 2}
SHAPE = (24, 24, 24)


def _organ_with_tumour() -> np.ndarray:
    """A 6^3 organ (1) holding a 2^3 tumour (2): one foreground region."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[4:10, 4:10, 4:10] = 1
    ref[6:8, 6:8, 6:8] = 2
    return ref


def _write(tmp, name, cases: dict) -> dict:
    return {c: write_nifti(tmp / name / f"{c}.nii.gz", a) for c, a in cases.items()}


def test_keep_largest_region_removes_only_the_smaller_pieces_of_those_labels():
    seg = _organ_with_tumour()
    seg[16:18, 16:18, 16] = 2  # a separate 4-voxel tumour blob
    seg[20, 20, 20] = 1  # a separate organ voxel
    union = keep_largest_region(seg, [1, 2])
    assert (union[16:18, 16:18, 16] == 0).all() and union[20, 20, 20] == 0
    assert (union[4:10, 4:10, 4:10] == seg[4:10, 4:10, 4:10]).all()  # the largest region untouched
    tumour = keep_largest_region(seg, 2)  # the largest tumour piece: the 8 voxels inside the organ
    assert (tumour == 2).sum() == 8 and tumour[20, 20, 20] == 1  # organ voxels are not the step's labels
    np.testing.assert_array_equal(apply_postprocessing(seg, [[1, 2]]), union)


def test_a_spurious_blob_removed_raises_dice_and_the_foreground_step_is_chosen(tmp_path):
    """Hand-computed: case a has an 8-voxel organ blob apart, case b an 8-voxel tumour blob.
    Organ Dice a = 2*208/(208+216); tumour Dice b = 2*8/(8+16); everything else 1."""
    ref = _organ_with_tumour()
    pa, pb = ref.copy(), ref.copy()
    pa[16:18, 16:18, 16:18] = 1
    pb[16:18, 16:18, 16:18] = 2
    refs = _write(tmp_path, "ref", {"a": ref, "b": ref})
    d = determine_postprocessing(_write(tmp_path, "pred", {"a": pa, "b": pb}), refs, LABELS)
    organ, tumour = (2 * 208 / 424 + 1) / 2, (1 + 16 / 24) / 2
    assert d["dice_before"]["organ"] == pytest.approx(organ) and d["dice_before"]["tumour"] == pytest.approx(tumour)
    assert d["dice_before"]["foreground_mean"] == pytest.approx((organ + tumour) / 2)
    assert d["steps"] == [{"labels": [1, 2]}]  # per class nothing is left to gain (strictly better only)
    assert d["dice_after"] == {"organ": 1.0, "tumour": 1.0, "foreground_mean": 1.0}
    assert [t["chosen"] for t in d["tests"]] == [True, False, False]


def test_a_step_that_would_drop_a_class_is_not_chosen(tmp_path):
    """The union step would lift the organ (a 64-voxel spurious blob) more than it lowers the
    tumour (a lone lesion voxel apart), so the foreground mean rises: still refused, because the
    tumour's Dice falls. Per class: the organ's step chosen, the tumour's refused."""
    ref = _organ_with_tumour()
    ref[20, 20, 20] = 2  # a second, lone tumour lesion
    pred = ref.copy()
    pred[14:18, 14:18, 0:4] = 1
    refs = _write(tmp_path, "ref", {"a": ref})
    d = determine_postprocessing(_write(tmp_path, "pred", {"a": pred}), refs, LABELS)
    union = d["tests"][0]
    assert union["after"]["foreground_mean"] > union["before"]["foreground_mean"]  # the mean alone would take it
    assert union["classes_worse"] == ["tumour"] and union["after"]["tumour"] == pytest.approx(16 / 17)
    assert not union["chosen"]
    assert d["steps"] == [{"labels": [1]}]
    assert d["dice_before"]["organ"] == pytest.approx(2 * 208 / (208 + 272))
    assert d["dice_after"] == {"organ": 1.0, "tumour": 1.0, "foreground_mean": 1.0}


def test_a_decision_for_other_labels_is_refused(tmp_path):
    f = tmp_path / "pp.json"
    f.write_text(json.dumps({"format": "medvol-postprocessing-1", "labels": LABELS, "steps": [{"labels": [1]}]}))
    assert read_postprocessing(f, LABELS) == [[1]]
    with pytest.raises(Exception, match="decided for the labels"):
        read_postprocessing(f, {"background": 0, "fg": 1})
    f.write_text("{}")
    with pytest.raises(Exception, match=str(f)):
        read_postprocessing(f)


# --------------------------------------------------------------------------- end to end
TINY = ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
        "data.num_workers=0", "trainer.steps=2", "trainer.val_every=2"]
SPLITS = [{"train": ["s0", "s1"], "val": ["s2", "s3"]}, {"train": ["s2", "s3"], "val": ["s0", "s1"]}]


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """A real 2-fold cross-validation (tiny model, 2 steps: a poor one) in CV/model, and
    constructed configurations beside it: CV/blob (the references plus a spurious blob apart,
    with one-hot probabilities saved) and CV/empty (nothing found)."""
    from medvol.config import load_recipe
    from medvol.preprocessing import preprocess_dataset
    from medvol.training import train

    tmp = tmp_path_factory.mktemp("best")
    cases = {f"s{i}": ([sphere_case(radius=5.0 + i, seed=i)[0]], sphere_case(radius=5.0 + i, seed=i)[1], np.eye(4))
             for i in range(4)}
    raw = write_v2_dataset(tmp / "Dataset012_Best", cases)
    assert not preprocess_dataset(raw, tmp / "pre", num_workers=1, quiet=True).failures
    (tmp / "pre" / "splits_final.json").write_text(json.dumps(SPLITS))
    for k in (0, 1):
        train(load_recipe("quickstart", TINY + [f"data.fold={k}"]), tmp / "pre", tmp / "CV" / "model" / f"fold_{k}",
              device="cpu", quiet=True)
    for name in ("blob", "empty"):
        shutil.copytree(tmp / "CV" / "model", tmp / "CV" / name)
        for fold in (tmp / "CV" / name).glob("fold_*"):
            for case in json.loads((fold / "validation" / "summary.json").read_text())["cases"]:
                ref = read_volume(raw / "labelsTr" / f"{case}.nii.gz")
                seg = np.asarray(ref.array).astype(np.uint8)
                if name == "blob":
                    seg[0:2, 0:2, 0:2] = 1
                else:
                    seg[:] = 0
                write_nifti(fold / "validation" / f"{case}.nii.gz", seg, ref.affine)
                probs = np.stack([seg == 0, seg == 1]).astype(np.float16)
                np.savez_compressed(fold / "validation" / f"{case}.npz", probabilities=probs, affine=ref.affine)
    return raw, tmp / "CV"


def test_best_picks_the_best_configuration_and_its_postprocessing(cv, tmp_path, capsys):
    raw, runs = cv
    out = tmp_path / "best"
    assert main(["best", str(runs / "empty"), str(runs / "model"), str(runs / "blob"), "-o", str(out),
                 "--no-ensembles", "--device", "cpu", "--quiet"]) == 0
    info = json.loads((out / "best.json").read_text())
    scores = {k: v["foreground_mean"] for k, v in info["all_results"].items()}
    assert scores["empty"] == 0.0 and scores["blob"] < 1.0 and set(scores) == {"empty", "model", "blob"}
    assert scores["blob"] > scores["model"]  # the tiny model trained 2 steps is worse than reference + blob
    assert info["best_model_or_ensemble"]["name"] == "blob"
    assert info["best_model_or_ensemble"]["result_on_crossval_post_pp"] == 1.0  # the blob removed
    pp = json.loads((out / "postprocessing.json").read_text())
    assert pp["steps"] == [{"labels": [1]}] and pp["labels"] == {"background": 0, "fg": 1}
    printed = capsys.readouterr().out
    command = f"medvol predict -m {runs / 'blob'} -i INPUT_FOLDER -o OUTPUT_FOLDER --checkpoint latest " \
              f"--postprocessing {out / 'postprocessing.json'}"
    assert command in printed and command in (out / "inference_instructions.txt").read_text()


def test_ensembles_average_the_cross_validation_probabilities(cv, tmp_path):
    """model has no saved probabilities: its folds predict them again; blob's own are used."""
    from medvol.inference.postprocess import argmax_labels

    raw, runs = cv
    out = tmp_path / "best"
    assert main(["best", str(runs / "model"), str(runs / "blob"), "-o", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    info = json.loads((out / "best.json").read_text())
    assert list(info["all_results"]) == ["model", "blob", "model+blob"]
    for fold, case in (("fold_0", "s2"), ("fold_1", "s0")):
        with np.load(out / "probabilities" / "model" / fold / f"{case}.npz") as z:
            a = z["probabilities"].astype(np.float32)
        with np.load(runs / "blob" / fold / "validation" / f"{case}.npz") as z:
            b = z["probabilities"].astype(np.float32)
        ens = np.asarray(read_volume(out / "ensembles" / "model+blob" / f"{case}.nii.gz").array)
        np.testing.assert_array_equal(ens, argmax_labels((a + b) / 2))
        # the model's probabilities predicted again give its own validation label map back
        np.testing.assert_array_equal(argmax_labels(a), np.asarray(read_volume(runs / "model" / fold / "validation" /
                                                                                f"{case}.nii.gz").array))
    assert not (out / "probabilities" / "blob").exists()
    kept = out / "probabilities" / "model" / "fold_0" / "s2.npz"
    before = kept.stat().st_mtime_ns
    assert main(["best", str(runs / "model"), str(runs / "blob"), "-o", str(out), "--device", "cpu",
                 "--quiet"]) == 0  # into the same folder again: the probabilities are reused
    assert kept.stat().st_mtime_ns == before
    assert json.loads((out / "best.json").read_text()) == info


def test_configurations_predict_cannot_ensemble_are_not_ensembled(cv, tmp_path, caplog):
    raw, runs = cv
    other = tmp_path / "other"
    shutil.copytree(runs / "blob", other)
    for plans_file in other.glob("fold_*/plans.json"):
        plans = json.loads(plans_file.read_text())
        plans["configurations"]["2d"]["batch_size"] += 1  # as a ResEnc plan beside a default one
        plans_file.write_text(json.dumps(plans))
    with caplog.at_level("WARNING"):
        assert main(["best", str(runs / "blob"), str(other), "-o", str(tmp_path / "best"), "--device", "cpu"]) == 0
    assert list(json.loads((tmp_path / "best" / "best.json").read_text())["all_results"]) == ["blob", "other"]
    assert "blob+other not ensembled: their plans' configurations differ" in caplog.text


def test_predict_applies_the_postprocessing_file(cv, tmp_path):
    raw, runs = cv
    pp = tmp_path / "postprocessing.json"
    pp.write_text(json.dumps({"format": "medvol-postprocessing-1", "labels": {"background": 0, "fg": 1},
                              "steps": [{"labels": [1]}]}))
    img = np.zeros((64, 24, 20), np.float32)  # two bodies far apart: the poor model's map has pieces apart
    img[:24] = sphere_case(radius=5.0, seed=9)[0]
    img[50:62, 6:18, 4:16] = sphere_case(shape=(12, 12, 12), radius=3.0, seed=8)[0]
    model, inp = runs / "model" / "fold_0", tmp_path / "in"
    write_nifti(inp / "two.nii.gz", img)
    common = ["-m", str(model), "-i", str(inp), "--device", "cpu", "--quiet", "--no-pictures", "--no-tta"]
    assert main(["predict", *common, "-o", str(tmp_path / "plain")]) == 0
    assert main(["predict", *common, "-o", str(tmp_path / "pp"), "--postprocessing", str(pp)]) == 0
    plain = np.asarray(read_volume(tmp_path / "plain" / "two.nii.gz").array)
    done = np.asarray(read_volume(tmp_path / "pp" / "two.nii.gz").array)
    np.testing.assert_array_equal(done, keep_largest_region(plain, [1]))
    assert (done != plain).any()  # the file was applied
    other = tmp_path / "other.json"
    other.write_text(pp.read_text().replace('"fg"', '"liver"'))
    assert main(["predict", *common, "-o", str(tmp_path / "x"), "--postprocessing", str(other)]) == 2
    from medvol.errors import ConfigError
    from medvol.inference import Predictor

    with Predictor(model, device="cpu", tta=False, postprocessing=pp) as predictor:  # the same through the API
        np.testing.assert_array_equal(predictor.predict_array(img, affine=np.eye(4)), done)
    with pytest.raises(ConfigError, match="not both"):
        Predictor(model, device="cpu", postprocessing=pp, largest_component_only=True)


@pytest.mark.parametrize("labels", [{"background": 0, "fg": [1], "core": 1},
                                    {"background": 0, "fg": 1, "ignore": 2}])
def test_region_and_ignore_label_runs_are_refused_in_one_line(cv, tmp_path, capsys, labels):
    """`medvol best` scores plain label maps: runs of a region or ignore-label dataset are
    refused with one line naming the run, not a traceback."""
    _, runs = cv
    other = tmp_path / "regions"
    shutil.copytree(runs / "blob", other)
    for plans_file in other.glob("fold_*/plans.json"):
        plans_file.write_text(json.dumps({**json.loads(plans_file.read_text()), "labels": labels}))
    assert main(["best", str(other), "-o", str(tmp_path / "best"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medvol best: error: {other}: regions and an ignore label are not supported") and \
        "\n" not in err
