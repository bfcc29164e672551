"""medvol preprocess vs nnUNetv2_plan_and_preprocess on the same raw dataset.

Installs nothing. Needs nnunetv2 in its own virtual environment (it pulls torchvision and a
CUDA torch, so it must not share medvol's): ``python3 -m venv .venv-nnunet &&
.venv-nnunet/bin/pip install torch==2.14.1 nnunetv2==2.8.1``. Point ``--nnunet-venv`` at it.

Both tools run as child processes of this script (import time included) on the same
folder; it prints wall-clock time, peak memory of each process tree, their ratio, and the
agreement of the results: plans (spacing, patch), per-case shapes after crop + resample,
per-class Dice of the resampled label maps and Pearson r of the normalised images.

    python benchmarks/preprocess_vs_nnunet.py --spacing 2 --cases 8
    python benchmarks/preprocess_vs_nnunet.py --spacing 1 --cases 6 --aniso
    python benchmarks/preprocess_vs_nnunet.py --ct --cases 3        # 512 x 512 x 300 CT cases
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proctree import run_measured  # noqa: E402

READ_NNUNET = r"""
import sys, json, pickle, numpy as np, blosc2
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
plans = json.load(open(src.parent / "nnUNetPlans.json"))
for f in sorted(src.glob("*.pkl")):
    case = f.stem
    d = blosc2.open(str(src / f"{case}.b2nd"), mode="r")[:]
    s = blosc2.open(str(src / f"{case}_seg.b2nd"), mode="r")[:]
    np.save(dst / f"{case}.npy", d); np.save(dst / f"{case}_seg.npy", s)
