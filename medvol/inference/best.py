"""``medvol best``: nnU-Net's ``nnUNetv2_find_best_configuration`` and ``determine_postprocessing``.

Each RUN is a cross-validation of one configuration: a folder of ``fold_*`` runs (or the fold
runs themselves, as ``medvol cv`` takes them), each holding its end-of-run validation
(``RUN/fold_K/validation/``, see :mod:`medvol.training.final_validation`). As nnU-Net does:

1. every configuration is scored on its cross-validation predictions of all folds pooled, by
   the foreground-mean Dice (the mean over the foreground classes of each class' mean Dice
   over cases: ``medvol cv``'s "all cases" row);
2. every pair of configurations is ensembled (their saved cross-validation probabilities
   averaged, then argmax) and scored the same way (``--no-ensembles``: nnU-Net's
   ``--disable_ensembling``); a pair that ``medvol predict`` could not ensemble (plans that
   differ in spacing, labels, normalisation, orientation or configurations) is skipped with a
   warning. The probabilities are ``fold/validation/<case>.npz`` when the
   fold saved them; otherwise the fold's model predicts its validation cases once more (its
   validation checkpoint and the recipe's inference settings, as the final validation did)
   into ``OUT/probabilities/<configuration>/<fold>/`` (reused by a later run while newer than
   the fold's validation);
3. the best one (ties: the first, single configurations before ensembles) gets nnU-Net's
   post-processing test: keeping the largest 26-connected foreground region (all foreground
   labels as one) is chosen when the foreground-mean Dice rises and no class' Dice falls;
   then, with more than one foreground class, per class (in label order) keeping that label's
   largest component is chosen when that class' Dice rises. Every comparison is strict.

Written to OUT: ``postprocessing.json`` (the decision, for ``medvol predict --postprocessing``),
``best.json`` (every score, the best, the post-processing before/after: nnU-Net's
``inference_information.json``), ``inference_instructions.txt`` (the commands) and
``ensembles/<A>+<B>/<case>.nii.gz`` (the ensembles' cross-validation label maps).

Dice is medvol's one Dice (:func:`medvol.evaluation.metrics.dice`): a class absent from both
prediction and reference counts 1 (nnU-Net leaves such cases out of its means). Each test
reads the label maps again (one case in memory at a time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvol.errors import ConfigError, InputError
from medvol.evaluation.crossval import FOREGROUND, SUMMARY, VALIDATION_DIR, Fold, cross_validation, load_fold
from medvol.evaluation.metrics import dice
from medvol.inference.postprocess import POSTPROCESSING_FORMAT, apply_postprocessing, argmax_labels
from medvol.io import Volume, read_volume, write_volume
from medvol.manifest import check_files, claim_files
from medvol.utils import read_json, write_json, write_text

log = logging.getLogger(__name__)

BEST_FILES = ("postprocessing.json", "best.json", "inference_instructions.txt")


@dataclass
class Configuration:
    """One RUN: its folds' validation label maps, references and scans, per case."""

    name: str
    path: Path
    folds: list[Fold]
    labels: dict[str, int]
    checkpoint: str
    predictions: dict[str, Path] = field(default_factory=dict)
    references: dict[str, Path] = field(default_factory=dict)
    scans: dict[str, list[Path]] = field(default_factory=dict)


@dataclass
class Candidate:
    """A configuration or an ensemble of two, with its cross-validation label maps."""

    name: str
    members: list[Configuration]
    predictions: dict[str, Path]
    dice: dict[str, float] = field(default_factory=dict)  # class name (and FOREGROUND) -> mean Dice


