"""DoDNet's dynamic head: one batched matrix product per layer for the whole batch (medvol)
vs a Python loop of per-sample convolutions and vs grouped convolutions (groups = batch).
Same outputs; prints the speed ratios.

    python benchmarks/dodnet_head.py [--device cuda] [--batch 8] [--size 64 96 96]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def per_sample_loop(features, params, widths):
    outs = []
    for s in range(features.shape[0]):
        x, p, o = features[s:s + 1], params[s], 0
        layers = list(zip(widths[:-1], widths[1:]))
        ws = []
        for cin, cout in layers:
            ws.append(p[o:o + cin * cout].reshape(cout, cin, 1, 1, 1))
            o += cin * cout
        for i, (_, cout) in enumerate(layers):
            x = F.conv3d(x, ws[i], p[o:o + cout])
            o += cout
            if i < len(layers) - 1:
                x = F.relu(x)
        outs.append(x)
    return torch.cat(outs)


def grouped_conv(features, params, widths):
    b, spatial = features.shape[0], features.shape[2:]
    x = features.reshape(1, b * widths[0], *spatial)
    layers = list(zip(widths[:-1], widths[1:]))
    o = sum(ci * co for ci, co in layers)
    w_off = 0
    for i, (cin, cout) in enumerate(layers):
        w = params[:, w_off:w_off + cin * cout].reshape(b * cout, cin, 1, 1, 1)
        x = F.conv3d(x, w, params[:, o:o + cout].reshape(-1), groups=b)
        w_off += cin * cout
        o += cout
        if i < len(layers) - 1:
            x = F.relu(x)
    return x.reshape(b, widths[-1], *spatial)


def compare(device: torch.device, batch: int, size, repeats: int = 10) -> dict:
    """Mean milliseconds per call of the three forms on ``batch`` x 8 x ``size`` features (head
    8 -> 8 -> 8 -> 2, after one warm-up call each) and their largest output difference."""
    from medvol.networks.dodnet import dynamic_head, head_param_count

    widths = (8, 8, 8, 2)
    feats = torch.randn(batch, 8, *size, device=device)
    params = torch.randn(batch, head_param_count(widths), device=device)

    def timed(fn):
        fn(feats, params, widths)  # warm up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn(feats, params, widths)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeats * 1e3, out

    with torch.no_grad():
        t_batched, y1 = timed(dynamic_head)
        t_loop, y2 = timed(per_sample_loop)
        t_group, y3 = timed(grouped_conv)
    diff = max(float((y1 - y2).abs().max()), float((y1 - y3).abs().max()))
    return {"batch": batch, "size": list(size), "batched_ms": t_batched, "loop_ms": t_loop, "grouped_ms": t_group,
            "max_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=3, default=[32, 64, 64])
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    r = compare(torch.device(a.device), a.batch, a.size, a.repeats)
    b = r["batched_ms"]
    print(f"device {a.device}, batch {a.batch}, features {a.size}: batched matmul {b:.2f} ms, "
          f"per-sample loop {r['loop_ms']:.2f} ms ({r['loop_ms'] / b:.2f}x), grouped conv {r['grouped_ms']:.2f} ms "
          f"({r['grouped_ms'] / b:.2f}x); max |difference| {r['max_diff']:.2e}")
    return 0 if r["max_diff"] < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