json.dump(plans, open(dst / "plans.json", "w"))
"""


def build_dataset(root: Path, spacing: float, cases: int, aniso: bool) -> Path:
    from medvol.datasets.brain import Acquisition, build_brain_dataset, default_acquisitions

    ds = root / "Dataset001_BrainTissue"
    if aniso:  # thick-slice acquisitions: exercises the anisotropic target spacing and separate-z
        acqs = [Acquisition((spacing * 0.9, spacing * 0.9, spacing * 4.0), seed=i, noise=0.02,
                            flip=((0, 1),)[0] if i % 3 == 1 else ()) for i in range(cases)]
        acqs[0] = Acquisition((spacing, spacing, spacing * 4.5))
    else:
        acqs = default_acquisitions(cases, spacing)
    build_brain_dataset(ds, n_train=cases, n_test=0, acquisitions=acqs)
    return ds


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def compare(medvol_out: Path, nn_npy: Path) -> dict:
    from medvol.preprocessing import list_cases, load_case, load_plans

    plans = load_plans(medvol_out)
    nn_plans = json.loads((nn_npy / "plans.json").read_text())
    cfg = nn_plans["configurations"]["3d_fullres"]
    tf = nn_plans["transpose_forward"]
    tb = [tf.index(i) for i in range(3)]

    def nn_to_xyz(a):  # (C, transposed zyx) -> (C, x, y, z)
        a = a.transpose([0] + [i + 1 for i in tb])
        return a.transpose(0, 3, 2, 1)

    nn_spacing_zyx = np.array(cfg["spacing"])[tb]
    nn_patch_zyx = np.array(cfg["patch_size"])[tb]
    rows = []
    for case in list_cases(medvol_out):
        img, seg, _ = load_case(medvol_out, case)
        nimg = nn_to_xyz(np.load(nn_npy / f"{case}.npy"))
        nseg = nn_to_xyz(np.load(nn_npy / f"{case}_seg.npy"))
        row = {"case": case, "shape_medvol": list(img.shape[1:]), "shape_nnunet": list(nimg.shape[1:])}
        if img.shape == nimg.shape:
            a, b = np.asarray(img, np.float64).ravel(), nimg.astype(np.float64).ravel()
            row["pearson_r"] = float(np.corrcoef(a, b)[0, 1])
            row["dice"] = {int(c): dice(seg[0] == c, nseg[0] == c) for c in np.unique(nseg) if c > 0}
        rows.append(row)
    return {
        "target_spacing_medvol": plans["target_spacing"], "target_spacing_nnunet": nn_spacing_zyx[::-1].tolist(),
        "patch_medvol": plans["patch_size"], "patch_nnunet": nn_patch_zyx[::-1].tolist(),
        "batch_medvol": plans["batch_size"], "batch_nnunet": cfg["batch_size"],
        "plan_2d_medvol": _plan_2d_medvol(plans), "plan_2d_nnunet": nnunet_2d_in_xyz(nn_plans),
        "cases": rows,
    }


def _plan_2d_medvol(plans: dict) -> dict:
    c2 = plans["configurations"]["2d"]
    return {"slice_axis": c2["slice_axis"], "spacing": c2["spacing"], "patch_size": c2["patch_size"],
            "batch_size": c2["batch_size"], "strides": c2["network"]["strides"]}


def nnunet_2d_in_xyz(nn_plans: dict) -> dict:
    """nnU-Net's 2d configuration in medvol's terms: its two axes are transposed axes 1, 2 =
    SimpleITK (z, y, x) axes tf[1], tf[2] = medvol axes 2 - tf[1], 2 - tf[2]; listed in X, Y, Z order."""
    c2, tf = nn_plans["configurations"]["2d"], nn_plans["transpose_forward"]
    xyz = [2 - tf[1], 2 - tf[2]]
    order = np.argsort(xyz)

    def to_xyz(v):
        return [v[i] for i in order]

    strides = c2["architecture"]["arch_kwargs"]["strides"]
    return {"slice_axis": 2 - tf[0], "spacing": to_xyz(c2["spacing"]), "patch_size": to_xyz(c2["patch_size"]),
            "batch_size": c2["batch_size"], "strides": [to_xyz(s) for s in strides]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnunet-venv", type=Path, default=Path(".venv-nnunet"))
    ap.add_argument("--raw", type=Path, help="an existing nnU-Net v2 raw dataset folder (DatasetXXX_Name)")
    ap.add_argument("--spacing", type=float, default=2.0, help="base spacing of the built brain dataset (mm)")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--aniso", action="store_true", help="thick-slice (4x) acquisitions")
    ap.add_argument("--ct", action="store_true", help="512 x 512 x --slices CT cases (medvol.datasets.ct)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="medvol runs (the median is compared; memory: the max)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", type=Path, help="keep the work folder here")
    a = ap.parse_args()

    nn_bin = a.nnunet_venv / "bin"
    if not (nn_bin / "nnUNetv2_plan_and_preprocess").exists():
        print(f"nnunetv2 not found in {a.nnunet_venv}: see this script's docstring", file=sys.stderr)
        return 2
    work = Path(a.keep or tempfile.mkdtemp(prefix="mv_bench_"))
    raw_root = work / "nnUNet_raw"
    if a.raw:
        raw = raw_root / a.raw.name
        if not raw.exists():
            shutil.copytree(a.raw, raw)
    elif a.ct:
        from medvol.datasets.ct import build_ct_dataset

        raw = raw_root / "Dataset002_HeadCT"
        if not (raw / "dataset.json").exists():
            build_ct_dataset(raw, a.cases, a.slices)
    else:
        raw = build_dataset(raw_root, a.spacing, a.cases, a.aniso)
    dataset_id = int(raw.name[len("Dataset"):len("Dataset") + 3])
    mv_out, nn_pre = work / "medvol_pre", work / "nnUNet_preprocessed"
    shutil.rmtree(mv_out, ignore_errors=True)
    shutil.rmtree(nn_pre, ignore_errors=True)
    medvol_bin = Path(sys.executable).parent / "medvol"

    runs = []
    for _ in range(a.repeat):  # a VM's page-fault cost swings run to run: the median of a few
        shutil.rmtree(mv_out, ignore_errors=True)
        runs.append(run_measured([str(medvol_bin), "preprocess", str(raw), "-o", str(mv_out), "-j", str(a.workers),
                                  "--quiet"]))
        if runs[-1]["returncode"]:
            print(runs[-1]["output"])
            return 1
    mv = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    mv_seconds = [round(r["seconds"], 2) for r in runs]
    mv["peak_rss"] = max(r["peak_rss"] for r in runs)
    env = {"nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(nn_pre), "nnUNet_results": str(work / "res"),
           "nnUNet_compile": "f"}
    nn = run_measured([str(nn_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
                       "-np", str(a.workers)], env=env)
    if nn["returncode"]:
        print(nn["output"])
        return 1
    nn_npy = work / "nnunet_npy"
    conv = run_measured([str(nn_bin / "python"), "-c", READ_NNUNET,
                         str(nn_pre / raw.name / "nnUNetPlans_3d_fullres"), str(nn_npy)])
    if conv["returncode"]:
        print(conv["output"])
        return 1
    res = compare(mv_out, nn_npy)
    res.update({"dataset": str(raw), "workers": a.workers, "medvol_seconds": mv["seconds"],
                "nnunet_seconds": nn["seconds"], "speedup": nn["seconds"] / mv["seconds"],
                "medvol_peak_rss_mb": mv["peak_rss"] / 2**20, "nnunet_peak_rss_mb": nn["peak_rss"] / 2**20})
    kind = ("CT, 512 x 512 x slices" if a.ct
            else f"{'anisotropic' if a.aniso else 'varied'}, base spacing {a.spacing} mm")
    print(f"dataset: {raw.name}, {len(res['cases'])} cases ({kind})")
    print(f"target spacing  medvol {np.round(res['target_spacing_medvol'], 4).tolist()}  "
          f"nnU-Net {np.round(res['target_spacing_nnunet'], 4).tolist()}")
    print(f"patch / batch   medvol {res['patch_medvol']} / {res['batch_medvol']}  "
          f"nnU-Net {res['patch_nnunet']} / {res['batch_nnunet']}")
    print(f"2d plan         medvol {res['plan_2d_medvol']}\n                nnU-Net {res['plan_2d_nnunet']}")
    for r in res["cases"]:
        dice_txt = " ".join(f"{k}:{v:.4f}" for k, v in r.get("dice", {}).items())
        print(f"  {r['case']}: shape {r['shape_medvol']} vs {r['shape_nnunet']}  "
              f"r={r.get('pearson_r', float('nan')):.5f}  dice {dice_txt}")
    ok_shapes = all(r["shape_medvol"] == r["shape_nnunet"] for r in res["cases"])
    min_r = min(r.get("pearson_r", 0) for r in res["cases"])
    min_dice = min(min(r["dice"].values()) for r in res["cases"] if r.get("dice"))
    sp_err = float(np.max(np.abs(np.subtract(res["target_spacing_medvol"], res["target_spacing_nnunet"]))))
    print(f"agreement: shapes identical {ok_shapes}, spacing max |diff| {sp_err:.2e} mm, "
          f"min Pearson r {min_r:.5f}, min per-class Dice {min_dice:.4f}")
    print(f"wall clock: medvol {mv['seconds']:.1f} s (median of {mv_seconds}), nnU-Net {nn['seconds']:.1f} s "
          f"-> medvol {res['speedup']:.2f}x faster")
    print(f"peak memory (process tree): medvol {res['medvol_peak_rss_mb']:.0f} MB, "
          f"nnU-Net {res['nnunet_peak_rss_mb']:.0f} MB ({res['medvol_peak_rss_mb'] / res['nnunet_peak_rss_mb']:.2f}x)")
    res.update({"medvol_runs_seconds": mv_seconds, "shapes_identical": ok_shapes, "min_pearson_r": min_r,
                "min_dice": min_dice, "spacing_max_diff": sp_err})
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
