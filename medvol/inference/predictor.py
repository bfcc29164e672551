"""Sliding-window prediction of whole scans with a trained run, back in the scans' geometry.

Each scan is preprocessed with the run's plan, predicted with MONAI's sliding-window
inference (Gaussian importance weighting, batched windows, AMP on CUDA, optional mirroring
TTA inside each window as nnU-Net does), converted to float16 class probabilities, restored
to the scan's own grid (:func:`restore_geometry`) and written as a label map with exactly the
input's shape and affine. Accumulation happens in float16, on the GPU when the output fits
there and on the CPU otherwise, so a process holds about twice the float16 probabilities.
"""

from __future__ import annotations

import itertools
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medvol.errors import ConfigError, InputError
from medvol.networks import as_class_logits
from medvol.io import Volume, is_nifti, read_volume, write_volume
from medvol.io.dicom import list_dicom_files
from medvol.manifest import check_files, claim_files
from medvol.utils import atomic_path, cuda_amp_dtype, read_json

log = logging.getLogger(__name__)


class WindowPredictor(nn.Module):
    """Runs ``model`` on one batch of windows: float32 in, mirrored TTA, float16 out."""

    def __init__(self, model: nn.Module, mirror_axes: tuple[int, ...] = (), amp_dtype=None,
                 task: int | None = None):
        super().__init__()
        self.model = model
        self.flips = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
        self.amp_dtype = amp_dtype
        self.task = task  # task-conditioned multi-label models (DoDNet): sigmoid channels out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        total = None
        ctx = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            for axes in self.flips:
                dims = [a + 2 for a in axes]
                xi = torch.flip(x, dims) if dims else x
                if self.task is None:
                    y = as_class_logits(self.model(xi).float())
                else:
                    y = self.model(xi, torch.full((xi.shape[0],), self.task, device=xi.device)).float()
                y = torch.flip(y, dims) if dims else y
                total = y if total is None else total + y
        mean = total / len(self.flips)
        return (torch.sigmoid(mean) if self.task is not None else mean).half()


@dataclass
class RunModel:
    model: nn.Module
    recipe: object
    plans: dict
    run_dir: Path

    @property
    def patch_size(self) -> list[int]:
        return list(self.recipe.data.patch_size or self.plans["patch_size"])

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        aug = self.recipe.data.augment
        return tuple(int(a) for a in aug.flip_axes) if aug.enabled and aug.flip_prob > 0 else ()


def load_run(run_dir: str | Path, device: torch.device, checkpoint: str = "best") -> RunModel:
    """Model, recipe and plans of a run folder written by ``medvol train``."""
    from medvol.config import load_recipe
    from medvol.networks import build_model
    from medvol.training.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    for f in ("recipe.yaml", "plans.json"):
        if not (run_dir / f).exists():
            raise ConfigError(f"{run_dir}: not a medvol run folder (no {f}); pass the --out of `medvol train`")
    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.trainer.name == "pcrl":
        raise ConfigError(f"{run_dir}: a PCRL pretraining run has no segmentation model; fine-tune one from its "
                          f"encoder.pt (--set init_from={run_dir / 'encoder.pt'})")
    plans = read_json(run_dir / "plans.json")
    ckpt_path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt_path.exists() and checkpoint == "best":
        ckpt_path = run_dir / "checkpoints" / "latest.pt"
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    key = ckpt.get("inference_model", "model")
    model = build_model(recipe.model, plans, len(plans["normalization"]), len(plans["labels"]))
    model.load_state_dict(ckpt["models"][key])
    model.to(device).eval()
    return RunModel(model, recipe, plans, run_dir)


def sliding_window_probabilities(run: RunModel, image: np.ndarray | torch.Tensor, device: torch.device,
                                 overlap: float = 0.5, sw_batch_size: int = 2, tta: bool = False,
                                 amp: bool = True, task: int | None = None) -> torch.Tensor:
    """Class probabilities ``(C, X, Y, Z)`` float16 (on CPU) of a preprocessed image.

    Pass the image as a float16 tensor (and drop the float32 array) to hold the least memory:
    then the process keeps the float16 input, the float16 output and MONAI's float16 count map.
    """
    from monai.inferers import sliding_window_inference

    amp_dtype = cuda_amp_dtype(device, amp)
    predictor = WindowPredictor(run.model, run.mirror_axes if tta else (), amp_dtype, task)
    n_classes = len(run.plans["labels"])
    out_bytes = n_classes * int(np.prod(image.shape[1:])) * 2 * 2  # float16 output + count map headroom
    acc = device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if out_bytes > 0.5 * free:
            acc = torch.device("cpu")
    x = torch.as_tensor(image)  # a (possibly strided) view of a cropped array: no float32 copy
    x = x.to(device=acc, dtype=torch.float16)[None]  # float16 input: MONAI accumulates in float16
    logits = sliding_window_inference(x, run.patch_size, sw_batch_size, predictor, overlap=overlap, mode="gaussian",
                                      sigma_scale=0.125, padding_mode="constant", cval=0.0, sw_device=device,
                                      device=acc)[0]
    if task is not None:  # multi-label: already per-channel sigmoid probabilities
        return logits.cpu()
    for z in range(0, logits.shape[-1], 16):  # softmax in slabs, in place: no float32 copy of the volume
        sl = logits[..., z:z + 16]
        sl.copy_(torch.softmax(sl.float(), dim=0).half())
    return logits.cpu()


