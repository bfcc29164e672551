"""The demo's training in fp32 and in bf16: seconds, steps/s and held-out Dice, per seed.

    python benchmarks/train_precision.py --demo demo_out [--seeds 0 1 2] [--precisions fp32 bf16]

Uses the demo's raw data and cache (``make demo`` writes them; the cache is redone when it is
stale). For each precision and seed it trains the demo's recipe (quickstart, narrow, 150
steps, the demo's checkpoint choice) into ``--work``, predicts the two held-out scans in fp32 (so that only the training
precision differs) and prints the per-class Dice against their reference labels, then the
mean and spread per precision: bf16 training keeps accuracy when its Dice lies within fp32's
run-to-run spread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def train_and_score(demo: Path, work: Path, precision: str, seed: int, steps: int, threads: int) -> dict:
    from medvol.config import load_recipe
    from medvol.demo import DEMO_OVERRIDES
    from medvol.evaluation import evaluate_folders
    from medvol.inference import predict
    from medvol.training import train

    torch.set_num_threads(threads)
    raw = demo / "raw" / "Dataset001_BrainTissue"
    run = work / f"{precision}_seed{seed}"
    recipe = load_recipe("quickstart", DEMO_OVERRIDES + [
        f"trainer.steps={steps}", f"trainer.val_every={max(steps // 3, 1)}", f"trainer.seed={seed}",
        f"trainer.precision={precision}"])
    t0 = time.perf_counter()
    train(recipe, demo / "preprocessed", run, device="cpu", quiet=True)
    seconds = time.perf_counter() - t0
    preds = run / "predictions"
    predict(run, raw / "imagesTs", preds, device="cpu", quiet=True, precision="fp32")
    summary = evaluate_folders(preds, raw / "labelsTs", preds / "metrics")["summary"]
    return {"precision": precision, "seed": seed, "train_seconds": seconds, "steps_per_s": steps / seconds,
            "dice": {k: v["dice"]["mean"] for k, v in summary.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("demo_out"))
    ap.add_argument("--work", type=Path, default=Path("bench_train_precision"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from medvol.preprocessing import preprocess_dataset

    preprocess_dataset(a.demo / "raw" / "Dataset001_BrainTissue", a.demo / "preprocessed", quiet=True)
    rows = []
    for seed in a.seeds:  # seeds outermost: a cut-short run still compares precisions
        for precision in a.precisions:
            r = train_and_score(a.demo, a.work, precision, seed, a.steps, a.threads)
            rows.append(r)
            dice = " ".join(f"{k} {v:.4f}" for k, v in r["dice"].items())
            print(f"{precision:5s} seed {seed}: {r['train_seconds']:.0f} s ({r['steps_per_s']:.3f} steps/s), "
                  f"Dice {dice}", flush=True)
    for precision in a.precisions:
        mine = [r for r in rows if r["precision"] == precision]
        for cls in mine[0]["dice"]:
            d = np.array([r["dice"][cls] for r in mine])
            print(f"{precision} {cls}: mean {d.mean():.4f}, range {d.min():.4f}-{d.max():.4f} over {len(d)} seeds")
        print(f"{precision}: {np.mean([r['steps_per_s'] for r in mine]):.3f} steps/s mean")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
