"""Portable model files: export -> predict from the zip equals predict from the run folder."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from medvol.cli import main
from medvol.errors import InputError
from medvol.export import read_model_zip

from conftest import sphere_case, write_nifti


def test_export_then_predict_from_the_zip_equals_the_run_folder(tiny_run, tmp_path):
    model = tmp_path / "model.zip"
    assert main(["export", str(tiny_run), "-o", str(model), "--quiet"]) == 0
    with zipfile.ZipFile(model) as z:
        assert sorted(z.namelist()) == ["checkpoint.pt", "manifest.json", "plans.json", "recipe.yaml"]
        manifest = json.loads(z.read("manifest.json"))
        ckpt = torch.load(io.BytesIO(z.read("checkpoint.pt")), weights_only=True)
    assert manifest["format"] == "medvol-model-1" and manifest["torch"] == torch.__version__
    assert set(ckpt) == {"models", "inference_model", "step"}  # no optimiser, scheduler or RNG state
    inp = tmp_path / "in"
    write_nifti(inp / "scan.nii.gz", sphere_case(seed=3)[0])
    args = ["-i", str(inp), "--device", "cpu", "--quiet", "--no-tta", "--save-probabilities"]
    assert main(["predict", "-m", str(tiny_run), "-o", str(tmp_path / "a"), *args]) == 0
    assert main(["predict", "-m", str(model), "-o", str(tmp_path / "b"), *args]) == 0
    for name in ("scan.nii.gz",):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with np.load(tmp_path / "a" / "scan.npz") as pa, np.load(tmp_path / "b" / "scan.npz") as pb:
        np.testing.assert_array_equal(pa["probabilities"], pb["probabilities"])


def _rewrite(src, dst, change):
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return dst


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("plans.json"), "incomplete or unknown model file"),
    (lambda m: m.update({"plans.json": m["plans.json"] + b" "}), "plans.json: checksum mismatch"),
    ("pickle", "refused by torch.load\\(weights_only=True\\)"),
    (lambda m: m.update({"/etc/cron.d/x": b"* * * * * root true"}), "unexpected member '/etc/cron.d/x'"),
    (lambda m: m.update({"checkpoints/extra.pt": b""}), "unexpected member 'checkpoints/extra.pt'"),
])
def test_broken_model_files_are_one_clear_error(tiny_run, tmp_path, damage, message):
    model = tmp_path / "model.zip"
    assert main(["export", str(tiny_run), "-o", str(model), "--quiet"]) == 0
    if damage == "pickle":  # a pickled object, with a manifest that vouches for it
        def damage(m):
            buf = io.BytesIO()
            torch.save({"models": {"model": Evil()}}, buf)
            m["checkpoint.pt"] = buf.getvalue()
            man = json.loads(m["manifest.json"])
            man["sha256"]["checkpoint.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()
            m["manifest.json"] = json.dumps(man).encode()
    bad = _rewrite(model, tmp_path / "bad.zip", damage)
    with pytest.raises(InputError, match=message):
        read_model_zip(bad)
    inp = tmp_path / "in"
    write_nifti(inp / "scan.nii.gz", sphere_case()[0])
    assert main(["predict", "-m", str(bad), "-i", str(inp), "-o", str(tmp_path / "p"), "--device", "cpu",
                 "--quiet"]) == 2


def test_a_second_copy_of_a_member_is_refused(tiny_run, tmp_path):
    """Zip readers disagree on which of two same-named members they read: refused, named."""
    model = tmp_path / "model.zip"
    assert main(["export", str(tiny_run), "-o", str(model), "--quiet"]) == 0
    with zipfile.ZipFile(model) as z:
        plans = z.read("plans.json")
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(model, "a") as z:
        z.writestr("plans.json", plans)
    with pytest.raises(InputError, match=r"unexpected member 'plans\.json' \(a second copy\)"):
        read_model_zip(model)
