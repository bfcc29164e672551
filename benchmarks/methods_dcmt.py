"""DC-MT against the same network on its labelled subjects alone and a plain slice CNN: slice and subject grades.

Data (``medvol.datasets.subjects.build_graded_subjects``): the REAL MNI152 T1 that nilearn
ships, seen through varied crops, flips, intensities and noise, with SYNTHETIC ellipsoidal
lesions; the grades are made up from the lesions: a slice is 0 (no lesion), 1 (a cross-section
under 80 mm^2) or 2 (at least 80 mm^2), a subject's grade is the maximum of its slice grades
(DC-MT's rule), and the region mask (DC-MT's attention target) is the brain, present on every
slice as the knee's cartilage band is. Written through ``datasets/dcmt.py``'s
``write_subject_stacks`` (one stack of axial slices per subject) and preprocessed once.

Held out: the last ``HELD_OUT`` subjects of each grade, never trained on (``data.val_cases``;
the trainers' end-of-run validation on them selects nothing: the last checkpoint grades).
Labelled at budget ``b``: the first ``b / 3`` training subjects of each grade; every other
training subject is unlabelled. Every arm draws half of its labelled slots grade-balanced
(``data.oversample_grades: 0.5``, ``COMMON``: 95 % of the slices are grade 0). Arms, same
labelled subjects, same steps, same seed; the first two the same network and recipe
(``dcmt_demo``: DC-MT's attention network, CE + attention MSE + bound loss on the labelled
slices, the mean teacher that predicts):

- ``DC-MT``: with the unlabelled subjects (4 labelled + 4 unlabelled slices a batch) and the
  class and attention consistency terms, the class consistency's weight chosen per budget on
  validation subjects (:func:`tune`: the last ``VALIDATION`` training subjects of each grade
  that are not labelled, kept out of those runs with the held-out ones; the published 5, 1 or
  0, by the mean slice balanced accuracy over the seeds);
- ``supervised``: the semi-supervised terms off (consistency weights 0, no unlabelled stream,
  the same 4 labelled slices a batch): what the unlabelled subjects and the consistency buy;
- ``slice CNN``: the issue's "plain slice classifier" (``slice_classifier_demo``: a plain 2D
  CNN, cross-entropy on the labelled slices, no attention target, no teacher, its own batch of
  16), the same labelled subjects and steps: what DC-MT's network and the rest buy together.

Each run's last checkpoint (``dcmt_demo``'s: the teacher) grades every slice of the held-out subjects
(``medvol extract-features``); scored with ``medvol.evaluation.classification``: accuracy,
balanced accuracy and AUC (for the ordered grades: the mean of the AUCs of P(grade >= 1) and
P(grade >= 2), ``ordinal_auc``) over the held-out slices, and over the held-out subjects with
each subject's grade by DC-MT's rule (the maximum of its slices' predicted grades) and its AUC
scores the maxima over its slices of P(grade >= k). The subject grade is also learned: the
slice aggregator (:func:`aggregate`, ``AGGREGATOR``: a mean teacher over the arm's slice
features of the training subjects, the arm's labelled subjects keeping their grades) grades
the held-out subjects; with 3 or 6 labelled subjects it learns from 3 or 6 examples.

    python benchmarks/methods.py --method dcmt --seeds 0 1 2 --out bench_methods
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np
import yaml

N_SUBJECTS, SPACING = 30, 4.0
TOY_SUBJECTS, TOY_SPACING = 12, 6.0
HELD_OUT = 4  # subjects of each grade (toy: 1)
BUDGETS = (3, 6)  # labelled subjects, budget / 3 of each grade; the other training subjects unlabelled
STEPS_PER_EPOCH, EPOCHS = 50, 12  # dcmt_demo's 12 epochs (its warm-up, ramp-up and decay in epochs), epochs of 50 steps
ARMS = ("DC-MT", "supervised", "slice CNN")
RECIPES = {"DC-MT": "dcmt_demo", "supervised": "dcmt_demo", "slice CNN": "slice_classifier_demo"}
SUPERVISED = ["method.loss.consistency_cls=0", "method.loss.consistency_att=0", "data.unlabelled_per_batch=0",
              "data.batch_size=4"]  # the same 4 labelled slices a batch as DC-MT's 4 + 4
# every arm's: half of the labelled slots drawn grade-balanced (95 % of the slices are grade 0)
COMMON: list[str] = ["data.oversample_grades=0.5"]
VALIDATION = 2  # subjects of each grade, from the training subjects, that choose DC-MT's class-consistency weight
TUNE_CLASS_CONSISTENCY = (5.0, 1.0, 0.0)  # the published weight first
# the subject model over each arm's slice features: slice_aggregator_demo as a mean teacher, 4 labelled + 4 unlabelled
# training subjects a batch (the labelled ones: the arm's), its last checkpoint
AGGREGATOR = ["method.mean_teacher=true", "data.batch_size=8", "data.unlabelled_per_batch=4",
              "trainer.final_validation=false"]
AGGREGATOR_STEPS = 300


def build(work: Path, toy: bool) -> tuple[Path, dict[str, int]]:
    """(the cache, {subject: grade}), built once under ``work/data/dcmt``."""
    from medvol.datasets.subjects import build_graded_subjects
    from medvol.preprocessing import preprocess_dataset
    from medvol.utils import read_json, write_json

    root = work / "data" / "dcmt"
    grades_file = root / "subject_grades.json"
    if not (root / "pre" / "plans.json").exists():
        _, grades = build_graded_subjects(root / "raw", n=TOY_SUBJECTS if toy else N_SUBJECTS,
                                          spacing=TOY_SPACING if toy else SPACING)
        preprocess_dataset(root / "raw", root / "pre", num_workers=1, quiet=True)
        write_json(grades_file, grades)  # atomic: a later run reads it back
    return root / "pre", read_json(grades_file)


def by_grade(grades: dict[str, int], leave: Collection[str] = ()) -> dict[int, list[str]]:
    """{grade: its subjects in order}, without those in ``leave``."""
    return {g: sorted(s for s, v in grades.items() if v == g and s not in leave) for g in sorted(set(grades.values()))}


def split(grades: dict[str, int], held_out: int, budget: int) -> tuple[list[str], list[str]]:
    """(held-out subjects: the last ``held_out`` of each grade; labelled: the first
    ``budget // 3`` training subjects of each grade)."""
    by = by_grade(grades)
    test = [s for g in by for s in by[g][len(by[g]) - held_out:]]
    rest = by_grade(grades, test)
    labelled = [s for g in rest for s in rest[g][: budget // len(rest)]]
    return sorted(test), sorted(labelled)


def score(features: Path, test: list[str], truth: dict[str, dict[int, int]], subject_truth: dict[str, int]) -> dict:
    """Slice- and subject-level accuracy, balanced accuracy and ordinal AUC over ``test``."""
    import torch

    from medvol.evaluation.classification import balanced_accuracy, ordinal_auc
    from medvol.io.slice_features import read_features

    items = {s.subject: s for s in read_features(features).items}
    probs, target, sub_pred, sub_cum, sub_target = [], [], [], [], []
    for subject in test:
        s = items[subject]
        p = torch.from_numpy(s.logits).softmax(1).numpy()
        idx = np.where(s.raw_slice >= 0, s.raw_slice, s.slice_index)
        y = np.array([truth[subject][int(i)] for i in idx])
        probs.append(p)
        target.append(y)
        cum = np.flip(np.cumsum(np.flip(p, 1), 1), 1)  # P(grade >= k), k = 0..K-1
        sub_pred.append(int(p.argmax(1).max()))  # DC-MT's rule: the subject is its worst slice
        sub_cum.append(cum.max(0))
        sub_target.append(subject_truth[subject])
    p, y = np.concatenate(probs), np.concatenate(target)
    cum = np.array(sub_cum)  # the subject's P(grade >= k) as a distribution for ordinal_auc
    sub_p = np.concatenate([cum[:, :-1] - cum[:, 1:], cum[:, -1:]], 1)
    sp, sy = np.array(sub_pred), np.array(sub_target)
    return {"scored": list(test), "slices": int(len(y)), "slice_accuracy": float(np.mean(p.argmax(1) == y)),
            "slice_balanced_accuracy": balanced_accuracy(p.argmax(1), y), "slice_auc": ordinal_auc(p, y),
            "slice_grades_true": np.bincount(y, minlength=p.shape[1]).tolist(),
            "slice_grades_predicted": np.bincount(p.argmax(1), minlength=p.shape[1]).tolist(),
            "subjects": int(len(sy)), "subject_accuracy": float(np.mean(sp == sy)),
            "subject_balanced_accuracy": balanced_accuracy(sp, sy), "subject_auc": ordinal_auc(sub_p, sy)}


def aggregate(features: Path, test: list[str], labelled: list[str], seed: int, out: Path, toy: bool,
              subject_truth: dict[str, int], arm_run: Path) -> dict:
    """Subject grades of ``test`` from the slice aggregator (``AGGREGATOR``) trained on ``features``
    of the training subjects, ``labelled`` keeping their grades: accuracy, balanced accuracy, ordinal AUC.
    An aggregator older than its arm's run (``arm_run``, retrained since) is trained again."""
    import torch

    from medvol.data.slice_outputs import subject_probabilities
    from medvol.evaluation.classification import balanced_accuracy, ordinal_auc
    from medvol.inference.subjects import load_subject_model
    from medvol.io.slice_features import read_features
    from medvol.training import load_recipe, train

    steps = 4 if toy else AGGREGATOR_STEPS
    done = out / "train_summary.json"
    if done.exists() and done.stat().st_mtime < (arm_run / "train_summary.json").stat().st_mtime:
        shutil.rmtree(out)  # this harness's own run, on the features of an arm that has been retrained
    if not done.exists():
        sets = [*AGGREGATOR, f"data.val_cases={test}", f"data.labelled={labelled}", f"trainer.seed={seed}",
                f"trainer.steps={steps}", f"trainer.val_every={steps + 1}"]
        train(load_recipe("slice_aggregator_demo", sets), features, out, resume="auto", device="cpu", quiet=True)
    model = load_subject_model(out, torch.device("cpu"), "latest").aggregator
    items = {s.subject: s for s in read_features(features).items}
    p = subject_probabilities(model, [items[s].features for s in test], torch.device("cpu"))
    y = np.array([subject_truth[s] for s in test])
    return {"aggregator_accuracy": float(np.mean(p.argmax(1) == y)),
            "aggregator_balanced_accuracy": balanced_accuracy(p.argmax(1), y), "aggregator_auc": ordinal_auc(p, y)}


def train_arm(arm: str, cache: Path, held_out: list[str], labelled: list[str], seed: int, run: Path, toy: bool,
              extra: tuple[str, ...] = ()) -> tuple[float, dict]:
    """Train (or reuse) one arm's run, ``held_out`` kept out of training: (its training seconds, its
    checked ``split.json``)."""
    from medvol.training import load_recipe, train

    epochs = 1 if toy else EPOCHS
    steps_per_epoch = 2 if toy else STEPS_PER_EPOCH
    t0 = time.perf_counter()
    summary = run / "train_summary.json"
    if not (summary.exists() and json.loads(summary.read_text()).get("steps_done") == epochs * steps_per_epoch):
        steps = epochs * steps_per_epoch
        sets = [f"data.val_cases={held_out}", f"data.labelled={labelled}", "trainer.final_validation=false",
                f"trainer.seed={seed}", "trainer.log_every=50", *COMMON]
        if arm == "slice CNN":
            sets += [f"trainer.steps={steps}", f"trainer.val_every={steps + 1}"]
        else:
            sets += [f"method.steps_per_epoch={steps_per_epoch}", f"method.epochs={epochs}",
                     f"method.val_every_epochs={epochs + 1}", *(SUPERVISED if arm == "supervised" else [])]
        train(load_recipe(RECIPES[arm], [*sets, *extra]), cache, run, resume="auto", device="cpu", quiet=True)
    used = json.loads((run / "split.json").read_text())
    if set(used["labelled"]) != set(labelled) or set(held_out) & set(used["labelled"] + used["unlabelled"]):
        raise RuntimeError(f"{run}: trained on {used}, not on labelled {labelled} with {held_out} held out")
    return json.loads(summary.read_text()).get("seconds", time.perf_counter() - t0), used  # a reused run's own time


def run_arm(arm: str, cache: Path, test: list[str], labelled: list[str], seed: int, out: Path, toy: bool,
            truth: dict[str, dict[int, int]], subject_truth: dict[str, int], extra: tuple[str, ...] = ()) -> dict:
    """Train (or reuse) one arm, grade the held-out subjects' slices with its teacher, score."""
    from medvol.inference.subjects import extract_features
    from medvol.losses.dcmt import DCMTLossConfig

    run = out / "run"
    seconds, used = train_arm(arm, cache, test, labelled, seed, run, toy, extra)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())  # what the run itself used
    loss = DCMTLossConfig(**(recipe.get("method") or {}).get("loss") or {})
    consistency = [loss.consistency_cls, loss.consistency_att] if recipe["trainer"]["name"] == "dcmt" else [0, 0]
    features = extract_features(run, cache, out / "features", device="cpu", checkpoint="latest", quiet=True)
    return {"method": "dcmt", "arm": arm, "budget": len(labelled), "seed": seed,
            "steps": recipe["trainer"]["steps"], "train_seconds": round(seconds, 1), "labelled": used["labelled"],
            "unlabelled_per_batch": recipe["data"].get("unlabelled_per_batch", 0),
            "consistency": consistency, "oversample_grades": recipe["data"].get("oversample_grades", 0.0),
            "held_out": used["validation"], **score(features, test, truth, subject_truth),
            **aggregate(features, test, labelled, seed, out / "aggregator", toy, subject_truth, run)}


def validation_split(grades: dict[str, int], test: list[str], labelled: list[str], per_grade: int) -> list[str]:
    """The last ``per_grade`` training subjects of each grade that are neither held out nor labelled."""
    by = by_grade(grades, test + labelled)
    return sorted(s for g in by for s in by[g][len(by[g]) - per_grade:])


def tune(seeds: list[int], work: Path, toy: bool, cache: Path, grades: dict[str, int], truth: dict[str, dict[int, int]],
         test: list[str], labelled: list[str]) -> float:
    """DC-MT's class-consistency weight at the budget of ``labelled``, chosen on validation subjects, never the held-out
    ones: each weight of ``TUNE_CLASS_CONSISTENCY`` trains with the held-out and the validation subjects
    both kept out, its teacher grades the validation subjects' slices, and the weight of the best mean
    slice balanced accuracy over ``seeds`` wins (DC-MT's own selection metric; a tie keeps the earlier,
    the published 5 first). Kept in ``runs/dcmt/tuning_b{budget}.json``."""
    from medvol.inference.subjects import extract_features
    from medvol.utils import read_json, write_json

    budget = len(labelled)
    path = work / "runs" / "dcmt" / f"tuning_b{budget}.json"
    if path.exists():
        return float(read_json(path)["chosen"])
    val = validation_split(grades, test, labelled, 1 if toy else VALIDATION)
    scores: dict[float, list[float]] = {}
    for w in TUNE_CLASS_CONSISTENCY:
        for seed in seeds:
            out = work / "runs" / "dcmt" / f"tune_b{budget}_w{w:g}_s{seed}"
            train_arm("DC-MT", cache, sorted(test + val), labelled, seed, out / "run", toy,
                      (f"method.loss.consistency_cls={w}",))
            features = extract_features(out / "run", cache, out / "features", device="cpu", checkpoint="latest",
                                        quiet=True)
            scores.setdefault(w, []).append(score(features, val, truth, grades)["slice_balanced_accuracy"])
        print(f"dcmt tuning budget {budget}: class consistency {w:g}: validation slice balanced accuracy "
              f"{np.mean(scores[w]):.3f} ({', '.join(f'{v:.3f}' for v in scores[w])})", flush=True)
    chosen = max(TUNE_CLASS_CONSISTENCY, key=lambda w: float(np.mean(scores[w])))
    write_json(path, {"budget": budget, "validation": val, "seeds": seeds, "metric": "slice_balanced_accuracy",
                      "scores": {str(w): v for w, v in scores.items()}, "chosen": chosen})  # atomic: reused later
    return chosen


def run_name(arm: str) -> str:
    return arm.replace("-", "").replace(" ", "_").lower()


def run(seeds: list[int], work: Path, toy: bool, deadline: float, budgets: tuple[int, ...] = BUDGETS) -> list[dict]:
    """Every arm at each labelled budget (subjects, a multiple of 3) over ``seeds``."""
    from medvol.cache import load_plans
    from medvol.data.slices import cached_slice_labels, slice_config

    work = Path(work)
    cache, grades = build(work, toy)
    truth = cached_slice_labels(cache, slice_config(load_plans(cache))["slice_axis"]).slices  # checked read
    rows = []
    for budget in (3,) if toy else budgets:
        test, labelled = split(grades, 1 if toy else HELD_OUT, budget)
        weight = tune(seeds, work, toy, cache, grades, truth, test, labelled)
        for seed in seeds:
            for arm in ARMS:
                if time.time() > deadline:
                    print(f"budget spent: dcmt {arm} budget {budget} seed {seed} not run")
                    return rows
                out = work / "runs" / "dcmt" / f"b{budget}_s{seed}_{run_name(arm)}"
                extra = (f"method.loss.consistency_cls={weight}",) if arm == "DC-MT" else ()
                rows.append(run_arm(arm, cache, test, labelled, seed, out, toy, truth, grades, extra))
                r = rows[-1]
                scores = "; ".join(f"{w} acc {r[f'{w}_accuracy']:.3f} bal {r[f'{w}_balanced_accuracy']:.3f} AUC "
                                   f"{r[f'{w}_auc']:.3f}" for w in ("slice", "subject", "aggregator"))
                print(f"dcmt {arm:10s} budget {budget} seed {seed}: {scores}"
                      f" ({r['train_seconds']:.0f} s training)", flush=True)
    return rows


METRICS = ("slice_accuracy", "slice_balanced_accuracy", "slice_auc",
           "subject_accuracy", "subject_balanced_accuracy", "subject_auc",
           "aggregator_accuracy", "aggregator_balanced_accuracy", "aggregator_auc")


def table(rows: list[dict], out: Path) -> str:
    """Per budget: each arm's mean [min, max] over seeds of every metric, and DC-MT minus each
    other arm paired by seed."""
    from methods import stat  # this folder is on sys.path (methods._elsewhere)

    picture = plot(rows, out)
    lines = ["### DC-MT vs the same network on its labelled subjects alone and vs a plain slice CNN (real MNI152 "
             "T1, synthetic lesions and grades 0/1/2; held-out subjects; subject = its worst slice, or the "
             f"aggregator's grade; picture: {picture.name})", "",
             "| labelled | arm | seeds | steps | slice acc | slice bal. acc | slice AUC | subject acc "
             "| subject bal. acc | subject AUC | aggregator acc | aggregator bal. acc | aggregator AUC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for budget in sorted({r["budget"] for r in rows}):
        by = {a: [r for r in rows if r["budget"] == budget and r["arm"] == a] for a in ARMS}
        for a, rs in by.items():
            if rs:
                lines.append(f"| {budget} | {a} | {len(rs)} | {rs[0]['steps']} | "
                             + " | ".join(stat([r[m] for r in rs]) for m in METRICS) + " |")
        for base in ARMS[1:]:
            pairs = [(m, s) for m in by["DC-MT"] for s in by[base] if m["seed"] == s["seed"]]
            if pairs:
                lines.append(f"| {budget} | DC-MT - {base} (paired) | {len(pairs)} | | "
                             + " | ".join(stat([m[k] - s[k] for m, s in pairs]) for k in METRICS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> Path:
    """``out/dcmt.png``: held-out slice balanced accuracy and subject accuracy against the labelled
    budget, each arm a line (mean over seeds, bars min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, name in zip(axes, ("slice_balanced_accuracy", "subject_accuracy"),
                                ("slice balanced accuracy", "subject accuracy (worst slice)")):
        for arm, style in zip(ARMS, ("o-", "s--", "^:")):
            values = [[r[metric] for r in rows if r["arm"] == arm and r["budget"] == b] for b in budgets]
            mean = np.array([np.mean(v) for v in values])
            spread = np.array([[mean[i] - min(v), max(v) - mean[i]] for i, v in enumerate(values)]).T
            ax.errorbar(budgets, mean, yerr=spread, fmt=style, capsize=3, label=arm)
        ax.axhline(1 / 3, color="grey", lw=0.8, ls=":")  # chance: three balanced grades
        ax.set_xticks(budgets)
        ax.set_xlabel("labelled subjects")
        ax.set_ylabel(f"held-out {name}")
    axes[0].legend(fontsize=8)
    fig.suptitle("DC-MT vs its supervised arm and a plain slice CNN (MNI152 T1, synthetic lesions)", fontsize=9)
    fig.tight_layout()
    path = Path(out) / "dcmt.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

