"""``medvol predict``: whole scans through a trained run, written back in the scans' geometry.

Each scan is preprocessed with the run's plan, predicted by the one sliding-window path
(:mod:`medvol.inference.sliding_window`: batched windows, Gaussian blending, optional
mirroring TTA, float16 accumulation), restored to the scan's own grid
(:func:`restore_geometry`), turned into labels (:mod:`medvol.inference.postprocess`) and
written as a label map with exactly the input's shape and affine.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from medvol.checkpoint import RunModel, expand_fold_folders, load_run
from medvol.config import InferenceConfig
from medvol.errors import ConfigError, InputError, PredictionStopped
from medvol.inference.postprocess import dodnet_postprocess, largest_component, task_labels, to_labels
from medvol.inference.sliding_window import TaskSigmoid, class_decoder, sliding_window_probabilities
from medvol.io import Volume, read_volume, write_volume
from medvol.io.dicom import list_dicom_files
from medvol.io.discovery import input_cases
from medvol.manifest import check_files, claim_files
from medvol.plans import Plans
from medvol.precision import choose_precision
from medvol.utils import atomic_path, read_json

log = logging.getLogger(__name__)


def case_probabilities(run: RunModel, image: np.ndarray | torch.Tensor, device: torch.device,
                       settings: InferenceConfig, sw_batch_size: int = 2, task: int | None = None,
                       mask: np.ndarray | None = None, stats: dict | None = None) -> torch.Tensor:
    """Probabilities ``(K, X, Y, Z)`` float16 of one preprocessed image: class softmax (region
    sigmoids for nnU-Net's regions), or for a task-conditioned model the given task's sigmoid
    channels. ``mask``: the body mask whose outside windows are skipped (see
    :func:`sliding_window_probabilities`)."""
    decoder = class_decoder(run.plans.labels.has_regions) if task is None else TaskSigmoid(task)
    n_out = run.plans.num_classes if task is None else _task_channels(run)
    return sliding_window_probabilities(run.model, image, run.patch_size, device, decoder, n_channels=n_out,
                                        overlap=settings.overlap, step=settings.step, sw_batch_size=sw_batch_size,
                                        mirror_axes=run.mirror_axes if settings.tta else (), blend=settings.blend,
                                        slice_axis=run.slice_axis, context=run.context,
                                        precision=choose_precision(device, settings.precision), mask=mask,
                                        stats=stats)


def _task_channels(run: RunModel) -> int:
    """Output channels of a task-conditioned model (DoDNet: organ and tumour sigmoids)."""
    widths = getattr(run.model, "head_widths", None)
    return int(widths[-1]) if widths else 2


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``, checked (--device)."""
    from medvol import validation

    device = validation.device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _settings(recipe_settings: InferenceConfig, **given) -> InferenceConfig:
    """The recipe's inference settings with the options given (not None) put over them; an
    explicit overlap (without a step) also sets aside the recipe's step."""
    out = dataclasses.replace(recipe_settings, **{k: v for k, v in given.items() if v is not None})
    if given.get("overlap") is not None and given.get("step") is None:
        out = dataclasses.replace(out, step=None)
    return out


def predict(run_dir: str | Path | Sequence[str | Path], inputs: str | Path, out_dir: str | Path, device: str = "auto",
            tta: bool | None = None, overlap: float | None = None, sw_batch_size: int = 2,
            save_probabilities: bool = False, checkpoint: str = "best", quiet: bool = False, postprocess=None,
            largest_component_only: bool | None = None, task: str | int | None = None,
            step: list[int] | None = None, precision: str | None = None,
            all_windows: bool | None = None, stop: Callable[[], int | None] | None = None,
            expertise: Sequence[float] | None = None) -> list[Path]:
    """Predict every scan in ``inputs``; write ``<case>.nii.gz`` (and ``.npz``) to ``out_dir``.

    ``tta``, ``overlap``, ``step`` (window step in voxels per axis, replacing ``overlap``),
    ``largest_component_only``, ``precision`` (:mod:`medvol.precision`) and ``all_windows``
    (also run windows outside the body mask) default to the recipe's ``inference`` section;
    what was used is written to ``out_dir/predict.json``. ``run_dir`` may
    also be a model file written by ``medvol export`` (``.zip``), several of them (an ensemble:
    their probabilities are averaged before post-processing; the first one's inference
    settings apply) or a folder holding ``fold_*`` runs. ``stop``: see :func:`predict_cases`.
    ``expertise`` (MRNet runs): one weight per rater, see :func:`apply_expertise`; an MRNet run
    always writes its calibrated probabilities (``.npz``) beside the label map."""
    _check_options(sw_batch_size, overlap)
    with unpacked_models(run_dir) as run_dirs:
        dev = resolve_device(device)
        runs = [load_run(r, dev, checkpoint) for r in run_dirs]
        save_probabilities = apply_expertise(runs, expertise) or save_probabilities
        cases = input_cases(inputs, runs[0].plans.num_channels)
        return predict_cases(runs, cases, out_dir, dev, tta, overlap, sw_batch_size, save_probabilities, quiet,
                             postprocess, largest_component_only, task, step, precision, all_windows, stop)


def apply_expertise(runs: list[RunModel], expertise: Sequence[float] | None) -> bool:
    """Give every expertise-conditioned (MRNet) model ``expertise`` (None: equal weights);
    True when there is such a model. Expertise for a model that takes none is a ConfigError."""
    conditioned = [r for r in runs if hasattr(r.model, "set_expertise")]
    if expertise is not None and len(conditioned) != len(runs):
        raise ConfigError(f"--expertise: {runs[0].run_dir} is not an expertise-conditioned (MRNet) model")
    for r in conditioned:
        model: Any = r.model  # an MRNet (medvol.networks.slice.mrnet), not imported here
        model.set_expertise(expertise if expertise is not None else [1.0] * model.num_raters)
    return bool(conditioned)


SLICE_CLASSIFIERS = ("slice_classifier", "dcmt")  # trainers whose models grade slices: no label map


def _check_segmentation_models(runs: list[RunModel]) -> None:
    """A slice classifier predicts subjects through its aggregator, not label maps."""
    for r in runs:
        if r.recipe.trainer.name in SLICE_CLASSIFIERS:
            raise ConfigError(f"{r.run_dir}: a slice classifier ({r.recipe.trainer.name}) grades slices and writes no "
                              "label map; run `medvol extract-features` with it, train `slice_aggregator` on the "
                              "features and predict with that run (subjects.csv)")


def _check_options(sw_batch_size: int, overlap: float | None) -> None:
    from medvol import validation

    validation.positive_int(sw_batch_size, "--sw-batch-size")
    if overlap is not None:
        validation.fraction(overlap, "--overlap")


@contextmanager
def unpacked_models(run_dir) -> Iterator[list[Path]]:
    """Run folders for ``predict``: the ones given, the ``fold_*`` runs of a folder of folds,
    model zips unpacked for the duration."""
    from medvol.export import unpacked_model

    given = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(r) for r in run_dir]
    expanded = expand_fold_folders(given)
    with ExitStack() as stack:
        yield [stack.enter_context(unpacked_model(r)) if r.suffix == ".zip" else r for r in expanded]


