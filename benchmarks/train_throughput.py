"""Data pipeline patches/s (0, 1, 2 workers) vs quickstart model steps/s, in one process.

    python benchmarks/train_throughput.py --data demo_out/preprocessed [--device cuda]

Prints the loader's throughput for each worker count and the model's (forward + backward +
SGD step at the plan's patch and batch size, AMP on CUDA), and their ratio: the loader keeps
up when it delivers at least one batch per model step (ratio >= 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def loader_rate(trainer, workers: int, batches: int) -> float:
    from medvol.data import make_loader

    loader = make_loader(trainer.make_dataset(), 0, batches + 2, trainer.batch_size, 0, 1, workers)
    it = iter(loader)
    next(it), next(it)  # warm up: worker start, first memory maps
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += b["image"].shape[0]
    return n / (time.perf_counter() - t0)


def model_rate(trainer, steps: int) -> float:
    from medvol.data import make_loader

    batch = next(iter(make_loader(trainer.make_dataset(), 0, 1, trainer.batch_size, 0, 1, 0)))
    batch = {k: v.to(trainer.device) for k, v in batch.items()}
    trainer.optimization_step(batch, 0)  # warm up (cudnn.benchmark picks kernels)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(steps):
        trainer.optimization_step(batch, s + 1)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a preprocessing cache")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, default=20, help="batches timed per loader setting")
    ap.add_argument("--steps", type=int, default=5, help="model steps timed")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    from medvol.config import load_recipe
    from medvol.training import get_trainer
    from medvol.training.distributed import setup

    recipe = load_recipe("quickstart", a.overrides)
    info = setup(a.device)
    trainer = get_trainer("supervised")(recipe, a.data, Path("/tmp/medvol_bench_run"), info)
    dev = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "CPU"
    print(f"device {dev}, patch {trainer.patch_size}, batch {trainer.batch_size}, "
          f"amp {trainer.amp_dtype or 'fp32'}, torch threads {torch.get_num_threads()}")
    steps_s = model_rate(trainer, a.steps)
    need = steps_s * trainer.batch_size
    print(f"model: {steps_s:.3f} steps/s = {need:.2f} patches/s needed")
    for w in (0, 1, 2):
        r = loader_rate(trainer, w, a.batches)
        print(f"loader, {w} worker(s): {r:.1f} patches/s  -> {r / need:.1f}x what the model consumes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
