"""Label round trip: medvol's cache -> restore_geometry vs nnU-Net v2's preprocess -> revert.

Each training label is preprocessed (crop to the nonzero box, resample to the plan's target
spacing) and mapped back to its own grid the way a prediction is: one-hot -> linear
resampling (nearest neighbour across a separate z axis) -> argmax -> un-crop. The per-class
Dice of the result against the raw label measures what the round trip loses.

- medvol: ``medvol preprocess`` (in this process), then ``load_case`` + ``restore_geometry``.
- nnU-Net: ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` and, in a child process with its own
  python, its cached segmentation fed as logits to
  ``convert_predicted_logits_to_segmentation_with_correct_shape`` (the export path of its
  predictor), compared with the label as its own reader loads it.

Needs nnunetv2 in its own virtual environment. Its dependencies pull a CUDA torch and
torchvision; the resampling and export path needs neither, so install it without them:

    python3 -m venv .venv-nnunet && .venv-nnunet/bin/pip install torch==2.13.0
    .venv-nnunet/bin/pip install --no-deps nnunetv2==2.8.1 batchgenerators acvl-utils==0.2.6 \
        dynamic-network-architectures==0.4.4
    .venv-nnunet/bin/pip install scikit-image simpleitk scipy numpy pandas tqdm blosc2 nibabel

Data, built by ``medvol.datasets.brain`` from the MNI152 2009a template (nothing downloaded):
real brain-tissue cases (background / grey / white matter), an isotropic dataset and a
thick-slice one, each with cases finer and coarser than the dataset's target spacing; and small
structures, five Harvard-Oxford cortical regions (the atlas in the nimare wheel) within the
template's grey matter, ribbons 2-4 mm thick, in cases stored RAS, LAS and LPS at 0.7 mm (finer
than the 0.9 mm target), 0.9, 1.0 and 1.3 mm.

    python benchmarks/label_roundtrip.py --nnunet-venv .venv-nnunet [--json out.json] [--only NAME ...]

It prints one table per dataset (the figures in benchmarks/RESULTS.md) and exits 1 when medvol
keeps less of any class than nnU-Net on any case, beyond ``TIE_NOISE``. About 7 minutes for the
two tissue datasets on an idle 2-core machine; the small structures took 14 more on a busy one
(nnU-Net's preprocessing 8 of them); ``--keep DIR --reuse`` reruns medvol's side against
nnU-Net's results already in DIR (2-6 minutes per dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Where two labels tie exactly (0.5 / 0.5), nnU-Net's float64 rounding (~1e-14) decides and
# medvol gives the voxel to the nearest one: a dozen voxels of a million-voxel case may go either
# way, ~1e-6 of Dice. Below this the round trip counts as losing to nnU-Net's.
TIE_NOISE = 1e-5

NNUNET_REVERT = r"""
import json, pickle, sys
from pathlib import Path
import blosc2, numpy as np, torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

torch.set_num_threads(1)
pre, raw = Path(sys.argv[1]), Path(sys.argv[2])
pm = PlansManager(json.loads((pre / "nnUNetPlans.json").read_text()))
cm = pm.get_configuration("3d_fullres")
lm = pm.get_label_manager(json.loads((raw / "dataset.json").read_text()))
out = {"spacing": list(cm.spacing), "transpose_forward": list(pm.transpose_forward), "cases": {}}
for pkl in sorted((pre / "nnUNetPlans_3d_fullres").glob("*.pkl")):
    case = pkl.stem
    props = pickle.loads(pkl.read_bytes())
    seg = blosc2.open(str(pkl.with_name(case + "_seg.b2nd")), mode="r")[:][0]
    seg = np.clip(seg, 0, None)
    onehot = torch.from_numpy(np.stack([seg == c for c in range(len(lm.all_labels))]).astype(np.float32))
    back = convert_predicted_logits_to_segmentation_with_correct_shape(onehot, pm, cm, lm, props,
                                                                       num_threads_torch=1)
    ref, _ = SimpleITKIO().read_seg(str(raw / "labelsTr" / (case + ".nii.gz")))
    ref = ref[0]
    assert back.shape == ref.shape, (case, back.shape, ref.shape)
    dice = {}
    for c in lm.foreground_labels:
        a, b = back == c, ref == c
        dice[str(c)] = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    out["cases"][case] = {"dice": dice, "shape_after_resampling": list(seg.shape)}
