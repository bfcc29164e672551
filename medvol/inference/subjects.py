"""Subject-level predictions of the two-stage slice pipeline (after DC-MT's aggregation network,
MedIA 2022; ``docs/methods/slice_aggregator.md``).

Stage one, a trained 2D slice classifier (a run folder with ``data.configuration: 2d``), runs
over each subject's slices across its plan's slice axis (through
:class:`medvol.networks.slice_adapter.SliceAdapter`) and gives per-slice logits and feature
vectors; stage two, the GRU slice aggregator (``trainer.name: slice_aggregator``), turns a
subject's feature sequence into subject class probabilities.

- :func:`extract_features` (``medvol extract-features``): the classifier over every case of a
  preprocessing cache, or over scans preprocessed with the classifier's plan, into one
  features file (:mod:`medvol.io.slice_features`) with the subjects' classes from
  ``slice_labels.csv``; what the aggregator trains on.
- :func:`predict_subjects` (``medvol predict -m AGG_RUN``): both stages on new scans; the
  aggregator's run folder names the classifier its features came from. Writes
  ``subjects.csv`` (subject, class probabilities, predicted class) and ``slices.csv`` (subject,
  slice of the preprocessed grid, the raw scan's slice nearest it, per-slice probabilities).
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from medvol.data.slice_outputs import SLICE_BATCH, slice_outputs, subject_probabilities
from medvol.errors import CacheError, ConfigError
from medvol.precision import Precision, choose_precision
from medvol.utils import sha256_file, write_text

log = logging.getLogger(__name__)

SUBJECTS_CSV, SLICES_CSV = "subjects.csv", "slices.csv"


@dataclass
class SliceClassifier:
    """A trained 2D slice classifier ready to run over preprocessed volumes."""

    model: nn.Module
    plans: dict  # plans.json of its run (the 3d plan preprocessing applies, with its 2d block)
    slice_axis: int  # 0-2 of X, Y, Z
    context: int
    patch_size: list[int]  # the 2D training patch (smaller slices are padded to it)
    run_dir: Path
    checkpoint: Path

    def outputs(self, image, device: torch.device, slice_batch: int = SLICE_BATCH,
                precision: Precision | None = None) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = slice_outputs(self.model, image, self.slice_axis, self.context, device, self.patch_size,
                                      slice_batch, precision=precision)
        assert feats is not None
        return logits, feats

    def meta(self) -> dict:
        """What a features file records about the classifier that made it."""
        return {"classifier": str(self.run_dir.resolve()), "checkpoint": self.checkpoint.stem,
                "checkpoint_sha256": sha256_file(self.checkpoint), "slice_axis": self.slice_axis,
                "context": self.context}


def load_classifier(run_dir: str | Path, device: torch.device, checkpoint: str = "best",
                    sha256: str | None = None) -> SliceClassifier:
    """The slice classifier of a ``medvol train`` run folder (``data.configuration: 2d``); with
    ``sha256``, its checkpoint file must be the one whose hash that is."""
    from medvol.checkpoint import load_run, run_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: the slice classifier's run folder is not there")
    run = load_run(run_dir, device, checkpoint)
    if run.slice_axis is None:
        raise ConfigError(f"{run_dir}: a 3D model; the slice pipeline needs a 2D slice classifier "
                          "(data.configuration: 2d)")
    ckpt = run_checkpoint(run_dir, checkpoint)
    if sha256 and sha256_file(ckpt) != sha256:
        raise ConfigError(f"{ckpt}: not the checkpoint the aggregator's features were extracted with (it changed "
                          "since): extract the features again and retrain the aggregator")
    return SliceClassifier(run.model, run.plans.raw, int(run.slice_axis), run.context, run.patch_size, run_dir, ckpt)


# ------------------------------------------------------------------ stage one: features


def _is_cache(path: Path) -> bool:
    return (path / "plans.json").is_file() and (path / "cases").is_dir()


def _cache_cases(cache: Path, clf: SliceClassifier) -> Iterator[tuple[str, np.ndarray, dict]]:
    """``(case, image, props)`` of a preprocessing cache made with the classifier's plan."""
    from medvol.cache import list_cases, load_case, plans_digest

    digest = plans_digest(clf.plans)
    for case in list_cases(cache):
        image, _, props = load_case(cache, case)
        if props.get("plans_digest") != digest:
            raise ConfigError(f"{cache}: case '{case}' was preprocessed with another plan than the slice "
                              f"classifier's ({clf.run_dir}); pass the cache it was trained on, or the scans")
        yield case, image, props