# --------------------------------------------------------------------------- configurations
def load_configuration(run: Path, name: str) -> Configuration:
    """A RUN checked as ``medvol cv`` checks it (one experiment, every case validated), with
    the raw scans and reference labels of its validation cases."""
    from medvol.checkpoint import expand_fold_folders

    cross_validation([run])
    folds = [load_fold(p) for p in expand_fold_folders([run])]
    if any(isinstance(v, list) for v in folds[0].plans["labels"].values()) or "ignore" in folds[0].plans["labels"]:
        raise ConfigError(f"{run}: regions and an ignore label are not supported by medvol best yet (it scores "
                          "plain label maps); compare the runs with medvol cv")
    labels = {str(k): int(v) for k, v in folds[0].plans["labels"].items()}
    checkpoints = {_validation(f).get("checkpoint", "latest") for f in folds}
    cfg = Configuration(name, run, folds, labels, sorted(checkpoints)[0])
    for f in folds:
        raw = _raw_cases(f)
        for case in f.cases:
            cfg.predictions[case] = f.run / VALIDATION_DIR / f"{case}.nii.gz"
            cfg.references[case], cfg.scans[case] = raw[case].label, list(raw[case].images)
    return cfg


def _validation(fold: Fold) -> dict:
    return read_json(fold.run / VALIDATION_DIR / SUMMARY)["validation"]


def _raw_cases(fold: Fold) -> dict:
    """The fold's validation cases in the raw dataset its validation recorded."""
    from medvol.preprocessing.raw import open_raw_dataset

    root = _validation(fold).get("raw_root")
    if not root or not Path(root).is_dir():
        raise InputError(fold.run / VALIDATION_DIR / SUMMARY, f"its raw dataset {root} is not reachable: the "
                                                              "references of the validation cases are read from it")
    raw = {c.case_id: c for c in open_raw_dataset(root).training}
    gone = [c for c in fold.cases if c not in raw or not _exists(raw[c].label)]
    if gone:
        raise InputError(root, f"no reference label for validation case(s) {', '.join(gone[:5])} of {fold.run}")
    return raw


def _exists(path: Path | None) -> bool:
    return path is not None and path.exists()


def _check_comparable(configs: list[Configuration]) -> None:
    first = configs[0]
    for c in configs[1:]:
        if c.labels != first.labels:
            raise ConfigError(f"{c.path}: labels {c.labels}, {first.path}: {first.labels}: configurations are "
                              "compared on one dataset")
        if set(c.predictions) != set(first.predictions):
            diff = sorted(set(c.predictions) ^ set(first.predictions))
            raise ConfigError(f"{c.path} and {first.path} cross-validate different cases ({', '.join(diff[:5])}): "
                              "configurations are compared on the same cases")


def _not_ensemblable(a: Configuration, b: Configuration) -> str | None:
    """Why ``medvol predict -m A -m B`` would refuse this pair (plans that differ where an
    ensemble needs one grid, classes and channels), or None."""
    from medvol.inference.predictor import ENSEMBLE_PLAN_KEYS

    pa, pb = a.folds[0].plans, b.folds[0].plans
    diff = [k for k in ENSEMBLE_PLAN_KEYS if pa.get(k) != pb.get(k)]
    return f"their plans' {', '.join(diff)} differ" if diff else None


def _names(runs: list[Path]) -> list[str]:
    """Each RUN's name: its folder name, or its path when two share a name."""
    names = [Path(r).name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r).strip("/").replace("/", "_") for r in runs]
    return names


# --------------------------------------------------------------------------- Dice
def dice_table(predictions: dict[str, Path], references: dict[str, Path], labels: dict[str, int],
               steps: list[list[int]] | None = None) -> dict[str, dict[str, float]]:
    """case -> class name -> Dice of the label maps (after ``steps`` of post-processing)."""
    out = {}
    for case in sorted(predictions):
        pred, ref = _pair(predictions[case], references[case])
        pred = apply_postprocessing(pred, steps or [])
        out[case] = {n: dice(pred == v, ref == v) for n, v in labels.items() if v > 0}
    return out


def _pair(pred_path: Path, ref_path: Path) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(read_volume(pred_path).array), np.asarray(read_volume(ref_path).array)
    if pred.shape != ref.shape:
        raise InputError(pred_path, f"shape {pred.shape}, its reference {ref_path} {ref.shape}")
    return pred.astype(np.int64), ref.astype(np.int64)


