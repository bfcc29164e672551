"""``medvol evaluate --kind soft``: predicted probabilities against several raters' labels.

Predictions: ``<case>.npz`` (``probabilities`` ``(K, X, Y, Z)``, what ``medvol predict`` writes
for an MRNet run or with ``--save-probabilities``). References: one label file per rater,
``<case>_r<k><ext>`` (the multi-rater raw layout). The soft reference of class c is the
expertise-weighted fraction of raters who drew c (equal weights by default). Per case and
foreground class: MRNet's soft Dice and the ECE (:mod:`medvol.evaluation.metrics`); over all
cases one reliability diagram per class (``<out>_reliability.png``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from medvol.errors import InputError
from medvol.evaluation.metrics import expected_calibration_error, reliability_bins, soft_dice
from medvol.io import read_volume
from medvol.io.dataset_json import dataset_labels
from medvol.io.discovery import find_scans, scan_stem
from medvol.manifest import claim_files
from medvol.utils import atomic_path, write_json

_RATER = re.compile(r"^(?P<case>.+)_r(?P<k>\d+)$")


def rater_files(ref_dir: Path) -> dict[str, list[Path]]:
    """``{case: [rater 0's file, rater 1's, ...]}`` of ``<case>_r<k>`` label files in ``ref_dir``."""
    found: dict[str, dict[int, Path]] = {}
    for p in find_scans(ref_dir):
        m = _RATER.match(scan_stem(p.name))
        if m and p.is_file():
            found.setdefault(m["case"], {})[int(m["k"])] = p
    out = {}
    for case, by_k in sorted(found.items()):
        if sorted(by_k) != list(range(len(by_k))) or len(by_k) < 2:
            raise InputError(ref_dir, f"case '{case}': rater files must be <case>_r0, _r1, ... (at least two), "
                                      f"found raters {sorted(by_k)}")
        out[case] = [by_k[k] for k in range(len(by_k))]
    if not out:
        raise InputError(ref_dir, "no multi-rater reference (<case>_r<k> label files) found")
    return out


def soft_reference(files: Sequence[Path], num_classes: int, expertise: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(soft reference ``(K, X, Y, Z)``: the weighted fraction of raters per class, affine)."""
    w = np.full(len(files), 1.0 / len(files)) if expertise is None else np.asarray(expertise, float)
    if w.shape != (len(files),) or (w < 0).any() or w.sum() <= 0:
        raise InputError(files[0], f"--expertise: give {len(files)} non-negative weights, one per rater")
    w = w / w.sum()
    out, affine = None, None
    for wk, f in zip(w, files):
        v = read_volume(f)
        lab = np.asarray(v.array).astype(np.int64)
        if out is None:
            out, affine = np.zeros((num_classes, *lab.shape)), v.affine
        elif lab.shape != out.shape[1:]:
            raise InputError(f, f"shape {lab.shape} differs from the other raters' {out.shape[1:]}")
        for c in range(num_classes):
            out[c] += wk * (lab == c)
    assert out is not None and affine is not None
    return out, affine


def _probabilities(path: Path, shape, affine) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, "missing: predict with an MRNet run (or --save-probabilities) into this folder")
    with np.load(path) as z:
        probs = z["probabilities"].astype(np.float32)
        if probs.shape[1:] != tuple(shape) or not np.allclose(z["affine"], affine, atol=1e-3, rtol=1e-4):
            raise InputError(path, f"probabilities {probs.shape[1:]} not on the reference's grid {tuple(shape)}")
    return probs


def evaluate_soft(pred_dir: str | Path, ref_dir: str | Path, out: str | Path,
                  expertise: Sequence[float] | None = None, n_bins: int = 10) -> dict:
    """Soft Dice and ECE of every case's probabilities; writes ``<out>_calibration.json`` and
    ``<out>_reliability.png``. Class names from the reference's ``dataset.json``."""
    pred_dir, ref_dir, out = Path(pred_dir), Path(ref_dir), Path(out)
    refs = rater_files(ref_dir)
    labels = dataset_labels(ref_dir.parent) or {}
    names = {v: k for k, v in labels.items()}
    cases: dict[str, dict] = {}
    pooled: dict[str, np.ndarray] = {}
    for case, files in refs.items():
        probe = read_volume(files[0])
        probs = _probabilities(pred_dir / f"{case}.npz", probe.spatial_shape, probe.affine)
        ref, _ = soft_reference(files, probs.shape[0], expertise)
        cases[case] = {}
        for c in range(1, probs.shape[0]):
            name = names.get(c, f"class_{c}")
            cases[case][name] = {"soft_dice": soft_dice(probs[c], ref[c]),
                                 "ece": expected_calibration_error(probs[c], ref[c], n_bins)}
            b = reliability_bins(probs[c], ref[c], n_bins)
            acc = pooled.setdefault(name, np.zeros((3, n_bins)))
            acc += np.nan_to_num(np.stack([b["count"], b["confidence"] * b["count"], b["frequency"] * b["count"]]))
    summary = {n: {k: float(np.mean([cases[c][n][k] for c in cases])) for k in ("soft_dice", "ece")}
               for n in pooled}
    result: dict = {"cases": cases, "summary": summary, "expertise": list(expertise) if expertise else "equal",
              "reliability": {n: {"count": a[0].tolist(), "confidence": (a[1] / np.maximum(a[0], 1)).tolist(),
                                  "frequency": (a[2] / np.maximum(a[0], 1)).tolist()} for n, a in pooled.items()}}
    claim_files(out.parent, [f"{out.name}_calibration.json", f"{out.name}_reliability.png"])
    write_json(out.parent / f"{out.name}_calibration.json", result)
    reliability_picture(result["reliability"], out.parent / f"{out.name}_reliability.png")
    return result


def reliability_picture(bins: dict[str, dict], path: Path) -> Path:
    """One reliability diagram per class: frequency of the reference against confidence per bin
    (bars), the diagonal of perfect calibration, and the fraction of voxels per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(bins)), figsize=(4 * max(1, len(bins)), 4), squeeze=False)
    for ax, (name, b) in zip(axes[0], bins.items()):
        n = len(b["count"])
        centres = (np.arange(n) + 0.5) / n
        count = np.asarray(b["count"])
        ax.bar(centres, np.where(count > 0, b["frequency"], 0), width=1.0 / n, edgecolor="k", alpha=0.7,
               label="reference frequency")
        ax.plot([0, 1], [0, 1], "r--", label="calibrated")
        ax.plot(centres, count / max(count.sum(), 1), "g.-", label="fraction of voxels")
        ax.set(xlabel="predicted probability", ylabel="frequency", title=name, xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
