"""The built-in demo: real brain-tissue data from the nilearn wheel, through the whole pipeline.

preprocess -> train the quickstart U-Net briefly (a narrow one, so that it runs in minutes on
a 2-core CPU) -> predict the held-out scans in their own geometry -> evaluate against their
reference labels -> pictures and an index.html.

The pipeline runs on whatever data ``build_data`` writes: the built-in real data come from
``datasets/`` (``python -m medvol.datasets.demo``, which ``medvol demo`` launches), so no
module under ``medvol/`` depends on the dataset builders.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from medvol.io.discovery import input_cases, scan_stem
from medvol.plans import Plans

DEMO_OVERRIDES = ["model.base_features=8", "model.max_features=64", "data.patch_size=[48, 48, 48]",
                  "data.batch_size=2", "optimizer.lr=0.02", "trainer.log_every=5"]


def run_demo(out: str | Path, build_data: Callable[..., Path], workers: int | None = None, quiet: bool = False,
             steps: int = 150, device: str = "auto", n_train: int = 8, n_test: int = 2) -> int:
    """The whole pipeline on the dataset ``build_data(raw_folder, n_train=, n_test=)`` writes
    (an nnU-Net v2 raw dataset with ``labelsTs``); returns the exit status."""
    from medvol.config import load_recipe
    from medvol.evaluation import evaluate_folders
    from medvol.evaluation.report import write_report
    from medvol.inference import predict
    from medvol.preprocessing import load_plans, preprocess_dataset
    from medvol.training import train

    out = Path(out)
    raw = out / "raw" / "Dataset001_BrainTissue"
    t0 = time.perf_counter()
    if not (raw / "dataset.json").exists():
        print(f"[1/5] building demo data from the MNI152 template -> {raw}")
        build_data(raw, n_train=n_train, n_test=n_test)
    pre = out / "preprocessed"
    print(f"[2/5] preprocessing -> {pre}")
    report = preprocess_dataset(raw, pre, num_workers=workers, quiet=quiet)
    if report.failures:
        for case, err in report.failures.items():
            print(f"failed {case}: {err}")
        return 1
    plans = Plans.from_dict(load_plans(pre))
    print(f"      target spacing {[round(s, 3) for s in plans.target_spacing]} mm, "
          f"plan patch {plans.patch_size}, batch {plans.batch_size}")
    run = out / "run"
    recipe = load_recipe("quickstart", DEMO_OVERRIDES + [f"trainer.steps={steps}",
                                                         f"trainer.val_every={max(steps // 3, 1)}"])
    resume = (run / "checkpoints" / "latest.pt").exists()
    print(f"[3/5] training quickstart (narrow) for {steps} steps -> {run}" + (" (resuming)" if resume else ""))
    train(recipe, pre, run, resume=resume, device=device, quiet=quiet)
    preds = out / "predictions"
    print(f"[4/5] predicting {raw / 'imagesTs'} -> {preds}")
    written = predict(run, raw / "imagesTs", preds, device=device, quiet=quiet)
    print("[5/5] evaluating and drawing")
    metrics = evaluate_folders(preds, raw / "labelsTs", preds / "metrics")
    images = dict(input_cases(raw / "imagesTs", 1))
    cases = {scan_stem(p.name): (images[scan_stem(p.name)][0], p, raw / "labelsTs" / p.name) for p in written}
    names = plans.label_names
    index = write_report(out, cases, metrics, names=names, title="medvol demo: brain tissue (MNI152, nilearn)")
    for cls, s in metrics["summary"].items():
        print(f"      {cls}: Dice {s['dice']['mean']:.3f}, HD95 {s['hd95']['mean']:.1f} mm, "
              f"ASD {s['asd']['mean']:.2f} mm")
    print(f"done in {time.perf_counter() - t0:.0f} s. Report: {index}  (training curve: {run / 'loss.png'})")
    return 0
