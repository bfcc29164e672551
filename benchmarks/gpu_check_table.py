"""The one table of ``gpu_check.py``: a markdown row per figure, from the report it writes as JSON."""

from __future__ import annotations


def _gb(x) -> str:
    return "-" if x is None else f"{x:.1f} GB"


def _bad(row: dict) -> str | None:
    """The error text of a measurement that failed, else None."""
    return str(row["error"])[:160] if "error" in row else None


def _status(row: dict) -> str:
    return "ok" if row.get("ok") else "FAIL"


def prepare_rows(r: dict) -> list[tuple]:
    return [("0 prepare", f"{r['cases']} synthetic CTs {r['shape']}", f"plan: patch {r['patch']} x {r['batch']} "
             f"for {r['gpu_memory_gb']:g} GB; {r['seconds']:.0f} s", _status(r))]


def tests_rows(r: dict) -> list[tuple]:
    failures = "; ".join(r.get("failures", []))[:200]
    return [("1 tests", r["command"], r["summary"] + (f" ({failures})" if failures else ""), _status(r))]


def train_rows(r: dict) -> list[tuple]:
    rows, fp32 = [], r["rows"].get("fp32", {}).get("steps_per_s")
    for name, x in r["rows"].items():
        if _bad(x):
            rows.append(("2 train", name, _bad(x), "FAIL"))
            continue
        speed = f"{x['steps_per_s']:.2f} steps/s" + (f" ({x['steps_per_s'] / fp32:.2f}x fp32)" if fp32 else "")
        mem = (f", peak {_gb(x['peak_gpu_gb'])} = {x['peak_gpu_gb'] / x['plan_gpu_memory_gb']:.2f}x the plan's "
               f"{x['plan_gpu_memory_gb']:g} GB" if x["peak_gpu_gb"] is not None else "")
        scale = f", scaler {x['scaler_scale']:g}" if x.get("scaler_scale") else ""
        rows.append(("2 train", f"{name}, patch {x['patch']} x {x['batch']}", speed + mem + scale, "ok"))
    return rows


def resume_rows(r: dict) -> list[tuple]:
    rows = []
    for name, x in r["rows"].items():
        if _bad(x):
            rows.append(("3 resume", name, _bad(x), "FAIL"))
            continue
        rows.append(("3 resume", f"{name}: stop at {x['stop_at']} of {x['steps']}, --resume",
                     f"max loss difference {x['max_loss_diff']:.2e} (relative {x['max_loss_rel_diff']:.1e}, gate "
                     f"{x['rel_gate']:g}), weights {x['max_weight_diff']:.1e}; bit-exact: "
                     f"{'yes' if x['bit_exact'] else 'no'}", _status(x)))
    if r.get("nondeterministic_ops"):
        rows.append(("3 resume", "ops without a deterministic kernel", "; ".join(r["nondeterministic_ops"])[:300],
                     "note"))
    return rows


def predict_rows(r: dict) -> list[tuple]:
    rows = []
    for name, x in r["rows"].items():
        if _bad(x):
            rows.append(("4 predict", name, _bad(x), "FAIL"))
            continue
        dice = f", min Dice vs fp32 {x['min_dice_vs_fp32']:.4f}" if "min_dice_vs_fp32" in x else ""
        dice += " (not gated: untrained dry-run model)" if x.get("gated") is False else ""
        speed = f"{x['voxels_per_s'] / 1e6:.2f} Mvox/s ({x['seconds']:.1f} s)"
        rows.append(("4 predict", f"{name}, {r['shape']}", f"{speed}{dice}, peak {_gb(x['peak_gpu_gb'])}", _status(x)))
    val = r.get("model_val_dice")
    rows.append(("4 predict", f"the model: quickstart after {r['train_steps']} steps", "validation Dice "
                 f"{'-' if val is None else f'{val:.3f}'}; auto = {r['auto']['precision']}", "note"))
    rows.append(("4 predict", "nnU-Net v2 nnUNetPredictor", r["nnunet"], "not run"))
    return rows


