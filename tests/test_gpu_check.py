"""benchmarks/gpu_check.py, the one prepared GPU check (issue 32), kept from rotting on the CPU:
its plan, its table over failed and partial steps, and the whole dry run (every step, small)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "gpu_check.py"


def test_the_plan_names_every_step_of_the_issue():
    r = subprocess.run([sys.executable, str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for words in ("pytest -m cuda", "fp32 / bf16 / bf16+cl / fp16", "peak GPU memory vs --gpu-memory", "--resume",
                  "512x512x300", "MONAI sliding_window_inference", "nnU-Net v2", "DoDNet head", "loader",
                  "--nproc 1", "NCCL"):
        assert words in r.stdout, words


def test_the_table_shows_failed_cut_off_and_skipped_steps(capsys):
    sys.path.insert(0, str(BENCH))
    from gpu_check_table import print_table

    train = {"rows": {"fp32": {"steps_per_s": 2.0, "patches_per_s": 4.0, "patch": [128, 128, 128], "batch": 2,
                               "peak_gpu_gb": 6.0, "plan_gpu_memory_gb": 8.0, "scaler_scale": None, "ok": True},
                      "fp16": {"error": "RuntimeError: CUDA error: an illegal memory access", "ok": False}}}
    report = {"environment": {"gpus": ["NVIDIA H100 80GB HBM3"], "torch": "2.11.0", "cuda": "13.0", "python": "3.12",
                              "cpus": 16}, "elapsed_s": 400.0, "budget_s": 440.0, "steps": {
        "train": {"status": "failed", "seconds": 50.0, "cap_s": 90, "result": train, "stderr_tail": "boom\n"},
        "predict": {"status": "timeout", "seconds": 100.0, "cap_s": 100, "result": {"rows": {"medvol:fp32": {}}},
                    "stderr_tail": ""},
        "ddp": {"status": "not run", "seconds": 0, "cap_s": 0, "result": {}, "stderr_tail": "budget spent"}}}
    print_table(report)
    out = capsys.readouterr().out
    assert "| 2 train | fp32, patch [128, 128, 128] x 2 | 2.00 steps/s (1.00x fp32), peak 6.0 GB = 0.75x" in out
    assert "illegal memory access | FAIL |" in out and "| train | step failed after 50.0 s (cap 90 s) | boom" in out
    assert "| predict | partial result |" in out and "TIMEOUT" in out
    assert "| ddp | step not run after 0 s (cap 0 s) | budget spent | NOT RUN |" in out


def test_a_step_past_its_cap_is_killed_and_reported(tmp_path):
    sys.path.insert(0, str(BENCH))
    import gpu_check

    args = argparse.Namespace(work=tmp_path / "work", gpu_memory=8.0, dry_run=True)
    rec = gpu_check.run_step("prepare", 0.3, args)
    assert rec["status"] == "timeout" and rec["result"] == {} and rec["cap_s"] == 0.3 and rec["seconds"] < 30


@pytest.mark.slow
def test_the_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """About 1.5 minutes on an idle 2-core CPU (3-4 under load): every step in its own process."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--work", str(tmp_path / "work"), "--json",
                        str(tmp_path / "gpu_check.json")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and list(report["steps"]) == ["prepare", "tests", "train", "resume", "predict", "head",
                                                           "ddp"]
    assert {s["status"] for s in report["steps"].values()} == {"ok"}
    steps = report["steps"]
    assert steps["tests"]["result"]["skipped"] >= 10  # no CUDA here: every CUDA test collected, then skipped
    assert steps["resume"]["result"]["rows"]["fp32"]["bit_exact"]  # the CPU resumes exactly
    assert set(steps["predict"]["result"]["rows"]) == {"medvol:fp32", "monai", "medvol:auto", "medvol:bf16+cl",
                                                       "floor"}
    assert steps["ddp"]["result"]["group_of_one"]["ddp_wrapped"]
    for n in range(7):
        assert f"| {n} " in r.stdout
