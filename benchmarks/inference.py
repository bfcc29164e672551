"""Sliding-window inference: medvol vs a plain MONAI call, speed and peak memory, in one run.

    python benchmarks/inference.py                      # CPU, narrow quickstart network
    python benchmarks/inference.py --device cuda --base-features 32 --max-features 320
    python benchmarks/inference.py --big                # a 512x512x400 CT through the whole predict path

Each variant runs in its own child process (so peak RSS is its own) on the same input:
- ``monai``: ``monai.inferers.sliding_window_inference(x, roi, sw_batch_size=1, model)`` with
  MONAI's defaults (overlap 0.25, constant weighting, float32 accumulation) + softmax;
- ``medvol``: medvol's ``sliding_window_probabilities`` (Gaussian weighting, batched windows,
  float16 accumulation, AMP on CUDA), at the same overlap, and at medvol's default 0.5.
``--big`` runs preprocess_case -> sliding window -> restore_geometry -> argmax on a
512x512x400 volume and prints the peak memory over the input against the size of the float16
class probabilities.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def _model(args, n_classes: int, device):
    from medvol.config import ModelConfig
    from medvol.networks import build_model
    from medvol.plans import Plans

    plans = Plans(num_channels=1, label_names={c: str(c) for c in range(n_classes)}, patch_size=list(args.patch),
                  topology={"kernel_sizes": [[3, 3, 3]] * 5, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4})
    cfg = ModelConfig(base_features=args.base_features, max_features=args.max_features, deep_supervision=False)
    torch.manual_seed(0)
    return build_model(cfg, plans, 1, n_classes).to(device).eval()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    device = torch.device(args.device)
    shape = tuple(args.shape)
    x = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    model = _model(args, args.classes, device)
    roi = tuple(args.patch)
    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.variant == "monai":
            from monai.inferers import sliding_window_inference

            out = sliding_window_inference(torch.from_numpy(x)[None].to(device), roi, 1, model)
            probs = torch.softmax(out, 1)[0].cpu()
        else:
            from medvol.inference.sliding_window import sliding_window_probabilities

            probs = sliding_window_probabilities(model, x, roi, device, n_channels=args.classes,
                                                 overlap=args.overlap, sw_batch_size=args.sw_batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    del probs  # kept until the clock stopped: the peak RSS holds the output, as in real use
    return {"seconds": sec, "voxels_per_s": float(np.prod(shape)) / sec, "peak_rss_mb": _rss_mb(),
            "rss_over_input_mb": _rss_mb() - base, "probs_fp16_mb": args.classes * float(np.prod(shape)) * 2 / 2**20,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def big(args) -> dict:
    """512x512x400 through the whole predict path; memory over the loaded input."""
    from medvol.inference import restore_geometry
    from medvol.inference.sliding_window import sliding_window_probabilities
    from medvol.io import Volume
    from medvol.preprocessing import preprocess_case

    device = torch.device(args.device)
    shape = (512, 512, 400)
    rng = np.random.default_rng(0)
    hu = np.full(shape, -1000, np.float32)
    hu[40:-40, 40:-40, 10:-10] = rng.normal(40, 30, (432, 432, 380)).astype(np.float32)
    vol = Volume(hu, np.diag([0.8, 0.8, 1.0, 1.0]))
    input_mb = hu.nbytes / 2**20
    del hu  # the Volume holds the scan, as after read_volume
    plans = {"target_spacing": [0.8, 0.8, 1.0], "resampling": {"image": "cubic"},
             "normalization": [{"channel": 0, "scheme": "CTNormalization", "use_mask_for_norm": False,
                                "statistics": {"mean": 40.0, "std": 30.0, "percentile_00_5": -100.0,
                                               "percentile_99_5": 200.0}}],
             "labels": {"background": 0, "organ": 1}, "patch_size": list(args.patch)}
    model = _model(args, 2, device)
    base = _rss_mb()
    t0 = time.perf_counter()
    image, props = preprocess_case(vol, plans, inplace=True)  # as medvol predict does
    image = torch.from_numpy(image).half()  # ... and drops the float32 array
    probs = sliding_window_probabilities(model, image, list(args.patch), device, n_channels=2,
                                         overlap=args.overlap, sw_batch_size=args.sw_batch)
    del image
    restored = restore_geometry(probs, props, dtype=np.float16)
    del probs
    from medvol.inference.postprocess import argmax_labels

    seg = argmax_labels(restored)
    sec = time.perf_counter() - t0
    probs_mb = 2 * float(np.prod(shape)) * 2 / 2**20
    return {"seconds": sec, "input_mb": input_mb, "probs_fp16_mb": probs_mb, "peak_rss_mb": _rss_mb(),
            "rss_over_input_mb": _rss_mb() - base, "ratio_to_probs": (_rss_mb() - base) / probs_mb,
            "seg_shape": list(seg.shape)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 160, 128])
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--base-features", type=int, default=8)
    ap.add_argument("--max-features", type=int, default=64)
    ap.add_argument("--sw-batch", type=int, default=2)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(big(a) if a.variant == "big" else worker(a)))
        return 0
    common = [sys.executable, __file__, "--device", a.device, "--shape", *map(str, a.shape), "--patch",
              *map(str, a.patch), "--classes", str(a.classes), "--base-features", str(a.base_features),
              "--max-features", str(a.max_features), "--sw-batch", str(a.sw_batch)]

    def run(variant, overlap):
        r = subprocess.run(common + ["--variant", variant, "--overlap", str(overlap)], capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:])
            raise SystemExit(1)
        return json.loads(r.stdout.strip().splitlines()[-1])

    print(f"device {a.device}, network features {a.base_features}-{a.max_features}, patch {a.patch}, "
          f"torch threads {torch.get_num_threads()}")
    if a.big:
        b = run("big", 0.25)
        print(f"512x512x400 CT, 2 classes: {b['seconds']:.0f} s; float16 probabilities {b['probs_fp16_mb']:.0f} MB; "
              f"peak RSS over the loaded input {b['rss_over_input_mb']:.0f} MB = {b['ratio_to_probs']:.2f}x the "
              f"float16 probabilities (input {b['input_mb']:.0f} MB float32)")
        return 0
    m = run("monai", 0.25)
    v = run("medvol", 0.25)
    v5 = run("medvol", 0.5)
    print(f"input {a.shape}, {a.classes} classes")
    print(f"monai defaults (overlap 0.25) : {m['voxels_per_s'] / 1e6:.2f} Mvox/s, peak RSS {m['peak_rss_mb']:.0f} MB")
    print(f"medvol (overlap 0.25)         : {v['voxels_per_s'] / 1e6:.2f} Mvox/s, peak RSS {v['peak_rss_mb']:.0f} MB"
          f"  -> {v['voxels_per_s'] / m['voxels_per_s']:.2f}x speed, {v['peak_rss_mb'] / m['peak_rss_mb']:.2f}x memory")
    print(f"medvol (overlap 0.5, default) : {v5['voxels_per_s'] / 1e6:.2f} Mvox/s, peak RSS {v5['peak_rss_mb']:.0f} MB")
    if a.device.startswith("cuda"):
        print(f"GPU peak: monai {m['gpu_peak_mb']:.0f} MB, medvol {v['gpu_peak_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
