"""Packaging: every package under medvol/ (and datasets/) is installed; the built wheel
carries the recipes and trains outside the checkout."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sphere_case, write_v2_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "medvol").rglob("__init__.py")}
    found |= {"medvol.datasets." + ".".join(p.parent.relative_to(ROOT / "datasets").parts)
              for p in (ROOT / "datasets").rglob("__init__.py") if p.parent != ROOT / "datasets"}
    found |= {"medvol.datasets", "medvol.pipelines"}
    assert found <= listed, f"not listed in setup.cfg [options] packages: {sorted(found - listed)}"


def test_console_script_entry_point():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "medvol = medvol.cli:main" in cfg["options.entry_points"]["console_scripts"]


def _run(*cmd, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


def _installed_wheel(tmp: Path) -> Path:
    """A fresh venv holding only the wheel built from a copy of the sources (no stale build/
    of the checkout); the dependencies come from this interpreter's site-packages through a
    .pth file added after the install, so neither pip nor the checkout's editable finder is involved."""
    src = tmp / "src"
    for name in ("medvol", "datasets", "pipelines"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "wheels", src,
         cwd=tmp)
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
         *(tmp / "wheels").glob("medvol-*.whl"), cwd=tmp)
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_medvol_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    return venv


@pytest.mark.slow
def test_wheel_installs_the_recipes_and_trains_outside_the_checkout(tmp_path):
    venv = _installed_wheel(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run(venv / "bin" / "python", "-c", "import medvol, medvol.pipelines; print(medvol.__file__)", cwd=outside)
    assert Path(where.strip()).is_relative_to(venv), where
    listing = _run(venv / "bin" / "medvol", "recipes", cwd=outside)
    rows = dict(line.split(None, 1) for line in listing.splitlines())
    assert sorted(rows) == sorted(p.stem for p in (ROOT / "pipelines").glob("*.yaml"))
    assert rows["quickstart"].startswith("nnU-Net-style 3D U-Net")
    assert "--data" in _run(venv / "bin" / "medvol", "train", "quickstart", "--help", cwd=outside)

    from medvol.preprocessing import preprocess_dataset

    cases = {f"s{i}": ([sphere_case(seed=i)[0]], sphere_case(seed=i)[1], np.eye(4)) for i in range(2)}
    raw = write_v2_dataset(outside / "Dataset050_Wheel", cases)
    assert not preprocess_dataset(raw, outside / "pre", num_workers=1, quiet=True).failures
    tiny = ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
            "data.num_workers=0", "trainer.steps=2", "trainer.val_every=2", "data.val_cases=[s1]"]
    _run(venv / "bin" / "medvol", "train", "quickstart", "--data", "pre", "--out", "run", "--device", "cpu", "--quiet",
         *[x for s in tiny for x in ("--set", s)], cwd=outside)
    ckpt = torch.load(outside / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2
