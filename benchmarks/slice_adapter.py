"""SliceAdapter: batched slices against a per-slice Python loop (speed), and peak memory on a CT-sized volume.

    python benchmarks/slice_adapter.py                  # speed table, then the memory table (CPU)
    python benchmarks/slice_adapter.py --skip-memory    # speed table only
    python benchmarks/slice_adapter.py --skip-speed     # memory table only

Speed: one volume ``(1, 1, H, W, S)`` through a MONAI 2D ``BasicUNet`` (eval mode, 2 classes),
segmentation mode, under ``torch.inference_mode()``: a plain loop calling the model on one slice
at a time and writing each result into the output volume, against ``SliceAdapter`` with
``slice_batch`` 16 and 32. The variants run interleaved in the same process; the median of the
rounds is printed, and the largest difference between the loop's and the adapter's logits.

Memory: each configuration runs in its own child process on a synthetic 512 x 512 x S CT-like
volume (random HU-like values: only the sizes matter here) through the adapter; peak RSS is the
child's ``resource.getrusage`` maximum, reported over the child's current RSS (``/proc/self/status``)
once the model and the input exist.
Comparing S = 100 and 400 shows what grows with the slice count (the output logits); comparing
slice batches 16 and 32 shows what grows with the slice batch (the model's activations).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from medvol.networks.slice_adapter import SliceAdapter

CLASSES = 2


def _model(features: tuple[int, ...]) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=CLASSES, features=features).eval()


def per_slice_loop(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The baseline: the 2D model on one slice (last axis) at a time, written into a volume."""
    out = x.new_empty(x.shape[0], CLASSES, *x.shape[2:])
    for z in range(x.shape[-1]):
        out[..., z] = model(x[..., z])
    return out


def _timed(fn, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = fn(x)
    return time.perf_counter() - t0, y


def speed(args) -> None:
    model = _model(tuple(args.features))
    x = torch.randn(1, 1, args.size, args.size, args.slices)
    variants = {"per-slice loop": lambda v: per_slice_loop(model, v)}
    for sb in args.slice_batches:
        variants[f"SliceAdapter, slice_batch {sb}"] = SliceAdapter(model, axis=-1, slice_batch=sb)
    times = {name: [] for name in variants}
    diffs = {}
    for r in range(args.rounds + 1):  # round 0 warms up (oneDNN builds its primitives per batch shape)
        outs = {}
        for name, fn in variants.items():
            sec, outs[name] = _timed(fn, x)
            if r:
                times[name].append(sec)
        diffs = {name: float((y - outs["per-slice loop"]).abs().max()) for name, y in outs.items()}
    print(f"speed: BasicUNet 2D features {tuple(args.features)}, volume 1x1x{args.size}x{args.size}x{args.slices}, "
          f"{CLASSES} classes, torch threads {torch.get_num_threads()}, "
          f"median of {args.rounds} interleaved rounds after a warm-up round")
    base = statistics.median(times["per-slice loop"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:32s}: {args.slices / med:6.2f} slices/s ({med:.2f} s)  {base / med:.2f}x the loop  "
              f"max |diff| {diffs[name]:.1e}")


def _rss_mb() -> float:
    """Peak RSS of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def memory_child(args) -> dict:
    """One adapter run on a synthetic 512 x 512 x S volume; RSS figures in MB."""
    model = _model(tuple(args.memory_features))
    adapter = SliceAdapter(model, axis=-1, slice_batch=args.slice_batch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 512, 512, args.slices, generator=gen).mul_(300.0).add_(40.0).clamp_(-1000, 2000)
    x.sub_(40.0).div_(300.0)  # as after CT normalisation, in place: one copy of the input
    base = _current_rss_mb()
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = adapter(x)
    sec = time.perf_counter() - t0
    return {"slices": args.slices, "slice_batch": args.slice_batch, "seconds": sec, "base_mb": base,
            "peak_mb": _rss_mb(), "input_mb": x.nbytes / 2**20, "output_mb": y.nbytes / 2**20}


def memory(args) -> None:
    configs = [(100, 16), (400, 16), (100, 32)]
    rows = []
    for slices, sb in configs:
        cmd = [sys.executable, __file__, "--memory-child", "--slices", str(slices), "--slice-batch", str(sb),
               "--memory-features", *map(str, args.memory_features)]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:])
            raise SystemExit(1)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"memory: BasicUNet 2D features {tuple(args.memory_features)}, synthetic 512x512xS volume, {CLASSES} "
          f"classes, one child process per row; 'over base' = peak RSS - RSS once model and input exist")
    for r in rows:
        over = r["peak_mb"] - r["base_mb"]
        print(f"  S={r['slices']:3d} slice_batch={r['slice_batch']:2d}: input {r['input_mb']:5.0f} MB, output "
              f"{r['output_mb']:5.0f} MB, peak RSS {r['peak_mb']:5.0f} MB, over base {over:5.0f} MB, "
              f"over base - output {over - r['output_mb']:4.0f} MB ({r['slices'] / r['seconds']:.2f} slices/s)")
    a, b = rows[0], rows[1]
    grow = (b["peak_mb"] - a["peak_mb"]) / (b["input_mb"] + b["output_mb"] - a["input_mb"] - a["output_mb"])
    print(f"  S 100 -> 400: peak RSS grows {b['peak_mb'] - a['peak_mb']:.0f} MB = {grow:.2f}x the growth of "
          f"input + output ({b['input_mb'] + b['output_mb'] - a['input_mb'] - a['output_mb']:.0f} MB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="in-plane size of the speed volume")
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--features", type=int, nargs=6, default=[8, 8, 16, 32, 64, 8])
    ap.add_argument("--slice-batches", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-features", type=int, nargs=6, default=[4, 4, 8, 16, 32, 4])
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--slice-batch", type=int, default=16, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        print(json.dumps(memory_child(a)))
        return 0
    if not a.skip_speed:
        speed(a)
    if not a.skip_memory:
        memory(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