def _scan_cases(cases: list, plans: dict) -> Iterator[tuple[str, np.ndarray, dict]]:
    """``(case, image, props)`` of scans preprocessed with ``plans`` (as ``medvol predict`` does)."""
    from medvol.io import read_volume
    from medvol.preprocessing import preprocess_case

    for case, sources in cases:
        array, props = preprocess_case([read_volume(s) for s in sources], plans, inplace=True)
        yield case, array, props


def _cases(data: Path, clf: SliceClassifier) -> tuple[int, Iterator[tuple[str, np.ndarray, dict]]]:
    """How many cases ``data`` holds (a cache, or scans) and an iterator over them, preprocessed."""
    from medvol.cache import list_cases
    from medvol.io.discovery import input_cases

    if _is_cache(data):
        return len(list_cases(data)), _cache_cases(data, clf)
    found = input_cases(data, len(clf.plans["normalization"]))
    return len(found), _scan_cases(found, clf.plans)


def _raw_slices(props: dict, axis: int, n: int) -> np.ndarray:
    """The raw scan's slice nearest each preprocessed slice; -1 where the cache reordered the axes."""
    from medvol.data.slices import raw_slice_of

    try:
        return raw_slice_of(props, axis)
    except CacheError:
        return np.full(n, -1, np.int64)


def _subject_labels(data: Path, labels: str | Path | None, counts: dict[str, int]) -> dict[str, int]:
    """``{subject: class}`` from ``labels`` (a slice_labels.csv), else from the cache's own; {}
    when there is none (scans: only ``labels``)."""
    from medvol.io.slice_labels import SLICE_LABELS_FILE, read_slice_labels

    if labels is None and _is_cache(data) and (data / SLICE_LABELS_FILE).is_file():
        labels = data / SLICE_LABELS_FILE
    return {} if labels is None else read_slice_labels(labels, counts).subjects


def extract_features(run_dir: str | Path, data: str | Path, out_dir: str | Path, device: str = "auto",
                     checkpoint: str = "best", labels: str | Path | None = None, slice_batch: int = SLICE_BATCH,
                     quiet: bool = False, precision: str = "auto") -> Path:
    """The slice classifier of ``run_dir`` over every case of ``data`` (a preprocessing cache
    made with its plan, or scans: a file, a folder, a DICOM series), per-slice features and
    logits written to ``out_dir/features.npz`` with the subjects' classes: from ``labels`` (a
    ``slice_labels.csv`` indexing the raw scans' slices) or, for a cache, its own. ``precision``
    (:mod:`medvol.precision`) is recorded: predict with the same one."""
    from tqdm import tqdm

    from medvol.inference.predictor import resolve_device
    from medvol.io.slice_features import FEATURES_FILE, SliceFeatures, SubjectSlices, write_features
    from medvol.manifest import check_files, claim_files

    dev, data, out_dir = resolve_device(device), Path(data), Path(out_dir)
    prec = choose_precision(dev, precision)
    clf = load_classifier(run_dir, dev, checkpoint)
    check_files(out_dir, [FEATURES_FILE])  # before anything is computed
    n, cases = _cases(data, clf)
    items, counts = [], {}
    for case, image, props in tqdm(cases, total=n, desc="extract-features", unit="case",
                                   disable=quiet or not sys.stderr.isatty()):
        logits, feats = clf.outputs(image, dev, slice_batch, prec)
        counts[case] = int(props["original_shape"][clf.slice_axis])
        items.append(SubjectSlices(case, feats, logits, np.arange(len(feats)),
                                   _raw_slices(props, clf.slice_axis, len(feats))))
    if not items:
        raise CacheError(f"{data}: no preprocessed case here")
    classes = _subject_labels(data, labels, counts)
    for item in items:
        item.subject_class = classes.get(item.subject, -1)
    meta = {**clf.meta(), "source": str(data.resolve()), "precision": prec.name,
            "slice_classes": int(items[0].logits.shape[1]),
            "subject_classes": max(classes.values()) + 1 if classes else None}
    claim_files(out_dir, [FEATURES_FILE])
    return write_features(out_dir / FEATURES_FILE, SliceFeatures(items, meta))


# ------------------------------------------------------------------ stage two: subjects


@dataclass
class SubjectModel:
    """A trained aggregator and the slice classifier whose features it was trained on."""

    aggregator: nn.Module
    classifier: SliceClassifier
    run_dir: Path


