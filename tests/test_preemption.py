"""Pre-emption as SLURM does it: SIGTERM mid-run -> the step finishes, latest.pt is written,
exit status 75; `--resume auto` then ends exactly like an uninterrupted run. `medvol predict`
finishes the case in flight and stops, exit 75, saying which cases it did not write."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import pytest
import torch

from medvol.checkpoint import load_checkpoint
from medvol.errors import PREEMPTED_EXIT

from conftest import medvol_argv, run_killed_at, sphere_case, write_nifti

SETS = ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
        "data.num_workers=0", "trainer.steps=40", "trainer.val_every=40", "trainer.log_every=1",
        "data.val_cases=[s1]"]


def _argv(pre, out, *extra):
    return [sys.executable, "-m", "medvol", "train", "quickstart", "--data", str(pre), "--out", str(out),
            "--device", "cpu", "--quiet", *sum((["--set", s] for s in SETS), []), *extra]


def _losses(run) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"}


def _logged_steps(run) -> int:
    try:
        return len(_losses(run))
    except (FileNotFoundError, KeyError):
        return 0


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_run_stops_cleanly_and_resume_auto_matches_the_full_run(tiny_run, tmp_path, sig):
    pre = tiny_run.parent / "pre"
    full = tmp_path / "full"
    assert subprocess.run(_argv(pre, full, "--resume", "auto"), env=ENV, timeout=600).returncode == 0  # fresh
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_argv(pre, cut), env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _logged_steps(cut) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err
    assert "pre-empted after step" in err and "--resume auto" in err
    stopped = load_checkpoint(cut / "checkpoints" / "latest.pt")["step"]
    assert 3 <= stopped < 40 and max(_losses(cut)) == stopped - 1  # the step in flight was finished
    assert subprocess.run(_argv(pre, cut, "--resume", "auto"), env=ENV, timeout=600).returncode == 0
    a, b = _losses(full), _losses(cut)
    assert sorted(b) == list(range(40)) and all(a[s] == b[s] for s in range(40))
    wa = load_checkpoint(full / "checkpoints" / "latest.pt")["models"]["model"]
    wb = load_checkpoint(cut / "checkpoints" / "latest.pt")["models"]["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_checkpoint_every_writes_latest_between_validations(tiny_run, tmp_path, monkeypatch):
    from medvol.config import load_recipe
    from medvol.training import engine, train

    pre = tiny_run.parent / "pre"
    saved = []
    real = engine.save_checkpoint
    monkeypatch.setattr(engine, "save_checkpoint", lambda path, state: saved.append((path.name, state["step"]))
                        or real(path, state))
    r = load_recipe("quickstart", SETS + ["trainer.steps=5", "trainer.val_every=5", "trainer.checkpoint_every=2"])
    train(r, pre, tmp_path / "run", device="cpu", quiet=True)
    assert [s for name, s in saved if name == "latest.pt"] == [2, 4, 5]  # every 2 steps, then at validation
    with pytest.raises(Exception, match="nothing to resume"):
        train(r, pre, tmp_path / "fresh", device="cpu", quiet=True, resume=True)
    with pytest.raises(Exception, match="checkpoint_every"):
        load_recipe("quickstart", ["trainer.checkpoint_every=0"])


@pytest.mark.ddp
def test_under_ddp_every_rank_stops_at_the_same_step(tiny_run, tmp_path):
    """Two processes started as srun starts them; only rank 1 gets SIGTERM, yet both stop
    after the same step (the flag is all-reduced after every step) and exit 75."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pre, out = tiny_run.parent / "pre", tmp_path / "ddp"
    procs = []
    for rank in range(2):
        env = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NTASKS_PER_NODE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(_argv(pre, out, "--set", "data.batch_size=1"), env=env,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 300
    while _logged_steps(out) < 3 and procs[0].poll() is None and time.time() < deadline:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT, PREEMPTED_EXIT], errs
    steps = {int(e.split("pre-empted after step ")[1].split(":")[0]) for e in errs}
    assert len(steps) == 1 and load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == steps.pop()


