"""``medvol cv``: the folds' end-of-run validations merged into one cross-validation table.

Each fold's run folder holds ``validation/summary.json`` (written when the run finished: its
validation cases predicted from their raw scans and evaluated, see
``medvol.training.final_validation``). The table gives, per class and for the mean over the
foreground classes:

- each fold: the mean (std, n) of every metric over the fold's validation cases;
- all cases: the same over the validation cases of all folds pooled, as nnU-Net's
  cross-validation summary (it merges the folds' predictions and evaluates them as one set);
- mean of folds: the mean and std over folds of the folds' means (equal to the pooled mean
  when the folds are of equal size).

Undefined values (HD95 when a class is absent from the prediction or the reference) are left
out of means, as :func:`medvol.evaluation.metrics.summarize` does. The runs must be folds of
one experiment: one plan, one dataset (case list and labels), one configuration, and no case
validated in two folds (that would be no cross-validation: e.g. fold ``all`` among the folds),
and no case left unvalidated (every case a fold trained on with its label, ``RUN/split.json``,
is validated by another fold: a fold missing is named when the cache's splits_final.json can
be read).
Written to OUT: ``cv_summary.json``, ``cv_summary.csv``, ``cv_summary.html`` (self-contained,
with the chart inlined) and ``cv_dice.png``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from medvol.errors import ConfigError, InputError
from medvol.evaluation.metrics import summarize
from medvol.manifest import check_files, claim_files
from medvol.utils import atomic_path, read_input_json, read_json, to_jsonable

log = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
SUMMARY = "summary.json"
CV_METRICS = ("dice", "jaccard", "hd95", "asd", "volume_diff_ml")
CV_FILES = ("cv_summary.json", "cv_summary.csv", "cv_summary.html", "cv_dice.png")
FOREGROUND = "foreground_mean"  # nnU-Net's name for the mean over the foreground classes


@dataclass
class Fold:
    """One run's validation and what identifies its experiment."""

    name: str
    run: Path
    fold: int | str | None
    cases: dict  # case -> class -> metric -> value (the summary's "cases")
    plans: dict
    dataset: dict
    configuration: str
    recipe: str
    labelled: list[str]  # the cases it trained on with their labels (RUN/split.json): another fold validates them
    cache: str | None  # the preprocessing cache it was trained from (as its validation recorded it)


def load_fold(run: Path) -> Fold:
    """A run folder's validation summary (checked to be from its final step) and identity."""
    from medvol.config import load_recipe

    if not (run / "recipe.yaml").is_file():
        raise InputError(run, "not a medvol run folder (no recipe.yaml): pass the --out of `medvol train`, or a "
                              "folder holding fold_* runs")
    path = run / VALIDATION_DIR / SUMMARY
    again = "validate it with `medvol train RECIPE --data PRE --out RUN --fold K --resume`"
    if not path.exists():
        raise InputError(path, "not found: this run has no end-of-run validation (not finished, trained with "
                               "--no-final-validation, its raw data was unreachable, or older than medvol cv); "
                               f"{again}")
    summary = read_input_json(path, "validation summary")
    if not isinstance(summary.get("cases"), dict) or not isinstance(summary.get("validation"), dict):
        raise InputError(path, "not an end-of-run validation summary (no 'cases' or 'validation' block)")
    bad = next((c for c, m in summary["cases"].items() if not isinstance(m, dict)), None)
    if bad is not None:
        raise InputError(path, f"case '{bad}': its metrics are not a mapping of classes (the file was changed "
                               f"after medvol wrote it); {again}")
    trained = read_json(run / "train_summary.json").get("steps_total") if (run / "train_summary.json").exists() \
        else None
    if trained is not None and summary["validation"].get("step") != trained:
        raise InputError(path, f"written at step {summary['validation'].get('step')}, but the run trained to step "
                               f"{trained}: {again}")
    recipe = load_recipe(run / "recipe.yaml")
    dataset = read_json(run / "dataset.json") if (run / "dataset.json").exists() else {}
    split = read_json(run / "split.json") if (run / "split.json").exists() else {}
    plans = read_input_json(run / "plans.json", "the run's plan")
    return Fold(run.name, run, recipe.data.fold, summary["cases"], plans,
                dataset, recipe.data.configuration, recipe.name, list(split.get("labelled", [])),
                summary["validation"].get("cache"))


