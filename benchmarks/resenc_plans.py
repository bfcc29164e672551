"""medvol's plans vs nnU-Net v2's planners on the same fingerprints: every planner
(ExperimentPlanner, nnUNetPlannerResEncM/L/XL), the 3d_fullres and 2d configurations, patch
size, batch size and strides.

nnU-Net runs in a child process with its own python (``--nnunet-python``; its dependencies as
benchmarks/label_roundtrip.py's docstring installs them, or nnunetv2, dynamic-network-architectures,
batchgenerators and acvl-utils installed with ``pip install --no-deps --target DIR`` and
``PYTHONPATH=DIR``). The child writes the fingerprint and dataset.json into a temporary
nnUNet_raw / nnUNet_preprocessed and calls the planner's ``plan_experiment`` (its image reader is
stubbed: no image is read). The fingerprints: the demo data's (``medvol.datasets.brain``'s
default build, as tests/test_resenc.py holds it) and the two hand-made ones of that test.

    python benchmarks/resenc_plans.py --nnunet-python .venv-nnunet/bin/python

Prints one row per fingerprint, planner and configuration and exits 1 on any difference of a
ResEnc preset. The default planner's rows are for reference (they equal nnU-Net's since its VRAM
estimate counts one segmentation head, as nnU-Net's does: before, the "iso" 2d batch was 75
where nnU-Net's is 76).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_resenc import FINGERPRINTS  # noqa: E402

from medvol.preprocessing.planners import PLANNERS  # noqa: E402
from medvol.preprocessing.planning import plan_experiment  # noqa: E402

CHILD = r"""
import json, os, sys, tempfile
job = json.load(sys.stdin)
root = tempfile.mkdtemp()
for k in ("raw", "preprocessed", "results"):
    os.environ["nnUNet_" + k] = os.path.join(root, k)
name = "Dataset999_Reference"
os.makedirs(os.path.join(root, "raw", name, "imagesTr"))
os.makedirs(os.path.join(root, "raw", name, "labelsTr"))
os.makedirs(os.path.join(root, "preprocessed", name))
json.dump(job["dataset_json"], open(os.path.join(root, "raw", name, "dataset.json"), "w"))
json.dump(job["fingerprint"], open(os.path.join(root, "preprocessed", name, "dataset_fingerprint.json"), "w"))
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as r
cls = ExperimentPlanner if job["planner"] == "ExperimentPlanner" else getattr(r, job["planner"])
class _Reader: pass
cls.determine_reader_writer = lambda self: _Reader
plans = cls(name).plan_experiment()
out = {}
for c, cfg in plans["configurations"].items():
    if "patch_size" in cfg:
        out[c] = {"patch_size": [int(i) for i in cfg["patch_size"]], "batch_size": int(cfg["batch_size"]),
                  "strides": [[int(j) for j in i] for i in cfg["architecture"]["arch_kwargs"]["strides"]]}
print("JSON" + json.dumps({"transpose": plans["transpose_forward"], "configurations": out}))
"""


def nnunet_plans(python: str, fingerprint: dict, dataset_json: dict, planner: str) -> dict:
    rev = [2, 1, 0]  # medvol's X, Y, Z -> nnU-Net's (SimpleITK's) z, y, x
    fp = {"spacings": [list(np.asarray(s)[rev]) for s in fingerprint["spacings"]],
          "shapes_after_crop": [list(np.asarray(s)[rev]) for s in fingerprint["shapes_after_crop"]],
          "median_relative_size_after_cropping": fingerprint["median_relative_size_after_cropping"],
          "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"]}
    fp = json.loads(json.dumps(fp, default=float))
    job = {"fingerprint": fp, "dataset_json": {**dataset_json, "file_ending": ".nii.gz"}, "planner": planner}
    res = subprocess.run([python, "-c", CHILD], input=json.dumps(job), capture_output=True, text=True, check=True)
    line = [s for s in res.stdout.splitlines() if s.startswith("JSON")][-1]
    return json.loads(line[4:])


def medvol_rows(plans: dict) -> dict:
    """medvol's configurations in nnU-Net's planning axis order (transpose_forward of z, y, x)."""
    work = [[2, 1, 0][i] for i in plans["nnunet_transpose_forward"]]  # planning axis k -> medvol axis
    net = plans["network"]
    c2 = plans["configurations"]["2d"]
    in_plane = work[1:]
    pos2 = [c2["in_plane_axes"].index(a) for a in in_plane]
    return {"3d_fullres": {"patch_size": [plans["patch_size"][a] for a in work], "batch_size": plans["batch_size"],
                           "strides": [[s[a] for a in work] for s in net["strides"]]},
            "2d": {"patch_size": [c2["patch_size"][i] for i in pos2], "batch_size": c2["batch_size"],
                   "strides": [[s[i] for i in pos2] for s in c2["network"]["strides"]]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nnunet-python", required=True)
    a = p.parse_args(argv)
    bad = 0
    for name, (fp, dataset_json) in FINGERPRINTS.items():
        for planner in PLANNERS.values():
            ours = medvol_rows(plan_experiment(fp, dataset_json, planner=planner.name))
            theirs = nnunet_plans(a.nnunet_python, fp, dataset_json, planner.nnunet_class)["configurations"]
            for conf in ("3d_fullres", "2d"):
                same = ours[conf] == theirs.get(conf)
                bad += not same and planner.residual  # the default planner's 2d batch may differ: its docstring
                print(f"{name:12s} {planner.name:10s} {conf:10s} {'same' if same else 'DIFFERENT'}  "
                      f"medvol {ours[conf]}" + ("" if same else f"  nnU-Net {theirs.get(conf)}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
