"""DE-DCGCN-EE against quickstart_2d on the retina demo, scored by the vessel metrics.

    python benchmarks/methods.py --method de_dcgcn_ee --seeds 0 1 2 --out bench_methods

Data: ``medvol.datasets.vessels.write_demo`` (scikit-image's bundled fundus photograph, resized to
256 x 256, cut into 64 x 64 tiles; vessels from a Frangi filter, not a manual annotation;
FOV by thresholding), preprocessed once into ``OUT/data/retina``. Both arms train on the same
8 training tiles (no validation split), the same steps, patch (64 x 64), batch (4) and seed,
without augmentation; each recipe keeps its own network, loss and optimiser (DE-DCGCN-EE:
``de_dcgcn_ee_demo``, widths 8-64, BCE, Adam 1e-3; quickstart_2d: nnU-Net's 2D U-Net from the
plan, Dice + CE with deep supervision, SGD 0.01 poly). The last checkpoint predicts the 4 test
tiles from their raw files with their probabilities; ``medvol evaluate --kind vessels`` scores them
inside the FOV (AUC from the probabilities, the rest at 0.5).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

STEPS = 300
ARMS = {"DE-DCGCN-EE": "de_dcgcn_ee_demo", "quickstart_2d": "quickstart_2d"}
METRICS = ("auc", "f1", "accuracy", "sensitivity", "specificity")


def _data(work: Path) -> Path:
    """The preprocessed retina demo (built once; its raw folder beside it)."""
    from medvol.datasets.vessels import write_demo
    from medvol.preprocessing import preprocess_dataset

    raw, pre = work / "data" / "retina_raw", work / "data" / "retina"
    if not (raw / "dataset.json").exists():
        write_demo(raw)
    if not (pre / "plans.json").exists():
        preprocess_dataset(raw, pre, num_workers=1, quiet=True)
    return raw


def _sets(seed: int, toy: bool) -> list[str]:
    steps = 2 if toy else STEPS
    return [f"trainer.steps={steps}", f"trainer.val_every={steps + 1}", "trainer.final_validation=false",
            "data.val_fraction=0.0", "data.patch_size=[64,64]", "data.batch_size=4", "data.num_workers=0",
            "data.augment.enabled=false", "inference.tta=false", f"trainer.seed={seed}", "trainer.log_every=10"]


def run_arm(label: str, recipe: str, raw: Path, seed: int, out: Path, toy: bool) -> dict:
    from medvol.evaluation.metrics import evaluate_vessel_folders
    from medvol.inference import predict
    from medvol.training import load_recipe, train

    t0 = time.perf_counter()
    if not (out / "train_summary.json").exists():
        train(load_recipe(recipe, _sets(seed, toy)), raw.parent / "retina", out / "run", resume="auto",
              device="cpu", quiet=True)
    pred = out / "pred"
    if not pred.exists():
        predict(out / "run", raw / "imagesTs", pred, device="cpu", checkpoint="latest", tta=False,
                save_probabilities=True, quiet=True)
    res = evaluate_vessel_folders(pred, raw / "labelsTs", raw / "fovTs")
    return {"method": "de_dcgcn_ee", "arm": label, "seed": seed, "scores": res["summary"],
            "seconds": time.perf_counter() - t0}


def run(seeds: list[int], work: Path, toy: bool, deadline: float) -> list[dict]:
    """Both arms for each seed, until ``deadline`` (time.time()) passes."""
    raw = _data(Path(work))
    rows = []
    for seed in seeds:
        for label, recipe in ARMS.items():
            if time.time() > deadline:
                return rows
            rows.append(run_arm(label, recipe, raw, seed, Path(work) / "de_dcgcn_ee" / f"{label}_s{seed}", toy))
    return rows


def table(rows: list[dict], out: Path) -> str:
    """Markdown: per arm, each metric's mean and min-max over seeds; DE-DCGCN-EE minus baseline."""
    def stat(vals):
        return f"{np.mean(vals):.4f} ({min(vals):.4f}-{max(vals):.4f})" if vals else "-"

    lines = ["### de_dcgcn_ee: vessel metrics on the retina demo test tiles (inside the FOV; mean (min-max) "
             "over seeds)", "", "| arm | seeds | " + " | ".join(METRICS) + " | seconds |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    by_arm = {a: [r for r in rows if r["arm"] == a] for a in ARMS}
    for arm, rs in by_arm.items():
        if rs:
            lines.append(f"| {arm} | {len(rs)} | " + " | ".join(stat([r['scores'][m] for r in rs]) for m in METRICS)
                         + f" | {np.mean([r['seconds'] for r in rs]):.0f} |")
    a, b = by_arm["DE-DCGCN-EE"], by_arm["quickstart_2d"]
    seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
    if seeds:
        sa, sb = ({r["seed"]: r["scores"] for r in rs} for rs in (a, b))
        diff = {m: [sa[s][m] - sb[s][m] for s in seeds] for m in METRICS}
        lines.append(f"| difference (paired) | {len(seeds)} | " + " | ".join(
            f"{np.mean(diff[m]):+.4f}" for m in METRICS) + " | |")
    return "\n".join(lines)