def _check_one_experiment(folds: list[Fold]) -> None:
    """Same plan, dataset and configuration everywhere; every case validated once."""
    first = folds[0]
    for f in folds[1:]:
        diff = sorted(k for k in set(first.plans) | set(f.plans) if first.plans.get(k) != f.plans.get(k))
        if diff:
            raise ConfigError(f"{f.run}: planned differently from {first.run} ({', '.join(diff)} differ): the folds "
                              "of one cross-validation share one plan")
        for key in ("training_cases", "labels"):
            if f.dataset.get(key) != first.dataset.get(key):
                raise ConfigError(f"{f.run}: trained on another dataset than {first.run} (its {key} differ)")
        if f.configuration != first.configuration:
            raise ConfigError(f"{f.run}: configuration {f.configuration}, {first.run}: {first.configuration}: "
                              "one cross-validation is of one configuration")
        if f.recipe != first.recipe:
            log.warning("%s: recipe %s, %s: recipe %s (merged all the same)", f.run, f.recipe, first.run, first.recipe)
    seen: dict[str, Path] = {}
    for f in folds:
        for case in f.cases:
            if case in seen:
                raise ConfigError(f"case {case} is validated by both {seen[case]} and {f.run}: the folds of a "
                                  "cross-validation validate disjoint cases (is one of them fold 'all', or were the "
                                  "splits drawn at random rather than from PRE/splits_final.json?)")
            seen[case] = f.run


def _check_every_case_validated(folds: list[Fold]) -> None:
    """Every case a fold trained on with its label is validated by one of the folds: else folds
    are missing (named from the cache's splits_final.json when it can be read)."""
    validated = {c for f in folds for c in f.cases}
    missing = sorted({c for f in folds for c in f.labelled} - validated)
    if not missing:
        return
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise ConfigError(f"case(s) {missing[:10]}{more} of the dataset are validated by no fold given "
                      f"({', '.join(str(f.run) for f in folds)}): a cross-validation merges all its folds; "
                      f"{_missing_folds(folds, missing)}")


def _missing_folds(folds: list[Fold], missing: list[str]) -> str:
    """Which folds of the cache's splits_final.json validate ``missing`` (a hint; best effort)."""
    splits_path = Path(folds[0].cache or "") / "splits_final.json"
    try:
        splits = read_json(splits_path)
        wanted = sorted({k for k, s in enumerate(splits) for c in missing if c in s["val"]})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        wanted = []
    if not wanted:
        return "train and validate the folds that validate them, and pass them too"
    return f"pass the run(s) of fold(s) {', '.join(map(str, wanted))} of {splits_path} too"


def _summary(cases: dict, classes: list[str]) -> dict:
    """Per class (and the foreground mean) each metric's mean/std/median/n over ``cases``."""
    per_class = summarize(cases, {c: c for c in classes})
    fg = {}
    for k in CV_METRICS:
        means = np.array([per_class[c][k]["mean"] for c in classes], float)
        ok = means[np.isfinite(means)]
        fg[k] = {"mean": float(ok.mean()) if ok.size else math.nan}
    return {**per_class, FOREGROUND: fg}


def _mean_of_folds(fold_summaries: list[dict], classes: list[str]) -> dict:
    out: dict[str, dict] = {}
    for c in [*classes, FOREGROUND]:
        out[c] = {}
        for k in CV_METRICS:
            v = np.array([s[c][k]["mean"] for s in fold_summaries], float)
            ok = v[np.isfinite(v)]
            out[c][k] = {"mean": float(ok.mean()) if ok.size else math.nan,
                         "std": float(ok.std()) if ok.size else math.nan, "n": int(ok.size)}
    return out


def cross_validation(runs: list[Path]) -> dict:
    """The cross-validation table of the runs' validation summaries (see the module's doc)."""
    from medvol.checkpoint import expand_fold_folders

    paths = expand_fold_folders([Path(r) for r in runs])
    for p in paths:
        if not p.is_dir():
            raise InputError(p, "run folder not found")
    folds = [load_fold(p) for p in paths]
    _check_one_experiment(folds)
    _check_every_case_validated(folds)
    names = [f.name for f in folds]
    if len(set(names)) < len(names):  # /a/run and /b/run: tell them apart by path
        names = [str(f.run) for f in folds]
    classes = list(next(iter(folds[0].cases.values())).keys()) if folds[0].cases else []
    per_fold = {n: _summary(f.cases, classes) for n, f in zip(names, folds)}
    pooled = {case: m for f in folds for case, m in f.cases.items()}
    return {"configuration": folds[0].configuration, "recipe": folds[0].recipe, "classes": classes,
            "metrics": list(CV_METRICS),
            "folds": {n: {"run": str(f.run), "fold": f.fold, "n_cases": len(f.cases), "cases": sorted(f.cases),
                          "summary": per_fold[n]} for n, f in zip(names, folds)},
            "all_cases": {"n_cases": len(pooled), "summary": _summary(pooled, classes)},
            "mean_of_folds": {"n_folds": len(folds), "summary": _mean_of_folds(list(per_fold.values()), classes)}}


