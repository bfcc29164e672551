"""Image-quality metrics of a restored image against its reference (super-resolution, SERAN):
PSNR and SSIM, computed by scikit-image (``skimage.metrics``), the one place medvol scores them.

``data_range`` defaults to the reference's own range (max - min), the convention for images
that have no fixed intensity scale (normalised MR); pass it to score on a fixed scale. Arrays
are 2D slices or 3D volumes of the same shape; SSIM uses scikit-image's defaults (7-wide
uniform window in every dimension, K1 0.01, K2 0.03), so each side must be at least 7.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvol.errors import InputError


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    if pred.shape != ref.shape:
        raise InputError(None, f"shapes differ: {pred.shape} vs reference {ref.shape}")
    return pred, ref


def _range(ref: np.ndarray, data_range: float | None) -> float:
    return float(data_range) if data_range is not None else float(max(ref.max() - ref.min(), 1e-8))


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(range^2 / MSE)``."""
    from skimage.metrics import peak_signal_noise_ratio

    pred, ref = _pair(pred, ref)
    return float(peak_signal_noise_ratio(ref, pred, data_range=_range(ref, data_range)))


def ssim(pred: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004) as scikit-image computes it."""
    from skimage.metrics import structural_similarity

    pred, ref = _pair(pred, ref)
    return float(structural_similarity(ref, pred, data_range=_range(ref, data_range)))


def image_scores(pred: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> dict[str, float]:
    """``{"psnr": dB, "ssim": ...}`` of one image or volume against its reference."""
    return {"psnr": psnr(pred, ref, data_range), "ssim": ssim(pred, ref, data_range)}


def evaluate_image_folders(pred_dir: str | Path, ref_dir: str | Path, out: str | Path | None = None) -> dict:
    """``medvol evaluate --kind image``: PSNR and SSIM of every scan of ``pred_dir`` against the
    scan of the same name in ``ref_dir`` (same grid required; each volume's data range is its
    reference's); writes ``<out>.json`` (per case + mean/std) and ``<out>.csv`` when ``out`` is given."""
    from medvol.evaluation.metrics import write_result_table
    from medvol.io import read_volume
    from medvol.io.discovery import find_scans, scan_stem

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds = {scan_stem(p.name): p for p in find_scans(pred_dir) if p.is_file()}
    refs = {scan_stem(p.name): p for p in find_scans(ref_dir) if p.is_file()}
    missing = sorted(set(refs) - set(preds))
    if not refs or missing:
        raise InputError(pred_dir, f"no image for the reference(s) {missing[:10]} of {ref_dir}" if refs
                         else f"no reference scans in {ref_dir}")
    cases = {}
    for case in sorted(refs):
        p, r = read_volume(preds[case]).array, read_volume(refs[case]).array
        if p.shape != r.shape:
            raise InputError(preds[case], f"shape {p.shape} differs from its reference {refs[case]} {r.shape}")
        cases[case] = image_scores(p, r)
    summary = {k: {"mean": float(np.mean([c[k] for c in cases.values()])),
                   "std": float(np.std([c[k] for c in cases.values()])), "n": len(cases)} for k in ("psnr", "ssim")}
    result = {"cases": cases, "summary": summary}
    if out is not None:
        write_result_table(Path(out), result, ["case", "psnr", "ssim"],
                           ([c, f"{s['psnr']:.6f}", f"{s['ssim']:.6f}"] for c, s in cases.items()))
    return result
