"""One GPU check (issue 32): every CUDA path of medvol measured in one short run, one table, gpu_check.json.

    bash benchmarks/gpu_check.sh                  # on a GPU machine: installs the carried wheels, then this
    python benchmarks/gpu_check.py --dry-run      # anywhere: every step planned and printed, run small on the CPU
    python benchmarks/gpu_check.py --plan         # the plan alone
    python benchmarks/gpu_check.py --only predict resume   # a rerun of some steps (prepare comes along if needed)

Steps, each in its own process under its own time cap, so that a failure, a hang or a broken
CUDA context loses only that step's figures (a step prints its figures as it goes; a step cut
off by its cap keeps what it printed):

0. prepare: a synthetic CT-like dataset (air, body, organ, bone) of real size, preprocessed and
   planned for ``--gpu-memory`` GB as ``medvol preprocess`` does;
1. tests: ``pytest -m cuda tests/test_cuda.py``;
2. train: quickstart steps/s at the plan's patch and batch in fp32, bf16, bf16 + channels-last
   and fp16 + scaler; peak GPU memory against ``--gpu-memory``;
3. resume: stop after K steps, ``--resume`` to N, against N uninterrupted (deterministic
   algorithms, cudnn.benchmark off): largest loss and weight difference;
4. predict: a 512x512x300 volume through medvol (fp32, auto, bf16 + channels-last) and MONAI's
   ``sliding_window_inference`` (fp32), same windows; voxels/s, Dice of labels against medvol fp32;
5. head: DoDNet's head batched vs loop vs grouped; the loader's patches/s per worker count
   against what the model consumes;
6. ddp: ``medvol train --nproc 1``, an NCCL process group of one (DDP, barriers, collectives),
   ``--nproc 2`` when two GPUs are there.

The dry run executes the same steps on the CPU at tiny sizes (fp16 and NCCL are CUDA-only: planned,
not run) after printing the GPU plan. Helpers come from the other benchmarks (inference.py,
train_throughput.py, dodnet_head.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASE = "gc_{:03d}"
OVERLAP, SW_BATCH = 0.5, 2  # medvol predict's defaults, given to MONAI too
DICE_GATE = 0.995  # labels of a faster setting against medvol fp32's, per class
NNUNET = ("not run: nnunetv2 is not on the lent machine, which has no network; carrying it would take "
          "SimpleITK (a 52.8 MB wheel) and its other dependencies (blosc2, acvl-utils, batchgenerators, "
          "dynamic-network-architectures, pandas...) beside medvol's 9.8 MiB in the 64 MiB carried: not attempted")


@dataclass(frozen=True)
class Sizes:
    """What each step runs: the GPU plan (``FULL``) or the CPU dry run (``DRY``)."""

    device: str
    shape: tuple  # each synthetic training case (1 mm voxels)
    predict_shape: tuple
    overrides: tuple  # recipe --set values common to every training
    precisions: tuple  # step 2
    timed_steps: int
    resume: tuple  # (steps, stop at, precisions)
    predict_train_steps: int
    heads: tuple  # ((batch, feature size), ...)
    workers: tuple
    loader_batches: int
    ddp_steps: int


COMMON = ("data.val_cases=[gc_002]", "trainer.final_validation=false")
FULL = Sizes("cuda", (256, 256, 192), (512, 512, 300), COMMON, ("fp32", "bf16", "bf16+cl", "fp16"), 8,
             (6, 3, ("fp16", "bf16")), 60, ((8, (32, 64, 64)), (2, (64, 96, 96))),
             tuple(sorted({0, 2, 4, 8, max(1, (os.cpu_count() or 2) - 1)})), 12, 4)
DRY = Sizes("cpu", (32, 32, 24), (32, 32, 24), COMMON + ("model.base_features=4", "model.max_features=16",
            "data.patch_size=[16, 16, 16]", "data.batch_size=2", "data.num_workers=0"), ("fp32",), 2,
            (4, 2, ("fp32",)), 2, ((2, (8, 8, 8)),), (0,), 2, 2)


def emit(result: dict) -> dict:
    """Print the step's figures so far (the parent keeps the last line printed)."""
    print(json.dumps(result, default=str), flush=True)
    return result