def model_plans(run_dir) -> Plans:
    """The plan of the model(s) ``predict`` would run (the first one's)."""
    with unpacked_models(run_dir) as run_dirs:
        return Plans.from_dict(read_json(run_dirs[0] / "plans.json"))


def predict_cases(runs: list[RunModel], cases: list[tuple[str, list[Path]]], out_dir: str | Path,
                  device: torch.device, tta: bool | None = None, overlap: float | None = None, sw_batch_size: int = 2,
                  save_probabilities: bool = False, quiet: bool = False, postprocess=None,
                  largest_component_only: bool | None = None, task: str | int | None = None,
                  step: list[int] | None = None, precision: str | None = None,
                  all_windows: bool | None = None, stop: Callable[[], int | None] | None = None) -> list[Path]:
    """:func:`predict` of loaded models (``load_run``) on given cases: ``[(case id, its
    channel sources)]``, as :func:`medvol.io.discovery.input_cases` lists them.

    ``stop``, asked before each case, returns the signal that asks the run to stop (or None):
    then :class:`PredictionStopped` is raised, naming the cases not written (those written
    are complete: every file is written atomically)."""
    from tqdm import tqdm

    settings, postprocess, tasks = run_settings(runs, tta, overlap, sw_batch_size, postprocess, largest_component_only,
                                                task, step, precision, all_windows)
    out_dir = Path(out_dir)
    names = [_output_name(case, tname, tasks) for case, _ in cases for _, tname in tasks]
    _claim_outputs(out_dir, [s for _, srcs in cases for s in srcs],
                   [f"{n}{ext}" for n in names for ext in (".nii.gz", ".npz")[:2 if save_probabilities else 1]]
                   + [PREDICT_RECORD])
    written = []
    bar = tqdm(cases, desc="predict", unit="case", disable=quiet or not sys.stderr.isatty())
    for i, (case, sources) in enumerate(bar):
        _stop_if_asked(stop, out_dir, cases, i)
        written += _predict_case(runs, case, sources, out_dir, device, settings, tasks, sw_batch_size,
                                 postprocess, save_probabilities)
    _write_record(out_dir, runs, settings, device)
    return written


