"""MRNet against a 2D U-Net trained on the raters' majority vote: soft Dice and ECE.

Data: the MNI152 multi-rater demo (``datasets/multirater.py``: grey matter drawn by a lenient,
a middle and a strict synthetic rater; 6 training and 2 held-out scans at 3 mm). MRNet
(``mrnet_demo``) trains on the three raters; the baseline (``quickstart_2d``, nnU-Net's 2D
U-Net, narrowed to 8..64 features) on the majority vote (at least 2 of 3 raters), the same
slices, steps and seed, no validation split. Both predict the held-out scans from their raw
files (MRNet with equal expertise) and ``medvol evaluate --kind soft``'s scoring compares their
probabilities with the raters' mean: MRNet's soft Dice and the ECE.

    python benchmarks/methods.py --method mrnet --seeds 0 1 2 --out bench_methods
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

STEPS = 200
MRNET = ["data.patch_size=[64,64]", "data.batch_size=8"]
UNET = ["data.patch_size=[64,64]", "data.batch_size=8", "model.base_features=8", "model.max_features=64",
        "data.num_workers=0", "trainer.amp=false", "inference.tta=false"]


def build(work: Path, toy: bool) -> tuple[Path, Path, Path]:
    """(raw multi-rater dataset, its cache, the majority-vote dataset's cache), built once."""
    from medvol.datasets.multirater import build_multirater_dataset
    from medvol.io import Volume, read_volume, write_volume
    from medvol.preprocessing import preprocess_dataset

    root = work / "data" / "mrnet"
    raw, pre, vote_raw, vote_pre = root / "raw", root / "pre", root / "vote_raw", root / "vote_pre"
    if not (pre / "plans.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        build_multirater_dataset(raw, n_train=3 if toy else 6, n_test=1 if toy else 2, spacing=5.0 if toy else 3.0)
        shutil.copytree(raw / "imagesTr", vote_raw / "imagesTr")
        (vote_raw / "labelsTr").mkdir()
        for f in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
            case = f.name[: -len("_0000.nii.gz")]
            votes = [read_volume(raw / "labelsTr" / f"{case}_r{k}.nii.gz") for k in range(3)]
            majority = (sum(np.asarray(v.array, np.int64) for v in votes) >= 2).astype(np.uint8)
            write_volume(Volume(majority, votes[0].affine, {}), vote_raw / "labelsTr" / f"{case}.nii.gz")
        meta = json.loads((raw / "dataset.json").read_text())
        del meta["raters"]
        (vote_raw / "dataset.json").write_text(json.dumps(meta, indent=1))
        preprocess_dataset(vote_raw, vote_pre, num_workers=1, quiet=True)
        preprocess_dataset(raw, pre, num_workers=1, quiet=True)
    return raw, pre, vote_pre


def run_arm(label: str, recipe: str, sets: list[str], cache: Path, raw: Path, out: Path, seed: int,
            toy: bool) -> dict:
    """Train (or reuse) one run, predict the held-out scans with probabilities, score them."""
    from medvol.evaluation.calibration import evaluate_soft
    from medvol.inference import predict
    from medvol.training import load_recipe, train

    steps = 2 if toy else STEPS
    run, pred = out / "runs" / f"mrnet_{label}_s{seed}", out / "pred" / f"mrnet_{label}_s{seed}"
    t0 = time.perf_counter()
    summary = run / "train_summary.json"
    if not (summary.exists() and json.loads(summary.read_text()).get("steps_done") == steps):
        sets = [*sets, f"trainer.steps={steps}", f"trainer.val_every={steps + 1}", "trainer.final_validation=false",
                "data.val_fraction=0.0", f"trainer.seed={seed}", "trainer.log_every=50"]
        train(load_recipe(recipe, sets), cache, run, resume="auto", device="cpu", quiet=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(pred, ignore_errors=True)
    predict(run, raw / "imagesTs", pred, device="cpu", quiet=True, save_probabilities=True, checkpoint="latest")
    scores = evaluate_soft(pred, raw / "labelsTs", pred / "calibration")["summary"]["grey_matter"]
    return {"method": "mrnet", "arm": label, "seed": seed, "steps": steps, "train_seconds": round(seconds, 1),
            "soft_dice": scores["soft_dice"], "ece": scores["ece"]}


def run(seeds: list[int], work: Path, toy: bool, deadline: float) -> list[dict]:
    raw, pre, vote_pre = build(Path(work), toy)
    rows = []
    for seed in seeds:
        for label, recipe, sets, cache in (("mrnet", "mrnet_demo", MRNET, pre),
                                           ("unet_majority", "quickstart_2d", UNET, vote_pre)):
            if time.time() > deadline:
                return rows
            rows.append(run_arm(label, recipe, sets, cache, raw, Path(work), seed, toy))
    return rows


def table(rows: list[dict], out: Path) -> str:
    """Mean [min, max] over seeds of the soft Dice and ECE per arm, and MRNet minus the baseline."""
    from methods import stat  # this folder is on sys.path (methods._elsewhere)

    by = {a: [r for r in rows if r["arm"] == a] for a in ("mrnet", "unet_majority")}
    lines = ["### MRNet vs a 2D U-Net on the majority vote (MNI152 multi-rater demo, grey matter)", "",
             "| arm | seeds | steps | soft Dice (higher better) | ECE (lower better) |", "|---|---|---|---|---|"]
    for a, rs in by.items():
        lines.append(f"| {a} | {len(rs)} | {rs[0]['steps'] if rs else '-'} | {stat([r['soft_dice'] for r in rs], 4)} | "
                     f"{stat([r['ece'] for r in rs], 4)} |")
    pairs = [(m, u) for m in by["mrnet"] for u in by["unet_majority"] if m["seed"] == u["seed"]]
    if pairs:
        lines.append(f"| MRNet - U-Net (paired by seed) | {len(pairs)} | | "
                     f"{stat([m['soft_dice'] - u['soft_dice'] for m, u in pairs], 4)} | "
                     f"{stat([m['ece'] - u['ece'] for m, u in pairs], 4)} |")
    return "\n".join(lines)