def _case_groups(inp: Path, num_channels: int) -> list[tuple[str, list[Path]]]:
    """(case id, channel sources) for a NIfTI file, a folder of them, or a DICOM folder."""
    if inp.is_file():
        if not is_nifti(inp):
            raise InputError(inp, "expected a NIfTI file, a folder of them, or a DICOM series folder")
        m = re.match(r"^(.*)_0000$", _stem(inp.name))  # named as in a folder: <case>_0000 -> <case>
        return [(m.group(1) if m else _stem(inp.name), [inp])]
    if not inp.is_dir():
        raise InputError(inp, "input not found")
    niftis = sorted(p for p in inp.iterdir() if p.is_file() and is_nifti(p))
    if not niftis:
        if list_dicom_files(inp):
            return [(inp.name, [inp])]
        subdirs = sorted(d for d in inp.iterdir() if d.is_dir() and list_dicom_files(d))
        if subdirs:
            return [(d.name, [d]) for d in subdirs]
        raise InputError(inp, "no NIfTI files or DICOM series here")
    pat = re.compile(r"^(.*)_(\d{4})$")
    groups: dict[str, dict[int, Path]] = {}
    for p in niftis:
        m = pat.match(_stem(p.name))
        case, channel = (m.group(1), int(m.group(2))) if m and (num_channels > 1 or m.group(2) == "0000") \
            else (_stem(p.name), 0)
        other = groups.setdefault(case, {}).setdefault(channel, p)
        if other != p:
            raise InputError(p, f"maps to the same case '{case}' (channel {channel}) as {other.name}: "
                                "rename or move one of them")
    out = []
    for case, chans in sorted(groups.items()):
        missing = [c for c in range(num_channels) if c not in chans]
        if missing and not (len(chans) == 1 and num_channels > 1):
            raise InputError(inp / f"{case}_{missing[0]:04d}.nii.gz", f"case '{case}' lacks channel(s) {missing}")
        out.append((case, [chans[c] for c in sorted(chans)]))
    return out


def _stem(name: str) -> str:
    return name[:-7] if name.lower().endswith(".nii.gz") else name.rsplit(".", 1)[0]


def argmax_labels(probs: np.ndarray, slab: int = 8) -> np.ndarray:
    """argmax over classes of ``probs (C, X, Y, Z)`` into a uint8 (int16 past 255 classes)
    label map, slab by slab: a whole-volume argmax would allocate an int64 volume."""
    out = np.empty(probs.shape[1:], np.uint8 if probs.shape[0] < 256 else np.int16)
    for z in range(0, probs.shape[-1], slab):
        out[..., z:z + slab] = probs[..., z:z + slab].argmax(0)
    return out


def largest_component(seg: np.ndarray) -> np.ndarray:
    """Keep, for each foreground label, only its largest 26-connected component."""
    out = np.zeros_like(seg)
    for c in np.unique(seg):
        if c != 0:
            out[keep_largest_components(seg == c, 1)] = c
    return out