print(json.dumps(out))
"""


def datasets():
    """(name, acquisitions, labels): each set's median spacing is its target. Cases finer and coarser
    than it, by odd ratios and by exactly 2 (where every sample point of the coarser grid lies
    midway between voxels of the finer one: label ties); the finest ones with a cropped field
    of view to stay within the 2-core machine's time."""
    from medvol.datasets.brain import Acquisition

    iso = [Acquisition((0.475, 0.475, 0.475), crop=(0.35, 0.35, 0.35), noise=0.02, seed=0),
           Acquisition((0.7, 0.7, 0.7), noise=0.02, seed=1),
           Acquisition((0.95, 0.95, 0.95), flip=(0, 1), seed=2),
           Acquisition((0.95, 0.95, 0.95), oblique_deg=10.0, seed=3),
           Acquisition((1.3, 1.3, 1.3), noise=0.02, seed=4),
           Acquisition((1.9, 1.9, 1.9), flip=(2,), seed=5)]
    thick = [Acquisition((0.45, 0.45, 2.0), crop=(0.3, 0.3, 0.0), noise=0.02, seed=0),
             Acquisition((0.7, 0.7, 3.0), noise=0.02, seed=1),
             Acquisition((0.9, 0.9, 4.0), flip=(0, 1), seed=2),
             Acquisition((0.9, 0.9, 4.0), seed=3),
             Acquisition((1.2, 1.2, 5.5), noise=0.02, seed=4),
             Acquisition((1.8, 1.8, 8.0), seed=5)]
    # small structures: five gyral regions, stored RAS, LAS and LPS, finer and coarser than the target
    gyri = [Acquisition((0.7, 0.7, 0.7), noise=0.02, seed=1),
            Acquisition((0.7, 0.7, 0.7), flip=(0,), seed=2),  # LAS
            Acquisition((0.7, 0.7, 0.7), flip=(0, 1), noise=0.02, seed=3),  # LPS
            Acquisition((0.9, 0.9, 0.9), seed=4),
            Acquisition((1.0, 1.0, 1.0), flip=(0,), seed=5),  # LAS
            Acquisition((1.0, 1.0, 1.0), flip=(0, 1), noise=0.02, seed=6),  # LPS
            Acquisition((1.3, 1.3, 1.3), flip=(0,), seed=7)]  # LAS
    return [("Dataset101_RoundTripIso", iso, "tissue"), ("Dataset102_RoundTripThick", thick, "tissue"),
            ("Dataset103_RoundTripGyri", gyri, "gyri")]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def medvol_roundtrip(raw: Path, pre: Path) -> dict:
    from nibabel.orientations import aff2axcodes

    from medvol.inference import restore_geometry
    from medvol.io import read_volume
    from medvol.preprocessing import list_cases, load_case, load_plans, preprocess_dataset

    t = time.perf_counter()
    report = preprocess_dataset(raw, pre, num_workers=2, quiet=True)
    if report.failures:
        raise SystemExit(f"medvol preprocess failed: {report.failures}")
    seconds = time.perf_counter() - t
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    n = max(labels.values()) + 1
    cases = {}
    for case in list_cases(pre):
        _, seg, props = load_case(pre, case)
        lab = np.clip(np.asarray(seg[0]), 0, None)
        onehot = np.stack([lab == c for c in range(n)]).astype(np.float16)
        back = restore_geometry(onehot, props).argmax(0)
        ref = np.asarray(read_volume(raw / "labelsTr" / f"{case}.nii.gz").array)
        cases[case] = {"dice": {str(c): dice(back == c, ref == c) for c in range(1, n)},
                       "stored": "".join(aff2axcodes(props["original_affine"])),
                       "spacing": props["original_spacing"], "shape_after_crop": props["shape_after_crop"],
                       "shape_after_resampling": list(seg.shape[1:])}
    return {"spacing": load_plans(pre)["target_spacing"], "seconds": seconds, "cases": cases}


def _run(cmd: list[str], env: dict) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return res.stdout


