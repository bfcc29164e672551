"""SERAN against bicubic interpolation and a plain residual CNN of the same parameter count
(issue 30), on held-out real T1 slices: ``benchmarks/methods.py --method seran``.

Data: the MNI152 2009a T1 (nilearn, 1 mm) cut into axial slabs of ``SLAB`` slices, written as a
plain NIfTI folder and preprocessed by medvol (crop, z-score); every third slab is held out
(never trained on, ``data.val_cases``) and scored on its middle slices, so the nearest training
slice is at least ``SLAB // 2 - 1`` mm away. Each scored slice: a ``CROP`` x ``CROP`` HR crop
round its centre, degraded by bicubic downsampling x2 (the trainer's ``degrade``), restored by
each arm; PSNR and SSIM against the HR crop (``medvol.evaluation.image``, data range of the HR
crop). Both networks train through ``medvol.training.train`` with the same recipe, steps, seed
and data; only ``model.options.attention`` and the width differ (the plain CNN's width is the
one whose parameter count is nearest SERAN's).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

SLAB, CROP, SCALE = 10, 96, 2
STEPS = 600
RECIPE = "seran_demo"
COMMON = ["model.base_features=16", "model.options.groups=2", "model.options.blocks=2", "model.options.descriptors=8",
          "data.batch_size=16", "method.lr_patch=24", "optimizer.lr=1.0e-3", "method.lr_halve_every=300",
          "trainer.log_every=50", "method.val_slices=2", "data.num_workers=0"]


def build_slabs(work: Path, toy: bool) -> tuple[Path, list[str]]:
    """The MNI152 T1 as axial slabs (a plain NIfTI folder) preprocessed into ``work/pre``; the
    held-out slab ids."""
    import nibabel as nib

    from medvol.datasets.realdata import MNI152_2009A, package_file
    from medvol.preprocessing import preprocess_dataset

    raw, pre = work / "raw", work / "pre"
    img = nib.load(package_file("nilearn", MNI152_2009A["t1"]))
    data = np.asarray(img.dataobj, np.float32)
    zs = np.flatnonzero(data.reshape(-1, data.shape[2]).max(0) > 0.1 * data.max())
    n_slabs = 6 if toy else (zs[-1] - zs[0] + 1) // SLAB
    ids = [f"slab_{i:02d}" for i in range(n_slabs)]
    held_out = [c for i, c in enumerate(ids) if i % 3 == 1]
    if not (pre / "plans.json").exists():
        raw.mkdir(parents=True, exist_ok=True)
        for i, case in enumerate(ids):
            z0 = int(zs[0]) + i * SLAB
            aff = img.affine.copy()
            aff[:3, 3] = img.affine[:3, :3] @ [0, 0, z0] + img.affine[:3, 3]
            nib.save(nib.Nifti1Image(data[:, :, z0:z0 + SLAB], aff), raw / f"{case}.nii.gz")
        preprocess_dataset(raw, pre, num_workers=1, quiet=True)
    return pre, held_out


def matched_width(target: int, **opts) -> int:
    """The plain CNN's width whose parameter count is nearest ``target``."""
    from medvol.networks.seran import SERAN, parameter_count

    return min(range(8, 65), key=lambda f: abs(parameter_count(SERAN(1, 1, SCALE, f, attention=False, **opts))
                                              - target))