def predict(run_dir: str | Path, inputs: str | Path, out_dir: str | Path, device: str = "auto",
            tta: bool | None = None, overlap: float | None = None, sw_batch_size: int = 2,
            save_probabilities: bool = False, checkpoint: str = "best", quiet: bool = False, postprocess=None,
            largest_component_only: bool | None = None, task: str | int | None = None) -> list[Path]:
    """Predict every scan in ``inputs``; write ``<case>.nii.gz`` (and ``.npz``) to ``out_dir``.

    ``tta``, ``overlap`` and ``largest_component_only`` default to the recipe's ``inference``
    section (else no TTA, overlap 0.5, no post-processing). ``run_dir`` may also be a model
    file written by ``medvol export`` (``.zip``)."""
    if Path(run_dir).suffix == ".zip":
        from medvol.export import unpacked_model

        with unpacked_model(run_dir) as run:
            return predict(run, inputs, out_dir, device, tta, overlap, sw_batch_size, save_probabilities, "best",
                           quiet, postprocess, largest_component_only, task)
    from tqdm import tqdm

    from medvol.inference.geometry import restore_geometry
    from medvol.preprocessing import preprocess_case

    from medvol import validation

    validation.device(device)
    validation.positive_int(sw_batch_size, "--sw-batch-size")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    run = load_run(run_dir, dev, checkpoint)
    inf = run.recipe.inference
    tta = bool(inf.get("tta", False)) if tta is None else tta
    overlap = validation.fraction(inf.get("overlap", 0.5) if overlap is None else overlap, "--overlap")
    if largest_component_only is None:
        largest_component_only = bool(inf.get("largest_component", False))
    if largest_component_only and postprocess is None:
        postprocess = largest_component
    n_ch = len(run.plans["normalization"])
    tasks = _resolve_tasks(run, task)
    cases = _case_groups(Path(inputs), n_ch)
    out_dir = Path(out_dir)
    names = [_output_name(case, tname, tasks) for case, _ in cases for _, tname in tasks]
    _claim_outputs(out_dir, [s for _, srcs in cases for s in srcs],
                   [f"{n}{ext}" for n in names for ext in ((".nii.gz", ".npz") if save_probabilities else (".nii.gz",))])
    written = []
    for case, sources in tqdm(cases, desc="predict", unit="case", disable=quiet or not sys.stderr.isatty()):
        vols = [read_volume(s) for s in sources]
        image, props = preprocess_case(vols, run.plans, inplace=True)  # the scans are ours: no extra copy
        image = torch.from_numpy(image).half()  # the float32 array is dropped here
        ref = vols[0]
        for tid, tname in tasks:
            probs = sliding_window_probabilities(run, image, dev, overlap, sw_batch_size, tta, task=tid)
            if tid is None:
                restored = restore_geometry(probs, props, dtype=np.float16)
                seg = argmax_labels(restored)
            else:  # organ / tumour sigmoid channels -> 0 background, 1 organ, 2 tumour
                restored = restore_geometry(probs, props, fill=0.0, dtype=np.float16)
                seg = (restored[0] > 0.5).astype(np.uint8)
                seg[restored[1] > 0.5] = 2
            del probs
            if postprocess is not None:
                seg = postprocess(seg)
            if tid is not None and inf.get("dodnet_postprocess", False):
                seg = dodnet_postprocess(seg, tname)
            name = _output_name(case, tname, tasks)
            claim_files(out_dir, [f"{name}.nii.gz"] + ([f"{name}.npz"] if save_probabilities else []))
            path = write_volume(Volume(seg, ref.affine, {}), out_dir / f"{name}.nii.gz")
            if save_probabilities:
                with atomic_path(out_dir / f"{name}.npz") as tmp:
                    with open(tmp, "wb") as f:
                        np.savez_compressed(f, probabilities=restored, affine=ref.affine)
            written.append(path)
            log.info("%s -> %s", name, path)
        del image
    return written


def _output_name(case: str, task_name: str, tasks: list) -> str:
    """``<case>``, or ``<case>_<task>`` when several tasks are predicted."""
    return case if len(tasks) == 1 else f"{case}_{task_name}"


def _claim_outputs(out_dir: Path, sources: list[Path], names: list[str]) -> None:
    """Refuse, before anything is written, an output that would replace one of the inputs
    (same file after resolving links) or a file that medvol did not write."""
    inputs = {f.resolve() for s in sources for f in (list_dicom_files(s) if s.is_dir() else [s])}
    for n in names:
        if (out_dir / n).resolve() in inputs:
            raise InputError(out_dir / n, "the prediction would replace this input scan: choose another output folder")
    check_files(out_dir, names)  # before anything is computed; each file is claimed as it is written


def _resolve_tasks(run: RunModel, task) -> list[tuple[int | None, str]]:
    """[(task id, name)] to predict: [(None, "")] for ordinary models; for task-conditioned
    ones the given task (id or name) or all of them."""
    n = getattr(run.model, "num_tasks", None)
    if n is None:
        if task not in (None, "all"):
            raise ConfigError(f"--task {task}: this run's model is not task-conditioned")
        return [(None, "")]
    from medvol.datasets.mots import task_rules

    dj = run.run_dir / "dataset.json"
    rules = task_rules(read_json(dj) if dj.exists() else None)
    names = {t: rules[t][0] if t in rules else f"task{t}" for t in range(n)}
    if task in (None, "all"):
        return sorted(names.items())
    for t, name in names.items():
        if str(task) in (str(t), name):
            return [(t, name)]
    raise ConfigError(f"--task {task}: unknown; this run knows {', '.join(f'{t} ({n_})' for t, n_ in names.items())}")


def keep_largest_components(mask: np.ndarray, k: int = 1) -> np.ndarray:
    """The ``k`` largest 26-connected components of ``mask``."""
    from scipy import ndimage

    comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n <= k:
        return mask.astype(bool)
    sizes = np.bincount(comp.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:k] + 1
    return np.isin(comp, keep)


def dodnet_postprocess(seg: np.ndarray, task_name: str, min_tumour_voxels: int = 50) -> np.ndarray:
    """DoDNet's post-processing of one task's map (0 bg, 1 organ, 2 tumour): the largest organ
    component (two for kidney); tumour components of <= ``min_tumour_voxels`` voxels, or not
    touching the organ (when the task annotates one), removed."""
    from scipy import ndimage

    organ_any = seg > 0
    out = np.zeros_like(seg)
    if (seg == 1).any():
        organ = keep_largest_components(organ_any, 2 if task_name == "kidney" else 1)
        out[organ] = 1
    else:
        organ = None
    comp, n = ndimage.label(seg == 2, structure=np.ones((3, 3, 3)))
    if n:
        sizes = np.bincount(comp.ravel())
        for c in range(1, n + 1):
            if sizes[c] <= min_tumour_voxels:
                continue
            region = comp == c
            if organ is not None and not (region & organ).any():
                continue
            out[region] = 2
    return out
