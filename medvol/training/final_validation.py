"""Validation in the scans' own geometry at the end of a run (nnU-Net's final validation).

When a run has trained its last step, the main process predicts each validation case from
its raw scan exactly as ``medvol predict -m RUN --checkpoint latest`` does (the run's plan,
the one sliding-window path, the recipe's ``inference`` settings, ``restore_geometry`` onto
the scan's grid) and evaluates the predictions against the raw reference labels with
:mod:`medvol.evaluation.metrics`:

    RUN/validation/<case>.nii.gz   label maps with the raw scans' shapes and affines
    RUN/validation/summary.json    per case and class metrics and their summary, as
                                   ``medvol evaluate`` writes them, plus a ``validation``
                                   block (fold, step, checkpoint, raw dataset, cases)
    RUN/validation/summary.csv     one row per case and class

The raw dataset is the one the cache was made from (``PRE/dataset.json``: ``raw_root``).
When it cannot be reached (moved, unmounted, a validation case gone) the validation is
skipped with a warning and the run still succeeds; ``medvol train ... --resume`` on the
finished run validates it later. Validation cases without a reference label file
(unlabelled cases of a semi-supervised dataset) are left out and listed.

Resume: a resumed run that trains no further step and whose ``summary.json`` was written at
its final step does not validate again; in every other case (steps were trained, the summary
is missing or from another step) it validates.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from medvol.errors import InputError, MedvolError, PredictionStopped
from medvol.evaluation.crossval import SUMMARY, VALIDATION_DIR
from medvol.training.preemption import PreemptionFlag
from medvol.utils import read_json

log = logging.getLogger(__name__)


class RawUnreachable(Exception):
    """The raw scans or labels of the validation cases cannot be read (the message says why)."""


def validated_step(run_dir: str | Path) -> int | None:
    """The step at which ``RUN/validation/summary.json`` was written (None: no readable one)."""
    try:
        return int(read_json(Path(run_dir) / VALIDATION_DIR / SUMMARY)["validation"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def raw_validation_cases(cache_dir: Path, cases: list[str]) -> tuple[str, list[tuple[str, list[Path], Path]],
                                                                      list[str]]:
    """(raw root, [(case, channel sources, reference label)], unlabelled cases) of ``cases``
    in the raw dataset the cache was made from; :class:`RawUnreachable` when it cannot be read."""
    from medvol.preprocessing.raw import open_raw_dataset

    dj = cache_dir / "dataset.json"
    try:
        root = read_json(dj).get("raw_root")
    except (OSError, ValueError) as e:
        raise RawUnreachable(f"{dj}: unreadable ({e})") from None
    if not root:
        raise RawUnreachable(f"{dj} does not record the raw dataset (no raw_root)")
    if not Path(root).is_dir():
        raise RawUnreachable(f"the raw dataset {root} (recorded in {dj}) is not reachable")
    try:
        raw = {c.case_id: c for c in open_raw_dataset(root).training}
    except InputError as e:
        raise RawUnreachable(f"the raw dataset {root} cannot be read: {e}") from None
    gone = [c for c in cases if c not in raw]
    if gone:
        raise RawUnreachable(f"the raw dataset {root} no longer holds validation case(s) {', '.join(gone[:5])}")
    found, unlabelled = [], []
    for case in cases:
        rc = raw[case]
        missing = [p for p in rc.images if not p.exists()]
        if rc.problem is not None or missing:
            raise RawUnreachable(str(rc.problem or f"{missing[0]}: not found"))
        if rc.label is None or not rc.label.exists():
            unlabelled.append(case)
        else:
            found.append((case, list(rc.images), rc.label))
    return str(root), found, unlabelled


def _warn_changed(cache_dir: Path, cases: list[tuple[str, list[Path], Path]]) -> None:
    """Say so when a case's raw files changed since it was preprocessed (it is validated as it is now)."""
    from medvol.cache import case_paths
    from medvol.preprocessing.sources import changed_sources

    for case, images, label in cases:
        try:
            record = read_json(case_paths(cache_dir, case)[2]).get("sources")
        except (OSError, ValueError):
            continue
        if changed_sources(record, [*images, label]):
            log.warning("final validation: the raw files of case %s changed since preprocessing; it is "
                        "evaluated against them as they are now", case)