def run_settings(runs: list[RunModel], tta: bool | None = None, overlap: float | None = None, sw_batch_size: int = 2,
                 postprocess=None, largest_component_only: bool | None = None, task: str | int | None = None,
                 step: list[int] | None = None, precision: str | None = None, all_windows: bool | None = None
                 ) -> tuple[InferenceConfig, Callable | None, list[tuple[int | None, str]]]:
    """The loaded models checked (segmentation models planned alike) and what they predict
    with: the recipe's inference settings under the options given, the label-map
    post-processing (or None) and the tasks (:func:`_resolve_tasks`)."""
    _check_options(sw_batch_size, overlap)
    _check_segmentation_models(runs)
    run = _same_plans(runs)
    settings = _settings(run.recipe.inference, tta=tta, overlap=overlap, step=step,
                         largest_component=largest_component_only, precision=precision, all_windows=all_windows)
    if settings.largest_component and postprocess is None:
        postprocess = largest_component
    return settings, postprocess, _resolve_tasks(run, task)


PREDICT_RECORD = "predict.json"


def _stop_if_asked(stop: Callable[[], int | None] | None, out_dir: Path, cases: list, done: int) -> None:
    signum = stop() if stop is not None else None
    if signum is not None:
        raise PredictionStopped(signum, out_dir, done, [c for c, _ in cases[done:]])


def _write_record(out_dir: Path, runs: list[RunModel], settings: InferenceConfig, device: torch.device) -> None:
    """``predict.json``: the models and the settings the predictions were made with."""
    from medvol.config import to_dict
    from medvol.utils import write_json

    claim_files(out_dir, [PREDICT_RECORD])
    write_json(out_dir / PREDICT_RECORD, {
        "models": [str(r.run_dir) for r in runs], "device": str(device),
        "settings": to_dict(settings), **choose_precision(device, settings.precision).describe(),
        **_expertise_record(runs)})


def _expertise_record(runs: list[RunModel]) -> dict:
    """``{"expertise": [weights per MRNet run]}`` for expertise-conditioned models, else nothing."""
    models: list[Any] = [r.model for r in runs if hasattr(r.model, "set_expertise")]
    weights = [m.expertise.tolist() for m in models]
    return {"expertise": weights} if weights else {}


ENSEMBLE_PLAN_KEYS = ("target_spacing", "labels", "normalization", "orientation", "configurations",
                      "regions_class_order")