def head_rows(r: dict) -> list[tuple]:
    rows = []
    for h in r["heads"]:
        if _bad(h):
            rows.append(("5 head", "DoDNet head", _bad(h), "FAIL"))
            continue
        b = h["batched_ms"]
        rows.append(("5 head", f"DoDNet head, batch {h['batch']}, 8 x {'x'.join(map(str, h['size']))} features",
                     f"batched {b:.2f} ms, loop {h['loop_ms']:.2f} ms ({h['loop_ms'] / b:.2f}x), grouped "
                     f"{h['grouped_ms']:.2f} ms ({h['grouped_ms'] / b:.2f}x); max diff {h['max_diff']:.1e}",
                     "ok" if h["max_diff"] < 1e-3 else "FAIL"))
    loader = r.get("loader", {})
    if _bad(loader):
        return rows + [("5 loader", "loader", _bad(loader), "FAIL")]
    for w, x in loader.get("workers", {}).items():
        rows.append(("5 loader", f"{w} worker(s)", f"{x['patches_per_s']:.1f} patches/s = {x['x_model']:.1f}x the "
                     f"model's {loader['model_patches_per_s']:.1f} (auto)", "ok" if x["x_model"] >= 1 else "slower"))
    return rows


def ddp_rows(r: dict) -> list[tuple]:
    rows = []
    for key, what in (("nproc1", "medvol train --nproc 1"), ("group_of_one", "process group of one (DDP)"),
                      ("nproc2", "medvol train --nproc 2")):
        x = r.get(key, {})
        if _bad(x) or "returncode" in x:
            rows.append(("6 ddp", what, _bad(x) or f"exit {x['returncode']}", "FAIL"))
        elif "skipped" in x:
            rows.append(("6 ddp", what, f"not run: {x['skipped']}", "not run"))
        elif key == "group_of_one":
            rows.append(("6 ddp", what, f"{x['backend']}{' ' + x['nccl'] if x.get('nccl') else ''}, DDP wrapped: "
                         f"{x['ddp_wrapped']}, {x['steps']} steps in {x['seconds']:.1f} s", _status(x)))
        elif x:
            rows.append(("6 ddp", what, f"world size {x['world_size']} on {x['device']} ({x['precision']}), "
                         f"{x['seconds']:.1f} s with start-up", _status(x)))
    return rows


ROWS = {"prepare": prepare_rows, "tests": tests_rows, "train": train_rows, "predict": predict_rows,
        "resume": resume_rows, "head": head_rows, "ddp": ddp_rows}


def step_rows(name: str, rec: dict) -> list[tuple]:
    """The rows of one step; a step that failed before its first figure gets its error."""
    try:
        rows = ROWS[name](rec["result"]) if rec["result"] else []
    except (KeyError, TypeError, ZeroDivisionError) as e:  # a partial result (cut off mid-step)
        rows = [(name, "partial result", f"{type(e).__name__}: {e}", rec["status"])]
    if rec["status"] != "ok":
        tail = [ln for ln in rec.get("stderr_tail", "").splitlines() if ln.strip()]
        rows.append((name, f"step {rec['status']} after {rec['seconds']} s (cap {rec['cap_s']} s)",
                     (tail[-1] if tail else "")[:200], rec["status"].upper()))
    return rows


def print_table(report: dict) -> None:
    env = report["environment"]
    device = ", ".join(env["gpus"]) or "CPU (dry run)"
    print(f"\nmedvol GPU check on {device}: torch {env['torch']} (CUDA {env['cuda']}), python {env['python']}, "
          f"{env['cpus']} CPUs; {report['elapsed_s']} s of a {report['budget_s']:g} s budget")
    print("| step | what | figure | status |")
    print("|---|---|---|---|")
    for name, rec in report["steps"].items():
        for row in step_rows(name, rec):
            print("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