def final_validation(run_dir: str | Path, cache_dir: str | Path, cases: list[str], step: int,
                     device: torch.device, checkpoint: str = "latest", quiet: bool = True,
                     flag: PreemptionFlag | None = None) -> dict | None:
    """Predict ``cases`` from their raw scans with the run's ``checkpoint`` and evaluate them
    into ``RUN/validation/``; returns the summary (None when skipped, with a warning saying why).
    A signal caught by ``flag`` stops it before the next case (:class:`medvol.errors.Stopped`,
    saying which cases were written; no summary.json, so ``--resume`` validates again)."""
    run_dir, cache_dir = Path(run_dir), Path(cache_dir)
    later = f"validate it later with `medvol train ... --out {run_dir} --resume` once that is fixed"
    try:
        root, found, unlabelled = raw_validation_cases(cache_dir, cases)
    except RawUnreachable as e:
        log.warning("final validation skipped: %s. The run itself is complete; %s", e, later)
        return None
    if unlabelled:
        log.info("final validation: %d case(s) without a reference label left out: %s", len(unlabelled),
                 ", ".join(unlabelled[:10]))
    if not found:
        log.warning("final validation skipped: none of the %d validation case(s) has a reference label", len(cases))
        return None
    _warn_changed(cache_dir, found)
    try:
        result = _predict_and_evaluate(run_dir, found, device, checkpoint, quiet, flag)
    except MedvolError as e:
        log.warning("final validation failed: %s. The run itself is complete; %s", e, later)
        return None
    except PredictionStopped as e:  # only fit's flag asks predict_cases to stop
        if flag is not None:
            latest = run_dir / "checkpoints" / "latest.pt"
            flag.stop_point(f"the run is complete ({latest} written at step {step}); {e.done} of {len(found)} "
                            f"validation case(s) predicted into {run_dir / VALIDATION_DIR}, no {SUMMARY} written; "
                            f"validate it with `medvol train ... --out {run_dir} --resume`",
                            during="the final validation")
        raise
    recipe = result.pop("recipe")
    result["validation"] = {"run": str(run_dir.resolve()), "fold": recipe.data.fold,
                            "configuration": recipe.data.configuration, "checkpoint": checkpoint, "step": step,
                            "raw_root": root, "cache": str(cache_dir.resolve()), "cases": [c for c, _, _ in found],
                            "unlabelled_cases": unlabelled, "inference": dataclasses.asdict(recipe.inference)}
    from medvol.evaluation.metrics import write_metrics

    write_metrics(run_dir / VALIDATION_DIR / Path(SUMMARY).stem, result)  # summary.json last: marks it done
    means = ", ".join(f"{k} {v['dice']['mean']:.4f}" for k, v in result["summary"].items())
    log.info("final validation of %d case(s) in their scans' geometry -> %s (Dice %s)", len(found),
             run_dir / VALIDATION_DIR / SUMMARY, means)
    return result


def _predict_and_evaluate(run_dir: Path, found: list[tuple[str, list[Path], Path]], device: torch.device,
                          checkpoint: str, quiet: bool, flag: PreemptionFlag | None = None) -> dict:
    """The cases predicted as ``medvol predict`` does, then their metrics (and the run's recipe)."""
    from medvol.checkpoint import load_run
    from medvol.evaluation.metrics import evaluate_pairs
    from medvol.inference.predictor import predict_cases

    run = load_run(run_dir, device, checkpoint)
    out = run_dir / VALIDATION_DIR
    predict_cases([run], [(case, images) for case, images, _ in found], out, device, quiet=quiet,
                  stop=None if flag is None else lambda: flag.signum)
    labels = run.plans.labels.as_json()  # per class, or per region; the ignore label's voxels left out
    result = evaluate_pairs({case: (out / f"{case}.nii.gz", label) for case, _, label in found}, labels)
    result["recipe"] = run.recipe
    return result


def validate_at_end(run_dir: Path, cache_dir: Path, cases: list[str], step: int, device: torch.device,
                    dist, trained: bool, quiet: bool, flag: PreemptionFlag | None = None) -> None:
    """The end of :func:`medvol.training.engine.fit` (``trainer.final_validation``): the main
    process of ``dist`` validates ``cases`` at the run's final ``step`` while the others wait;
    a resumed run that trained nothing (``trained`` False) keeps a summary already written at
    that step. ``flag``: fit's pre-emption flag, which stops it between two cases."""
    from medvol.training.distributed import run_on_main

    def validate() -> None:
        if not trained and validated_step(run_dir) == step:
            log.info("final validation: %s is from this step (%d) already", run_dir / VALIDATION_DIR / SUMMARY, step)
            return
        final_validation(run_dir, cache_dir, cases, step, device, quiet=quiet, flag=flag)

    run_on_main(dist, validate)
