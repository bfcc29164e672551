"""Sliding-window inference like for like: MONAI, the pure forward floor, and medvol's settings.

    python benchmarks/inference.py                      # synthetic input, CPU, narrow quickstart network
    python benchmarks/inference.py --run demo_out/run --input demo_out/raw/Dataset001_BrainTissue/imagesTs
                                                        # real scans through `predict`: seconds, memory, Dice
    python benchmarks/inference.py --device cuda --base-features 32 --max-features 320
    python benchmarks/inference.py --big                # a 512x512x400 CT through the whole predict path

Synthetic table, each variant in its own process on the same input, network, windows (patch,
overlap 0.25, window batch 2, Gaussian weighting):
- ``floor``: the model's forward passes on that many window batches, nothing else;
- ``monai``: ``monai.inferers.sliding_window_inference`` with the same window batch, overlap and
  Gaussian weighting (fp32, float32 accumulation) + softmax;
- ``medvol:<precision>[+cl]``: ``sliding_window_probabilities`` (float16 accumulation) in fp32 or
  bf16 autocast, with or without channels-last; ``medvol:auto+tta`` the automatic choice with
  mirroring over 3 axes (8 passes, batched).
``--run``: ``medvol predict`` on real scans with fp32 and every window (the reference), then
window skipping, bf16, bf16 + channels-last and auto: seconds, peak RSS, per-class Dice of the
labels against the reference, share of windows skipped.
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


def _precision(variant: str, device):
    from medvol.precision import Precision, choose_precision

    name = variant.split(":")[1].split("+")[0]
    if name == "auto":
        return choose_precision(device)
    return Precision(name, device.type, "+cl" in variant)


def _n_windows(shape, roi, overlap: float) -> int:
    from monai.data.utils import dense_patch_slices, get_valid_patch_size

    scan = [int(r * (1 - overlap)) or 1 for r in roi]
    return len(dense_patch_slices(shape, get_valid_patch_size(shape, roi), scan))


def timed_variant(variant: str, model, x: np.ndarray, roi, device, classes: int, overlap: float, sw_batch: int):
    """(output, seconds) of one variant (module docstring) on ``x`` ``(1, X, Y, Z)``: class
    probabilities ``(K, X, Y, Z)`` on the CPU (float16 for medvol, float32 for MONAI), the last
    window batch's logits for the floor. The clock stops after the GPU has finished."""
    shape = x.shape[1:]
    t0 = time.perf_counter()
    with torch.no_grad():
        if variant == "floor":
            n = -(-_n_windows(shape, roi, overlap) // sw_batch)
            batch = torch.from_numpy(x[None, :, :roi[0], :roi[1], :roi[2]]).repeat(sw_batch, 1, 1, 1, 1)
            for _ in range(n):
                probs = model(batch.to(device))
        elif variant == "monai":
            from monai.inferers import sliding_window_inference

            out = sliding_window_inference(torch.from_numpy(x)[None].to(device), roi, sw_batch, model,
                                           overlap=overlap, mode="gaussian", sigma_scale=0.125)
            probs = torch.softmax(out, 1)[0].cpu()
        else:
            from medvol.inference.sliding_window import sliding_window_probabilities

            probs = sliding_window_probabilities(model, x, roi, device, n_channels=classes, overlap=overlap,
                                                 sw_batch_size=sw_batch, precision=_precision(variant, device),
                                                 mirror_axes=(0, 1, 2) if "tta" in variant else ())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return probs, time.perf_counter() - t0


def worker(args) -> dict:
    device = torch.device(args.device)
    shape = tuple(args.shape)
    x = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    model = _model(args, args.classes, device)
    base = _rss_mb()
    probs, sec = timed_variant(args.variant, model, x, tuple(args.patch), device, args.classes, args.overlap,
                               args.sw_batch)
    del probs  # kept until the clock stopped: the peak RSS holds the output, as in real use
    return {"seconds": sec, "voxels_per_s": float(np.prod(shape)) / sec, "peak_rss_mb": _rss_mb(),
            "rss_over_input_mb": _rss_mb() - base, "probs_fp16_mb": args.classes * float(np.prod(shape)) * 2 / 2**20,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def real(args) -> dict:
    """``medvol predict`` of ``--input`` with ``--run`` in one setting; labels saved for Dice."""
    import logging

    import medvol.inference.predictor as predictor

    device = torch.device(args.device)
    setting = args.variant.split(":", 1)[1]
    chosen = _precision("x:" + setting.replace("+skip", ""), device)
    predictor.choose_precision = lambda *a, **k: chosen  # this child's setting, whatever auto would say
    stats: dict = {"run": 0, "skipped": 0}

    class Count(logging.Handler):
        def emit(self, record):
            if "windows outside the body mask" in record.getMessage():
                skipped, total = record.args[1], record.args[2]
                stats["skipped"] += skipped
                stats["run"] += total - skipped

    logging.getLogger("medvol.inference.predictor").addHandler(Count())
    logging.getLogger("medvol.inference.predictor").setLevel(logging.INFO)
    t0 = time.perf_counter()
    predictor.predict(args.run, args.input, args.out, device=args.device, quiet=True,
                      all_windows="skip" not in setting, tta=False if args.no_tta else None)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(),
            "precision": chosen.name + ("+cl" if chosen.channels_last else ""),
            "windows": stats}


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
    ap.add_argument("--run", help="a trained run folder: benchmark `predict` on --input with it")
    ap.add_argument("--input", help="scans for --run")
    ap.add_argument("--out", default=".bench/inference", help="prediction folders for --run (one per setting)")
    ap.add_argument("--no-tta", action="store_true", help="--run: without mirroring (else the recipe's choice)")
    ap.add_argument("--settings", nargs="+", default=["fp32", "fp32+skip", "bf16+skip", "bf16+cl+skip", "auto+skip"],
                    help="settings for --run, the first the reference (fp32 with every window)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        fn = big if a.variant == "big" else real if a.variant.startswith("real:") else worker
        print(json.dumps(fn(a)))
        return 0
    if a.run:
        return real_table(a)
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
    rows = [(v, run(v, a.overlap)) for v in ("floor", "monai", "medvol:fp32", "medvol:fp32+cl", "medvol:bf16",
                                              "medvol:bf16+cl", "medvol:auto", "medvol:auto+tta")]
    ref = dict(rows)["medvol:fp32"]["seconds"]
    print(f"input {a.shape}, {a.classes} classes, overlap {a.overlap}, window batch {a.sw_batch}, Gaussian")
    print("| variant | seconds | vs medvol fp32 | peak RSS MB |")
    print("|---|---|---|---|")
    for v, r in rows:
        print(f"| {v} | {r['seconds']:.2f} | {ref / r['seconds']:.2f}x | {r['peak_rss_mb']:.0f} |")
    if a.device.startswith("cuda"):
        print("GPU peak MB: " + ", ".join(f"{v} {r['gpu_peak_mb']:.0f}" for v, r in rows))
    return 0


def real_table(a) -> int:
    """``predict`` on real scans in each setting; Dice of its labels against fp32 with every window."""
    from pathlib import Path

    from medvol.evaluation.metrics import dice
    from medvol.io import read_volume

    out = Path(a.out)
    rows = []
    for setting in a.settings:
        folder = out / setting.replace("+", "_")
        r = subprocess.run([sys.executable, __file__, "--device", a.device, "--run", a.run, "--input", a.input,
                            "--out", str(folder), "--variant", f"real:{setting}"] + (["--no-tta"] if a.no_tta else []),
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:])
            return 1
        rows.append((setting, folder, json.loads(r.stdout.strip().splitlines()[-1])))
    ref_folder = rows[0][1]
    print(f"real scans {a.input} with {a.run}, device {a.device}")
    print("| setting | seconds | speed-up | peak RSS MB | windows skipped | min per-class Dice vs fp32 |")
    print("|---|---|---|---|---|---|")
    for setting, folder, res in rows:
        worst = 1.0
        for f in sorted(ref_folder.glob("*.nii.gz")):
            x, y = read_volume(f).array, read_volume(folder / f.name).array
            for c in np.unique(x[x > 0]):
                worst = min(worst, dice(x == c, y == c))
        w = res["windows"]
        share = f"{w['skipped'] / max(1, w['run'] + w['skipped']):.0%}" if w["run"] + w["skipped"] else "-"
        print(f"| {setting} ({res['precision']}) | {res['seconds']:.1f} | {rows[0][2]['seconds'] / res['seconds']:.2f}x"
              f" | {res['peak_rss_mb']:.0f} | {share} | {worst:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
