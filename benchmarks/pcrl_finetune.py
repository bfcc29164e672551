"""Fine-tuning from a PCRL pretraining vs from scratch, at a low label count, on the same data.

The brain-tissue demo data (real MNI152 template, 10 training scans at 3 mm, grey and white
matter): PCRL pretrains on the 8 non-validation scans without their labels
(``pcrl_demo``); then ``pcrl_finetune_demo`` trains the same U-Net with only 2 labelled scans,
once from ``encoder.pt`` and once from scratch, with the same seed, split, batches and steps,
validated on the 2 held-out scans. Prints both validation Dice curves (mean of GM and WM).

    python benchmarks/pcrl_finetune.py [--pretrain-steps 300] [--steps 200] [--seeds 0 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path


def dice_curve(run: Path) -> list[tuple[int, float]]:
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]) + 1, float(r["value"])) for r in csv.DictReader(f) if r["name"] == "val/dice_mean"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    ap.add_argument("--val-every", type=int, default=25)
    ap.add_argument("--labelled", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args()

    from medvol.config import load_recipe
    from medvol.datasets.brain import build_brain_dataset
    from medvol.preprocessing import preprocess_dataset
    from medvol.training import train

    work = a.work or Path(tempfile.mkdtemp(prefix="pcrl_bench_"))
    val = ["brain_008", "brain_009"]
    raw = build_brain_dataset(work / "raw" / "Dataset001_BrainTissue", n_train=10, n_test=0, base_spacing=3.0)
    preprocess_dataset(raw, work / "pre", num_workers=2, quiet=True)
    pre = work / "pre"

    t0 = time.perf_counter()
    pre_run = work / "pcrl"
    r = load_recipe("pcrl_demo", [f"trainer.steps={a.pretrain_steps}", f"data.val_cases={val}"])
    metrics = train(r, pre, pre_run, device=a.device, quiet=True)
    print(f"PCRL pretraining: {a.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s, "
          f"val recon MSE {metrics.get('val/recon_mse', float('nan')):.4f}, "
          f"retrieval acc {metrics.get('val/retrieval_acc', float('nan')):.3f} (chance 1/{r.method['val_samples']}), "
          f"embedding std {metrics.get('val/embedding_std', float('nan')):.3f}")

    curves: dict[str, list] = {}
    for seed in a.seeds:
        for name, init in (("scratch", None), ("pcrl", pre_run / "encoder.pt")):
            sets = [f"trainer.steps={a.steps}", f"trainer.val_every={a.val_every}", f"data.val_cases={val}",
                    f"data.labelled={a.labelled}", f"trainer.seed={seed}"]
            if init:
                sets.append(f"init_from={init}")
            t1 = time.perf_counter()
            run = work / f"ft_{name}_{seed}"
            train(load_recipe("pcrl_finetune_demo", sets), pre, run, device=a.device, quiet=True)
            curves[f"{name} seed {seed}"] = dice_curve(run)
            print(f"fine-tune {name:7s} seed {seed}: {time.perf_counter() - t1:.0f} s")

    steps = [s for s, _ in next(iter(curves.values()))]
    print(f"\nvalidation Dice (mean of GM, WM) on {val}, {a.labelled} labelled scans, {a.steps} steps")
    print("step      " + " ".join(f"{s:>6d}" for s in steps))
    for name, curve in curves.items():
        print(f"{name:17s} " + " ".join(f"{d:6.3f}" for _, d in curve))
    for kind in ("scratch", "pcrl"):
        finals = [c[-1][1] for n, c in curves.items() if n.startswith(kind)]
        bests = [max(d for _, d in c) for n, c in curves.items() if n.startswith(kind)]
        print(f"{kind:7s}: final Dice mean over seeds {sum(finals) / len(finals):.3f}, "
              f"best {sum(bests) / len(bests):.3f}")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