def test_sigterm_stops_predict_between_cases_and_leaves_only_whole_files(tiny_run, tmp_path):
    """Issue 35, 3: SIGTERM while predicting with a model zip -> the case in flight is finished,
    exit 75, one line naming the cases not written; no unpacked model, no lock, no partial file."""
    from medvol.cli import main

    model, inp, out, tmp = tmp_path / "model.zip", tmp_path / "in", tmp_path / "out", tmp_path / "tmp"
    assert main(["export", str(tiny_run), "-o", str(model), "--quiet"]) == 0
    cases = [f"c{i:02d}" for i in range(12)]
    for i, c in enumerate(cases):
        write_nifti(inp / f"{c}.nii.gz", sphere_case(seed=i)[0])
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "medvol", "predict", "-m", str(model), "-i", str(inp), "-o",
                             str(out), "--device", "cpu", "--quiet", "--tta"], env={**ENV, "TMPDIR": str(tmp)},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("*.nii.gz")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err
    written = sorted(p.name[:-7] for p in out.glob("*.nii.gz"))
    lines = [ln for ln in err.splitlines() if ln.startswith("medvol ")]
    assert len(lines) == 1 and 1 <= len(written) < len(cases), err
    not_written = [c for c in cases if c not in written]  # named up to 10, then counted (how many is timing)
    more = f" and {len(not_written) - 10} more" if len(not_written) > 10 else ""
    assert lines[0] == (f"medvol predict: stopped by SIGTERM: {len(written)} of {len(cases)} case(s) written to {out}, "
                        f"not written: {', '.join(not_written[:10])}{more}; rerun the same command "
                        "to predict them (it predicts every case again)")
    assert not list(tmp.iterdir())  # no medvol-model-* left behind
    assert sorted(p.name for p in out.iterdir()) == sorted([".medvol-manifest.json", *(f"{c}.nii.gz" for c in written)])
    for c in written:
        assert nib.load(out / f"{c}.nii.gz").get_fdata().shape == (24, 24, 20)


def test_the_predict_flag_waits_for_the_case_in_flight_but_not_for_a_second_ctrl_c():
    from medvol.training.preemption import PreemptionFlag

    for first in (signal.SIGINT, signal.SIGTERM):
        with PreemptionFlag((signal.SIGTERM, signal.SIGINT)) as flag:
            os.kill(os.getpid(), first)
            os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
            assert flag.signum == first
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigkill_during_predict_leaves_whole_files_and_the_rerun_finishes(tiny_run, tmp_path):
    """Issue 35, 3: SIGKILL (no handler can run) while predicting: every case file in OUT is
    whole, and the same command run again predicts every case into the same folder."""
    inp, out = tmp_path / "in", tmp_path / "out"
    cases = [f"c{i:02d}" for i in range(8)]
    for i, c in enumerate(cases):
        write_nifti(inp / f"{c}.nii.gz", sphere_case(seed=i)[0])
    argv = [sys.executable, "-m", "medvol", "predict", "-m", str(tiny_run), "-i", str(inp), "-o", str(out),
            "--device", "cpu", "--quiet", "--tta", "--no-pictures"]
    proc = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # a finished case (its name): "*.nii.gz" also matches the temp file ".c00.nii.gz.<...>.part.nii.gz",
    # and a kill while the first case is still being written left no case file at all under load
    while not list(out.glob("c*.nii.gz")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)
    written = sorted(out.glob("c*.nii.gz"))
    assert 1 <= len(written) < len(cases)
    for p in written:
        assert nib.load(p).get_fdata().shape == (24, 24, 20)
    rerun = subprocess.run(argv, env=ENV, stderr=subprocess.PIPE, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in out.glob("c*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    assert not list(out.glob(".*.part*"))  # a write the kill cut short was swept by the rerun


def test_sigkill_while_exporting_keeps_the_old_model_and_the_rerun_leaves_what_an_unkilled_export_does(
        tiny_run, tmp_path):
    """Issue 35, 3: SIGKILL (no handler) after the zip is written under its temp name and before
    the rename: no model.zip (or the previous one, byte for byte); the same command run again
    writes a model predict reads and sweeps the killed writer's temp file."""
    from medvol.export import unpacked_model

    out, ref = tmp_path / "out", tmp_path / "ref"
    argv = medvol_argv("export", str(tiny_run), "-o", str(out / "model.zip"), "--quiet")
    run_killed_at("model.zip", argv, tmp_path / "hook")
    assert not (out / "model.zip").exists() and len(list(out.glob(".model.zip.*.part.zip"))) == 1
    assert subprocess.run(argv, env=ENV).returncode == 0
    assert subprocess.run(medvol_argv("export", str(tiny_run), "-o", str(ref / "model.zip"), "--quiet"),
                          env=ENV).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    with unpacked_model(out / "model.zip") as run:
        assert (run / "plans.json").read_bytes() == (tiny_run / "plans.json").read_bytes()
    before = (out / "model.zip").read_bytes()
    run_killed_at("model.zip", argv, tmp_path / "hook")  # a second export over the first one, killed
    assert (out / "model.zip").read_bytes() == before
