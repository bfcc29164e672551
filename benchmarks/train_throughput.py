"""Data pipeline patches/s (0, 1, 2 workers) vs quickstart model steps/s, in one process.

    python benchmarks/train_throughput.py --data demo_out/preprocessed [--device cuda]
    python benchmarks/train_throughput.py --data demo_out/preprocessed --precisions fp32 auto

Prints the model's steps/s (forward + backward + SGD step at the plan's patch and batch size)
in each precision asked for (``medvol/precision.py``: fp32, bf16, auto...), then the loader's
throughput for each worker count against the last one: the loader keeps up when it delivers at
least one batch per model step (ratio >= 1).
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
    batch = {k: trainer.precision.layout(v.to(trainer.device)) if v.is_floating_point() else v.to(trainer.device)
             for k, v in batch.items()}
    trainer.optimization_step(batch, 0)  # warm up (cudnn.benchmark picks kernels)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(steps):
        trainer.optimization_step(batch, s + 1)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def make_trainer(data: Path, info, overrides: list[str], precision: str, run: Path = Path("/tmp/medvol_bench_run")):
    """The quickstart trainer on the cache ``data`` with ``--set`` ``overrides`` in ``precision``."""
    from medvol.config import load_recipe
    from medvol.training import get_trainer

    recipe = load_recipe("quickstart", [*overrides, f"trainer.precision={precision}"])
    return get_trainer("supervised")(recipe, data, run, info)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a preprocessing cache")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, default=20, help="batches timed per loader setting")
    ap.add_argument("--steps", type=int, default=5, help="model steps timed")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "auto"], help="trainer.precision values to time")
    a = ap.parse_args()

    from medvol.training.distributed import setup

    info = setup(a.device)
    rates = {}
    for name in a.precisions:
        trainer = make_trainer(a.data, info, a.overrides, name)
        rates[name] = model_rate(trainer, a.steps)
        p = trainer.precision
        dev = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "CPU"
        print(f"{name:>5} ({p.name}{', channels-last' if p.channels_last else ''}) on {dev}, patch "
              f"{trainer.patch_size}, batch {trainer.batch_size}, {torch.get_num_threads()} threads: "
              f"{rates[name]:.3f} steps/s ({rates[name] / rates[a.precisions[0]]:.2f}x {a.precisions[0]})")
    need = rates[a.precisions[-1]] * trainer.batch_size
    print(f"model ({a.precisions[-1]}): {need:.2f} patches/s needed")
    for w in (0, 1, 2):
        r = loader_rate(trainer, w, a.batches)
        print(f"loader, {w} worker(s): {r:.1f} patches/s  -> {r / need:.1f}x what the model consumes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
