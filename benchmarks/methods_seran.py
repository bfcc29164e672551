"""SERAN against bicubic interpolation and a plain residual CNN of the same parameter count
(issue 30), on held-out real T1 slices: ``benchmarks/methods.py --method seran``.

Data: the MNI152 2009a T1 (nilearn, 1 mm) cut into axial slabs of ``SLAB`` slices, written as a
plain NIfTI folder and preprocessed by medvol (crop, z-score); every third slab is held out
(never trained on, ``data.val_cases``) and scored on its middle slices, so the nearest training
slice is at least ``SLAB // 2 - 1`` mm away. Each scored slice: an HR crop of up to
``Setting.crop`` pixels round its centre (cut to multiples of the scale), degraded by bicubic
downsampling by the setting's scale (the trainer's ``degrade``), restored by each arm; PSNR and
SSIM against the HR crop (``medvol.evaluation.image``, data range of the HR crop). Both
networks train through ``medvol.training.train`` with the same recipe, steps, seed and data;
only ``model.options.attention`` (and ``zero_init``) and the width differ: the plain CNN's
width is the one whose parameter count is nearest SERAN's, and SERAN's descriptor count is the
one nearest the setting's for which the two counts are within 1 % (:func:`matched`).

Each comparison is a :class:`Setting` in :data:`SETTINGS`; ``--method seran`` runs those named
in :data:`BENCH` (``run(..., settings=(...))`` any of them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

SLAB = 10
RECIPE = "seran_demo"


@dataclass(frozen=True)
class Setting:
    """One comparison: the scale, the shared body (SERAN's width ``features``), the training
    (``steps``, LR patch, batch, lr halved at half the steps) and the scored HR crop side."""

    name: str
    scale: int = 2
    steps: int = 600
    features: int = 16
    groups: int = 2
    blocks: int = 2
    descriptors: int = 8
    lr_patch: int = 24
    batch: int = 16
    crop: int = 96
    zero_init: bool = False
    res_scale: float = 1.0
    excitation: str = "add"

    def opts(self) -> dict:
        return {"scale": self.scale, "groups": self.groups, "blocks": self.blocks, "descriptors": self.descriptors}

    def sets(self) -> list[str]:
        return [f"model.base_features={self.features}", f"model.options.scale={self.scale}",
                f"model.options.groups={self.groups}", f"model.options.blocks={self.blocks}",
                f"model.options.descriptors={self.descriptors}", f"model.options.res_scale={self.res_scale}",
                f"data.batch_size={self.batch}",
                f"method.lr_patch={self.lr_patch}", "optimizer.lr=1.0e-3", f"method.lr_halve_every={self.steps // 2}",
                "trainer.log_every=50", "method.val_slices=2", "data.num_workers=0", f"trainer.steps={self.steps}",
                f"trainer.val_every={self.steps}"]


# x2: the first comparison (16 wide, 24 px LR patches, 600 steps); the others were
# screened on seed 0 (docs/methods/seran.md); x2_w32_zero is the most favourable to SERAN found
SETTINGS = {s.name: s for s in (
    Setting("x2"),
    Setting("x2_zero", zero_init=True),
    Setting("x2_zero_rs10", zero_init=True, res_scale=10.0),  # with Adam: ~10x the attention output's step
    Setting("x2_p48_zero", lr_patch=48, batch=4, zero_init=True),  # 4x the context, same pixels per step
    Setting("x4", scale=4, crop=128),
    Setting("x4_zero", scale=4, crop=128, zero_init=True),
    Setting("x2_w32", features=32),
    Setting("x2_w32_zero", features=32, zero_init=True),
    # the SE reading of "recalibrate feature responses": X * sigmoid(conv1x1(G' V)) (RCAN's gate)
    Setting("x2_gate", excitation="gate"),
)}
BENCH = ("x2", "x2_w32_zero")  # what benchmarks/methods.py --method seran runs


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


def matched(st: Setting) -> tuple[Setting, int]:
    """``st`` with SERAN's descriptor count nearest its own for which a plain CNN width lands
    within 1 % of SERAN's parameter count, and that width (the width alone moves the count in
    steps of several per cent)."""
    from medvol.networks.seran import SERAN, parameter_count

    def count(s: Setting, f: int, attention: bool) -> int:
        return parameter_count(SERAN(1, 1, features=f, attention=attention, **s.opts()))

    for m in sorted(range(2, 2 * st.descriptors + 1), key=lambda m: (abs(m - st.descriptors), m)):
        cand = replace(st, descriptors=m)
        target = count(cand, st.features, True)
        width = min(range(8, 2 * st.features + 8), key=lambda f: abs(count(cand, f, False) - target))
        if abs(count(cand, width, False) - target) <= 0.01 * target:
            return cand, width
    raise ValueError(f"no plain CNN within 1 % of SERAN's parameter count for {st}")


def test_slices(pre: Path, held_out: list[str], crop: int, scale: int) -> list[np.ndarray]:
    """The scored HR crops ``(1, <= crop, <= crop)`` (smaller where the slab is, cut to multiples
    of ``scale``): the 4 middle slices of each held-out slab."""
    from medvol.cache import load_case
    from medvol.data.sr_pairs import crop_to_multiple

    out = []
    for case in held_out:
        image = np.asarray(load_case(pre, case, mmap=False)[0], np.float32)
        cx, cy = image.shape[1] // 2, image.shape[2] // 2
        x0, y0 = max(0, cx - crop // 2), max(0, cy - crop // 2)
        for z in range(SLAB // 2 - 2, SLAB // 2 + 2):
            out.append(crop_to_multiple(image[:, x0:x0 + crop, y0:y0 + crop, z], scale))
    return out


def score(restore, crops: list[np.ndarray], scale: int) -> dict[str, float]:
    """Mean PSNR / SSIM of ``restore(lr) -> sr`` over the crops (bicubic degradation by ``scale``)."""
    import torch

    from medvol.data.sr_pairs import degrade
    from medvol.evaluation.image import image_scores

    rows = []
    for hr in crops:
        lr = degrade(torch.from_numpy(np.ascontiguousarray(hr))[None], scale, "bicubic")[0].numpy()
        rows.append(image_scores(restore(lr)[0], hr[0]))
    return {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim")}


def figure(crop: np.ndarray, model, scale: int, out: Path) -> Path:
    """LR (nearest), bicubic, SERAN and HR of one held-out crop side by side, with each PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from medvol.data.sr_pairs import degrade
    from medvol.evaluation.image import psnr
    from medvol.training.seran import bicubic_upsample, super_resolve

    lr = degrade(torch.from_numpy(np.ascontiguousarray(crop))[None], scale, "bicubic")[0].numpy()
    panels = {f"LR (x{scale} bicubic-degraded)": np.kron(lr[0], np.ones((scale, scale))),
              "bicubic": bicubic_upsample(lr, scale)[0], "SERAN": super_resolve(model, lr, torch.device("cpu"))[0],
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


def run_setting(st: Setting, seeds: list[int], work: Path, toy: bool, deadline: float,
                arms: tuple[str, ...] = ("SERAN", "plain residual CNN")) -> list[dict]:
    """Bicubic and ``arms`` (SERAN, the plain residual CNN of SERAN's parameter count) under
    ``st`` (its descriptor count as :func:`matched` sets it)."""
    import torch

    from medvol.checkpoint import load_run
    from medvol.networks.seran import SERAN, parameter_count
    from medvol.training import load_recipe, train
    from medvol.training.seran import bicubic_upsample, super_resolve

    pre, held_out = build_slabs(work / "data", toy)
    crops = test_slices(pre, held_out, st.crop, st.scale)
    steps = 4 if toy else st.steps
    st, width = matched(st)
    n_seran = parameter_count(SERAN(1, 1, features=st.features, **st.opts()))
    n_plain = parameter_count(SERAN(1, 1, features=width, attention=False, **st.opts()))
    extras = {"SERAN": [f"model.options.zero_init={str(st.zero_init).lower()}",
                        f"model.options.excitation={st.excitation}"],
              "plain residual CNN": [f"model.base_features={width}", "model.options.attention=false"]}
    common = {"method": "seran", "setting": st.name, "scale": st.scale}
    rows = [{**common, "arm": "bicubic", "seed": s, "params": 0, "steps": 0, "seconds": 0.0,
             **score(lambda lr: bicubic_upsample(lr, st.scale), crops, st.scale)} for s in seeds]
    for seed in seeds:
        for arm in arms:
            if time.time() > deadline:
                break
            run_dir = work / "runs" / st.name / f"{arm.split()[0].lower()}_s{seed}"
            sets = [*st.sets(), *extras[arm], f"trainer.seed={seed}", f"data.val_cases={held_out}"]
            if toy:
                sets += ["trainer.steps=4", "trainer.val_every=4", "method.lr_halve_every=2"]
            t0 = time.time()
            train(load_recipe(RECIPE, sets), pre, run_dir, resume="auto", device="cpu", quiet=True)
            model = load_run(run_dir, torch.device("cpu"), "latest").model
            if arm == "SERAN" and seed == seeds[0]:
                figure(crops[len(crops) // 2], model, st.scale, work / f"seran_crops_{st.name}.png")
            seran = arm == "SERAN"
            restored = score(lambda lr, m=model: super_resolve(m, lr, torch.device("cpu")), crops, st.scale)
            rows.append({**common, "descriptors": st.descriptors, "arm": arm, "seed": seed, "steps": steps,
                         "seconds": time.time() - t0, "params": n_seran if seran else n_plain,
                         "width": st.features if seran else width, **restored})
    return rows


def run(seeds: list[int], work: Path, toy: bool, deadline: float, settings: tuple[str, ...] = BENCH) -> list[dict]:
    """Every setting in ``settings`` (default :data:`BENCH`) over ``seeds``; rows in
    ``work/seran/seran.json``."""
    from medvol.utils import write_json

    work = Path(work) / "seran"
    rows = [r for name in settings for r in run_setting(SETTINGS[name], seeds, work, toy, deadline)]
    write_json(work / "seran.json", {"rows": rows, "settings": {n: SETTINGS[n].__dict__ for n in settings}})
    return rows


def table(rows: list[dict], out: Path) -> str:
    """Markdown per setting: per arm, PSNR and SSIM mean ± std over seeds, each seed's values."""
    lines: list[str] = []
    for name in dict.fromkeys(r.get("setting", "x2") for r in rows):
        st = SETTINGS[name]
        lines += [f"### SERAN `{name}`: x{st.scale} on held-out MNI152 T1 slices ({st.crop}x{st.crop} crops, "
                  f"bicubic degradation; {st.features} wide, {st.groups}x{st.blocks} blocks, LR patch {st.lr_patch}"
                  f"{', zero-initialised attention' if st.zero_init else ''}"
                  f"{', gated excitation' if st.excitation == 'gate' else ''})", "",
                  "| arm | params | steps | PSNR dB (mean ± std) | SSIM (mean ± std) | per seed PSNR / SSIM |",
                  "|---|---|---|---|---|---|"]
        here = [r for r in rows if r.get("setting", "x2") == name]
        for arm in dict.fromkeys(r["arm"] for r in here):
            rs = [r for r in here if r["arm"] == arm]
            p, s = np.array([r["psnr"] for r in rs]), np.array([r["ssim"] for r in rs])
            per = ", ".join(f"{r['seed']}: {r['psnr']:.2f} / {r['ssim']:.4f}" for r in rs)
            lines.append(f"| {arm} | {rs[0]['params']} | {rs[0]['steps']} | {p.mean():.2f} ± {p.std():.2f} | "
                         f"{s.mean():.4f} ± {s.std():.4f} | {per} |")
        lines.append("")
    return "\n".join(lines)
