"""The two-stage subject pipeline on the subject demo data: held-out subject accuracy.

    python benchmarks/subject_pipeline.py                       # 36 subjects at 4 mm, seeds 0-2
    python benchmarks/subject_pipeline.py --seeds 0 1 2 3 4 --clf-steps 300 --agg-steps 300

Builds ``datasets/subjects.py``'s data (MNI152 scans, a third of them with a large lesion =
subject class 1, a third with a small one, a third without), preprocesses it, and per seed:
trains ``slice_classifier_demo`` (plain 2D CNN on the slice classes), extracts its per-slice
features, trains ``slice_aggregator_demo`` on them with the classifier's validation subjects
held out of both stages, and prints the aggregator's held-out subject accuracy, balanced
accuracy and AUC, the majority-class baseline on the same subjects, and the held-out AUC of
the simplest subject score without an aggregator (the classifier's largest slice probability).
Single thread, CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medvol.config import load_recipe
from medvol.datasets.subjects import build_subject_dataset
from medvol.evaluation.classification import binary_auc, majority_accuracy
from medvol.inference.subjects import extract_features
from medvol.io.slice_features import read_features
from medvol.preprocessing import preprocess_dataset
from medvol.training import train


def run_seed(pre: Path, root: Path, seed: int, clf_steps: int, agg_steps: int) -> dict:
    t0 = time.perf_counter()
    train(load_recipe("slice_classifier_demo", [f"trainer.steps={clf_steps}", f"trainer.val_every={clf_steps}",
                                                f"trainer.seed={seed}"]), pre, root / "clf", device="cpu", quiet=True)
    held_out = json.loads((root / "clf" / "split.json").read_text())["validation"]
    features = extract_features(root / "clf", pre, root / "features", device="cpu", quiet=True)
    m = train(load_recipe("slice_aggregator_demo", [f"trainer.steps={agg_steps}", f"trainer.val_every={agg_steps}",
                                                    f"trainer.seed={seed}", f"data.val_cases={held_out}"]),
              root / "features", root / "agg", device="cpu", quiet=True)
    items = [s for s in read_features(features).items if s.subject in held_out]
    y = np.array([s.subject_class for s in items])
    max_p = np.array([torch.from_numpy(s.logits).softmax(1)[:, 1].max().item() for s in items])
    return {"seed": seed, "held_out": len(items), "accuracy": m["val/accuracy"],
            "balanced_accuracy": m["val/balanced_accuracy"], "auc": m["val/auc"], "majority": majority_accuracy(y),
            "max_slice_auc": binary_auc(max_p, y), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=36)
    ap.add_argument("--spacing", type=float, default=4.0, help="in-plane mm (slices 1.5x)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clf-steps", type=int, default=300)
    ap.add_argument("--agg-steps", type=int, default=300)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        raw = build_subject_dataset(Path(tmp) / "raw" / "Dataset031_BrainLesionSubjects", n=a.subjects,
                                    spacing=a.spacing, seed=0)
        preprocess_dataset(raw, Path(tmp) / "pre", num_workers=1, quiet=True)
        print("seed  held-out  accuracy  balanced  AUC    majority  max-slice AUC  seconds")
        for seed in a.seeds:
            r = run_seed(Path(tmp) / "pre", Path(tmp) / f"seed{seed}", seed, a.clf_steps, a.agg_steps)
            print(f"{r['seed']:>4}  {r['held_out']:>8}  {r['accuracy']:.3f}     {r['balanced_accuracy']:.3f}     "
                  f"{r['auc']:.3f}  {r['majority']:.3f}     {r['max_slice_auc']:.3f}          {r['seconds']:.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