def is_subject_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is a slice aggregator's run folder (predicted by :func:`predict_subjects`)."""
    from medvol.io.slice_features import AGGREGATOR_RUN_FILE

    return (Path(run_dir) / AGGREGATOR_RUN_FILE).is_file()


def load_subject_model(run_dir: str | Path, device: torch.device, checkpoint: str = "best") -> SubjectModel:
    """The aggregator of ``run_dir`` (eval mode, on ``device``) with its slice classifier."""
    from medvol.checkpoint import inference_weights, load_checkpoint, load_weights, run_checkpoint
    from medvol.config import load_recipe
    from medvol.io.slice_features import AGGREGATOR_RUN_FILE
    from medvol.networks import build_model
    from medvol.utils import read_json

    run_dir = Path(run_dir)
    info = read_json(run_dir / AGGREGATOR_RUN_FILE)
    if not info.get("classifier"):
        raise ConfigError(f"{run_dir / AGGREGATOR_RUN_FILE}: its features name no slice classifier (made outside "
                          "medvol extract-features): it cannot predict scans")
    ckpt = load_checkpoint(run_checkpoint(run_dir, checkpoint))
    model = build_model(load_recipe(run_dir / "recipe.yaml").model, None, int(info["feature_dim"]),
                        int(info["num_classes"]))
    load_weights(model, inference_weights(ckpt), run_dir / AGGREGATOR_RUN_FILE, run_checkpoint(run_dir, checkpoint))
    clf = load_classifier(info["classifier"], device, info.get("classifier_checkpoint") or "best",
                          info.get("classifier_sha256"))
    return SubjectModel(model.to(device).eval(), clf, run_dir)


def predict_subjects(run_dir: str | Path, inputs: str | Path, out_dir: str | Path, device: str = "auto",
                     checkpoint: str = "best", quiet: bool = False, slice_batch: int = SLICE_BATCH,
                     precision: str = "auto") -> list[Path]:
    """Both stages on every scan of ``inputs``: ``out_dir/subjects.csv`` and ``slices.csv``.
    ``precision`` is the slice classifier's (the aggregator, a small network, runs in fp32)."""
    from tqdm import tqdm

    from medvol.inference.predictor import resolve_device
    from medvol.io.discovery import input_cases
    from medvol.manifest import check_files

    dev, out_dir = resolve_device(device), Path(out_dir)
    prec = choose_precision(dev, precision)
    sm = load_subject_model(run_dir, dev, checkpoint)
    cases = input_cases(inputs, len(sm.classifier.plans["normalization"]))
    check_files(out_dir, [SUBJECTS_CSV, SLICES_CSV])
    subjects, slices = [], []
    for case, image, props in tqdm(_scan_cases(cases, sm.classifier.plans), total=len(cases), desc="predict",
                                   unit="case", disable=quiet or not sys.stderr.isatty()):
        logits, feats = sm.classifier.outputs(image, dev, slice_batch, prec)
        probs = subject_probabilities(sm.aggregator, [feats], dev)[0]
        subjects.append([case, *probs, int(probs.argmax())])
        raw = _raw_slices(props, sm.classifier.slice_axis, len(feats))
        slices += [[case, s, int(r), *p] for s, (r, p) in enumerate(zip(raw, torch.from_numpy(logits).softmax(1)
                                                                             .numpy()))]
        log.info("%s: subject class %d (p = %.3f)", case, int(probs.argmax()), float(probs.max()))
    k_subject, k_slice = len(subjects[0]) - 2, len(slices[0]) - 3
    return [_write_csv(out_dir / SUBJECTS_CSV, ["subject", *_prob_columns(k_subject), "predicted"], subjects),
            _write_csv(out_dir / SLICES_CSV, ["subject", "slice", "raw_slice", *_prob_columns(k_slice)], slices)]


def _prob_columns(k: int) -> list[str]:
    return [f"p_{c}" for c in range(k)]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """Probabilities with 6 decimals; written atomically and recorded in the folder's manifest."""
    from medvol.manifest import claim_files

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[f"{v:.6f}" if isinstance(v, (float, np.floating)) else v for v in row] for row in rows])
    claim_files(path.parent, [path.name])
    write_text(path, buf.getvalue())
    return path


__all__ = ["extract_features", "is_subject_run", "load_classifier", "load_subject_model", "predict_subjects",
           "slice_outputs", "subject_probabilities"]
