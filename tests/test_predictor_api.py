"""medvol.inference.Predictor: the Python API predicts arrays, Volumes and files exactly as
``medvol predict`` does (same labels, probabilities and affine), and cleans up a model zip."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvol.cli import main
from medvol.errors import MedvolError
from medvol.inference import Predictor
from medvol.io import Volume

from conftest import sphere_case, write_nifti

# an oblique-free but offset, anisotropic grid whose numbers are exact in float32 (NIfTI's sform)
AFFINE = np.array([[1.25, 0, 0, -10.0], [0, 1.0, 0, 4.0], [0, 0, 1.5, 2.5], [0, 0, 0, 1]])
OPTS = ["--device", "cpu", "--quiet", "--no-tta", "--save-probabilities", "--no-pictures"]


def _scan(tmp_path: Path, seed: int = 3) -> tuple[np.ndarray, Path]:
    image = sphere_case(seed=seed)[0]
    return image, write_nifti(tmp_path / "in" / "scan.nii.gz", image, AFFINE)


def _cli(model, inp: Path, out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, affine, probabilities) that ``medvol predict`` writes for ``inp``."""
    assert main(["predict", "-m", str(model), "-i", str(inp), "-o", str(out), *OPTS]) == 0
    img = nib.load(str(out / "scan.nii.gz"))
    with np.load(out / "scan.npz") as z:
        return np.asarray(img.dataobj), img.affine, z["probabilities"]


def test_predict_array_equals_what_medvol_predict_writes(tiny_run, tmp_path):
    image, path = _scan(tmp_path)
    labels, affine, probs = _cli(tiny_run, path.parent, tmp_path / "cli")
    with Predictor(tiny_run, device="cpu", tta=False) as p:
        seg, prob = p.predict_array(image, affine=AFFINE, return_probabilities=True)
        vol = p.predict_volume(Volume(image.copy(), AFFINE))
        by_spacing = p.predict_array(image[None], spacing=(1.25, 1.0, 1.5), return_probabilities=True)
        shifted = p.predict_array(image, affine=np.diag([1.25, 1.0, 1.5, 1.0]), return_probabilities=True)
    assert seg.shape == image.shape and np.array_equal(seg, labels)
    np.testing.assert_array_equal(prob, probs)  # voxel for voxel, not merely close
    assert len(np.unique(prob[1])) > 100  # a real map of this scan, not a constant
    np.testing.assert_array_equal(affine, AFFINE)
    assert np.array_equal(vol.array, labels) and np.array_equal(vol.affine, AFFINE)
    # spacing only = the axis-aligned affine of that spacing (the origin plays no part)
    for got, want in zip(by_spacing, shifted):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(by_spacing[1], prob)
    assert not np.shares_memory(seg, image) and np.array_equal(image, sphere_case(seed=3)[0])  # input untouched


def test_predict_files_equals_medvol_predict(tiny_run, tmp_path):
    _, path = _scan(tmp_path)
    labels, _, probs = _cli(tiny_run, path.parent, tmp_path / "cli")
    with Predictor(tiny_run, device="cpu", tta=False) as p:
        written = p.predict_files([path], tmp_path / "api", save_probabilities=True)
        from_folder = p.predict_files(path.parent, tmp_path / "api2")
        with pytest.raises(MedvolError, match="scan: this case name is given twice in the inputs"):
            p.predict_files([path, path.parent], tmp_path / "api3")
    assert written == [tmp_path / "api" / "scan.nii.gz"]
    assert (tmp_path / "api" / "predict.json").is_file() and not (tmp_path / "api3").exists()
    assert np.array_equal(np.asarray(nib.load(str(from_folder[0])).dataobj), labels)
    assert np.array_equal(np.asarray(nib.load(str(written[0])).dataobj), labels)
    with np.load(tmp_path / "api" / "scan.npz") as z:
        np.testing.assert_array_equal(z["probabilities"], probs)


def test_a_model_zip_predicts_and_leaves_no_folder_after_close(tiny_run, tmp_path):
    model = tmp_path / "model.zip"
    assert main(["export", str(tiny_run), "-o", str(model), "--quiet"]) == 0
    image, path = _scan(tmp_path)
    _, _, probs = _cli(tiny_run, path.parent, tmp_path / "cli")
    p = Predictor(model, device="cpu", tta=False)
    unpacked = p.runs[0].run_dir
    assert unpacked.is_dir() and unpacked != tiny_run
    _, prob = p.predict_array(image, affine=AFFINE, return_probabilities=True)
    np.testing.assert_array_equal(prob, probs)
    p.close()
    assert not unpacked.exists()
    with Predictor([model, model], device="cpu", tta=False) as ens:  # an ensemble of zips
        folders = [r.run_dir for r in ens.runs]
        assert len(set(folders)) == 2 and all(f.is_dir() for f in folders)
    assert not any(f.exists() for f in folders)


@pytest.mark.parametrize("shape", [(2, 24, 24, 20), (24, 24), (1, 1, 24, 24, 20)])
def test_a_wrong_channel_count_is_one_clear_error(tiny_run, shape):
    with Predictor(tiny_run, device="cpu") as p:
        with pytest.raises(MedvolError, match=r"the model expects 1 channel\(s\) as \(C, X, Y, Z\)") as e:
            p.predict_array(np.zeros(shape, np.float32), spacing=(1, 1, 1))
    assert "\n" not in str(e.value) and str(shape) in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of them"),
    ({"spacing": (1, 1, 1), "affine": np.eye(4)}, "exactly one of them"),
    ({"spacing": (1, 0, 1)}, "3 positive numbers"),
    ({"affine": np.eye(3)}, "finite 4x4 matrix"),
])
def test_a_missing_or_bad_grid_is_one_clear_error(tiny_run, kwargs, message):
    with Predictor(tiny_run, device="cpu") as p:
        with pytest.raises(MedvolError, match=message):
            p.predict_array(np.zeros((24, 24, 20), np.float32), **kwargs)