def write_cross_validation(result: dict, out: str | Path, stop: Callable[[str], None] | None = None) -> list[Path]:
    """``cv_summary.json``, ``.csv``, ``.html`` and ``cv_dice.png`` in ``out``, as one set: all
    four are written under temporary names and renamed into place together. ``stop(what)``,
    called before the renames, may raise to stop (``medvol cv`` on SIGTERM): then no file of
    ``out`` changed."""
    out = Path(out)
    check_files(out, CV_FILES)
    paths = [out / n for n in CV_FILES]
    with ExitStack() as renames:  # each atomic_path renames on leaving, or removes its file on an exception
        json_tmp, csv_tmp, html_tmp, png_tmp = (renames.enter_context(atomic_path(p)) for p in paths)
        json_tmp.write_text(json.dumps(to_jsonable(result), indent=1))
        _write_csv(result, csv_tmp)
        _write_chart(result, png_tmp)
        html_tmp.write_text(_html(result, png_tmp))
        if stop is not None:
            stop(f"nothing written to {out} (its {', '.join(CV_FILES)} are as they were); rerun the same command")
        claim_files(out, CV_FILES)
    return paths


def _rows(result: dict):
    """(row label, run, n cases, summary) of each fold, all cases, and the mean of folds."""
    for name, f in result["folds"].items():
        yield f"fold {f['fold']}" if f["fold"] is not None else name, f["run"], f["n_cases"], f["summary"]
    yield "all cases", "", result["all_cases"]["n_cases"], result["all_cases"]["summary"]
    yield "mean of folds", "", result["mean_of_folds"]["n_folds"], result["mean_of_folds"]["summary"]


def _write_csv(result: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "run", "n", "class", *[f"{k}_{s}" for k in CV_METRICS for s in ("mean", "std")]])
        for label, run, n, summary in _rows(result):
            for c in [*result["classes"], FOREGROUND]:
                vals = [summary[c][k].get(s, math.nan) for k in CV_METRICS for s in ("mean", "std")]
                w.writerow([label, run, n, c, *[f"{v:.6g}" for v in vals]])


def _write_chart(result: dict, path: Path) -> None:
    """Grouped bars: each class's mean Dice per fold and over all cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [*result["classes"], FOREGROUND]
    bars = [(label, s) for label, _, _, s in _rows(result) if label != "mean of folds"]
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(classes) * len(bars) * 0.5 + 2), 3.5), dpi=100)
    for i, (label, s) in enumerate(bars):
        ax.bar([j + i * width for j in range(len(classes))], [s[c]["dice"]["mean"] for c in classes], width,
               label=label, hatch="//" if label == "all cases" else None)
    ax.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(classes))], classes)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean Dice")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _cell(entry: dict, digits: int) -> str:
    mean, std = entry.get("mean", math.nan), entry.get("std")
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None and math.isfinite(std) else "")


def _html(result: dict, png: Path) -> str:
    """One page: a table per metric (Dice, HD95) and the chart, inlined."""
    classes = [*result["classes"], FOREGROUND]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    tables = []
    for metric, title, digits in (("dice", "Dice", 4), ("hd95", "HD95 (mm)", 2)):
        rows = "".join(f"<tr class='{'total' if not run else ''}'><td>{html.escape(str(label))}</td><td>{n}</td>"
                       + "".join(f"<td>{_cell(s[c][metric], digits)}</td>" for c in classes) + "</tr>"
                       for label, run, n, s in _rows(result))
        tables.append(f"<h2>{title}</h2><table><tr><th></th><th>n</th>{head}</tr>{rows}</table>")
    img = base64.b64encode(png.read_bytes()).decode()
    title = f"medvol cross-validation: {result['recipe']} ({result['configuration']}), " \
            f"{result['mean_of_folds']['n_folds']} fold(s), {result['all_cases']['n_cases']} case(s)"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;background:#fafafa;margin:2em}table{border-collapse:collapse}"
            "th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right}td:first-child{text-align:left}"
            "tr.total{font-weight:bold;background:#eef}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Mean ± std over cases (folds, all cases pooled) or over folds (mean "
            "of folds); HD95 leaves out cases where it is undefined.</p>" + "".join(tables)
            + f"<h2>Mean Dice</h2><img alt='mean Dice per fold and class' src='data:image/png;base64,{img}'>"
            "</body></html>")