def _same_plans(runs: list[RunModel]) -> RunModel:
    """The first run, after checking that every run was planned alike (an ensemble averages
    probabilities on one grid, of the same classes and channels)."""
    first = runs[0].plans.raw
    for r in runs[1:]:
        for key in ENSEMBLE_PLAN_KEYS:
            if r.plans.raw.get(key) != first.get(key):
                raise ConfigError(f"{r.run_dir}: its plan's {key} ({r.plans.raw.get(key)}) differs from "
                                  f"{runs[0].run_dir}'s ({first.get(key)}): these models cannot be ensembled")
    return runs[0]


def _ensemble_probabilities(runs: list[RunModel], image: torch.Tensor, device: torch.device,
                            settings: InferenceConfig, sw_batch_size: int, task: int | None,
                            mask: np.ndarray | None = None, stats: dict | None = None) -> torch.Tensor:
    """The mean of the runs' probabilities: one model's at a time plus the running sum."""
    total = case_probabilities(runs[0], image, device, settings, sw_batch_size, task, mask, stats)
    if len(runs) == 1:
        return total
    total = total.float()
    for r in runs[1:]:
        total += case_probabilities(r, image, device, settings, sw_batch_size, task, mask).float()
    return (total / len(runs)).half()


def _predict_case(runs: list[RunModel], case: str, sources: list[Path], out_dir: Path, device: torch.device,
                  settings: InferenceConfig, tasks, sw_batch_size: int, postprocess, save_probabilities: bool
                  ) -> list[Path]:
    """One case (every task of a task-conditioned model): label maps (and probabilities) written."""
    vols = [read_volume(s) for s in sources]
    ref, written = vols[0], []
    for tname, seg, restored in case_outputs(runs, vols, device, settings, tasks, sw_batch_size, postprocess,
                                             case, inplace=True):  # the scans are ours: no extra copy
        name = _output_name(case, tname, tasks)
        claim_files(out_dir, [f"{name}.nii.gz"] + ([f"{name}.npz"] if save_probabilities else []))
        path = write_volume(Volume(seg, ref.affine, {}), out_dir / f"{name}.nii.gz")
        if save_probabilities:
            with atomic_path(out_dir / f"{name}.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, probabilities=restored, affine=ref.affine)
        written.append(path)
        log.info("%s -> %s", name, path)
    return written


def case_outputs(runs: list[RunModel], vols: list[Volume], device: torch.device, settings: InferenceConfig, tasks,
                 sw_batch_size: int, postprocess, case: str = "", inplace: bool = False
                 ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(task name, label map, probabilities)`` per task of one scan (its channel volumes), both
    in the scan's own grid: preprocessing, the ensemble's sliding window, the geometry restore and
    post-processing. ``inplace``: the volumes' arrays may be overwritten."""
    from medvol.inference.geometry import restore_geometry
    from medvol.preprocessing import preprocess_case

    previous = previous_stage_labels(runs, vols, device, settings, sw_batch_size)  # before inplace may change vols
    array, props = preprocess_case(vols, runs[0].plans.raw, inplace=inplace, body_mask=not settings.all_windows,
                                   slice_axis=_scan_slice_axis(runs))
    image = torch.from_numpy(array).half()
    del array  # the float32 array is dropped here
    if previous is not None:  # 3d_cascade_fullres: the low-res labels, one-hot, as extra channels
        image = torch.cat([image, previous_stage_channels(previous, props, runs[0].plans).half()])
    mask = props.pop("body_mask", None)
    stats: dict[str, int] = {}
    for tid, tname in tasks:
        probs = _ensemble_probabilities(runs, image, device, settings, sw_batch_size, tid, mask, stats)
        if stats.get("windows_skipped"):
            log.info("%s: %d of %d windows outside the body mask skipped", case, stats["windows_skipped"],
                     stats["windows_skipped"] + stats["windows_run"])
        if tid is None:  # class softmax (background outside the crop) or region sigmoids (no region there)
            regions = runs[0].plans.labels.has_regions
            restored = restore_geometry(probs, props, fill=0.0 if regions else "background", dtype=np.float16)
            seg = to_labels(restored, runs[0].plans.labels)
        else:
            restored = restore_geometry(probs, props, fill=0.0, dtype=np.float16)
            seg = task_labels(restored, annotated=_annotated(runs[0], tid))
        del probs
        if postprocess is not None:
            seg = postprocess(seg)
        if tid is not None and settings.dodnet_postprocess:
            seg = dodnet_postprocess(seg, tname, organ_annotated=_annotated(runs[0], tid)[0])
        yield tname, seg, restored


def previous_stage_labels(runs: list[RunModel], vols: list[Volume], device: torch.device, settings: InferenceConfig,
                          sw_batch_size: int) -> np.ndarray | None:
    """A 3d_cascade_fullres model's first stage: the scan's label map (its own grid) by the
    low-res run(s) (an ensemble when the runs name several), with their recipes' window settings
    and this call's TTA, precision and window mask. nnU-Net's ``-prev_stage_predictions``, made
    here. None for the models of other configurations."""
    stages = {str(p.run_dir): p for r in runs for p in r.previous_stage}
    if not stages:
        return None
    if any(not r.previous_stage for r in runs):
        raise ConfigError("a 3d_cascade_fullres model cannot be ensembled with models of other configurations")
    low = list(stages.values())
    own = run_settings(low)[0]
    low_settings = dataclasses.replace(own, tta=settings.tta, precision=settings.precision,
                                       all_windows=settings.all_windows)
    _, seg, _ = next(case_outputs(low, vols, device, low_settings, [(None, "")], sw_batch_size, None))
    return seg


def previous_stage_channels(seg: np.ndarray, props: dict, plans: Plans) -> torch.Tensor:
    """The low-res label map of a scan (its own grid) on the scan's preprocessed grid, one-hot
    over the foreground labels ``(F, X, Y, Z)`` (:mod:`medvol.data.cascade`)."""
    from medvol.data.cascade import onehot, to_preprocessed_grid

    return onehot(to_preprocessed_grid(seg, props, plans.raw.get("orientation", "stored")),
                  sorted(plans.class_names))


def _scan_slice_axis(runs: list[RunModel]) -> int | None:
    """The axis along which the scan keeps its own spacing: a 2D model's slice axis (nnU-Net's
    2d), unless an ensemble mixes 2D and 3D models, which then share the 3D grid (the one the
    2D model's training slices were cut from)."""
    axes = {r.slice_axis for r in runs}
    return axes.pop() if len(axes) == 1 else None


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


def _annotated(run: RunModel, task: int) -> tuple[bool, bool]:
    """(organ, tumour): which channels the task's dataset annotates (both for unknown tasks)."""
    from medvol.data.partial_labels import rules_of_folder

    rule = rules_of_folder(run.run_dir).get(task)
    return (True, True) if rule is None else (rule[1] is not None, rule[2] is not None)


def _resolve_tasks(run: RunModel, task) -> list[tuple[int | None, str]]:
    """[(task id, name)] to predict: [(None, "")] for ordinary models; for task-conditioned
    ones the given task (id or name) or all of them."""
    n = getattr(run.model, "num_tasks", None)
    if n is None:
        if task not in (None, "all"):
            raise ConfigError(f"--task {task}: this run's model is not task-conditioned")
        return [(None, "")]
    from medvol.data.partial_labels import rules_of_folder

    rules = rules_of_folder(run.run_dir)
    names = {t: rules[t][0] if t in rules else f"task{t}" for t in range(n)}
    if task in (None, "all"):
        return sorted(names.items())
    for t, name in names.items():
        if str(task) in (str(t), name):
            return [(t, name)]
    raise ConfigError(f"--task {task}: unknown; this run knows {', '.join(f'{t} ({n_})' for t, n_ in names.items())}")