def nnunet_roundtrip(raw: Path, work: Path, venv: Path, reuse: bool = False) -> dict:
    ident = int(raw.name[len("Dataset"):len("Dataset") + 3])
    env = dict(os.environ, nnUNet_raw=str(raw.parent), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"), nnUNet_compile="f")
    t = time.perf_counter()
    if not (reuse and (work / "nnUNet_preprocessed" / raw.name / "nnUNetPlans_3d_fullres").is_dir()):
        _run([str(venv / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(ident), "-c", "3d_fullres",
              "-np", "2", "-npfp", "2"], env)
    seconds = time.perf_counter() - t
    res = _run([str(venv / "bin" / "python"), "-c", NNUNET_REVERT, str(work / "nnUNet_preprocessed" / raw.name),
                str(raw)], env)
    out = json.loads(res.strip().splitlines()[-1])
    tf = out["transpose_forward"]  # nnU-Net's spacing is in transposed SimpleITK (z, y, x) order
    zyx = [out["spacing"][tf.index(i)] for i in range(3)]
    out["spacing"] = zyx[::-1]
    out["seconds"] = seconds
    return out


def table(name: str, mv: dict, nn: dict, labels: dict) -> list[str]:
    target = np.asarray(mv["spacing"])
    classes = {str(v): k for k, v in labels.items() if v}
    rows = [f"### {name}: target spacing medvol {np.round(target, 4).tolist()} mm, "
            f"nnU-Net {np.round(nn['spacing'], 4).tolist()} mm", "",
            "| case | stored | spacing (mm) | spacing / target | crop -> resampled shape | "
            + " | ".join(f"{n} Dice medvol / nnU-Net" for n in classes.values()) + " | min medvol - nnU-Net |",
            "|---" * (6 + len(classes)) + "|"]
    for case, m in mv["cases"].items():
        n = nn["cases"][case]
        ratio = "/".join(f"{r:.2f}" for r in np.asarray(m["spacing"]) / target)
        shapes = f"{m['shape_after_crop']} -> {m['shape_after_resampling']}"
        cells = [f"{m['dice'][c]:.5f} / {n['dice'][c]:.5f}" for c in classes]
        delta = min(m["dice"][c] - n["dice"][c] for c in m["dice"])
        rows.append(f"| {case} | {m['stored']} | {np.round(m['spacing'], 3).tolist()} | {ratio} | {shapes} | "
                    + " | ".join(cells) + f" | {delta:+.1e} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnunet-venv", type=Path, default=Path(".venv-nnunet"))
    ap.add_argument("--keep", type=Path, help="work in (and keep) this folder")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--reuse", action="store_true", help="with --keep: reuse the raw data and nnU-Net's "
                                                          "preprocessing found there (medvol's is always redone)")
    ap.add_argument("--only", nargs="+", help="run only these datasets (e.g. Dataset103_RoundTripGyri)")
    a = ap.parse_args()
    if not (a.nnunet_venv / "bin" / "nnUNetv2_plan_and_preprocess").exists():
        print(f"nnunetv2 not found in {a.nnunet_venv}: see this script's docstring", file=sys.stderr)
        return 2
    import torch

    from medvol.datasets.brain import build_brain_dataset

    torch.set_num_threads(1)
    work = Path(a.keep or tempfile.mkdtemp(prefix="mv_roundtrip_")).resolve()
    results, worst = {}, []
    for name, acqs, labels in datasets():
        if a.only and name not in a.only:
            continue
        raw = work / "nnUNet_raw" / name
        if not (a.reuse and (raw / "dataset.json").exists()):
            build_brain_dataset(raw, n_train=len(acqs), n_test=0, acquisitions=acqs, name=name, labels=labels)
        shutil.rmtree(work / f"medvol_{name}", ignore_errors=True)
        mv = medvol_roundtrip(raw, work / f"medvol_{name}")
        nn = nnunet_roundtrip(raw, work, a.nnunet_venv.resolve(), a.reuse)
        results[name] = {"medvol": mv, "nnunet": nn}
        names = json.loads((raw / "dataset.json").read_text())["labels"]
        print("\n".join(table(name, mv, nn, names)) + "\n", flush=True)
        for case, m in mv["cases"].items():
            worst += [m["dice"][c] - nn["cases"][case]["dice"][c] for c in m["dice"]]
    print(f"medvol - nnU-Net per-class Dice: min {min(worst):+.2e}, max {max(worst):+.2e} "
          f"(bar: >= -{TIE_NOISE:.0e})")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0 if min(worst) >= -TIE_NOISE else 1


if __name__ == "__main__":
    sys.exit(main())
