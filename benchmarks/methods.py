"""Each method beside the baseline it exists to beat, on real data, same cases, steps and scoring.

    python benchmarks/methods.py --method infnet --seeds 0 1 2 --out bench_methods
    python benchmarks/methods.py --all --seeds 0 --jobs 2   # the whole table, one seed, both cores
    python benchmarks/methods.py --method ugpcl --toy            # seconds: the harness end to end

For every comparison: one real dataset (``DATASETS``: built from the real volumes the wheels
ship, preprocessed once into ``OUT/data/<name>``), the method and its baseline trained with the
same labelled cases (``data.labelled``: the first k labelled training cases, at each labelled
budget), the same steps and seed, no validation split (every labelled case trains); then each
run's last checkpoint predicts the held-out scans from their raw files in their own geometry
and ``medvol evaluate``'s scoring gives Dice and HD95 per class. Writes ``OUT/methods.json``
(every run), ``OUT/methods.md`` (mean and min-max over seeds, method minus baseline, the wall
minutes of both arms per seed) and, per comparison, ``OUT/<method>.png`` (Dice against the
labelled budget, method and baseline as two lines). ``--budget-minutes`` stops starting runs
once spent (what ran is still reported). ``--jobs N`` runs N at once, each its own process on
one thread (log in ``OUT/jobs/``), the dearest first (``Arm.minutes``): an arm at one seed and
budget (an arm that pretrains: at every budget, pretrained once), or a whole comparison scored
elsewhere. The rows and table are those one process gives; a failed run is named and the exit
status is 1. ``--all`` runs the comparisons README's figures rest on, one or two per method; the
screens and studies (Inf-Net at other sizes, without the augmentation or on whole bone slices,
UGPCL with its unlabelled terms off, CANet with the published-width discriminator) run by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

TOY = ["trainer.steps=2", "trainer.log_every=1"]


@dataclass(frozen=True)
class Arm:
    label: str
    recipe: str
    sets: tuple[str, ...] = ()
    pretrain: str | None = None  # a self-supervised recipe run first on the same cache; init_from its encoder.pt
    sets_for: Callable[[int, int], tuple[str, ...]] | None = None  # more overrides, of (labelled budget, steps)
    minutes: float = 2.0  # about what one seed at one budget takes on one idle thread: --jobs starts dear runs first


@dataclass(frozen=True)
class Comparison:
    method: str
    dataset: str
    arm: Arm
    baseline: Arm
    budgets: tuple[int, ...]
    steps: int
    note: str = ""
    partial: bool = False  # DoDNet: one network over partial datasets (steps x datasets) vs one per dataset
    study: bool = False  # a screen or one setting studied (size, augmentation, a term off): not in --all


@dataclass
class Data:
    pre: Path
    images: Path
    labels: Path


def _ct_slices(root: Path, toy: bool, target: str) -> Path:
    """Real head-CT slices (pydicom-data's CT, 128 x 128) in COVID-SemiSeg's layout."""
    from medvol.datasets.covid_semiseg import convert_covid_semiseg
    from medvol.datasets.ct_slices import write_ct_semiseg_layout

    n = (4, 4, 2) if toy else (24, 48, 16)
    src = write_ct_semiseg_layout(root / "src", n_labelled=n[0], n_unlabelled=n[1], n_test=n[2], target=target)
    return convert_covid_semiseg(src / "train", root / "raw", src / "unlabelled", src / "test", label_name=target)


def _brain(root: Path, toy: bool, binary: str | None = None) -> Path:
    """MNI152 T1 scans (nilearn) at 3 mm through varied acquisitions; two held out."""
    from medvol.datasets.brain import build_brain_dataset

    return build_brain_dataset(root / "raw", n_train=4 if toy else 6, n_test=2, base_spacing=4.0 if toy else 3.0,
                               binary=binary)


def _brain_partial(root: Path, toy: bool) -> Path:
    from medvol.datasets.brain import build_brain_partial_dataset

    return build_brain_partial_dataset(root / "raw", n_train=4 if toy else 8, n_test=2,
                                       base_spacing=4.0 if toy else 3.0)


DATASETS = {
    "ct_bone": lambda root, toy: _ct_slices(root, toy, "bone"),
    "ct_brain": lambda root, toy: _ct_slices(root, toy, "brain"),
    "brain_tissue": _brain,
    "brain_wm": lambda root, toy: _brain(root, toy, binary="white_matter"),
    "brain_partial": _brain_partial,
}

# Inf-Net at CPU scale: 1/4 width, no ImageNet backbone (none ships), so Adam 1e-3 (1e-4 is the
# published fine-tuning rate of a pretrained backbone), the one x0.1 decay three quarters in.
INFNET_CPU = ("model.options.width_mult=0.25", "model.options.rfb_channels=16", "data.num_workers=0",
              "data.batch_size=8", "data.patch_size=[128,128]", "optimizer.lr=1e-3", "schedule.milestones=[225]",
              "model.options.input_scale=2.0")
Q2D_CPU = ("model.base_features=8", "data.batch_size=8")
UNET_2D = Arm("quickstart_2d", "quickstart_2d", Q2D_CPU)  # the 2D baseline of the Inf-Net comparisons
UNET_2D_PLAN = Arm("quickstart_2d", "quickstart_2d", ("model.base_features=8",))  # the plan's batch (UGPCL's)
UNET_3D = Arm("quickstart", "quickstart", ("model.base_features=8", "data.patch_size=[48,48,48]"), minutes=4)  # CANet's
# Semi-Inf-Net against the supervised Inf-Net at the slices' own 128 px (4x cheaper than 256;
# both arms alike). Its stages are sized in epochs of their own slices, as published: with k
# labelled slices an epoch is ceil(k / 8) x 3 scales steps.
INFNET_128 = tuple(s for s in INFNET_CPU if not s.startswith("model.options.input_scale"))
INFNET_352 = (*INFNET_128, "model.options.input_scale=2.75")  # 128 -> 352, the published working size
INFNET_704 = (*INFNET_128, "model.options.input_scale=5.5")  # 128 -> 704: the skull >= 2 stride-8 cells thick
# quickstart_2d's own augmentation (nnU-Net's, 2D: rotation to 180 degrees, both in-plane flips); the
# published Inf-Net resizes only, a setting made for 50 slices on a GPU for 100 epochs
AUG_2D = ("data.augment.enabled=true", "data.augment.rotate_deg=180", "data.augment.flip_axes=[0,1]")
UGPCL_224 = ("model.options.input_scale=3.5", "model.options.input_size=[224,224]")  # the published zoom to 224²
UGPCL_X2 = ("model.options.input_scale=2", "model.options.input_size=[128,128]")
UGPCL_LABELLED_ONLY = ("method.consistency=0", "method.rotation_weight=0", "method.contrast_weight=0",
                       "data.unlabelled_per_batch=0", "data.batch_size=4")  # the same 4 labelled slices a batch
SEMI_STEPS = 300  # the initial stage = the baseline's run; pretrain as long; finetune a third


def semi_infnet_stages(budget: int, steps: int, per_round: int = 6, rounds: int = 4) -> tuple[str, ...]:
    """Stage lengths for ``budget`` labelled slices: ``initial`` and ``pretrain`` ~``steps``
    steps each, ``finetune`` ~``steps`` / 3, one x0.1 decay three quarters into each; 4 rounds
    of 6 pseudo-labels, 3 epochs each; Adam 1e-3 throughout (no ImageNet backbone)."""
    def epoch(n: int) -> int:
        return -(-n // 8) * 3

    def stage(name: str, steps: int, slices: int) -> tuple[str, ...]:
        e = max(1, round(steps / epoch(slices)))
        return (f"method.{name}.epochs={e}", f"method.{name}.decay_epoch={max(1, int(0.75 * e))}",
                f"method.{name}.lr=1e-3", f"method.{name}.batch_size=8")

    return (f"method.per_round={per_round}", f"method.max_rounds={rounds}",
            *stage("initial", steps, budget), *stage("pretrain", steps, budget + per_round * rounds),
            *stage("finetune", steps // 3, budget),
            "method.round.epochs=3", "method.round.lr=1e-3", "method.round.batch_size=8")


COMPARISONS = {c.method: c for c in [
    # the published whole-slice resize (here 128 -> 256) gives the stride-8 final map its cells: a 2-4 px
    # skull cannot be drawn by a 16 x 16 map, and a region's boundary is placed to +-4 px by one
    Comparison("infnet", "ct_bone", Arm("Inf-Net", "infnet", INFNET_CPU, minutes=10),
               UNET_2D,
               study=True, budgets=(24,), steps=300, note="bone on real head-CT slices, 24 labelled slices"),
    # the published resize itself (352 px; here 128 -> 352): the final stride-8 map is 44 x 44
    Comparison("infnet_352", "ct_bone", Arm("Inf-Net 352", "infnet", INFNET_352, minutes=9),
               UNET_2D,
               study=True, budgets=(24,), steps=300,
               note="bone on real head-CT slices, Inf-Net at the published 352 px"),
    Comparison("infnet_704", "ct_bone", Arm("Inf-Net 704", "infnet", INFNET_704, minutes=34),
               UNET_2D,
               study=True, budgets=(24,), steps=300,
               note="bone on real head-CT slices, Inf-Net at 704 px (2x the published size)"),
    Comparison("infnet_brain", "ct_brain", Arm("Inf-Net", "infnet", INFNET_CPU, minutes=10),
               UNET_2D,
               study=True, budgets=(24,), steps=300, note="brain on real head-CT slices, 24 labelled slices"),
    Comparison("infnet_brain_352", "ct_brain", Arm("Inf-Net 352", "infnet", INFNET_352, minutes=9),
               UNET_2D,
               budgets=(24,), steps=300, note="brain on real head-CT slices, Inf-Net at the published 352 px"),
    # the same two with the baseline's augmentation: both arms see the same data pipeline
    Comparison("infnet_704_aug", "ct_bone", Arm("Inf-Net 704 aug", "infnet", (*INFNET_704, *AUG_2D), minutes=34),
               UNET_2D,
               study=True, budgets=(24,), steps=300, note="bone, Inf-Net at 704 px with quickstart_2d's augmentation"),
    # the same on 64 px patches (352 px at work; predict's windows too): a quarter of the pixels a step,
    # scores alike over 6 seeds, 8 min a run where whole slices take 33 (infnet.md, eighth round)
    Comparison("infnet_704_aug_p64", "ct_bone",
               Arm("Inf-Net 704 aug p64", "infnet", (*INFNET_704, *AUG_2D, "data.patch_size=[64,64]"), minutes=9),
               UNET_2D,
               budgets=(24,), steps=300, note="bone, Inf-Net at 704 px with augmentation, on 64 px patches"),
    Comparison("infnet_brain_352_aug", "ct_brain", Arm("Inf-Net 352 aug", "infnet", (*INFNET_352, *AUG_2D), minutes=9),
               UNET_2D,
               study=True, budgets=(24,), steps=300, note="brain, Inf-Net at 352 px with quickstart_2d's augmentation"),
    Comparison("semi_infnet", "ct_brain",
               Arm("Semi-Inf-Net", "semi_infnet", INFNET_128, sets_for=semi_infnet_stages, minutes=10),
               Arm("Inf-Net", "infnet", INFNET_128, minutes=3), budgets=(2, 8), steps=SEMI_STEPS,
               note="brain on real head-CT slices at 128 px; 24 of the 48 unlabelled slices pseudo-labelled"),
    # the published loader zooms every slice to 224²: the 64 px slices reach the stride-2 stem at 224 px
    # (x3.5; ugpcl.md, ninth round); at their own size UGPCL trails on white matter (a study now)
    Comparison("ugpcl", "brain_tissue", Arm("UGPCL 224", "ugpcl_demo", UGPCL_224, minutes=4),
               UNET_2D_PLAN,
               budgets=(1, 2), steps=300, note="GM/WM on real T1 scans, the rest of the 6 unlabelled"),
    Comparison("ugpcl_native", "brain_tissue", Arm("UGPCL", "ugpcl_demo"),
               UNET_2D_PLAN,
               study=True, budgets=(1, 2), steps=300, note="GM/WM on real T1 scans, UGPCL at the slices' 64 px"),
    Comparison("ugpcl_x2", "brain_tissue", Arm("UGPCL x2", "ugpcl_demo", UGPCL_X2, minutes=2),
               UNET_2D_PLAN,
               study=True, budgets=(1, 2), steps=300, note="GM/WM on real T1 scans, UGPCL at 128 px"),
    Comparison("ugpcl_224_b16", "brain_tissue",
               Arm("UGPCL 224 8+8", "ugpcl_demo", (*UGPCL_224, "data.batch_size=16", "data.unlabelled_per_batch=8"),
                   minutes=8),
               UNET_2D_PLAN,
               study=True, budgets=(1, 2), steps=300, note="GM/WM on real T1 scans, UGPCL at 224 px, 8 + 8 a batch"),
    # both arms on the scans resampled x3.5 in plane (a cache at 0.85 mm): the U-Net given UGPCL's zoom
    Comparison("ugpcl_zoomed_data", "brain_tissue_x3.5",
               Arm("UGPCL", "ugpcl_demo", ("data.patch_size=[192,224]", "model.options.input_size=[192,224]"),
                   minutes=4),
               Arm("quickstart_2d", "quickstart_2d", ("model.base_features=8",), minutes=7),
               study=True, budgets=(1, 2), steps=300,
               note="GM/WM on real T1 scans resampled x3.5 in plane, both arms on the plan's 192 x 224 patches"),
    # the published decoders' details (nearest upsampling, 3x3 head, skip LayerNorm, drop path, init)
    Comparison("ugpcl_published_decoders", "brain_tissue",
               Arm("UGPCL 224 published decoders", "ugpcl_demo", (*UGPCL_224, "model.options.published_decoders=true"),
                   minutes=4),
               Arm("UGPCL 224", "ugpcl_demo", UGPCL_224, minutes=4),
               study=True, budgets=(1, 2), steps=300, note="GM/WM on real T1 scans: the published decoders' details"),
    # the same UGPCL network with its unlabelled terms off: what the unlabelled scans themselves buy
    Comparison("ugpcl_semi", "brain_tissue", Arm("UGPCL", "ugpcl_demo"),
               Arm("UGPCL labelled only", "ugpcl_demo", UGPCL_LABELLED_ONLY),
               study=True, budgets=(1, 2), steps=300,
               note="GM/WM on real T1 scans at 64 px: the unlabelled terms on and off"),
    Comparison("ugpcl_semi_224", "brain_tissue", Arm("UGPCL 224", "ugpcl_demo", UGPCL_224, minutes=4),
               Arm("UGPCL 224 labelled only", "ugpcl_demo", (*UGPCL_224, *UGPCL_LABELLED_ONLY), minutes=3),
               study=True, budgets=(1, 2), steps=300,
               note="GM/WM on real T1 scans at 224 px: the unlabelled terms on and off"),
    # canet_demo's published-width attention discriminator (64 -> 512 channels) costs more than the
    # segmenter at this scale; 16 wide (16 -> 128) is 2.3x faster a step and scores alike (canet.md)
    Comparison("canet", "brain_wm", Arm("CANet", "canet_demo", ("data.val_cases=null",), minutes=16),
               UNET_3D,
               study=True, budgets=(1, 2), steps=300,
               note="white matter on real T1 scans, the rest of the 6 unlabelled"),
    Comparison("canet_d16", "brain_wm",
               Arm("CANet D16", "canet_demo", ("data.val_cases=null", "method.d_base=16"), minutes=7),
               UNET_3D,
               budgets=(1, 2), steps=300,
               note="white matter on real T1 scans, CANet's discriminator 16 wide (published 64)"),
    Comparison("dodnet", "brain_partial", Arm("DoDNet", "dodnet_demo", minutes=6),
               Arm("quickstart per dataset", "quickstart", ("model.base_features=8", "data.patch_size=[48,48,48]",
                                                            "data.batch_size=2"), minutes=8),
               budgets=(0,), steps=200, partial=True,
               note="brain (even cases) and white matter (odd cases) from two partially labelled sets"),
    Comparison("pcrl", "brain_tissue", Arm("PCRL", "pcrl_finetune_demo", pretrain="pcrl_demo", minutes=12),
               Arm("scratch", "pcrl_finetune_demo", minutes=4),
               budgets=(1, 2), steps=200, note="GM/WM on real T1 scans, pretrained on all 6 without labels"),
]}


# What --all runs: the comparisons README's figures rest on (each study runs by name)
MAIN = {m: c for m, c in COMPARISONS.items() if not c.study}


# Comparisons scored otherwise than by the Dice of a label map (super-resolution, multi-rater
# calibration, vessel metrics): method name -> a module beside this file with
# ``run(seeds, work, toy, deadline) -> list[dict]`` (rows with "method", "arm", "seed") and
# ``table(rows, out) -> str`` (its Markdown table, appended to methods.md; pictures into ``out``).
SCORED_ELSEWHERE: dict[str, str] = {
    "dcmt": "methods_dcmt",
    "de_dcgcn_ee": "methods_de_dcgcn_ee",
    "mrnet": "methods_mrnet",
    "seran": "methods_seran",
}
ELSEWHERE_MINUTES_A_SEED = 5.0  # what --jobs takes such a comparison to cost a seed (it starts dear runs first)


def _elsewhere(method: str):
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    return importlib.import_module(SCORED_ELSEWHERE[method])


def _run_elsewhere(method: str, a: argparse.Namespace, deadline: float, ap: argparse.ArgumentParser) -> list[dict]:
    """``method``'s own module; ``--budgets`` only where its ``run`` takes ``budgets``."""
    import inspect

    run = _elsewhere(method).run
    if not a.budgets:
        return run(a.seeds, a.out, a.toy, deadline)
    if "budgets" not in inspect.signature(run).parameters:
        ap.error(f"--budgets: {method} has no labelled budgets")
    return run(a.seeds, a.out, a.toy, deadline, budgets=tuple(a.budgets))


def _task_copy(raw: Path, out: Path, cases: list[str], values: list[int], name: str) -> Path:
    """One partial dataset on its own: ``cases`` (and every test scan) with label 1 where the
    label is one of ``values``: what that dataset's annotators drew."""
    from medvol.io import Volume, read_volume, write_volume

    tests = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*_0000.nii.gz"))
    for split, ids in (("Tr", cases), ("Ts", tests)):
        for sub in (f"images{split}", f"labels{split}"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for case in ids:
            shutil.copy(raw / f"images{split}" / f"{case}_0000.nii.gz", out / f"images{split}")
            label = read_volume(raw / f"labels{split}" / f"{case}.nii.gz")
            write_volume(Volume(np.isin(label.array, values).astype(np.uint8), label.affine, {}),
                         out / f"labels{split}" / f"{case}.nii.gz")
    meta = json.loads((raw / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps({
        "name": name, "channel_names": meta["channel_names"], "labels": {"background": 0, name: 1},
        "numTraining": len(cases), "file_ending": meta["file_ending"]}, indent=1))
    return out


def task_datasets(raw: Path, work: Path) -> dict[int, tuple[str, int, Data]]:
    """Per task of a partial dataset: (name, the label value DoDNet predicts for it, its own
    preprocessed single-task dataset)."""
    from medvol.preprocessing import preprocess_dataset

    meta = json.loads((raw / "dataset.json").read_text())
    out = {}
    for tid, rule in meta["tasks"].items():
        values, value = (rule["organ"], 1) if rule["organ"] else (rule["tumour"], 2)
        cases = sorted(c for c, t in meta["case_tasks"].items() if str(t["task_id"]) == tid
                       and (raw / "labelsTr" / f"{c}.nii.gz").exists())
        root = work / f"task{tid}"
        if not (root / "pre" / "plans.json").exists():
            _task_copy(raw, root / "raw", cases, values, rule["name"])
            preprocess_dataset(root / "raw", root / "pre", num_workers=2, quiet=True)
        out[int(tid)] = (rule["name"], value, Data(root / "pre", root / "raw" / "imagesTs", root / "raw" / "labelsTs"))
    return out


# the same scans and held-out files, cached with the in-plane spacing divided (2D plans' slices zoomed)
ZOOMED = {"brain_tissue_x3.5": ("brain_tissue", 3.5)}


def _zoomed(name: str, work: Path, toy: bool) -> Data:
    """``ZOOMED[name]``'s dataset preprocessed again at its plan's target spacing with the 2D
    in-plane axes ``zoom`` times finer (``medvol preprocess --target-spacing``)."""
    from medvol.cache import load_plans
    from medvol.preprocessing import preprocess_dataset

    base, zoom = ZOOMED[name]
    data = build_data(base, work, toy)
    pre = work / "data" / name / "pre"
    if not (pre / "plans.json").exists():
        plans = load_plans(data.pre)
        spacing = [float(s) for s in plans["target_spacing"]]
        for ax in plans["configurations"]["2d"]["in_plane_axes"]:
            spacing[ax] /= zoom
        preprocess_dataset(data.images.parent, pre, num_workers=2, quiet=True, target_spacing=spacing)
    return Data(pre, data.images, data.labels)


def build_data(name: str, work: Path, toy: bool) -> Data:
    """The dataset's raw folder and cache under ``work/data/name`` (built once)."""
    from medvol.preprocessing import preprocess_dataset

    if name in ZOOMED:
        return _zoomed(name, work, toy)
    root = work / "data" / name
    raw = root / "raw"
    if not (root / "pre" / "plans.json").exists():
        raw = DATASETS[name](root, toy)
        preprocess_dataset(raw, root / "pre", num_workers=2, quiet=True)
    return Data(root / "pre", raw / "imagesTs", raw / "labelsTs")


def _common(c: Comparison, budget: int | None, seed: int, toy: bool) -> list[str]:
    steps = 2 if toy else c.steps
    labelled = [] if budget is None else [f"data.labelled={budget}"]
    return [f"trainer.steps={steps}", f"trainer.val_every={steps + 1}", "trainer.final_validation=false",
            "data.val_fraction=0.0", *labelled, f"trainer.seed={seed}", *(TOY if toy else [])]


def _scores(pred: Path, labels: Path) -> dict:
    """``{class: {dice, hd95}}``: medvol evaluate's means over the held-out scans."""
    from medvol.evaluation.metrics import evaluate_folders

    result = evaluate_folders(pred, labels)
    return {name: {k: float(m[k]["mean"]) for k in ("dice", "hd95")} for name, m in result["summary"].items()}


def _binarised(pred: Path, value: int, out: Path) -> Path:
    """Label maps ``== value`` as 0/1 maps of the same geometry (a task's structure)."""
    from medvol.io import Volume, read_volume, write_volume

    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(pred.glob("*.nii.gz")):
        v = read_volume(f)
        write_volume(Volume((v.array == value).astype(np.uint8), v.affine, {}), out / f.name)
    return out


def _train(recipe: str, sets: list[str], cache: Path, run: Path) -> None:
    """Train one run, or reuse it when a previous harness call finished it (its
    ``train_summary.json`` says every step was done): a rerun after a crash trains only what is
    missing. A run folder left half-way is continued from its ``latest.pt``."""
    from medvol.training import load_recipe, train

    summary = run / "train_summary.json"
    if summary.exists():
        done = json.loads(summary.read_text())
        if done.get("steps_done") == done.get("steps_total"):
            return
    train(load_recipe(recipe, sets), cache, run, resume="auto", device="cpu", quiet=True)


def run_partial_arm(arm: Arm, c: Comparison, data: Data, seed: int, out: Path, toy: bool) -> dict:
    """DoDNet: one network on the partial cache, predicted per task; the baseline: one network
    per task's own dataset. Each task scored against its structure on the held-out scans."""
    from medvol.inference import predict

    t0, scores = time.perf_counter(), {}
    sets = [*arm.sets, *_common(c, None, seed, toy)]
    tasks = task_datasets(data.pre.parent / "raw", data.pre.parent)
    if arm is c.arm:  # as many steps as the baselines together: each task's cases seen as often
        steps = len(tasks) * (2 if toy else c.steps)
        sets += [f"trainer.steps={steps}", f"trainer.val_every={steps + 1}"]
        _train(arm.recipe, sets, data.pre, out / "run")
    for tid, (name, value, task_data) in tasks.items():
        if arm is c.arm:
            predict(out / "run", data.images, out / f"pred_{name}", device="cpu", checkpoint="latest", tta=False,
                    task=tid, quiet=True)
            pred = _binarised(out / f"pred_{name}", value, out / f"bin_{name}")
        else:
            _train(arm.recipe, sets, task_data.pre, out / f"run_{name}")
            pred = out / f"pred_{name}"
            predict(out / f"run_{name}", task_data.images, pred, device="cpu", checkpoint="latest", tta=False,
                    quiet=True)
        scores.update(_scores(pred, task_data.labels))
    return {"method": c.method, "arm": arm.label, "budget": 0, "seed": seed, "scores": scores,
            "seconds": time.perf_counter() - t0}


def run_arm(arm: Arm, c: Comparison, data: Data, budget: int, seed: int, out: Path, toy: bool) -> dict:
    """Train one arm, predict the held-out scans, score them: ``{class: {dice, hd95}}``."""
    from medvol.inference import predict

    if c.partial:
        return run_partial_arm(arm, c, data, seed, out, toy)
    t0 = time.perf_counter()
    by_budget = arm.sets_for(budget, 2 if toy else c.steps) if arm.sets_for else ()
    sets = [*arm.sets, *by_budget, *_common(c, budget, seed, toy)]
    if arm.pretrain:  # labels unused: every training case, as a user would pretrain; once a seed, for every budget
        pre, pre_sets = out.parent / f"pretrain_s{seed}", [f"trainer.seed={seed}", *(TOY if toy else [])]
        _train(arm.pretrain, pre_sets, data.pre, pre)
        sets.append(f"init_from={pre / 'encoder.pt'}")
    _train(arm.recipe, sets, data.pre, out / "run")
    predict(out / "run", data.images, out / "pred", device="cpu", checkpoint="latest", tta=False, quiet=True)
    return {"method": c.method, "arm": arm.label, "budget": budget, "seed": seed,
            "scores": _scores(out / "pred", data.labels), "seconds": time.perf_counter() - t0}


@dataclass(frozen=True)
class Job:
    """One process of ``--jobs``: one arm at one budget and seed, or a whole comparison scored
    elsewhere (its module keeps its own order: DC-MT tunes once, then runs every seed)."""

    method: str
    seeds: tuple[int, ...]
    budgets: tuple[int, ...] = ()
    arm: str | None = None
    minutes: float = ELSEWHERE_MINUTES_A_SEED

    @property
    def name(self) -> str:
        where = "" if self.arm is None else f"_b{'-'.join(map(str, self.budgets))}_{self.arm.replace(' ', '_')}"
        return f"{self.method}{where}_s{'-'.join(map(str, self.seeds))}"

    def argv(self, a: argparse.Namespace) -> list[str]:
        one = [] if self.arm is None else ["--arm", self.arm, "--budgets", *map(str, self.budgets)]
        budgets = ["--budgets", *map(str, a.budgets)] if self.arm is None and a.budgets else []
        return ["--method", self.method, "--seeds", *map(str, self.seeds), *one, *budgets, "--out", str(a.out),
                *(["--toy"] if a.toy else [])]


def jobs_of(methods: list[str], a: argparse.Namespace) -> list[Job]:
    """Every run of ``methods`` (an arm at a seed and budget, or a module's whole comparison); the
    data built here first, so that no two processes build one dataset."""
    jobs = []
    for m in methods:
        if m in SCORED_ELSEWHERE:
            jobs.append(Job(m, tuple(a.seeds), minutes=ELSEWHERE_MINUTES_A_SEED * len(a.seeds)))
            continue
        c = COMPARISONS[m]
        data = build_data(c.dataset, a.out, a.toy)
        if c.partial:
            task_datasets(data.pre.parent / "raw", data.pre.parent)
        budgets = (0,) if c.partial else (2,) if a.toy else tuple(a.budgets or c.budgets)
        for seed in a.seeds:  # an arm that pretrains runs its budgets as one job: one pretraining a seed
            for arm in (x for x in (c.arm, c.baseline) if a.arm in (None, x.label)):
                ways = [budgets] if arm.pretrain else [(b,) for b in budgets]
                jobs += [Job(m, (seed,), bs, arm.label, arm.minutes * len(bs)) for bs in ways]
    return jobs


RUNNING: set = set()  # the job processes alive (subprocess.Popen), stopped when the harness is


def run_job(job: Job, a: argparse.Namespace) -> list[dict] | None:
    """``job`` as its own process on one thread; its rows, or None when it failed (its log says why)."""
    import os
    import subprocess
    import sys

    rows, log = a.out / "jobs" / f"{job.name}.json", a.out / "jobs" / f"{job.name}.log"
    rows.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with log.open("w") as f, subprocess.Popen([sys.executable, __file__, *job.argv(a), "--job-rows", str(rows)],
                                              stdout=f, stderr=subprocess.STDOUT, env=env) as p:
        RUNNING.add(p)
        code = p.wait()
    RUNNING.discard(p)
    print(f"job {job.name}: {'done' if code == 0 else f'FAILED (exit {code}), see {log}'} "
          f"in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return json.loads(rows.read_text()) if code == 0 else None


def run_here(job: Job, a: argparse.Namespace, deadline: float, ap: argparse.ArgumentParser) -> list[dict]:
    """``job`` in this process: its arm at each of its budgets and seeds, or the module's comparison."""
    if time.time() > deadline:
        print(f"budget spent: {job.name} not run")
        return []
    if job.arm is None:
        return _run_elsewhere(job.method, a, deadline, ap)
    c = COMPARISONS[job.method]
    arm, data, rows = c.arm if job.arm == c.arm.label else c.baseline, build_data(c.dataset, a.out, a.toy), []
    for budget in job.budgets:
        for seed in job.seeds:
            out = a.out / "runs" / c.method / f"b{budget}_s{seed}_{arm.label.replace(' ', '_')}"
            rows.append(run_arm(arm, c, data, budget, seed, out, a.toy))
            s = rows[-1]["scores"]
            print(f"{c.method:8s} {arm.label:14s} budget {budget:3d} seed {seed}: "
                  + ", ".join(f"{k} {v['dice']:.3f}" for k, v in s.items()) + f" ({rows[-1]['seconds']:.0f} s)")
    return rows


def run_jobs(jobs: list[Job], a: argparse.Namespace, deadline: float) -> tuple[list[dict], list[Job]]:
    """``a.jobs`` processes at a time, dearest first; the rows in ``jobs``' order, and the jobs that failed."""
    from concurrent.futures import ThreadPoolExecutor

    (a.out / "jobs").mkdir(parents=True, exist_ok=True)

    def one(job: Job) -> list[dict] | None:
        if time.time() > deadline:
            print(f"budget spent: {job.name} not run")
            return []
        return run_job(job, a)

    pool = ThreadPoolExecutor(a.jobs)
    try:  # Ctrl-C or SIGTERM: no job starts any more, the running ones are stopped
        with _interrupted_by_sigterm():
            futures = {job: pool.submit(one, job) for job in sorted(jobs, key=lambda j: -j.minutes)}
            results = [futures[job].result() for job in jobs]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for p in list(RUNNING):
            p.terminate()
        raise
    pool.shutdown()
    return [r for rows in results if rows for r in rows], [j for j, rows in zip(jobs, results) if rows is None]


@contextlib.contextmanager
def _interrupted_by_sigterm():
    """SIGTERM raises KeyboardInterrupt in the main thread for the duration (so ``kill`` of the
    harness stops its jobs as Ctrl-C does)."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def stat(values: list[float], digits: int = 3) -> str:
    """Mean [min, max] over seeds (every table of the harness and its modules)."""
    return f"{np.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]" if values else "-"


def summarise(rows: list[dict]) -> list[dict]:
    """Per (method, budget, class): each arm's Dice over seeds and the paired difference."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        c = COMPARISONS[method]
        for budget in dict.fromkeys(r["budget"] for r in rows if r["method"] == method):
            mine = [r for r in rows if r["method"] == method and r["budget"] == budget]
            arms = (c.arm.label, c.baseline.label)
            for cls in mine[0]["scores"]:
                d = {a: [r["scores"][cls]["dice"] for r in mine if r["arm"] == a] for a in arms}
                h = {a: [r["scores"][cls]["hd95"] for r in mine if r["arm"] == a] for a in arms}
                n = min(len(v) for v in d.values())
                diff = [m - b for m, b in zip(d[c.arm.label][:n], d[c.baseline.label][:n])]
                out.append({"method": method, "budget": budget, "class": cls, "dice": d, "hd95": h, "diff": diff,
                            "minutes": _minutes(mine)})
    return out


def _minutes(rows: list[dict]) -> list[float]:
    """Per seed, the wall minutes of both arms together (what a comparison costs a seed)."""
    seeds = dict.fromkeys(r["seed"] for r in rows)
    return [sum(r.get("seconds", 0.0) for r in rows if r["seed"] == seed) / 60 for seed in seeds]


def write_table(summary: list[dict], out: Path) -> Path:
    lines = ["| method | labelled | class | method Dice | baseline | baseline Dice | difference "
             "| HD95 (method / baseline) | minutes a seed |",
             "|---|---|---|---|---|---|---|---|---|"] if summary else []  # only comparisons scored elsewhere
    for s in summary:
        c = COMPARISONS[s["method"]]
        hm, hb = (np.mean(s["hd95"][a.label]) if s["hd95"][a.label] else float("nan") for a in (c.arm, c.baseline))
        lines.append(f"| {c.arm.label} | {s['budget'] or 'all'} | {s['class']} | {stat(s['dice'][c.arm.label])} | "
                     f"{c.baseline.label} | {stat(s['dice'][c.baseline.label])} | {stat(s['diff'])} | "
                     f"{hm:.2f} / {hb:.2f} | {stat(s.get('minutes', []), 1)} |")
    path = out / "methods.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(summary: list[dict], method: str, out: Path) -> Path:
    """Mean Dice over classes against the labelled budget, method and baseline as two lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = COMPARISONS[method]
    mine = [s for s in summary if s["method"] == method]
    budgets = sorted({s["budget"] for s in mine})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm, style in ((c.arm, "o-"), (c.baseline, "s--")):
        means = [np.mean([np.mean(s["dice"][arm.label]) for s in mine if s["budget"] == b]) for b in budgets]
        ax.plot(budgets, means, style, label=arm.label)
    ax.set_xticks(budgets)
    ax.set_xlabel("labelled cases")
    ax.set_ylabel("held-out Dice (mean of classes and seeds)")
    ax.set_title(textwrap.fill(f"{c.arm.label} vs {c.baseline.label}: {c.note}", 70), fontsize=8)
    ax.legend()
    fig.tight_layout()
    path = out / f"{method}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", action="append", choices=sorted({**COMPARISONS, **SCORED_ELSEWHERE}),
                    help="repeat for several")
    ap.add_argument("--all", action="store_true", help="every comparison but the studies (name those with --method)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=int, nargs="+", help="these labelled budgets (default: the comparison's own)")
    ap.add_argument("--arm", help="only the arm of this label (one --method scored by Dice)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, each its own process on one thread, dearest first (2 on a 2-core CPU)")
    ap.add_argument("--job-rows", type=Path, help=argparse.SUPPRESS)  # a --jobs process: its rows here, no table
    ap.add_argument("--budget-minutes", type=float, default=float("inf"))
    ap.add_argument("--out", type=Path, default=Path("bench_methods"))
    ap.add_argument("--toy", action="store_true", help="toy data and 2 steps: checks the harness, measures nothing")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                    help="run nothing: one table and pictures in --out from the methods.json of earlier --out folders")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failed: list[Job] = []
    if a.merge:
        rows = [r for d in a.merge for r in json.loads((d / "methods.json").read_text())["runs"]]
    else:
        methods = sorted({**MAIN, **SCORED_ELSEWHERE}) if a.all else (
            a.method or ap.error("give --method NAME or --all"))
        if a.arm and (len(methods) != 1 or methods[0] not in COMPARISONS):
            ap.error("--arm: give one --method scored by Dice")
        deadline = time.time() + 60 * a.budget_minutes
        jobs = jobs_of(methods, a)
        if a.jobs > 1:
            rows, failed = run_jobs(jobs, a, deadline)
        else:
            rows = [r for job in jobs for r in run_here(job, a, deadline, ap)]
        if a.job_rows:
            from medvol.utils import write_json

            write_json(a.job_rows, rows)
            return 0
    report(rows, a.out)
    print(f"{time.perf_counter() - t0:.0f} s in all" + "".join(f"\nFAILED: {j.name}" for j in failed))
    return 1 if failed else 0


def report(rows: list[dict], out: Path) -> None:
    """``methods.json``, ``methods.md`` (printed) and a picture per Dice comparison."""
    from medvol.utils import write_json

    summary = summarise([r for r in rows if r["method"] in COMPARISONS])
    write_json(out / "methods.json", {"runs": rows, "summary": summary})
    table = write_table(summary, out)
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] in SCORED_ELSEWHERE):
        with table.open("a") as f:
            f.write("\n" + _elsewhere(m).table([r for r in rows if r["method"] == m], out) + "\n")
    print(table.read_text())
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] in COMPARISONS):
        print("picture:", plot(summary, m, out))


if __name__ == "__main__":
    raise SystemExit(main())