def test_slices(pre: Path, held_out: list[str]) -> list[np.ndarray]:
    """The scored HR crops ``(1, CROP, CROP)``: the middle slices of each held-out slab."""
    from medvol.cache import load_case

    out = []
    for case in held_out:
        image = np.asarray(load_case(pre, case, mmap=False)[0], np.float32)
        cx, cy = image.shape[1] // 2, image.shape[2] // 2
        x0, y0 = max(0, cx - CROP // 2), max(0, cy - CROP // 2)
        for z in range(SLAB // 2 - 2, SLAB // 2 + 2):
            out.append(image[:, x0:x0 + CROP, y0:y0 + CROP, z])
    return out


def score(restore, crops: list[np.ndarray]) -> dict[str, float]:
    """Mean PSNR / SSIM of ``restore(lr) -> sr`` over the crops (bicubic x2 degradation)."""
    import torch

    from medvol.data.sr_pairs import degrade
    from medvol.evaluation.image import image_scores

    rows = []
    for hr in crops:
        lr = degrade(torch.from_numpy(np.ascontiguousarray(hr))[None], SCALE, "bicubic")[0].numpy()
        rows.append(image_scores(restore(lr)[0], hr[0]))
    return {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim")}


def figure(crop: np.ndarray, model, out: Path) -> Path:
    """LR (nearest), bicubic, SERAN and HR of one held-out crop side by side, with each PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from medvol.data.sr_pairs import degrade
    from medvol.evaluation.image import psnr
    from medvol.training.seran import bicubic_upsample, super_resolve

    lr = degrade(torch.from_numpy(np.ascontiguousarray(crop))[None], SCALE, "bicubic")[0].numpy()
    panels = {"LR (x2 bicubic-degraded)": np.kron(lr[0], np.ones((SCALE, SCALE))),
              "bicubic": bicubic_upsample(lr, SCALE)[0], "SERAN": super_resolve(model, lr, torch.device("cpu"))[0],
              "HR": crop[0]}
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    lo, hi = np.percentile(crop, [1, 99.5])
    for ax, (name, img) in zip(axes, panels.items()):
        ax.imshow(img.T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.set_title(name if name.startswith(("LR", "HR")) else f"{name} {psnr(img, crop[0]):.2f} dB", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(seeds: list[int], work: Path, toy: bool, deadline: float) -> list[dict]:
    import torch

    from medvol.checkpoint import load_run
    from medvol.networks.seran import SERAN, parameter_count
    from medvol.training import load_recipe, train
    from medvol.training.seran import bicubic_upsample, super_resolve

    work = Path(work) / "seran"
    pre, held_out = build_slabs(work / "data", toy)
    crops = test_slices(pre, held_out)
    steps = 4 if toy else STEPS
    opts = {"groups": 2, "blocks": 2, "descriptors": 8}
    n_seran = parameter_count(SERAN(1, 1, SCALE, 16, **opts))
    width = matched_width(n_seran, **opts)
    n_plain = parameter_count(SERAN(1, 1, SCALE, width, attention=False, **opts))
    arms = {"SERAN": [], "plain residual CNN": [f"model.base_features={width}", "model.options.attention=false"]}
    rows = [{"method": "seran", "arm": "bicubic", "seed": s, "params": 0, "steps": 0, "seconds": 0.0,
             **score(lambda lr: bicubic_upsample(lr, SCALE), crops)} for s in seeds]
    for seed in seeds:
        for arm, extra in arms.items():
            if time.time() > deadline:
                break
            run_dir = work / "runs" / f"{arm.split()[0].lower()}_s{seed}"
            sets = [*COMMON, *extra, f"trainer.steps={steps}", f"trainer.val_every={steps}", f"trainer.seed={seed}",
                    f"data.val_cases={held_out}"]
            t0 = time.time()
            train(load_recipe(RECIPE, sets), pre, run_dir, resume="auto", device="cpu", quiet=True)
            model = load_run(run_dir, torch.device("cpu"), "latest").model
            if arm == "SERAN" and seed == seeds[0]:
                figure(crops[len(crops) // 2], model, work / "seran_crops.png")
            rows.append({"method": "seran", "arm": arm, "seed": seed, "steps": steps, "seconds": time.time() - t0,
                         "params": n_seran if arm == "SERAN" else n_plain,
                         **score(lambda lr, m=model: super_resolve(m, lr, torch.device("cpu")), crops)})
    (work / "seran.json").write_text(json.dumps({"rows": rows, "held_out": held_out, "n_slices": len(crops)},
                                                indent=1))
    return rows


def table(rows: list[dict], out: Path) -> str:
    """Markdown: per arm, PSNR and SSIM mean ± std over seeds, and each seed's values."""
    lines = [f"### SERAN x{SCALE} on held-out MNI152 T1 slices ({CROP}x{CROP} crops, bicubic degradation)", "",
             "| arm | params | steps | PSNR dB (mean ± std) | SSIM (mean ± std) | per seed PSNR / SSIM |",
             "|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        p, s = np.array([r["psnr"] for r in rs]), np.array([r["ssim"] for r in rs])
        per = ", ".join(f"{r['seed']}: {r['psnr']:.2f} / {r['ssim']:.4f}" for r in rs)
        lines.append(f"| {arm} | {rs[0]['params']} | {rs[0]['steps']} | {p.mean():.2f} ± {p.std():.2f} | "
                     f"{s.mean():.4f} ± {s.std():.4f} | {per} |")
    return "\n".join(lines)
