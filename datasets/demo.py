"""The built-in demo: real brain-tissue data from the nilearn wheel, through the pipeline.

For now the demo builds the raw dataset and preprocesses it (fingerprint, plan, cache);
training, prediction and evaluation join as those stages land.
"""

from __future__ import annotations

import time
from pathlib import Path

from medvol.datasets.brain import build_brain_dataset


def run_demo(out: str | Path, workers: int = 2, quiet: bool = False, n_train: int = 8, n_test: int = 2) -> int:
    from medvol.preprocessing import load_plans, preprocess_dataset

    out = Path(out)
    raw = out / "raw" / "Dataset001_BrainTissue"
    t0 = time.perf_counter()
    if not (raw / "dataset.json").exists():
        print(f"building demo data from the MNI152 template -> {raw}")
        build_brain_dataset(raw, n_train=n_train, n_test=n_test)
    pre = out / "preprocessed"
    report = preprocess_dataset(raw, pre, num_workers=workers, quiet=quiet)
    plans = load_plans(pre)
    print(f"preprocessed {len(report.done) + len(report.skipped)} case(s) in {time.perf_counter() - t0:.1f} s: "
          f"target spacing {[round(s, 3) for s in plans['target_spacing']]} mm, patch {plans['patch_size']}, "
          f"batch {plans['batch_size']}")
    print(f"cache: {pre}  (plans: {pre / 'plans.json'})")
    if report.failures:
        for case, err in report.failures.items():
            print(f"failed {case}: {err}")
        return 1
    return 0