def guarded(fn, *a) -> dict:
    """``fn(*a)``, or the error it raised: one measurement failing keeps the others."""
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001 - recorded in the table and the JSON
        return {"error": f"{type(e).__name__}: {e}"[:500], "ok": False}


def bench(name: str):
    """A sibling benchmark module (inference, train_throughput, dodnet_head)."""
    import importlib

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))

    return importlib.import_module(name)


def run_module(cmd: list[str], args) -> subprocess.CompletedProcess:
    """``python -m ...`` run in the scratch folder: from the tree's root, ``-m`` would import
    medvol from ./medvol, where medvol.datasets (the tree's datasets/) is not mapped;
    gpu_check.sh installs the whole package into its site folder."""
    args.work.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=args.work, capture_output=True, text=True)


def fresh(run: Path) -> Path:
    """``run`` emptied: a rerun (``--only``) trains into the same folders."""
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    return run


def dev(sz: Sizes):
    import torch

    return torch.device(sz.device, 0) if sz.device == "cuda" else torch.device("cpu")


def free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(sz: Sizes) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if sz.device == "cuda" else None


# ---------------------------------------------------------------- 0. prepare
def synthetic_ct(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (HU) and its labels: air (-1000) around a body ellipsoid (40 HU), an
    organ (200 HU, label 1) and a bone (1000 HU, label 2) in it; noise of 20 HU. No voxel is 0,
    so preprocessing keeps the whole field of view, as with a real CT."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    s = np.array(shape, np.float32)

    def ellipsoid(centre, radii):
        return sum(((g.astype(np.float32) - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1

    jitter = 1 + 0.1 * rng.uniform(-1, 1, 3)
    image = np.full(shape, -1000, np.float32)
    label = np.zeros(shape, np.uint8)
    image[ellipsoid(s / 2, 0.45 * s)] = 40
    organ, bone = ellipsoid(s * 0.4 * jitter, 0.15 * s), ellipsoid(s * 0.62 / jitter, 0.07 * s)
    image[organ], label[organ] = 200, 1
    image[bone], label[bone] = 1000, 2
    image += 20 * rng.standard_normal(shape, dtype=np.float32)
    return image, label


def write_dataset(root: Path, shape, n: int = 3) -> Path:
    """An nnU-Net v2 raw dataset of ``n`` synthetic CTs (uncompressed NIfTI, 1 mm)."""
    from medvol.io import Volume, write_volume

    for i in range(n):
        image, label = synthetic_ct(shape, i)
        write_volume(Volume(image, np.eye(4)), root / "imagesTr" / f"{CASE.format(i)}_0000.nii")
        write_volume(Volume(label, np.eye(4)), root / "labelsTr" / f"{CASE.format(i)}.nii")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "bone": 2},
            "numTraining": n, "file_ending": ".nii"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def step_prepare(args, sz: Sizes) -> dict:
    import shutil

    from medvol.cache import load_plans
    from medvol.preprocessing import preprocess_dataset

    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    raw = write_dataset(args.work / "raw" / "Dataset900_GpuCheck", sz.shape)
    report = preprocess_dataset(raw, args.work / "pre", num_workers=min(8, os.cpu_count() or 1), quiet=True,
                                gpu_memory_gb=args.gpu_memory)
    plans = load_plans(args.work / "pre")
    return {"seconds": time.perf_counter() - t0, "shape": list(sz.shape), "cases": 3, "failures": report.failures,
            "patch": plans["patch_size"], "batch": plans["batch_size"], "gpu_memory_gb": args.gpu_memory,
            "ok": not report.failures}


# ---------------------------------------------------------------- 1. tests
def step_tests(args, sz: Sizes) -> dict:
    test_file = ROOT / "tests" / "test_cuda.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(test_file)]
    r = run_module(cmd, args)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    ran = counts.get("passed", 0) + counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    ok = r.returncode == 0 and (ran > 0 or sz.device == "cpu")  # on a CPU every test is skipped
    return {"command": " ".join(cmd[2:]).replace(str(ROOT) + "/", ""), "returncode": r.returncode, "summary": tail,
            **counts, "failures": failed, "ok": ok}


# ---------------------------------------------------------------- 2. train
def train_rate(args, sz: Sizes, info, name: str) -> dict:
    """quickstart model steps/s in ``name`` (``+cl``: channels-last weights and inputs)."""
    from medvol.cache import load_plans
    from medvol.precision import Precision

    tt = bench("train_throughput")
    free_gpu()
    trainer = tt.make_trainer(args.work / "pre", info, list(sz.overrides), name.split("+")[0],
                              args.work / "runs" / "throughput")
    if name.endswith("+cl"):
        trainer.precision = Precision(trainer.precision.name, info.device.type, True)
        trainer.precision.prepare(trainer.models["model"])
    rate = tt.model_rate(trainer, sz.timed_steps)
    plan_gb = load_plans(args.work / "pre").get("network", {}).get("gpu_memory_gb", args.gpu_memory)
    out = {"steps_per_s": rate, "patches_per_s": rate * trainer.batch_size, "patch": trainer.patch_size,
           "batch": trainer.batch_size, "peak_gpu_gb": peak_gb(sz), "plan_gpu_memory_gb": plan_gb,
           "scaler_scale": trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None, "ok": True}
    del trainer
    free_gpu()
    return out


def step_train(args, sz: Sizes) -> dict:
    from medvol.training.distributed import setup

    info = setup(sz.device)
    out: dict = {"rows": {}}
    for name in sz.precisions:
        out["rows"][name] = guarded(train_rate, args, sz, info, name)
        emit(out)
    out["ok"] = all(r.get("ok") for r in out["rows"].values())
    return out


# ---------------------------------------------------------------- 3. resume
def deterministic() -> None:
    """Deterministic algorithms where torch has them (warnings where it has none), cudnn
    autotuning off: medvol turns it on for CUDA in choose_precision, the wrapper off again."""
    import torch

    import medvol.training.engine as engine

    torch.use_deterministic_algorithms(True, warn_only=True)
    chosen = engine.choose_precision

    def choose(*a, **k):
        p = chosen(*a, **k)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        return p

    engine.choose_precision = choose


def losses(run: Path) -> dict[int, float]:
    import csv

    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"}


def resume_pair(args, sz: Sizes, precision: str) -> dict:
    """N steps straight, and K steps + ``--resume`` to N: loss and weight differences."""
    from medvol.checkpoint import load_checkpoint
    from medvol.config import load_recipe
    from medvol.training import train

    n, k, _ = sz.resume
    base = fresh(args.work / "runs" / f"resume_{precision}")
    r = load_recipe("quickstart", [*sz.overrides, f"trainer.steps={n}", f"trainer.val_every={n}",
                                   "trainer.log_every=1", f"trainer.precision={precision}"])
    train(r, args.work / "pre", base / "full", device=sz.device, quiet=True)
    train(r, args.work / "pre", base / "cut", device=sz.device, stop_at=k, quiet=True)
    train(r, args.work / "pre", base / "cut", device=sz.device, resume=True, quiet=True)
    full, cut = losses(base / "full"), losses(base / "cut")
    diff = max(abs(full[s] - cut[s]) for s in full)
    rel = max(abs(full[s] - cut[s]) / max(abs(full[s]), 1e-12) for s in full)
    a, b = (load_checkpoint(base / x / "checkpoints" / "latest.pt")["models"]["model"] for x in ("full", "cut"))
    wdiff = max(float((a[t].float() - b[t].float()).abs().max()) for t in a if a[t].is_floating_point())
    gate = 1e-6 if precision == "fp32" else 1e-3
    return {"steps": n, "stop_at": k, "max_loss_diff": diff, "max_loss_rel_diff": rel, "max_weight_diff": wdiff,
            "bit_exact": wdiff == 0 and diff == 0, "rel_gate": gate, "same_steps": sorted(full) == sorted(cut),
            "ok": sorted(full) == sorted(cut) and rel <= gate}


def step_resume(args, sz: Sizes) -> dict:
    import warnings

    deterministic()
    out: dict = {"rows": {}, "cudnn_benchmark": False, "deterministic_algorithms": True}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for precision in sz.resume[2]:
            out["rows"][precision] = guarded(resume_pair, args, sz, precision)
            out["nondeterministic_ops"] = sorted({str(w.message)[:160] for w in seen
                                                  if "deterministic" in str(w.message)})
            emit(out)
    out["ok"] = all(r.get("ok") for r in out["rows"].values())
    return out


# ---------------------------------------------------------------- 4. predict
def predict_model(args, sz: Sizes):
    """quickstart trained briefly (auto precision) on the synthetic cache: labels that mean
    something, so that Dice between precisions measures the precision, not noise."""
    from medvol.checkpoint import load_run
    from medvol.config import load_recipe
    from medvol.training import train

    steps = sz.predict_train_steps
    r = load_recipe("quickstart", [*sz.overrides, f"trainer.steps={steps}", f"trainer.val_every={steps}"])
    metrics = train(r, args.work / "pre", fresh(args.work / "runs" / "predict"), device=sz.device, quiet=True)
    return load_run(args.work / "runs" / "predict", dev(sz), "latest"), metrics


def predict_input(rm, sz: Sizes) -> np.ndarray:
    """The preprocessed ``(1, X, Y, Z)`` synthetic CT of ``predict_shape`` (the whole field of view)."""
    from medvol.io import Volume
    from medvol.preprocessing import preprocess_case

    image, _ = synthetic_ct(sz.predict_shape, 7)
    x, _ = preprocess_case(Volume(image, np.eye(4)), rm.plans.raw, inplace=True)
    return np.ascontiguousarray(x, np.float32)


def predict_variant(rm, x: np.ndarray, sz: Sizes, variant: str, labels: dict) -> dict:
    """One variant of ``inference.timed_variant`` after a warm-up on a corner (cudnn autotuning)."""
    import torch

    from medvol.evaluation.metrics import dice
    from medvol.inference.postprocess import argmax_labels

    inf, device, roi = bench("inference"), dev(sz), tuple(rm.patch_size)
    k = rm.plans.num_classes
    corner = x[:, :roi[0] * 3 // 2, :roi[1] * 3 // 2, :roi[2] * 3 // 2]
    inf.timed_variant(variant, rm.model, np.ascontiguousarray(corner), roi, device, k, OVERLAP, SW_BATCH)
    free_gpu()
    probs, sec = inf.timed_variant(variant, rm.model, x, roi, device, k, OVERLAP, SW_BATCH)
    if variant.endswith("+cl"):  # Precision.prepare made the weights channels-last in place: undo for the next
        rm.model.to(memory_format=torch.contiguous_format)
    row = {"seconds": sec, "voxels_per_s": x[0].size / sec, "peak_gpu_gb": peak_gb(sz), "ok": True}
    if variant != "floor":
        labels[variant] = argmax_labels(probs.numpy())
        ref = labels.get("medvol:fp32")
        if ref is not None:
            row["min_dice_vs_fp32"] = min(dice(labels[variant] == c, ref == c) for c in range(1, k))
            row["gated"] = sz.device == "cuda"  # the dry run's model is untrained: its labels are near-ties
            row["ok"] = row["min_dice_vs_fp32"] >= DICE_GATE or not row["gated"]
    return row


def step_predict(args, sz: Sizes) -> dict:
    from medvol.precision import choose_precision

    rm, metrics = predict_model(args, sz)
    x = predict_input(rm, sz)
    auto = choose_precision(dev(sz))
    out: dict = {"shape": list(sz.predict_shape), "windowed_shape": list(x.shape[1:]), "patch": rm.patch_size,
                 "overlap": OVERLAP, "sw_batch": SW_BATCH, "train_steps": sz.predict_train_steps,
                 "model_val_dice": metrics.get("val/dice_mean"), "auto": auto.describe(), "rows": {},
                 "nnunet": NNUNET}
    labels: dict = {}
    for variant in ("medvol:fp32", "monai", "medvol:auto", "medvol:bf16+cl", "floor"):
        out["rows"][variant] = guarded(predict_variant, rm, x, sz, variant, labels)
        emit(out)
    out["ok"] = all(r.get("ok") for r in out["rows"].values())
    return out


# ---------------------------------------------------------------- 5. head + loader
def loader_rows(args, sz: Sizes) -> dict:
    """Patches/s of the loader per worker count against what the model (auto) consumes."""
    from medvol.training.distributed import setup

    tt = bench("train_throughput")
    trainer = tt.make_trainer(args.work / "pre", setup(sz.device), list(sz.overrides), "auto",
                              args.work / "runs" / "loader")
    need = tt.model_rate(trainer, max(2, sz.timed_steps // 2)) * trainer.batch_size
    rows = {}
    for w in dict.fromkeys(sz.workers):
        rate = tt.loader_rate(trainer, w, sz.loader_batches)
        rows[str(w)] = {"patches_per_s": rate, "x_model": rate / need}
    return {"model_patches_per_s": need, "workers": rows, "ok": True}


def step_head(args, sz: Sizes) -> dict:
    dh = bench("dodnet_head")
    out: dict = {"heads": []}
    for batch, size in sz.heads:
        out["heads"].append(guarded(dh.compare, dev(sz), batch, size, 10 if sz.device == "cuda" else 2))
        emit(out)
    out["loader"] = guarded(loader_rows, args, sz)
    out["ok"] = all(h.get("max_diff", 1) < 1e-3 for h in out["heads"]) and out["loader"].get("ok", False)
    return out


# ---------------------------------------------------------------- 6. ddp
def cli_train(args, sz: Sizes, nproc: int) -> dict:
    """``medvol train quickstart --nproc N`` for a few steps; its train_summary.json."""
    run = fresh(args.work / "runs" / f"nproc{nproc}")
    sets = [*sz.overrides, f"trainer.steps={sz.ddp_steps}", f"trainer.val_every={sz.ddp_steps}"]
    cmd = [sys.executable, "-m", "medvol", "train", "quickstart", "--data", str(args.work / "pre"), "--out",
           str(run), "--device", sz.device, "--nproc", str(nproc), "--quiet", *sum((["--set", s] for s in sets), [])]
    t0 = time.perf_counter()
    r = run_module(cmd, args)
    if r.returncode:
        return {"returncode": r.returncode, "error": r.stderr[-800:], "ok": False}
    s = json.loads((run / "train_summary.json").read_text())
    return {"seconds": time.perf_counter() - t0, "world_size": s["world_size"], "device": s["device"],
            "precision": s["precision"], "params_identical_across_ranks": s["params_identical_across_ranks"],
            "ok": bool(s["params_identical_across_ranks"])}


def group_of_one(args, sz: Sizes) -> dict:
    """``--step ddp_group`` in a process of its own, as rank 0 of a world of 1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    cmd = [sys.executable, __file__, "--step", "ddp_group", "--work", str(args.work)]
    r = subprocess.run(cmd + (["--dry-run"] if sz.device == "cpu" else []), capture_output=True, text=True, env=env)
    if r.returncode:
        return {"returncode": r.returncode, "error": r.stderr[-800:], "ok": False}
    return json.loads(r.stdout.strip().splitlines()[-1])


def step_ddp_group(args, sz: Sizes) -> dict:
    """medvol's distributed paths (DDP wrapping, barriers, the pre-emption all-reduce, the
    parameter checksum all-gather) in a process group of one: NCCL on a GPU, gloo on a CPU.
    medvol itself joins a group only when WORLD_SIZE > 1, so this marks the world of one as
    distributed."""
    import torch
    import torch.distributed as dist

    from medvol.config import load_recipe
    from medvol.training import get_trainer
    from medvol.training.distributed import DistInfo
    from medvol.training.engine import fit

    class GroupOfOne(DistInfo):
        @property
        def distributed(self) -> bool:
            return True

    device = dev(sz)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    r = load_recipe("quickstart", [*sz.overrides, f"trainer.steps={sz.ddp_steps}", f"trainer.val_every={sz.ddp_steps}"])
    trainer = get_trainer("supervised")(r, args.work / "pre", fresh(args.work / "runs" / "group_of_one"),
                                        GroupOfOne(0, 1, 0, device))
    wrapped = isinstance(trainer.models["model"], torch.nn.parallel.DistributedDataParallel)
    t0 = time.perf_counter()
    fit(trainer, quiet=True)
    seconds = time.perf_counter() - t0
    dist.destroy_process_group()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else None
    return {"backend": backend, "nccl": nccl, "ddp_wrapped": wrapped, "steps": sz.ddp_steps, "seconds": seconds,
            "ok": wrapped}


def step_ddp(args, sz: Sizes) -> dict:
    import torch

    out: dict = {"nproc1": guarded(cli_train, args, sz, 1)}
    emit(out)
    out["group_of_one"] = guarded(group_of_one, args, sz)
    emit(out)
    if sz.device == "cuda" and torch.cuda.device_count() >= 2:
        out["nproc2"] = guarded(cli_train, args, sz, 2)
    else:
        out["nproc2"] = {"skipped": "one GPU here" if sz.device == "cuda" else "dry run (CPU)", "ok": True}
    out["ok"] = all(v.get("ok") for v in out.values() if isinstance(v, dict))
    return out


STEPS = {  # name: (function, cap in seconds on the GPU, what it runs)
    "prepare": (step_prepare, 40, "3 synthetic CTs {shape}, 1 mm, preprocessed + planned for --gpu-memory"),
    "tests": (step_tests, 70, "pytest -m cuda tests/test_cuda.py"),
    "train": (step_train, 90, "quickstart at the plan's patch/batch: {precisions}, {timed_steps} timed steps each;"
                              " peak GPU memory vs --gpu-memory"),
    "resume": (step_resume, 60, "stop at {resume[1]} of {resume[0]} steps, --resume, vs uninterrupted, "
                                "in {resume_precisions}; deterministic algorithms"),
    "predict": (step_predict, 100, "quickstart trained {predict_train_steps} steps, then {predict_shape}: medvol "
                                   "fp32 / auto / bf16+channels-last vs MONAI sliding_window_inference fp32, "
                                   f"overlap {OVERLAP}, window batch {SW_BATCH}; Dice vs fp32 >= {DICE_GATE}; "
                                   "nnU-Net v2: not on the machine, not carried (see NNUNET)"),
    "head": (step_head, 40, "DoDNet head batched vs loop vs grouped at {heads}; loader at {workers} workers vs "
                            "the model's patches/s"),
    "ddp": (step_ddp, 55, "medvol train --nproc 1; NCCL group of one (DDP, barrier, all-reduce, all-gather); "
                          "--nproc 2 when 2 GPUs"),
}
CHILD_ENV = {"resume": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}}  # cuBLAS's deterministic mode, before CUDA starts


# ---------------------------------------------------------------- the parent
def run_step(name: str, cap: float, args) -> dict:
    """Step ``name`` in its own process (session) under ``cap`` seconds; its last JSON line."""
    cmd = [sys.executable, __file__, "--step", name, "--work", str(args.work), "--gpu-memory", str(args.gpu_memory)]
    env = {**os.environ, **CHILD_ENV.get(name, {})}
    if args.dry_run:  # tiny models: one thread each is faster, and spared the stalls of a busy machine
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd + (["--dry-run"] if args.dry_run else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    t0, status = time.perf_counter(), "ok"
    try:
        out, err = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and whatever it started (loader workers, torchrun)
        out, err = proc.communicate()
        status = "timeout"
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if status == "ok" and (proc.returncode or not result.get("ok")):
        status = "failed"
    rec = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "cap_s": round(cap, 1), "result": result}
    if status != "ok":
        rec["stderr_tail"] = err[-2500:]
    return rec


def environment() -> dict:
    import platform

    import torch

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "cpus": os.cpu_count()}


def _plain(v) -> str:
    """Sizes for the plan: 256x256x192, fp16 / bf16, 8 x 32x64x64."""
    if isinstance(v, tuple) and v and all(isinstance(x, int) for x in v):
        return "x".join(map(str, v))
    if isinstance(v, tuple):
        return " / ".join(f"{x[0]} x {_plain(x[1])}" if isinstance(x, tuple) and len(x) == 2 else _plain(x) for x in v)
    return str(v)


def describe_plan(sz: Sizes) -> list[str]:
    values = {k: _plain(v) for k, v in sz.__dict__.items()}
    values.update(resume=sz.resume, resume_precisions=" / ".join(sz.resume[2]), workers=", ".join(map(str, sz.workers)))
    return [f"  {i}. {name:8s} (cap {cap:3d} s): {what.format(**values)}"
            for i, (name, (_, cap, what)) in enumerate(STEPS.items())]


def chosen_steps(args) -> list[str]:
    names = args.only or list(STEPS)
    if "prepare" not in names and not (args.work / "pre" / "plans.json").exists():
        names = ["prepare", *names]
    return [n for n in STEPS if n in names]


def run_all(args, env: dict) -> dict:
    budget, t0 = args.budget, time.perf_counter()
    steps = {}
    for name in chosen_steps(args):
        left = budget - (time.perf_counter() - t0)
        if left < 15:
            steps[name] = {"status": "not run", "seconds": 0, "cap_s": 0, "result": {}, "stderr_tail": "budget spent"}
            continue
        cap = min(STEPS[name][1] * (1 if not args.dry_run else 3), left)
        steps[name] = run_step(name, cap, args)
        print(f"  {name}: {steps[name]['status']} in {steps[name]['seconds']} s", flush=True)
    return {"environment": env, "dry_run": args.dry_run, "budget_s": budget,
            "elapsed_s": round(time.perf_counter() - t0, 1), "steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="run every step small on the CPU (the GPU plan printed)")
    ap.add_argument("--plan", action="store_true", help="print the plan and stop")
    ap.add_argument("--only", nargs="+", choices=list(STEPS), help="these steps (and prepare when its cache is absent)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medvol_gpu_check"), help="scratch folder (replaced)")
    ap.add_argument("--json", type=Path, help="default: $OUT/gpu_check.json when OUT is set, else ./gpu_check.json")
    ap.add_argument("--budget", type=float, default=440.0, help="seconds for all steps together")
    ap.add_argument("--gpu-memory", type=float, default=8.0, help="the plan's GPU memory (GB), as medvol preprocess")
    ap.add_argument("--step", choices=[*STEPS, "ddp_group"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    sz = DRY if a.dry_run else FULL
    if a.step:
        fn = step_ddp_group if a.step == "ddp_group" else STEPS[a.step][0]
        emit(fn(a, sz))
        return 0
    print("GPU check plan (on one GPU):", *describe_plan(FULL), sep="\n")
    if a.plan:
        return 0
    if a.dry_run:
        print(f"dry run: the same steps on the CPU, cases {DRY.shape}, predict {DRY.predict_shape}, precisions "
              f"{DRY.precisions} (fp16, bf16 and NCCL: GPU only, planned above)")
    report = run_all(a, environment())
    from gpu_check_table import print_table  # beside this file (sys.path[0])

    print_table(report)
    path = a.json or Path(os.environ.get("OUT") or ".") / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