def mean_dice(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each class' mean over cases and their mean (FOREGROUND), as ``medvol cv``'s all-cases row."""
    classes = list(next(iter(table.values())))
    out = {c: float(np.mean([table[case][c] for case in table])) for c in classes}
    out[FOREGROUND] = float(np.mean([out[c] for c in classes]))
    return out


# --------------------------------------------------------------------------- ensembles
def ensemble_predictions(a: Configuration, b: Configuration, out_dir: Path, store: Path, device: str = "auto",
                         quiet: bool = True) -> dict[str, Path]:
    """The two configurations' cross-validation probabilities averaged, argmax -> label maps
    ``out_dir/<case>.nii.gz`` (the scan's grid, from the probability files; those predicted
    again are kept in ``store/<configuration>/``)."""
    pa, pb = (probability_files(c, store / c.name, device, quiet) for c in (a, b))
    names = [f"{case}.nii.gz" for case in sorted(pa)]
    check_files(out_dir, names)
    out = {}
    for case in sorted(pa):
        (prob_a, affine), (prob_b, _) = _load_probabilities(pa[case]), _load_probabilities(pb[case])
        if prob_a.shape != prob_b.shape:
            raise InputError(pb[case], f"probabilities of shape {prob_b.shape}, {pa[case]}'s {prob_a.shape}: "
                                       "not of the same case grid and classes")
        seg = argmax_labels((prob_a + prob_b) / 2)
        claim_files(out_dir, [f"{case}.nii.gz"])
        out[case] = write_volume(Volume(seg, affine, {}), out_dir / f"{case}.nii.gz")
    return out


def _load_probabilities(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            return z["probabilities"].astype(np.float32), z["affine"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(path, f"not a probability file of medvol predict --save-probabilities ({e})") from None


def probability_files(cfg: Configuration, store: Path, device: str = "auto", quiet: bool = True) -> dict[str, Path]:
    """case -> ``.npz`` of the configuration's validation probabilities: the fold's own
    ``validation/<case>.npz``, else predicted once into ``store/<fold>/`` (see the module doc)."""
    out = {}
    for fold in cfg.folds:
        own = {c: fold.run / VALIDATION_DIR / f"{c}.npz" for c in fold.cases}
        if all(p.exists() for p in own.values()):
            out.update(own)
            continue
        kept = {c: store / fold.name / f"{c}.npz" for c in fold.cases}
        validated = (fold.run / VALIDATION_DIR / SUMMARY).stat().st_mtime
        if not all(p.exists() and p.stat().st_mtime >= validated for p in kept.values()):
            _predict_probabilities(cfg, fold, store / fold.name, device, quiet)
        out.update(kept)
    return out


def _predict_probabilities(cfg: Configuration, fold: Fold, out_dir: Path, device: str, quiet: bool) -> None:
    """The fold's validation cases predicted again with their probabilities saved, exactly as
    its final validation predicted them (its checkpoint, the recipe's inference settings)."""
    from medvol.checkpoint import load_run
    from medvol.inference.predictor import predict_cases, resolve_device

    log.info("%s: predicting the %d validation case(s) of %s again to save their probabilities (for ensembles)",
             cfg.name, len(fold.cases), fold.run)
    dev = resolve_device(device)
    run = load_run(fold.run, dev, _validation(fold).get("checkpoint", "latest"))
    predict_cases([run], [(c, cfg.scans[c]) for c in sorted(fold.cases)], out_dir, dev, save_probabilities=True,
                  quiet=quiet)


# --------------------------------------------------------------------------- post-processing
def determine_postprocessing(predictions: dict[str, Path], references: dict[str, Path],
                             labels: dict[str, int]) -> dict:
    """nnU-Net's decision (see the module doc) on the label maps ``predictions``: the steps
    chosen, each test's Dice before and after, and the Dice without and with the steps."""
    fg = {n: v for n, v in labels.items() if v > 0}
    if not fg:
        raise ConfigError(f"labels {labels}: no foreground label to post-process")
    all_fg = sorted(fg.values())
    base = mean_dice(dice_table(predictions, references, labels))
    after_fg = mean_dice(dice_table(predictions, references, labels, [all_fg]))
    drops = [n for n in fg if after_fg[n] < base[n]]
    chosen = after_fg[FOREGROUND] > base[FOREGROUND] and not drops
    tests = [{"step": "largest foreground region", "labels": all_fg, "before": base, "after": after_fg,
              "chosen": chosen, "classes_worse": drops}]
    steps = [all_fg] if chosen else []
    if len(fg) > 1:
        current = after_fg if chosen else base  # a label's Dice: no later step of another label changes it
        for name, value in fg.items():
            trial = mean_dice(dice_table(predictions, references, {name: value}, [*steps, [value]]))[name]
            better = trial > current[name]
            tests.append({"step": f"largest component of {name}", "labels": [value], "before": current[name],
                          "after": trial, "chosen": better})
            if better:
                steps.append([value])
    final = mean_dice(dice_table(predictions, references, labels, steps)) if steps else base
    return {"format": POSTPROCESSING_FORMAT, "labels": dict(labels), "steps": [{"labels": s} for s in steps],
            "dice_before": base, "dice_after": final, "tests": tests, "n_cases": len(predictions)}


# --------------------------------------------------------------------------- the command
def find_best_configuration(runs: list[Path], out: Path, ensembles: bool = True, device: str = "auto",
                            quiet: bool = True) -> dict:
    """``medvol best`` (see the module doc): scores, the best, its post-processing; files in ``out``."""
    out = Path(out)
    check_files(out, BEST_FILES)
    configs = [load_configuration(Path(r), n) for r, n in zip(runs, _names([Path(r) for r in runs]))]
    _check_comparable(configs)
    ref, labels = configs[0].references, configs[0].labels
    candidates = [Candidate(c.name, [c], c.predictions) for c in configs]
    if ensembles:
        for i, a in enumerate(configs):
            for b in configs[i + 1:]:
                name = f"{a.name}+{b.name}"
                why = _not_ensemblable(a, b)
                if why:
                    log.warning("%s not ensembled: %s (medvol predict could not run it)", name, why)
                    continue
                preds = ensemble_predictions(a, b, out / "ensembles" / name, out / "probabilities", device, quiet)
                candidates.append(Candidate(name, [a, b], preds))
    for cand in candidates:
        cand.dice = mean_dice(dice_table(cand.predictions, ref, labels))
        log.info("%s: foreground-mean Dice %.4f", cand.name, cand.dice[FOREGROUND])
    best = candidates[int(np.argmax([c.dice[FOREGROUND] for c in candidates]))]  # ties: the first
    decision = determine_postprocessing(best.predictions, ref, labels)
    decision["model"] = {"name": best.name, "runs": [str(m.path) for m in best.members]}
    claim_files(out, BEST_FILES)
    write_json(out / "postprocessing.json", decision)
    info = _information(candidates, best, decision, out)
    write_json(out / "best.json", info)
    write_text(out / "inference_instructions.txt", info["instructions"] + "\n")
    return info


def inference_command(best: Candidate, postprocessing: Path) -> str:
    """The one ``medvol predict`` that reproduces the best model: its RUNs (two: an ensemble,
    probabilities averaged in one pass), the checkpoint that was cross-validated, the file."""
    models = " ".join(f"-m {m.path}" for m in best.members)
    return (f"medvol predict {models} -i INPUT_FOLDER -o OUTPUT_FOLDER --checkpoint {best.members[0].checkpoint} "
            f"--postprocessing {postprocessing}")


def _information(candidates: list[Candidate], best: Candidate, decision: dict, out: Path) -> dict:
    kept = [s["labels"] for s in decision["steps"]]
    what = "; ".join(f"keep the largest region of labels {s}" for s in kept) or "none (nothing improved)"
    instructions = "\n".join([
        f"Best: {best.name} (foreground-mean Dice {best.dice[FOREGROUND]:.4f} on its cross-validation, "
        f"{decision['dice_after'][FOREGROUND]:.4f} after post-processing).",
        f"Post-processing: {what}.", "", "Run inference like this:", "",
        inference_command(best, out / "postprocessing.json")])
    return {"all_results": {c.name: c.dice for c in candidates},
            "best_model_or_ensemble": {"name": best.name, "runs": [str(m.path) for m in best.members],
                                       "checkpoint": best.members[0].checkpoint,
                                       "result_on_crossval_pre_pp": best.dice[FOREGROUND],
                                       "result_on_crossval_post_pp": decision["dice_after"][FOREGROUND],
                                       "postprocessing_file": str(out / "postprocessing.json")},
            "instructions": instructions}
