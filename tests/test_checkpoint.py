"""The checkpoint contract (medvol/checkpoint.py): what is saved loads back exactly (models,
optimisers, schedulers, every RNG), loading never runs pickled code (weights_only), a failed
write leaves no partial file, and a run folder's checkpoint that does not fit its model is
a clear error."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from medvol.checkpoint import (
    expand_fold_folders,
    load_checkpoint,
    load_run,
    rng_state,
    run_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from medvol.errors import CacheError, ConfigError, MedvolError, OutputError

CPU = torch.device("cpu")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1))


def _step(net, opt, sched, x):
    loss = net(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _parts(seed: int = 0):
    net = _net(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    return net, opt, sched


# ---------------------------------------------------------------- round trip


def test_models_optimisers_and_schedulers_round_trip_and_resume_exactly(tmp_path):
    """Saved after 3 steps and loaded into fresh objects, the next two steps give bit-equal
    weights to those of the objects that never stopped."""
    x = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(1))
    net, opt, sched = _parts()
    for _ in range(3):
        _step(net, opt, sched, x)
    save_checkpoint(tmp_path / "latest.pt", {"format": "medvol-checkpoint-1", "step": 3, "best_metric": 0.25,
                                             "models": {"model": net.state_dict()},
                                             "optimizers": {"model": opt.state_dict()},
                                             "schedulers": {"model": sched.state_dict()}})
    ckpt = load_checkpoint(tmp_path / "latest.pt")
    assert (ckpt["format"], ckpt["step"], ckpt["best_metric"]) == ("medvol-checkpoint-1", 3, 0.25)
    net2, opt2, sched2 = _parts(seed=7)  # other initial weights: all of them must come from the file
    net2.load_state_dict(ckpt["models"]["model"])
    opt2.load_state_dict(ckpt["optimizers"]["model"])
    sched2.load_state_dict(ckpt["schedulers"]["model"])
    for k, v in net.state_dict().items():  # BatchNorm's running statistics included
        assert torch.equal(v, net2.state_dict()[k]), k
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 5e-3
    for _ in range(2):
        _step(net, opt, sched, x)
        _step(net2, opt2, sched2, x)
    for k, v in net.state_dict().items():
        assert torch.equal(v, net2.state_dict()[k]), k


def _draws() -> tuple:
    return (torch.rand(5).tolist(), torch.randint(0, 1000, (3,)).tolist(), np.random.rand(3).tolist(),
            np.random.standard_normal(3).tolist(), random.random(), random.gauss(0, 1), random.gauss(0, 1))


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    """torch, numpy and Python's generators, each with a cached Gaussian pending (numpy's
    legacy Box-Muller and random.gauss keep the second value of a pair), continue exactly."""
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal(1)  # leaves numpy's has_gauss set
    random.gauss(0, 1)  # leaves Python's gauss_next set
    assert np.random.get_state(legacy=True)[3] == 1
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    want = _draws()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert _draws() != want
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == want


# ---------------------------------------------------------------- what loading refuses


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "code_ran"
    bad = tmp_path / "bad.pt"
    torch.save({"models": {"model": {"w": torch.ones(2)}}, "extra": _Payload(marker)}, bad)
    with pytest.raises(CacheError, match="bad.pt: not a readable medvol checkpoint"):
        load_checkpoint(bad)
    assert not marker.exists()  # nothing in the file was executed
    torch.load(bad, weights_only=False)  # (what an unsafe load would have done)
    assert marker.exists()


def test_missing_and_damaged_files_are_cache_errors(tmp_path):
    with pytest.raises(CacheError, match="no checkpoint here"):
        load_checkpoint(tmp_path / "none.pt")
    save_checkpoint(tmp_path / "ok.pt", {"models": {"model": {"w": torch.arange(1000.0)}}})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="cut.pt: not a readable medvol checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


# ---------------------------------------------------------------- atomic writes


class _Unpicklable:
    """Fails when torch.save reaches it, after the tensors before it were written."""

    def __init__(self, error: BaseException):
        self.error = error

    def __reduce__(self):
        raise self.error


@pytest.mark.parametrize("error, raised", [(TypeError("cannot pickle this"), TypeError),
                                           (OSError(errno.ENOSPC, "No space left on device"), OutputError)])
def test_a_failed_write_leaves_the_old_checkpoint_and_no_partial_file(tmp_path, error, raised):
    path = tmp_path / "checkpoints" / "latest.pt"
    save_checkpoint(path, {"step": 1, "w": torch.zeros(3)})
    before = path.read_bytes()
    big = {"step": 2, "w": torch.randn(64, 1024), "then": _Unpicklable(error)}
    with pytest.raises(raised):
        save_checkpoint(path, big)
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]  # no temporary file left
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    # the first checkpoint of a run: nothing at all is left behind
    with pytest.raises(raised):
        save_checkpoint(tmp_path / "fresh" / "best.pt", big)
    assert list((tmp_path / "fresh").iterdir()) == []


def test_a_written_checkpoint_has_an_ordinary_files_mode(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"w": torch.ones(1)})
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o666 & ~mask


# ---------------------------------------------------------------- run folders


def test_best_falls_back_to_latest_and_fold_folders_expand(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").touch()
    assert run_checkpoint(run) == run / "checkpoints" / "latest.pt"  # never validated: no best.pt
    assert run_checkpoint(run, "latest") == run / "checkpoints" / "latest.pt"
    (run / "checkpoints" / "best.pt").touch()
    assert run_checkpoint(run) == run / "checkpoints" / "best.pt"
    (run / "checkpoints" / "latest.pt").unlink()
    assert not run_checkpoint(run, "latest").exists()  # latest never falls back to best
    folds = tmp_path / "cv"
    for name in ("fold_1", "fold_0"):
        (folds / name).mkdir(parents=True)
        (folds / name / "recipe.yaml").touch()
    (run / "recipe.yaml").touch()
    assert expand_fold_folders([run, folds]) == [run, folds / "fold_0", folds / "fold_1"]
    assert expand_fold_folders([folds / "fold_1"]) == [folds / "fold_1"]


def test_load_run_of_a_folder_that_is_no_run_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="not a medvol run folder .no recipe.yaml"):
        load_run(tmp_path, CPU)


def _run_with_model_widths(tiny_run: Path, dest: Path, base: int, top: int) -> Path:
    """A copy of ``tiny_run`` (a U-Net with base_features 4, max 8) whose recipe now builds
    another width: its checkpoint is from a smaller or bigger model than the recipe's."""
    shutil.copytree(tiny_run, dest)
    recipe = yaml.safe_load((dest / "recipe.yaml").read_text())
    recipe["model"].update(base_features=base, max_features=top)
    (dest / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return dest


def test_load_run_loads_the_checkpoint_it_was_trained_with(tiny_run):
    run = load_run(tiny_run, CPU)
    saved = load_checkpoint(run_checkpoint(tiny_run))["models"]["model"]
    assert not run.model.training
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("base, top", [(8, 16), (2, 4)])
def test_a_checkpoint_from_a_bigger_or_smaller_model_is_a_clear_error(tiny_run, tmp_path, base, top):
    run = _run_with_model_widths(tiny_run, tmp_path / "run", base, top)
    with pytest.raises(MedvolError) as e:
        load_run(run, CPU)
    saved = load_checkpoint(run_checkpoint(run))["models"]["model"]
    shapes = {k: "x".join(map(str, v.shape)) for k, v in saved.items()}
    first = next(iter(shapes))  # the first tensor differs in width, named with both shapes
    assert re.fullmatch(rf".*/run/plans\.json: the network it describes does not fit the weights of the checkpoint "
                        rf".*/run/checkpoints/(best|latest)\.pt \(\d+ tensor\(s\) differ: {re.escape(first)}: "
                        rf"{shapes[first]} in the checkpoint, {base}x.* in the network; .*\); was it edited after "
                        r"training\?", str(e.value)), str(e.value)
