"""A Python API for scripts and long-running services (nnU-Net's ``nnUNetPredictor``):
:class:`Predictor` loads the model(s) once, then predicts numpy arrays, :class:`Volume`\\ s and
files, each through the same code as ``medvol predict`` (preprocessing, sliding window,
geometry restore and post-processing of :mod:`medvol.inference.predictor`).

    with Predictor("runs/brain") as p:
        labels = p.predict_array(image, spacing=(1.0, 1.0, 1.0))
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medvol.checkpoint import load_run
from medvol.errors import ConfigError, InputError
from medvol.inference.predictor import (
    apply_expertise,
    case_outputs,
    predict_cases,
    resolve_device,
    run_settings,
    unpacked_models,
)
from medvol.io import Volume
from medvol.io.discovery import input_cases

PathLike = str | Path


class Predictor:
    """The model(s) of a run folder, several run folders (an ensemble), a folder of ``fold_*``
    runs or a model zip (``medvol export``: unpacked until :meth:`close`), loaded once.

    ``device``, ``checkpoint`` and the inference options (``tta``, ``overlap``, ``step``,
    ``sw_batch_size``, ``precision``, ``largest_component_only``, ``all_windows``, ``task``,
    ``expertise``, ``postprocessing``: a ``medvol best`` decision file) mean what they mean for
    ``medvol predict``; unset ones come from the recipe."""

    def __init__(self, model: PathLike | Sequence[PathLike], device: str = "auto", checkpoint: str = "best",
                 tta: bool | None = None, overlap: float | None = None, step: list[int] | None = None,
                 sw_batch_size: int = 2, precision: str | None = None, largest_component_only: bool | None = None,
                 all_windows: bool | None = None, task: str | int | None = None,
                 expertise: Sequence[float] | None = None, postprocessing: PathLike | None = None):
        self._stack = ExitStack()
        try:
            run_dirs = self._stack.enter_context(unpacked_models(model))
            self.device = resolve_device(device)
            self.runs = [load_run(r, self.device, checkpoint) for r in run_dirs]
            apply_expertise(self.runs, expertise)  # MRNet: one weight per rater (None: equal)
            self._options: dict[str, Any] = dict(
                tta=tta, overlap=overlap, sw_batch_size=sw_batch_size, task=task, step=step, precision=precision,
                largest_component_only=largest_component_only, all_windows=all_windows,
                postprocess=self._postprocessing(postprocessing, largest_component_only))
            self.settings, self.postprocess, self.tasks = run_settings(self.runs, **self._options)
        except BaseException:
            self._stack.close()
            raise
        self.sw_batch_size = sw_batch_size
        self.num_channels = self.runs[0].plans.num_channels

    def _postprocessing(self, path: PathLike | None, largest_component_only: bool | None):
        """``medvol best``'s ``postprocessing.json`` as the label-map post-processing (None: none)."""
        if path is None:
            return None
        if largest_component_only is not None:
            raise ConfigError("Predictor: give postprocessing or largest_component_only, not both (the file decides "
                              "which largest components are kept)")
        from medvol.inference.postprocess import postprocessing_from_file

        return postprocessing_from_file(path, self.runs[0].plans.raw["labels"])

    def close(self) -> None:
        """Release the models' unpacked zip folders (nothing to do for run folders)."""
        self._stack.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def predict_volume(self, volume: Volume, return_probabilities: bool = False):
        """The label map of ``volume`` (``(X, Y, Z)``, or ``(X, Y, Z, C)`` channels last) as a
        Volume with its affine; with ``return_probabilities`` also ``(K, X, Y, Z)`` float16."""
        if len(self.tasks) != 1:
            raise ConfigError(f"{self.runs[0].run_dir}: a task-conditioned model predicts {len(self.tasks)} tasks; "
                              "give Predictor(task=...) to predict arrays and volumes")
        (_, seg, probs), = case_outputs(self.runs, [volume], self.device, self.settings, self.tasks,
                                        self.sw_batch_size, self.postprocess)
        out = Volume(seg, volume.affine, {})
        return (out, probs) if return_probabilities else out

    def predict_array(self, image: np.ndarray, affine: np.ndarray | None = None,
                      spacing: Sequence[float] | None = None, return_probabilities: bool = False):
        """Labels ``(X, Y, Z)`` of ``image`` ``(C, X, Y, Z)`` (channels first) or ``(X, Y, Z)``, in
        the image's own grid; ``affine`` (4x4, voxel to RAS+ mm) or ``spacing`` (mm per axis: an
        axis-aligned grid) places it. With ``return_probabilities`` also ``(K, X, Y, Z)`` float16.
        The array is not modified."""
        image = np.asarray(image)
        chans = image[None] if image.ndim == 3 else image
        if chans.ndim != 4 or chans.shape[0] != self.num_channels:
            alone = " or (X, Y, Z)" if self.num_channels == 1 else ""
            raise InputError("image", f"shape {image.shape}: the model expects {self.num_channels} channel(s) as "
                                      f"(C, X, Y, Z), channels first{alone}")
        vol = Volume(chans[0] if len(chans) == 1 else np.moveaxis(chans, 0, -1), _grid(affine, spacing), {})
        out = self.predict_volume(vol, return_probabilities)
        return (out[0].array, out[1]) if return_probabilities else out.array

    def predict_files(self, inputs: PathLike | Sequence[PathLike | Sequence[PathLike]], out_dir: PathLike,
                      save_probabilities: bool = False, quiet: bool = True) -> list[Path]:
        """What ``medvol predict -i INPUTS -o OUT_DIR`` writes, with these models: ``inputs`` a scan,
        a folder of scans, or a list of them (an inner list: one case's channel files)."""
        cases = input_cases(inputs, self.num_channels) if isinstance(inputs, (str, Path)) else \
            _listed_cases(inputs, self.num_channels)
        return predict_cases(self.runs, cases, out_dir, self.device, save_probabilities=save_probabilities,
                             quiet=quiet, **self._options)


def _grid(affine, spacing) -> np.ndarray:
    """The 4x4 affine of an array given its ``affine`` or its ``spacing`` (exactly one)."""
    if (affine is None) == (spacing is None):
        raise InputError("image", "give its affine (4x4) or its spacing (3 numbers), exactly one of them")
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise InputError("affine", f"expected a finite 4x4 matrix, got shape {affine.shape}")
        return affine
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not (np.isfinite(sp).all() and (sp > 0).all()):
        raise InputError("spacing", f"expected 3 positive numbers (mm per axis), got {list(np.ravel(sp))}")
    return np.diag([*sp, 1.0])


def _listed_cases(inputs, num_channels: int) -> list[tuple[str, list[Path]]]:
    """The cases of a list of scans / folders (each as ``medvol predict -i`` lists it) and of
    channel-file lists (one case, named after its first file); a case name given twice is refused."""
    cases = []
    for item in inputs:
        if isinstance(item, (str, Path)):
            cases += input_cases(item, num_channels)
        else:
            files = [Path(f) for f in item]
            cases.append((input_cases(files[0], num_channels)[0][0], files))
    names = [c for c, _ in cases]
    for c in names:
        if names.count(c) > 1:
            raise InputError(c, "this case name is given twice in the inputs: one prediction would replace the other")
    return cases
