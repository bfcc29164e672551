"""The training engine on small real data: learning, exact resume, DDP on CPU (gloo)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medvol.checkpoint import load_checkpoint
from medvol.config import load_recipe
from medvol.training import train

from conftest import pinned

TINY = ["model.base_features=8", "model.max_features=32", "data.num_workers=0", "data.patch_size=[32, 32, 32]",
        "data.batch_size=2", "trainer.log_every=1"]


def _losses(run) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"}


def _metric(run, name) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["name"] == name]


@pytest.mark.slow
def test_short_training_learns_brain_tissue(brain_pre, tmp_path):
    run = tmp_path / "run"
    r = load_recipe("quickstart", TINY + ["trainer.steps=60", "trainer.val_every=20", "optimizer.lr=0.02"])
    with pinned():
        metrics = train(r, brain_pre, run, device="cpu", quiet=True)
    losses = np.array(list(_losses(run).values()))
    # Measured with threads pinned to 2, seeds 0/1/2: loss ratio 0.58 / 0.61 / 0.61, validation
    # Dice 0.67 -> 0.77, 0.70 -> 0.76, 0.71 -> 0.76: the bars below keep a wide margin.
    assert losses[-10:].mean() < 0.8 * losses[:10].mean()
    dice = _metric(run, "val/dice_mean")
    assert len(dice) == 3 and dice[-1] > dice[0]
    assert metrics["val/dice_mean"] > 0.55  # grey + white matter at 4 mm after 60 steps of a tiny U-Net
    for f in ("recipe.yaml", "plans.json", "loss.png", "split.json", "checkpoints/latest.pt", "checkpoints/best.pt"):
        assert (run / f).exists(), f
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 60 and set(ckpt["models"]) == {"model"} and "rng" in ckpt


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run_exactly(brain_pre, tmp_path):
    r = load_recipe("quickstart", TINY + ["trainer.steps=6", "trainer.val_every=3"])
    train(r, brain_pre, tmp_path / "full", device="cpu", quiet=True)
    train(r, brain_pre, tmp_path / "cut", device="cpu", stop_at=4, quiet=True)  # "killed" after step 4
    with pytest.raises(Exception, match="--resume"):
        train(r, brain_pre, tmp_path / "cut", device="cpu", quiet=True)
    train(r, brain_pre, tmp_path / "cut", device="cpu", resume=True, quiet=True)
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(cut) == list(range(6))
    for s in range(6):
        assert cut[s] == full[s], f"step {s}: {cut[s]} != {full[s]}"
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")["models"]["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")["models"]["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_batch_dice_equals_monais_on_one_process():
    from monai.losses import DiceCELoss

    from medvol.losses import segmentation_loss

    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 6, 5, 4), torch.randint(0, 4, (3, 1, 6, 5, 4))
    ref = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5,
                     smooth_dr=1e-5)(x, y)
    assert float(segmentation_loss("dice_ce", False)(x, y)) == pytest.approx(float(ref), rel=1e-6)


DDP_COMMON = ["model.base_features=4", "model.max_features=16", "data.num_workers=0",
              "data.patch_size=[32, 32, 32]", "trainer.steps=4", "trainer.val_every=4",
              "trainer.log_every=1", "data.val_cases=[brain_004]"]


def _train_argv(pre, out, *extra):
    sets = sum((["--set", s] for s in DDP_COMMON + ["data.batch_size=1"]), [])
    return [sys.executable, "-m", "medvol", "train", "quickstart", "--data", str(pre), "--out", str(out),
            "--device", "cpu", "--quiet", *sets, *extra]


@pytest.fixture(scope="module")
def ddp_run(brain_pre, tmp_path_factory):
    """2 gloo processes x batch 1 through `--nproc 2` (torchrun)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    ddp = subprocess.run(_train_argv(brain_pre, out, "--nproc", "2"), capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return out


@pytest.mark.ddp
def test_two_gloo_processes_match_one_process_with_double_batch(brain_pre, ddp_run, tmp_path):
    """With the default loss (batch Dice + CE, deep supervision): the Dice statistics are
    gathered over the ranks, so 2 processes x batch 1 train like 1 process x batch 2."""
    common = DDP_COMMON
    assert load_recipe("quickstart", common).trainer.loss == "dice_ce"
    assert load_recipe("quickstart", common).model.deep_supervision
    single = load_recipe("quickstart", common + ["data.batch_size=2"])
    train(single, brain_pre, tmp_path / "one", device="cpu", quiet=True)
    summary = json.loads((ddp_run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params_identical_across_ranks"] is True
    # the end-of-run validation ran once, on rank 0, while rank 1 waited (medvol.training.final_validation)
    assert json.loads((ddp_run / "validation" / "summary.json").read_text())["validation"]["cases"] == ["brain_004"]
    a = load_checkpoint(ddp_run / "checkpoints" / "latest.pt")["models"]["model"]
    b = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt")["models"]["model"]
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5
    # and the runs really trained (parameters left their initial values)
    torch.manual_seed(0)
    from medvol.networks import build_model
    from medvol.plans import Plans
    from medvol.preprocessing import load_plans

    init = build_model(single.model, Plans.from_dict(load_plans(brain_pre)), 1, 3).state_dict()
    moved = max(float((init[k] - b[k]).abs().max()) for k in b)
    assert moved > 1e-4


@pytest.mark.ddp
def test_srun_style_launch_matches_nproc(brain_pre, ddp_run, tmp_path):
    """Two processes started the way `srun` starts tasks (SLURM_* variables, MASTER_ADDR/PORT,
    no torchrun) train exactly like `--nproc 2`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "srun"
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NTASKS_PER_NODE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(_train_argv(brain_pre, out), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["world_size"] == 2
    a = load_checkpoint(ddp_run / "checkpoints" / "latest.pt")["models"]["model"]
    b = load_checkpoint(out / "checkpoints" / "latest.pt")["models"]["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("outcome", ["ends", "preempted", "fails"])
def test_processes_meet_before_leaving_the_group_unless_one_failed(outcome, tmp_path, monkeypatch):
    """After a run that ended (or was pre-empted, every process at the same step) the processes
    meet at a barrier before destroying the group (a gloo process that leaves alone aborts at
    exit more often: benchmarks/gloo_teardown.py). After an error on one process there is no
    barrier, which the others, inside some other collective, would never match."""
    import medvol.training.distributed as mdist
    import medvol.training.engine as engine
    from medvol.errors import Preempted

    calls: list[str] = []
    monkeypatch.setattr(mdist, "setup", lambda device: mdist.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(mdist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mdist.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(mdist.dist, "destroy_process_group", lambda: calls.append("destroy"))
    raised = {"ends": None, "preempted": Preempted(3, tmp_path / "latest.pt"), "fails": ValueError("bad case")}[outcome]

    def fit(trainer, **kw):
        calls.append("fit")
        if raised is not None:
            raise raised
        return {"val/dice": 0.5}

    monkeypatch.setattr(engine, "fit", fit)
    monkeypatch.setattr("medvol.training.get_trainer", lambda name: lambda *a: object())
    recipe = load_recipe("quickstart")
    if raised is None:
        assert train(recipe, tmp_path, tmp_path / "run") == {"val/dice": 0.5}
    else:
        with pytest.raises(type(raised)):
            train(recipe, tmp_path, tmp_path / "run")
    assert calls == (["fit", "destroy"] if outcome == "fails" else ["fit", "barrier", "destroy"])


@pytest.mark.parametrize("status", [0, 2])
def test_the_cli_ends_a_process_of_a_group_through_exit_process(status, monkeypatch):
    """A command run as one of several processes ends through ``exit_process`` with its own
    status (no interpreter finalization, where gloo's threads can abort it); a lone one returns."""
    from medvol import cli
    from medvol.training import distributed

    left: list[int] = []
    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, "check": lambda a: status})
    monkeypatch.setattr(distributed, "exit_process", left.append)
    for joined, expected in ((True, [status]), (False, [])):
        monkeypatch.setattr(distributed, "_joined", joined)
        left.clear()
        assert cli.main(["check", "raw"]) == status
        assert left == expected


def test_exit_process_flushes_and_leaves_with_the_status(tmp_path):
    """Block-buffered stdout (a pipe) and a log file handler still reach their files."""
    code = ("import logging, sys; from medvol.training.distributed import exit_process; "
            "logging.basicConfig(filename=sys.argv[1]); logging.warning('logged'); "
            "print('printed'); sys.stdout.write('tail'); exit_process(3)")
    log = tmp_path / "log.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 3 and r.stdout == "printed\ntail"
    assert "logged" in log.read_text()


@pytest.mark.parametrize("form", [["--nproc", "3"], ["--nproc=3"]])
def test_nproc_relaunches_the_same_command_under_torchrun(form, monkeypatch):
    from medvol import cli
    from medvol.training import distributed

    seen = {}
    monkeypatch.setattr(distributed, "launch", lambda n, argv: seen.update(n=n, argv=argv) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "quickstart", "--data", "d", "--out", "o", *form, "--set", "trainer.steps=1"]
    monkeypatch.setattr(sys, "argv", ["medvol", *argv])
    assert cli.main(argv) == 0
    assert seen == {"n": 3, "argv": ["train", "quickstart", "--data", "d", "--out", "o", "--set", "trainer.steps=1"]}


@pytest.mark.slow
def test_init_from_loads_matching_tensors_and_reports(brain_pre, tmp_path):
    r = load_recipe("quickstart", TINY + ["trainer.steps=2", "trainer.val_every=2"])
    train(r, brain_pre, tmp_path / "a", device="cpu", quiet=True)
    src = load_checkpoint(tmp_path / "a" / "checkpoints" / "latest.pt")["models"]["model"]
    r2 = load_recipe("quickstart", TINY + ["trainer.steps=1", "trainer.val_every=1", "trainer.freeze_init_steps=1",
                                           f"init_from={tmp_path / 'a' / 'checkpoints' / 'latest.pt'}"])
    train(r2, brain_pre, tmp_path / "b", device="cpu", quiet=True)
    report = json.loads((tmp_path / "b" / "init_report.json").read_text())
    assert len(report["loaded"]) == len(src) and not report["shape_mismatch"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "latest.pt")["models"]["model"]
    k = next(k for k in src if k.endswith("weight"))
    torch.testing.assert_close(b[k], src[k])  # frozen for the one step: the loaded weights are still there


@pytest.mark.slow
def test_any_patch_size_gets_its_own_topology(brain_pre, tmp_path, capsys):
    """A recipe patch other than the plan's: the U-Net topology is recomputed with the plan's
    rule and recorded in the run's plans.json (predict rebuilds the same network); a size no
    topology serves is one error naming the nearest valid sizes."""
    from medvol.checkpoint import load_run
    from medvol.cli import main

    sets = TINY[:-2] + ["data.batch_size=2", "trainer.steps=1", "trainer.val_every=1", "data.val_cases=[brain_004]"]
    r = load_recipe("quickstart", sets + ["data.patch_size=[48, 24, 32]"])
    train(r, brain_pre, tmp_path / "run", device="cpu", quiet=True)
    plans = json.loads((tmp_path / "run" / "plans.json").read_text())
    assert plans["patch_size"] == [48, 24, 32]
    assert plans["network"]["num_pool_per_axis"] == [3, 2, 3]  # 24 pools twice before its edge reaches 6
    run = load_run(tmp_path / "run", torch.device("cpu"))
    assert len(run.model.strides) == 4 and list(run.model.strides[-1]) == [2, 1, 2]
    args = ["train", "quickstart", "--data", str(brain_pre), "--out", str(tmp_path / "bad"), "--device", "cpu",
            "--quiet", *sum((["--set", s] for s in sets + ["data.patch_size=[36, 36, 36]"]), [])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nearest valid sizes: [32, 32, 32] or [40, 40, 40]" in err[0]
