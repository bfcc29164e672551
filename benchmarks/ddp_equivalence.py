"""DDP ≡ a larger batch (issue 35, 2): is the gap between 2 gloo processes × batch 1 and one
process × batch 2 the order of floating-point reductions, or a statistic still pooled per rank?

Data: real T1 cases of different sizes (``medvol.datasets.brain``, the MNI152 template seen
at 2.5-4.5 mm, cropped, oblique, flipped), preprocessed by medvol. Recipe: quickstart (batch
Dice + CE over the deep-supervision levels, SGD Nesterov 0.99, grad clip), a small U-Net,
4 steps, no validation. Every run trains in its own process (OMP_NUM_THREADS=1):

- ``one``:      1 process × batch 2;
- ``permuted``: the same, with the two samples of every batch swapped (mathematically the same
                update: every loss term and gradient is a sum or mean over the batch; only the
                order in which floating-point sums add the samples changes);
- ``ddp``:      2 gloo processes × batch 1 (torchrun), the samples of the same global slots;
- ``nudged``:   one process × batch 2 with the images multiplied by 1 + 2^-23 (one float32 ulp):
                how far 4 steps carry a perturbation of rounding size (float32 only);

each in float32 (as training runs) and in float64 (model, batch and loss; ``Tensor.float`` is
patched to the default dtype in the workers). If the DDP gap is reduction order, it is of the
size of the permutation gap in float32 and vanishes (~1e-13) in float64 with it; a statistic
pooled per rank would leave a float64 gap as large as the float32 one. The float32 gaps are
then compared with the nudged run's: what rounding-size perturbations become after 4 steps.

    python benchmarks/ddp_equivalence.py [--seeds 0 1] [--keep DIR] [--json out.json] [--set KEY=VALUE ...]

About 3 minutes per seed on the idle 2-core machine (each run is a process of its own; 15 under
a load average of 16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = ["model.base_features=8", "model.max_features=32", "data.patch_size=[48, 48, 48]", "data.num_workers=0",
        "trainer.steps=4", "trainer.val_every=1000", "trainer.log_every=1", "trainer.final_validation=false",
        "trainer.precision=fp32", "data.val_cases=[brain_005]"]
# batch, change (1: swap the two samples, 2: nudge the images by one float32 ulp), processes
RUNS = {"one": (2, 0, 1), "permuted": (2, 1, 1), "ddp": (1, 0, 2), "nudged": (2, 2, 1)}


def build_cache(tmp: Path) -> Path:
    """Six real T1 cases of different sizes and geometries, preprocessed by medvol."""
    from medvol.datasets.brain import Acquisition, build_brain_dataset
    from medvol.preprocessing import preprocess_dataset

    acqs = [Acquisition((3.0, 3.0, 3.0)), Acquisition((4.0, 4.0, 4.0), flip=(0, 1), intensity=(0.8, 20.0), seed=1),
            Acquisition((3.5, 3.5, 4.5), oblique_deg=12.0, noise=0.02, seed=2),
            Acquisition((2.5, 2.5, 2.5), crop=(0.3, 0.2, 0.35), seed=3),
            Acquisition((4.5, 4.0, 4.0), flip=(2,), intensity=(1.2, 0.0), crop=(0.0, 0.4, 0.0), seed=4),
            Acquisition((3.0, 3.0, 3.0), noise=0.01, seed=5),
            Acquisition((3.0, 3.0, 3.0), crop=(0.6, 0.55, 0.6), seed=6)]  # smaller than the patch: padded
    raw = build_brain_dataset(tmp / "Dataset001_BrainTissue", n_train=7, n_test=0, acquisitions=acqs)
    pre = tmp / "pre"
    assert not preprocess_dataset(raw, pre, num_workers=1, quiet=True, target_spacing=[2.0, 2.0, 2.0]).failures
    return pre


def worker(pre: str, out: str, batch: int, change: int, f64: bool, seed: int, extra: list[str]) -> None:
    """One training run in this process (a torchrun worker under DDP), patched as asked."""
    import torch

    from medvol.checkpoint import save_checkpoint
    from medvol.precision import Precision
    from medvol.training import engine, load_recipe, train

    if f64:
        torch.set_default_dtype(torch.float64)
        torch.Tensor.float = lambda self, *a, **k: self.to(torch.float64)  # type: ignore[method-assign]
        Precision.layout = lambda self, x: x.double()  # type: ignore[method-assign]  # float inputs only
    if change:
        step = engine.Trainer.optimization_step

        def changed(self, batch, s):
            if change == 1:
                return step(self, {k: v.flip(0) for k, v in batch.items()}, s)
            return step(self, {**batch, "image": batch["image"] * (1 + 2.0**-23)}, s)

        engine.Trainer.optimization_step = changed  # type: ignore[method-assign]

    def checkpoint_only(self, step: int) -> None:  # no validation: only the weights matter here
        save_checkpoint(self.trainer.run_dir / "checkpoints" / "latest.pt", self.trainer.state(step + 1, self.best))

    engine._Loop.validate_and_checkpoint = checkpoint_only  # type: ignore[method-assign]
    samples = _record_samples()
    recipe = load_recipe("quickstart", SETS + extra + [f"data.batch_size={batch}", f"trainer.seed={seed}"])
    train(recipe, pre, out, device="cpu", quiet=True)
    if batch == 2:
        Path(out, "samples.json").write_text(json.dumps(samples))


def _record_samples() -> list[dict]:
    """Per sample drawn, in order: its case, the share of its label patch that is -1 (padding
    where the case is smaller than the patch, or outside the case's nonzero mask) and the
    classes present in it (an empty class of one rank's part is what a per-rank statistic would
    get wrong)."""
    import numpy as np

    from medvol.data import dataset as ds

    samples: list[dict] = []
    case, extract = ds.PatchDataset._case, ds.extract_patch

    def recorded_case(self, case_id):
        samples.append({"case": case_id})
        return case(self, case_id)

    def recorded_extract(arr, start, patch, fill):
        out = extract(arr, start, patch, fill)
        if fill == -1:  # the label patch
            samples[-1].update(outside=round(float((out < 0).mean()), 4),
                               classes=sorted(int(c) for c in np.unique(out[out >= 0])))
        return out

    ds.PatchDataset._case = recorded_case  # type: ignore[method-assign]
    ds.extract_patch = recorded_extract
    return samples


def launch(pre: Path, out: Path, name: str, f64: bool, seed: int, extra: list[str]) -> float:
    batch, change, nproc = RUNS[name]
    args = [__file__, "--worker", str(pre), str(out), str(batch), str(change), str(int(f64)), str(seed), *extra]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", *args]
    if (out / "checkpoints" / "latest.pt").exists():  # --keep DIR: a run already made
        return math.nan
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                             "MEDVOL_CPU_BF16": "0"})
    return time.perf_counter() - t0


def weights(run: Path) -> dict:
    from medvol.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 4, ckpt["step"]
    return ckpt["models"]["model"]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def measure(pre: Path, tmp: Path, seed: int, extra: list[str]) -> dict:
    import torch

    from medvol.networks import build_model
    from medvol.plans import Plans
    from medvol.training import load_recipe
    from medvol.utils import read_json

    row: dict = {"seed": seed}
    for f64 in (False, True):
        dtype = "float64" if f64 else "float32"
        w = {}
        for name in [n for n in RUNS if not (f64 and n == "nudged")]:  # float32's ulp: its sensitivity
            out = tmp / f"{name}_{dtype}_s{seed}"
            row[f"seconds_{name}_{dtype}"] = launch(pre, out, name, f64, seed, extra)
            w[name] = weights(out)
        if not f64:
            row["samples"] = json.loads((tmp / f"one_{dtype}_s{seed}" / "samples.json").read_text())
        row[f"ddp_vs_one_{dtype}"] = max_diff(w["ddp"], w["one"])
        row[f"permuted_vs_one_{dtype}"] = max_diff(w["permuted"], w["one"])
        if not f64:
            row["nudged_vs_one_float32"] = max_diff(w["nudged"], w["one"])
            run = tmp / f"one_{dtype}_s{seed}"
            torch.manual_seed(seed)  # as the trainer seeds before building its model
            init = build_model(load_recipe(run / "recipe.yaml").model, Plans.from_dict(read_json(run / "plans.json")),
                               1, 3).state_dict()
            row["update_size"] = max_diff(w["one"], init)  # how far 4 steps moved the weights
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    p.add_argument("--json", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every run (e.g. model.base_features=32), after the defaults")
    a = p.parse_args(argv)
    tmp = a.keep or Path(tempfile.mkdtemp(prefix="ddp-equivalence-"))
    tmp.mkdir(parents=True, exist_ok=True)
    pre = tmp / "pre" if (tmp / "pre" / "plans.json").exists() else build_cache(tmp)
    rows = [measure(pre, tmp, s, a.set) for s in a.seeds]
    print("max |Δw| after 4 steps (seed: DDP vs one process, permuted batch vs one process; update size)")
    for r in rows:
        print(f"seed {r['seed']}: float32 ddp {r['ddp_vs_one_float32']:.2e} permuted {r['permuted_vs_one_float32']:.2e}"
              f" | float64 ddp {r['ddp_vs_one_float64']:.2e} permuted {r['permuted_vs_one_float64']:.2e}"
              f" | float32 nudged by 1 ulp {r['nudged_vs_one_float32']:.2e} | update {r['update_size']:.2e}")
        padded = [f"{x['case']} {x['outside']:.0%}" for x in r["samples"] if x["outside"] > 0]
        partial = [f"{x['case']} has {x['classes']}" for x in r["samples"] if x["classes"] != [0, 1, 2]]
        print(f"  {len(r['samples'])} samples: {len(padded)} partly padding or outside the mask ({', '.join(padded)}), "
              f"{len(partial)} "
              f"missing a class ({', '.join(partial)})")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        pre_, out_, b, sw, f, sd = sys.argv[2:8]
        worker(pre_, out_, int(b), int(sw), bool(int(f)), int(sd), sys.argv[8:])
    else:
        sys.exit(main())
