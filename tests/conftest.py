"""Shared fixtures: small real datasets built once per session, and synthetic writers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvol.datasets.brain import Acquisition, build_brain_dataset

# The suite's numbers (learning bars, DDP agreement) were measured in fp32: `auto` precision must
# not pick bf16 on CPUs that have it (child processes inherit this). tests/test_precision.py
# covers the bf16 path explicitly.
os.environ["MEDVOL_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def brain_raw(tmp_path_factory) -> Path:
    """A tiny real brain-tissue dataset (nnU-Net v2 layout): 5 training + 1 test case at
    ~4 mm, with LPS, oblique, cropped and anisotropic acquisitions among them."""
    root = tmp_path_factory.mktemp("raw") / "Dataset001_BrainTissue"
    acqs = [
        Acquisition((4.0, 4.0, 4.0)),
        Acquisition((4.0, 4.0, 4.0), flip=(0, 1), intensity=(0.8, 20.0), noise=0.02, seed=1),
        Acquisition((3.5, 3.5, 5.0), oblique_deg=12.0, seed=2),
        Acquisition((4.0, 4.0, 4.5), crop=(0.1, 0.15, 0.2), noise=0.02, seed=3),
        Acquisition((4.5, 4.0, 4.0), flip=(2,), intensity=(1.2, 0.0), seed=4),
        Acquisition((4.0, 4.0, 4.0), noise=0.01, seed=5),
    ]
    return build_brain_dataset(root, n_train=5, n_test=1, acquisitions=acqs)


@pytest.fixture(scope="session")
def brain_pre(brain_raw, tmp_path_factory) -> Path:
    from medvol.preprocessing import preprocess_dataset

    out = tmp_path_factory.mktemp("pre")
    report = preprocess_dataset(brain_raw, out, num_workers=2, quiet=True)
    assert not report.failures
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder of a tiny quickstart U-Net trained for one step on two spheres."""
    from medvol.config import load_recipe
    from medvol.preprocessing import preprocess_dataset
    from medvol.training import train

    tmp = tmp_path_factory.mktemp("safety")
    cases = {f"s{i}": ([sphere_case(seed=i)[0]], sphere_case(seed=i)[1], np.eye(4)) for i in range(2)}
    root = write_v2_dataset(tmp / "Dataset004_Sphere", cases)
    preprocess_dataset(root, tmp / "pre", num_workers=1, quiet=True)
    r = load_recipe("quickstart", ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]",
                                   "data.batch_size=2", "data.num_workers=0", "trainer.steps=1",
                                   "trainer.val_every=1", "data.val_cases=[s1]"])
    train(r, tmp / "pre", tmp / "run", device="cpu", quiet=True)
    return tmp / "run"


def write_nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine)
    nib.save(img, str(path))
    return path


def write_v2_dataset(root: Path, cases: dict, channel_names=None, labels=None, extra_json=None) -> Path:
    """cases: {case_id: (list of channel arrays, label array or None, affine)}."""
    channel_names = channel_names or {"0": "MRI"}
    labels = labels or {"background": 0, "fg": 1}
    for cid, (chans, lab, aff) in cases.items():
        for c, arr in enumerate(chans):
            write_nifti(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", arr, aff)
        if lab is not None:
            write_nifti(root / "labelsTr" / f"{cid}.nii.gz", lab, aff)
    meta = {"channel_names": channel_names, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz"}
    meta.update(extra_json or {})
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def sphere_case(shape=(24, 24, 20), radius=6.0, value=100.0, seed=0, spacing=(1.0, 1.0, 1.0)):
    """A bright sphere (label 1) in a noisy nonzero head-like box surrounded by zeros."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = (np.array(shape) - 1) / 2
    d = np.sqrt((((grid - centre[:, None, None, None])) ** 2).sum(0))
    label = (d <= radius).astype(np.uint8)
    image = np.zeros(shape, np.float32)
    box = tuple(slice(2, s - 2) for s in shape)
    image[box] = 20 + rng.normal(0, 2, image[box].shape)
    image[label > 0] = value + rng.normal(0, 5, int(label.sum()))
    return image, label, np.diag(list(spacing) + [1.0])


def metric_series(run: Path) -> dict[str, list[float]]:
    """A run's metrics.csv as {name: values in step order}."""
    out: dict[str, list[float]] = {}
    with open(run / "metrics.csv") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["name"], []).append(float(r["value"]))
    return out


# pipelines/slice_aggregator.yaml as it was before it took DC-MT's published settings (step
# clock, supervised, batch 8, attention pooling over any slice count, Adam 2e-4 with a step
# decay): the tests that use that recipe as a small base keep training exactly what they did.
AGGREGATOR_STEP_RECIPE = [
    "model.options={hidden: [256, 128], gru_hidden: 96, dropout: 0.5, fixed_slices: null, pooling: attention}",
    "data.batch_size=8", "data.unlabelled_per_batch=0", "optimizer.lr=2.0e-4", "optimizer.weight_decay=1.0e-4",
    "schedule={name: step, milestones: [600, 1200, 1800], gamma: 0.5}", "trainer.steps=2000", "trainer.val_every=200",
    "trainer.grad_clip=12.0", "trainer.seed=0",
    "method={mean_teacher: false, ema_decay: 0.99, consistency: 1.0, rampup_steps: 800, feature_dropout: 0.1, "
    "feature_noise: 0.1}",
]

LEARNING_THREADS = 2


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tiny models (fastest: with two threads on a busy machine a
    step-by-step GRU spends seconds synchronising); restored afterwards. Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

@contextmanager
def pinned(seed: int = 0, threads: int = LEARNING_THREADS):
    """Seeds and the intra-op thread count fixed for a learning run, so that its numbers do
    not hinge on the machine's core count (reduction order); restored afterwards. The
    trainers seed themselves from ``trainer.seed``; this covers anything drawn outside."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_two_ranks(command: list[str], data: Path, out: Path, sets: list[str]) -> dict:
    """``medvol <command> --data DATA --out OUT --device cpu --nproc 2`` with ``--set`` overrides,
    one OpenMP thread per rank; checks that both ranks ended with the same weights and returns
    ``train_summary.json``."""
    cmd = [sys.executable, "-m", "medvol", *command, "--data", str(data), "--out", str(out), "--device", "cpu",
           "--nproc", "2", "--quiet", *sum((["--set", s] for s in sets), [])]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params_identical_across_ranks"] is True
    return summary


# A sitecustomize that SIGKILLs the process (no handler can run) the moment an atomic write is
# about to rename a finished temp file onto a name ending in $MEDVOL_TEST_KILL_AT.
_KILL_HOOK = '''
import os, signal
_at = os.environ["MEDVOL_TEST_KILL_AT"]
_replace = os.replace
def _replace_or_die(src, dst, *a, **k):
    if os.fspath(dst).endswith(_at):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *a, **k)
os.replace = _replace_or_die
'''


def run_killed_at(name: str, argv: list[str], hook_dir: Path) -> None:
    """Run ``argv`` (a medvol command) in a process SIGKILLed just before ``name`` is renamed
    into place; checks that it did die that way."""
    import os
    import signal
    import subprocess

    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(_KILL_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hook_dir), "MEDVOL_TEST_KILL_AT": name}
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)


def medvol_argv(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "medvol", *args]
