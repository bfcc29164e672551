"""The catalogue of bad input (issue 20): one row per case.

Each row builds its inputs in a fresh folder, runs one ``medvol`` command and states:
- the exit status (2: one error line ``medvol <command>: error: ...``; 1: a dataset run in
  which cases failed, each listed on its own line under ``failed cases:``; 75 or 130: a run
  stopped by a signal, one line ``medvol <command>: stopped by ...`` saying what it wrote);
- a regular expression the error line must match (it names the file or option);
- which paths must come out untouched (sha256 of every file under them before and after:
  no file changed, none added, none removed).
No row may print a traceback. To add a case, append a ``Row`` to ``CATALOGUE``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from medvol.cli import main

from conftest import sphere_case, write_nifti, write_v2_dataset


# --------------------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A raw dataset of three sphere cases, its cache, and a one-step trained run."""
    from medvol.config import load_recipe
    from medvol.preprocessing import preprocess_dataset
    from medvol.training import train

    base = tmp_path_factory.mktemp("tiny")
    raw = write_v2_dataset(base / "Dataset009_Tiny", {c: ([sphere_case(seed=i)[0]], sphere_case(seed=i)[1], np.eye(4))
                                                       for i, c in enumerate("abc")})
    assert not preprocess_dataset(raw, base / "cache", num_workers=1, quiet=True).failures
    recipe = load_recipe("quickstart", ["model.base_features=4", "model.max_features=8", "data.num_workers=0",
                                        "trainer.steps=1", "trainer.val_every=1", "data.batch_size=2"])
    train(recipe, base / "cache", base / "run", device="cpu", quiet=True)
    return {"raw": raw, "cache": base / "cache", "run": base / "run"}


@dataclass
class Ctx:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    tiny: dict
    cleanups: list[Callable[[], object]] = field(default_factory=list)  # run after the command

    def raw(self) -> Path:
        """A private copy of the tiny raw dataset."""
        dst = self.tmp / "raw"
        if not dst.exists():
            shutil.copytree(self.tiny["raw"], dst)
        return dst

    def cache(self) -> Path:
        dst = self.tmp / "cache"
        if not dst.exists():
            shutil.copytree(self.tiny["cache"], dst)
        return dst

    def edit_json(self, change: Callable[[dict], None]) -> Path:
        path = self.raw() / "dataset.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))
        return self.raw()


@dataclass
class Row:
    id: str
    make: Callable[[Ctx], list[str]]  # builds the inputs, returns the command line
    error: str  # regex the error line must match
    rc: int = 2
    untouched: Callable[[Ctx], list[Path]] = field(default=lambda c: [c.tmp / "raw"])
    xfail: str | None = None  # a case that does not hold yet: the bug, precisely (strict: it must fail)
    adapter: str | None = None  # a dataset adapter's module (medvol.datasets.X) run instead of `medvol`
    prefix: Callable[[Ctx], list[str]] | None = None  # run `medvol` as a process behind this command prefix


# --------------------------------------------------------------------------- input builders
def _preprocess(c: Ctx, *extra) -> list[str]:
    return ["preprocess", str(c.raw()), "-o", str(c.tmp / "out"), "-j", "1", "--quiet", *extra]


def _label(value, dtype):
    def make(c: Ctx):
        lab = sphere_case(seed=0)[1].astype(dtype)
        lab[0, 0, 0] = value
        write_nifti(c.raw() / "labelsTr" / "a.nii.gz", lab)
        return _preprocess(c)

    return make


def _image(array, name="a_0000.nii.gz"):
    def make(c: Ctx):
        write_nifti(c.raw() / "imagesTr" / name, array)
        return _preprocess(c)

    return make


def _patched_nifti(path: Path, offset: int, dtype: str, values, gz: bool = True) -> Path:
    """A valid 24x24x20 NIfTI (qform only) with header bytes at ``offset`` overwritten."""
    img = nib.Nifti1Image(sphere_case(seed=0)[0], np.eye(4))
    img.set_sform(None, code=0)
    img.set_qform(np.eye(4), code=1)
    plain = path.with_name("plain.nii")
    nib.save(img, str(plain))
    data = bytearray(plain.read_bytes())
    plain.unlink()
    raw = np.array(values, dtype).tobytes()
    data[offset:offset + len(raw)] = raw
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return path


PIXDIM_XYZ, DIM_XYZ = 80, 42  # NIfTI-1 header offsets of pixdim[1:4] (float32) and dim[1:4] (int16)


def _header(offset, dtype, values):
    def make(c: Ctx):
        _patched_nifti(c.raw() / "imagesTr" / "a_0000.nii.gz", offset, dtype, values)
        return _preprocess(c)

    return make


def _json(change):
    def make(c: Ctx):
        c.edit_json(change)
        return _preprocess(c)

    return make


def _decathlon(meta_change):
    def make(c: Ctx):
        root = c.tmp / "raw"
        img, lab, aff = sphere_case()
        write_nifti(root / "imagesTr" / "a.nii.gz", img, aff)
        write_nifti(root / "labelsTr" / "a.nii.gz", lab, aff)
        meta = {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "ball"},
                "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}], "test": []}
        meta_change(meta)
        (root / "dataset.json").write_text(json.dumps(meta))
        return _preprocess(c)

    return make


def _train(*overrides):
    def make(c: Ctx):
        argv = ["train", "quickstart", "--data", str(c.tiny["cache"]), "--out", str(c.tmp / "run"), "--quiet"]
        for o in overrides:
            argv += ["--set", o]
        return argv

    return make


def _predict(*extra, image=None):
    def make(c: Ctx):
        src = c.tmp / "in" / "x.nii.gz"
        write_nifti(src, sphere_case()[0] if image is None else image)
        return ["predict", "-m", str(c.tiny["run"]), "-i", str(src), "-o", str(c.tmp / "pred"), "--device", "cpu",
                "--quiet", *extra]

    return make


def _cv_without_validation(c: Ctx) -> list[str]:
    shutil.copytree(c.tiny["run"], c.tmp / "runs" / "fold_0")
    shutil.rmtree(c.tmp / "runs" / "fold_0" / "validation")
    return ["cv", str(c.tmp / "runs"), "--quiet"]


def _cv_case_in_two_folds(c: Ctx) -> list[str]:
    for name in ("a", "b"):  # the same split twice: no cross-validation
        shutil.copytree(c.tiny["run"], c.tmp / "runs" / name)
    return ["cv", str(c.tmp / "runs" / "a"), str(c.tmp / "runs" / "b"), "-o", str(c.tmp / "out"), "--quiet"]


def _predict_huge_header_nii(c: Ctx):
    argv = _predict()(c)
    argv[argv.index("-i") + 1] = str(_patched_nifti(c.tmp / "in" / "big.nii", DIM_XYZ, "<i2", [900, 900, 900],
                                                    gz=False))
    return argv


def _no_cuda(make):
    def wrapped(c: Ctx):
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        return make(c)

    return wrapped


def _read_only_out(c: Ctx):
    out = c.tmp / "out"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse as the kernel would for a user
        import medvol.utils

        real = medvol.utils._tmp_name

        def refuse(path):
            if out in Path(path).parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(path.parent))
            return real(path)

        c.monkeypatch.setattr(medvol.utils, "_tmp_name", refuse)
    return _preprocess(c)


def _disk_full(c: Ctx):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    c.monkeypatch.setattr(np, "save", full)
    return _preprocess(c)


def _worker_killed(c: Ctx):
    from medvol.preprocessing import preprocessor

    real = preprocessor.load_raw_case

    def load(case, *a, **k):  # runs in a forked worker: dies the way an OOM kill does
        if case.case_id == "b":
            os._exit(9)
        return real(case, *a, **k)

    c.monkeypatch.setattr(preprocessor, "load_raw_case", load)
    return ["preprocess", str(c.raw()), "-o", str(c.tmp / "out"), "-j", "2", "--quiet"]


def _evaluate(missing=False, shifted=False):
    def make(c: Ctx):
        aff = np.eye(4)
        for case in ("a", "b"):
            write_nifti(c.tmp / "ref" / f"{case}.nii.gz", sphere_case()[1], aff)
        moved = aff.copy()
        moved[0, 3] = 3.0 if shifted else 0.0
        write_nifti(c.tmp / "pred" / "a.nii.gz", sphere_case()[1], moved)
        if not missing:
            write_nifti(c.tmp / "pred" / "b.nii.gz", sphere_case()[1], moved)
        return ["evaluate", "--pred", str(c.tmp / "pred"), "--ref", str(c.tmp / "ref"), "--quiet"]

    return make


def _truncated_cache(c: Ctx):
    cache = c.cache()
    for case in "abc":
        arr = cache / "cases" / f"{case}.npy"
        arr.write_bytes(arr.read_bytes()[: arr.stat().st_size // 2])
    return ["train", "quickstart", "--data", str(cache), "--out", str(c.tmp / "run"), "--quiet", "--device", "cpu",
            "--set", "trainer.steps=1", "--set", "data.num_workers=0", "--set", "model.base_features=4",
            "--set", "model.max_features=8"]


def _mixed_2d_3d(c: Ctx):
    img, lab, _ = sphere_case(seed=7)
    write_nifti(c.raw() / "imagesTr" / "flat_0000.nii.gz", img[:, :, 10:11])
    write_nifti(c.raw() / "labelsTr" / "flat.nii.gz", lab[:, :, 10:11])
    c.edit_json(lambda m: m.update(numTraining=4))
    return _preprocess(c)


def _non_utf8(c: Ctx):
    path = c.raw() / "dataset.json"
    path.write_bytes(path.read_bytes().replace(b'"fg"', b'"f\xe9"'))
    return _preprocess(c)


def _overwrite_into(where: str):
    """1. preprocess --overwrite into the raw folder's parent, the raw folder, or a folder in it."""
    def make(c: Ctx):
        raw = c.raw()
        (c.tmp / "notes.txt").write_text("the user's own file beside the dataset")
        out = {"parent": c.tmp, "raw": raw, "inside": raw / "pre"}[where]
        return ["preprocess", str(raw), "-o", str(out), "-j", "1", "--quiet", "--overwrite"]

    return make


def _overwrite_foreign(c: Ctx):
    """1. --overwrite on a medvol cache into which someone else's file has moved."""
    out = c.tmp / "out"
    shutil.copytree(c.tiny["cache"], out)
    (out / "cases" / "notes.txt").write_text("keep me")
    return ["preprocess", str(c.raw()), "-o", str(out), "-j", "1", "--quiet", "--overwrite"]


def _predict_into_input(c: Ctx):
    """2. predict -i d -o d where d holds scan.nii.gz: the output would replace the input."""
    write_nifti(c.tmp / "d" / "scan.nii.gz", sphere_case()[0])
    return ["predict", "-m", str(c.tiny["run"]), "-i", str(c.tmp / "d"), "-o", str(c.tmp / "d"), "--device", "cpu",
            "--quiet"]


def _duplicate_case_ids(kind: str):
    """3. two sources of one case id: Decathlon a/x + b/x, or predict inputs x.nii + x.nii.gz."""
    def make(c: Ctx):
        img, lab, aff = sphere_case()
        if kind == "predict":
            write_nifti(c.tmp / "in" / "x.nii", img)
            write_nifti(c.tmp / "in" / "x.nii.gz", img)
            return ["predict", "-m", str(c.tiny["run"]), "-i", str(c.tmp / "in"), "-o", str(c.tmp / "pred"),
                    "--device", "cpu", "--quiet"]
        raw = c.tmp / "raw"
        for sub in ("a", "b"):
            write_nifti(raw / sub / "x.nii.gz", img, aff)
            write_nifti(raw / "labels" / sub / "x.nii.gz", lab, aff)
        (raw / "dataset.json").write_text(json.dumps({
            "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "fg"},
            "training": [{"image": f"./{s}/x.nii.gz", "label": f"./labels/{s}/x.nii.gz"} for s in ("a", "b")]}))
        return ["preprocess", str(raw), "-o", str(c.tmp / "out"), "-j", "1", "--quiet"]

    return make


HOLD_LOCK = ("import sys\nfrom medvol.manifest import locked\nwith locked(sys.argv[1], 'predict'):\n"
             "    print('held', flush=True)\n    sys.stdin.read()\n")


def _predict_while_another_runs(c: Ctx):
    """A second predict into a folder that another (a process holding its lock) writes into."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(c.tmp / "pred")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    c.cleanups.append(lambda: holder.communicate(timeout=60))  # closing its stdin lets it go
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return _predict()(c)


def _model_zip(c: Ctx) -> Path:
    from medvol.export import export_model

    return export_model(c.tiny["run"], c.tmp / "model" / "m.zip")


def _predict_tampered_zip(c: Ctx):
    """A model zip from `medvol export` with a member added after: named, though never extracted."""
    import zipfile

    model = _model_zip(c)
    with zipfile.ZipFile(model, "a") as z:
        z.writestr("../../x", b"not part of the model")
    argv = _predict()(c)
    argv[argv.index("-m") + 1] = str(model)
    return argv


def _signal_during_first_case(sig: signal.Signals):
    """SIGTERM (a scheduler's pre-emption) or Ctrl-C while the first of three cases is predicted
    with a model zip unpacked into c.tmp/tmp: the case is finished, the others are not started."""
    def make(c: Ctx):
        from medvol.inference import predictor

        real = predictor._predict_case

        def signalled(*a, **k):
            if not (c.tmp / "pred" / "a.nii.gz").exists():
                os.kill(os.getpid(), sig)
            return real(*a, **k)

        def unexpected(signum, frame):  # guard: the signal must never end the test session
            raise AssertionError(f"{signal.Signals(signum).name} reached no handler of medvol predict")

        c.monkeypatch.setattr(predictor, "_predict_case", signalled)
        old = signal.signal(sig, unexpected)
        c.cleanups.append(lambda: signal.signal(sig, old))
        (c.tmp / "tmp").mkdir()
        c.monkeypatch.setattr(tempfile, "tempdir", str(c.tmp / "tmp"))
        for i, case in enumerate("abc"):
            write_nifti(c.tmp / "in" / f"{case}.nii.gz", sphere_case(seed=i)[0])
        return ["predict", "-m", str(_model_zip(c)), "-i", str(c.tmp / "in"), "-o", str(c.tmp / "pred"),
                "--device", "cpu", "--quiet"]

    return make



# --------------------------------------------------------------------------- issue 35, 3: the new commands
def _slice_labels(text: str | bytes):
    """preprocess of the tiny raw dataset with ``slice_labels.csv`` beside its dataset.json (the
    plan's 2d slice axis is Z: 20 slices per case)."""
    def make(c: Ctx):
        path = c.raw() / "slice_labels.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return _preprocess(c)

    return make


def _splits(splits, fold: str = "0"):
    """train --fold on a copy of the tiny cache holding ``splits`` as its splits_final.json."""
    def make(c: Ctx):
        if splits is not None:  # None: the file is already there
            (c.cache() / "splits_final.json").write_text(json.dumps(splits))
        return ["train", "quickstart", "--data", str(c.cache()), "--out", str(c.tmp / "run"), "--quiet", "--device",
                "cpu", "--fold", fold, "--set", "trainer.steps=1", "--set", "data.num_workers=0", "--set",
                "model.base_features=4", "--set", "model.max_features=8", "--no-final-validation"]

    return make


def _raw_splits(c: Ctx):
    """A raw dataset whose splits_final.json (copied into the cache) names a case it lacks."""
    (c.raw() / "splits_final.json").write_text(json.dumps([{"train": ["a", "b"], "val": ["zz"]}]))
    return _preprocess(c)


def _run_copy(c: Ctx, name: str, change: Callable[[Path], None] | None = None) -> Path:
    dst = c.tmp / "runs" / name
    shutil.copytree(c.tiny["run"], dst)
    if change is not None:
        change(dst)
    return dst


def _edit(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _cv(*changes):
    """cv over copies of the tiny run, the i-th changed by ``changes[i]`` (None: as trained)."""
    def make(c: Ctx):
        runs = [_run_copy(c, f"fold_{i}", ch) for i, ch in enumerate(changes)]
        return ["cv", *map(str, runs), "-o", str(c.tmp / "out"), "--quiet"]

    return make


def _other_validation_cases(run: Path) -> None:
    """The run validated other cases than the tiny run (renamed in its summary)."""
    _edit(run / "validation" / "summary.json",
          lambda s: s.update(cases={f"{k}2": v for k, v in s["cases"].items()}))


def _plan_key(key: str, value):
    return lambda run: _edit(run / "plans.json", lambda p: p.update({key: value}))


def _ensemble(change: Callable[[Path], None]):
    """predict -m RUN -m RUN2 where RUN2 is a copy of the tiny run changed by ``change``."""
    def make(c: Ctx):
        other = _run_copy(c, "other", change)
        argv = _predict()(c)
        return argv[:3] + ["-m", str(other)] + argv[3:]

    return make


def _export(change: Callable[[Path], None] | None = None, out: str = "m.zip", existing: bool = False):
    def make(c: Ctx):
        run = _run_copy(c, "run", change)
        (c.tmp / "model").mkdir()
        if existing:
            (c.tmp / "model" / out).write_text("the user's own file")
        return ["export", str(run), "-o", str(c.tmp / "model" / out), "--quiet"]

    return make


def _features(change: Callable[[dict], None] | None = None, raw: bytes | None = None):
    """train slice_aggregator on a features file of 4 subjects (written by hand, as
    extract-features writes it), its arrays changed by ``change`` or its bytes replaced by ``raw``."""
    def make(c: Ctx):
        from medvol.io.slice_features import FORMAT, SliceFeatures, SubjectSlices, write_features

        rng = np.random.default_rng(0)
        items = [SubjectSlices(f"s{i}", rng.normal(size=(3, 4)).astype(np.float32),
                               rng.normal(size=(3, 2)).astype(np.float32), np.arange(3), np.arange(3), i % 2)
                 for i in range(4)]
        path = write_features(c.tmp / "features" / "features.npz", SliceFeatures(items, {"subject_classes": 2}))
        if change is not None:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            arrays["meta"] = np.array(json.dumps({"format": FORMAT, "subject_classes": 2}))
            change(arrays)
            with open(path, "wb") as f:
                np.savez(f, **arrays)
        if raw is not None:
            path.write_bytes(raw(path.read_bytes()) if callable(raw) else raw)
        return ["train", "slice_aggregator", "--data", str(c.tmp / "features"), "--out", str(c.tmp / "agg"),
                "--quiet", "--device", "cpu", "--set", "trainer.steps=1", "--set", "trainer.val_every=1",
                "--set", "data.batch_size=2", "--set", "data.unlabelled_per_batch=0", "--set",
                "data.val_cases=[s0, s1]", "--set", "model.options={hidden: [8], gru_hidden: 4}"]

    return make


def _aggregator_run_file(text: str):
    """predict -m AGG where AGG's aggregator.json (which names its classifier) was tampered with."""
    def make(c: Ctx):
        agg = c.tmp / "agg"
        agg.mkdir()
        (agg / "aggregator.json").write_text(text)
        argv = _predict()(c)
        argv[argv.index("-m") + 1] = str(agg)
        return argv

    return make


def _covid(c: Ctx, masks=("a", "b"), mask_size: int = 12) -> list[str]:
    """A COVID-SemiSeg training folder (Imgs/*.png + GT/*.png) for the adapter."""
    import imageio.v3 as iio

    src = c.tmp / "src"
    for sub in ("Imgs", "GT"):
        (src / sub).mkdir(parents=True)
    for name in ("a", "b"):
        iio.imwrite(src / "Imgs" / f"{name}.png", np.full((12, 12), 80, np.uint8))
        if name in masks:
            iio.imwrite(src / "GT" / f"{name}.png", np.zeros((mask_size, mask_size), np.uint8))
    return [str(src), str(c.tmp / "out")]


def _covid_into_used_folder(c: Ctx) -> list[str]:
    argv = _covid(c)
    (c.tmp / "out").mkdir()
    (c.tmp / "out" / "notes.txt").write_text("mine")
    return argv


def _sigterm_in_final_validation(c: Ctx, sig: signal.Signals = signal.SIGTERM):
    """SIGTERM (a scheduler's pre-emption) while the end-of-run validation predicts its cases."""
    from medvol.inference import predictor

    real = predictor.predict_cases

    def signalled(*a, **k):
        os.kill(os.getpid(), sig)
        return real(*a, **k)

    def unexpected(signum, frame):  # guard: the signal must never end the test session
        raise AssertionError(f"{sig.name} reached no handler of medvol train during the final validation")

    c.monkeypatch.setattr(predictor, "predict_cases", signalled)
    old = signal.signal(sig, unexpected)
    c.cleanups.append(lambda: signal.signal(sig, old))
    return ["train", "quickstart", "--data", str(c.tiny["cache"]), "--out", str(c.tmp / "run"), "--quiet", "--device",
            "cpu", "--set", "trainer.steps=1", "--set", "trainer.val_every=1", "--set", "data.num_workers=0", "--set",
            "model.base_features=4", "--set", "model.max_features=8", "--set", "data.batch_size=2"]


def _sigterm_in(where: Callable[[], tuple[object, str]], make: Callable[[Ctx], list[str]], command: str):
    """SIGTERM at the first call of ``getattr(*where())`` while ``make``'s command runs."""
    def wrapped(c: Ctx):
        owner, name = where()
        real = getattr(owner, name)

        def signalled(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)

        def unexpected(signum, frame):  # guard: the signal must never end the test session
            raise AssertionError(f"SIGTERM reached no handler of medvol {command}")

        argv = make(c)
        c.monkeypatch.setattr(owner, name, signalled)
        old = signal.signal(signal.SIGTERM, unexpected)
        c.cleanups.append(lambda: signal.signal(signal.SIGTERM, old))
        return argv

    return wrapped


def _validating(cases: list[str], trained_on: list[str]) -> Callable[[Path], None]:
    """Make a copy of the tiny run (it validated 'c' after training on 'a' and 'b') the fold that
    trained on ``trained_on`` and validated ``cases`` (each with 'c''s metrics): a realistic fold."""
    def change(run: Path) -> None:
        _edit(run / "validation" / "summary.json", lambda s: (
            s.update(cases={k: s["cases"]["c"] for k in cases}), s["validation"].update(cases=cases)))
        _edit(run / "split.json", lambda s: s.update(labelled=trained_on, validation=cases))

    return change


def _complete_cv(c: Ctx, again: bool = False) -> list[str]:
    """cv over two folds that validate every case of the tiny dataset ('c', then 'a' and 'b');
    ``again``: OUT already holds the cross-validation of an earlier `medvol cv`, and fold_1 was
    validated again since (other metrics: the new table differs from the old)."""
    runs = [_run_copy(c, "fold_0"), _run_copy(c, "fold_1", _validating(["a", "b"], ["c"]))]
    argv = ["cv", *map(str, runs), "-o", str(c.tmp / "out"), "--quiet"]
    if again:
        assert main(argv) == 0
        _edit(runs[1] / "validation" / "summary.json",
              lambda s: [m.update(dice=m["dice"] / 2) for m in s["cases"]["a"].values()])
    return argv


def _cv_fold_missing(c: Ctx) -> list[str]:
    """Two of the three folds of the cache's splits_final.json: fold 1 (validating 'a') is missing."""
    splits = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["b", "c"], "val": ["a"]},
              {"train": ["a", "c"], "val": ["b"]}]
    c.cache().joinpath("splits_final.json").write_text(json.dumps(splits))
    runs = []
    for k in (0, 2):
        def change(run: Path, k=k) -> None:
            _validating(splits[k]["val"], splits[k]["train"])(run)
            _edit(run / "validation" / "summary.json", lambda s: s["validation"].update(cache=str(c.cache())))
        runs.append(_run_copy(c, f"fold_{k}", change))
    return ["cv", *map(str, runs), "-o", str(c.tmp / "out"), "--quiet"]


def _crossval_module():
    import medvol.evaluation.crossval

    return medvol.evaluation.crossval


def _aggregator_stub(c: Ctx) -> Path:
    agg = c.tmp / "agg"
    agg.mkdir()
    (agg / "aggregator.json").write_text(json.dumps({"classifier": "/nowhere"}))
    return agg


def _with_model(argv: list[str], model: Path) -> list[str]:
    argv[argv.index("-m") + 1] = str(model)
    return argv


def _recipe_file(text: str):
    def make(c: Ctx):
        (c.tmp / "r.yaml").write_text(text)
        return ["train", str(c.tmp / "r.yaml"), "--data", str(c.tiny["cache"]), "--out", str(c.tmp / "run"),
                "--quiet", "--device", "cpu"]

    return make


# --------------------------------------------------------------------------- read-only and full disks (issue 35, 3)
SMALL_TRAIN = ["trainer.steps=1", "trainer.val_every=1", "data.num_workers=0", "model.base_features=4",
               "model.max_features=8", "data.batch_size=2"]


def _unprivileged(c: Ctx) -> list[str]:
    """A prefix that runs the command as root without the capabilities that let root write
    anywhere (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): the kernel checks file permissions as for
    any user. (A separate user cannot run this interpreter: it lives under /root, mode 0700.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root, to drop root's capabilities (setpriv); as a user, row "
                    "read-only-output-folder covers it in-process")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


def _read_only_folder(c: Ctx) -> Path:
    """An empty output folder of mode 0555 (owned by root, written to without root's powers)."""
    out = c.tmp / "place" / "out"
    out.mkdir(parents=True)
    out.chmod(0o555)
    c.cleanups.append(lambda: out.chmod(0o755))
    return out


def _tmpfs(c: Ctx, size: str) -> Path:
    """A fresh tmpfs mounted at c.tmp/place (unmounted after the command); skip where mounts are
    not permitted (not root, or a container without CAP_SYS_ADMIN)."""
    place = c.tmp / "place"
    place.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (a real full or read-only disk)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=755", "tmpfs", str(place)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")
    c.cleanups.append(lambda: subprocess.run(["umount", "-l", str(place)], check=True))
    return place


def _full_disk(c: Ctx) -> Path:
    """A 256 KiB tmpfs filled to the last byte by the user's own file; the output goes to a new
    folder on it."""
    place = _tmpfs(c, "256k")
    fd = os.open(place / "user_data.bin", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\x5a" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return place / "out"


def _read_only_disk(c: Ctx) -> Path:
    """A tmpfs holding one file of the user's, remounted read-only (EROFS, even for root)."""
    place = _tmpfs(c, "1m")
    (place / "notes.txt").write_text("the user's own file")
    subprocess.run(["mount", "-o", "remount,ro", str(place)], check=True, capture_output=True)
    return place / "out"


def _writing(command: str, place: Callable[[Ctx], Path]):
    """``medvol <command>`` with its output in the folder ``place`` prepares."""
    def make(c: Ctx) -> list[str]:
        out = place(c)
        if command == "preprocess":
            return ["preprocess", str(c.raw()), "-o", str(out), "-j", "1", "--quiet"]
        if command == "train":
            return ["train", "quickstart", "--data", str(c.tiny["cache"]), "--out", str(out), "--quiet", "--device",
                    "cpu", *sum((["--set", s] for s in SMALL_TRAIN), [])]
        if command == "export":
            return ["export", str(c.tiny["run"]), "-o", str(out / "m.zip"), "--quiet"]
        write_nifti(c.tmp / "in" / "x.nii.gz", sphere_case()[0])
        return ["predict", "-m", str(c.tiny["run"]), "-i", str(c.tmp / "in" / "x.nii.gz"), "-o", str(out),
                "--device", "cpu", "--quiet"]

    return make


def _place_rows() -> list[Row]:
    """preprocess/train/predict/export into a read-only folder (as a user), onto a full disk
    and onto a read-only disk: one line, exit 2, the user's files as they were, nothing added."""
    rows = []
    problems = {"read-only-folder-as-a-user": (_read_only_folder, r"[Pp]ermission denied", _unprivileged),
                "full-disk": (_full_disk, r"disk full|No space left on device", None),
                "read-only-disk": (_read_only_disk, r"[Rr]ead-only file system", None)}
    for command in ("preprocess", "train", "predict", "export"):
        for name, (place, error, prefix) in problems.items():
            rows.append(Row(f"{command}-onto-a-{name}" if "disk" in name else f"{command}-into-a-{name}",
                            _writing(command, place), rf"place/out\S*: (cannot write: )?({error})",
                            untouched=_cache_and("place", "raw"), prefix=prefix))
    return rows


def _cache_and(*names):
    return lambda c: [c.tmp / n for n in names]


CATALOGUE = [
    # 1-3. nothing of the user's is lost
    Row("overwrite-parent-of-raw", _overwrite_into("parent"),
        r"output folder contains the raw dataset .*raw: choose a folder outside it", untouched=_cache_and("")),
    Row("overwrite-the-raw-folder", _overwrite_into("raw"), r"output folder is the raw dataset",
        untouched=_cache_and("")),
    Row("overwrite-inside-raw", _overwrite_into("inside"), r"output folder lies inside the raw dataset",
        untouched=_cache_and("")),
    Row("overwrite-foreign-file-in-cache", _overwrite_foreign,
        r"out/cases/notes\.txt: was not written by medvol .*--overwrite refuses to delete them",
        untouched=_cache_and("raw", "out")),
    Row("predict-output-is-its-input", _predict_into_input, r"d/scan\.nii\.gz: the prediction would replace this input",
        untouched=_cache_and("d")),
    Row("predict-two-scans-one-case", _duplicate_case_ids("predict"),
        r"x\.nii(\.gz)?: maps to the same case 'x' \(channel 0\) as x\.nii", untouched=_cache_and("in", "pred")),
    Row("decathlon-two-sources-one-case", _duplicate_case_ids("decathlon"),
        r"raw/b/x\.nii\.gz: maps to the same case id 'x' as .*raw/a/x\.nii\.gz", untouched=_cache_and("raw", "out")),
    # 4. label values, checked before any cast; declared labels consecutive from 0
    Row("label-65538-int32", _label(65538, np.int32), r"a\.nii\.gz: label value\(s\) \[65538\] are not declared", 1),
    Row("label-65536-int32", _label(65536, np.int32), r"a\.nii\.gz: label value\(s\) \[65536\] are not declared", 1),
    Row("label-1e10-float", _label(1e10, np.float64), r"a\.nii\.gz: label value\(s\) \[10000000000\] are not", 1),
    Row("label-fraction", _label(0.5, np.float32), r"a\.nii\.gz: label values must be integers, found \[0\.5\]", 1),
    Row("label-negative", _label(-1, np.int16), r"a\.nii\.gz: label value\(s\) \[-1\] are not declared", 1),
    Row("labels-not-consecutive", _json(lambda m: m.update(labels={"background": 0, "fg": 1, "x": 5})),
        r"dataset\.json: label values must be consecutive from 0 .* got \[0, 1, 5\]"),
    Row("label-value-float", _json(lambda m: m.update(labels={"background": 0, "fg": 1.5})),
        r"dataset\.json: label 'fg': value 1\.5 is not an integer"),
    # 5. options validated where they are parsed, recipe values alike; NaN never passes
    Row("ct-window-empty", lambda c: _preprocess(c, "--ct-window", "0", "0"), r"--ct-window: LO must be below HI",
        untouched=_cache_and("raw", "out")),
    Row("ct-window-reversed", lambda c: _preprocess(c, "--ct-window", "100", "-100"), r"--ct-window: LO must be below",
        untouched=_cache_and("raw", "out")),
    Row("ct-window-nan", lambda c: _preprocess(c, "--ct-window", "nan", "1"), r"--ct-window: must be a finite number",
        untouched=_cache_and("raw", "out")),
    Row("gpu-memory-negative", lambda c: _preprocess(c, "--gpu-memory", "-5"), r"--gpu-memory: must be > 0",
        untouched=_cache_and("raw", "out")),
    Row("gpu-memory-nan", lambda c: _preprocess(c, "--gpu-memory", "nan"), r"--gpu-memory: must be a finite number",
        untouched=_cache_and("raw", "out")),
    Row("target-spacing-zero", lambda c: _preprocess(c, "--target-spacing", "1", "0", "1"),
        r"--target-spacing: must be > 0", untouched=_cache_and("raw", "out")),
    Row("target-spacing-inf", lambda c: _preprocess(c, "--target-spacing", "1", "inf", "1"),
        r"--target-spacing: must be a finite number", untouched=_cache_and("raw", "out")),
    Row("workers-zero", lambda c: _preprocess(c, "-j", "0"), r"-j: must be an integer >= 1",
        untouched=_cache_and("raw", "out")),
    Row("overlap-one", _predict("--overlap", "1"), r"--overlap: must be in \[0, 1\)",
        untouched=_cache_and("in", "pred")),
    Row("overlap-nan", _predict("--overlap", "nan"), r"--overlap: must be a finite number",
        untouched=_cache_and("in", "pred")),
    Row("sw-batch-size-zero", _predict("--sw-batch-size", "0"), r"--sw-batch-size: must be an integer >= 1",
        untouched=_cache_and("in", "pred")),
    Row("device-cuda-without-cuda", _no_cuda(_predict("--device", "cuda")), r"--device cuda: no CUDA device",
        untouched=_cache_and("in", "pred")),
    Row("device-unknown", _predict("--device", "gpu0"), r"--device: expected auto, cpu, cuda or cuda:N",
        untouched=_cache_and("in", "pred")),
    Row("recipe-steps-zero", _train("trainer.steps=0"), r"'trainer\.steps' must be >= 1", untouched=_cache_and("run")),
    Row("recipe-lr-nan", _train("optimizer.lr=nan"), r"'optimizer\.lr' must be a finite number",
        untouched=_cache_and("run")),
    Row("recipe-lr-zero", _train("optimizer.lr=0"), r"'optimizer\.lr' must be > 0", untouched=_cache_and("run")),
    Row("recipe-patch-2d", _train("data.patch_size=[32, 32]"), r"'data\.patch_size' must be 3 positive integers",
        untouched=_cache_and("run")),
    # 8. evaluate: missing predictions are an error; the affine message quotes both affines
    Row("evaluate-missing-prediction", _evaluate(missing=True),
        r"pred: no prediction for 1 of the 2 reference case\(s\) in .*ref: b$", untouched=_cache_and("pred", "ref")),
    Row("evaluate-affine-mismatch", _evaluate(shifted=True),
        r"a\.nii\.gz: not on the reference's grid \(a\.nii\.gz\): affine \[\[1\.0, 0\.0, 0\.0, 3\.0\].* vs "
        r"\[\[1\.0, 0\.0, 0\.0, 0\.0\]", untouched=_cache_and("pred", "ref")),
    Row("evaluate-missing-folder", lambda c: ["evaluate", "--pred", str(c.tmp / "nope"), "--ref", str(c.tmp / "ref")],
        r"nope: folder not found", untouched=_cache_and("nope", "ref")),
    # 9. one line naming the file or option and the problem
    Row("zero-size-dimension", _image(np.zeros((24, 24, 0), np.float32)),
        r"a_0000\.nii\.gz: has a zero-size dimension \(shape \(24, 24, 0\)\)", 1),
    Row("zero-spacing", _header(PIXDIM_XYZ, "<f4", [1, 0, 1]),
        r"a_0000\.nii\.gz: voxel spacing \(pixdim\) must be finite and > 0, got \[1\.0, 0\.0, 1\.0\]", 1),
    Row("nan-spacing", _header(PIXDIM_XYZ, "<f4", [1, np.nan, 1]),
        r"a_0000\.nii\.gz: voxel spacing \(pixdim\) must be finite and > 0", 1),
    Row("header-declares-too-many-voxels-gz", _header(DIM_XYZ, "<i2", [30000, 30000, 30000]),
        r"a_0000\.nii\.gz: header declares shape \(30000, 30000, 30000\) .* truncated or corrupt header", 1),
    Row("header-declares-too-many-voxels-nii", _predict_huge_header_nii,
        r"big\.nii: header declares shape \(900, 900, 900\)", untouched=_cache_and("in", "pred")),
    Row("dataset-json-not-utf8", _non_utf8, r"dataset\.json: not UTF-8 text"),
    Row("channel-names-a-list", _json(lambda m: m.update(channel_names=["MRI"])),
        r"dataset\.json: 'channel_names' must be a mapping channel -> name, got list"),
    Row("channel-name-not-a-string", _json(lambda m: m.update(channel_names={"0": 1})),
        r"dataset\.json: 'channel_names' maps channel numbers to names"),
    Row("num-training-a-string", _json(lambda m: m.update(numTraining="3")),
        r"dataset\.json: 'numTraining' must be an integer, got str"),
    Row("file-ending-a-number", _json(lambda m: m.update(file_ending=5)),
        r"dataset\.json: 'file_ending' must be a string"),
    Row("file-ending-without-dot", _json(lambda m: m.update(file_ending="nii.gz")),
        r"dataset\.json: 'file_ending' must start with a dot"),
    Row("labels-a-list", _json(lambda m: m.update(labels=["background", "fg"])), r"dataset\.json: 'labels' must be"),
    Row("missing-key-near-miss", _json(lambda m: m.update(chanel_names=m.pop("channel_names"))),
        r"dataset\.json: missing key\(s\) \['channel_names'\] required by the nnU-Net v2 layout; "
        r"found 'chanel_names': did you mean 'channel_names'\?"),
    Row("reader-with-reorient", _json(lambda m: m.update(overwrite_image_reader_writer="NibabelIOWithReorient")),
        r"dataset\.json: 'overwrite_image_reader_writer': 'NibabelIOWithReorient' is not supported: medvol keeps "
        r"each scan's own voxel order"),
    Row("reader-tiff", _json(lambda m: m.update(overwrite_image_reader_writer="Tiff3DIO")),
        r"dataset\.json: 'overwrite_image_reader_writer': 'Tiff3DIO' is not supported"),
    Row("regions-without-class-order", _json(lambda m: m.update(labels={"background": 0, "a": [1, 2], "b": 2})),
        r"dataset\.json: labels declare regions \(\(1, 2\), \(2,\)\): 'regions_class_order' is required"),
    Row("ignore-label-not-highest", _json(lambda m: m.update(labels={"background": 0, "fg": 1, "ignore": 5})),
        r"dataset\.json: label 'ignore' is 5, but the ignore label must be the highest label value"),
    Row("nnunet-dataset-table", _json(lambda m: m.update(dataset={"a": {"images": ["x.nii.gz"]}})),
        r"dataset\.json: 'dataset': cases listed in 'dataset' .* are not supported"),
    Row("decathlon-modality-a-list", _decathlon(lambda m: m.update(modality=["MRI"])),
        r"dataset\.json: 'modality' must be a mapping"),
    Row("decathlon-training-a-dict", _decathlon(lambda m: m.update(training={"image": "a"})),
        r"dataset\.json: 'training' must be a list"),
    Row("decathlon-image-not-a-path", _decathlon(lambda m: m["training"][0].update(image=3)),
        r"dataset\.json: each 'training' entry needs 'image' and 'label' paths"),
    Row("decathlon-test-entry-a-number", _decathlon(lambda m: m.update(test=[1])),
        r"dataset\.json: each 'test' entry must be an image path"),
    Row("decathlon-label-name-not-a-string", _decathlon(lambda m: m.update(labels={"0": "background", "1": 2})),
        r"dataset\.json: 'labels' maps values to names"),
    Row("read-only-output-folder", _read_only_out, r"out/\.medvol-manifest\.json: cannot write: permission denied",
        untouched=_cache_and("raw", "out")),
    Row("disk-full", _disk_full, r"cannot write: disk full \(free space or fix permissions, then rerun\)"),
    Row("worker-killed", _worker_killed, r"a worker process died .* rerun the same command to resume"),
    Row("plan-on-a-raw-folder", lambda c: ["plan", str(c.raw()), "--quiet"],
        r"raw: a raw dataset \(or another folder\), not one `medvol fingerprint` wrote"),
    Row("truncated-cache-array-in-training", _truncated_cache,
        r"cache/cases/[abc]\.npy: truncated or corrupt cache array; rerun `medvol preprocess`",
        untouched=_cache_and("cache")),
    Row("predict-2d-image", _predict(image=sphere_case()[0][:, :, 10:11]),
        r"x\.nii\.gz: is a 2D image \(shape \(24, 24, 1\)\); the model was planned for 3D scans",
        untouched=_cache_and("in", "pred")),
    Row("predict-empty-image", _predict(image=np.zeros((24, 24, 0), np.float32)),
        r"x\.nii\.gz: has a zero-size dimension", untouched=_cache_and("in", "pred")),
    Row("cv-run-without-validation", _cv_without_validation,
        r"runs/fold_0/validation/summary\.json: not found: this run has no end-of-run validation",
        untouched=lambda c: [c.tmp / "runs"]),
    Row("cv-case-in-two-folds", _cv_case_in_two_folds, r"case [abc] is validated by both .*runs/a and .*runs/b",
        untouched=lambda c: [c.tmp / "runs", c.tmp / "out"]),
    Row("dataset-mixing-2d-and-3d", _mixed_2d_3d,
        r"raw: the dataset mixes 2D images \(1, e\.g\. case 'flat' of shape \[24, 24, 1\]\) and 3D images \(3"),
    # issue 35, 3: predict's output folder and model files
    Row("predict-into-a-folder-another-predict-writes", _predict_while_another_runs,
        r"pred: another medvol predict \(pid \d+ on .* since .*\) is writing into this folder: wait for it",
        untouched=_cache_and("in", "pred")),
    Row("predict-model-zip-with-an-extra-member", _predict_tampered_zip,
        r"model/m\.zip: unexpected member '\.\./\.\./x': a medvol model file holds only recipe\.yaml, plans\.json, "
        r"checkpoint\.pt, manifest\.json, so it was changed after `medvol export`",
        untouched=_cache_and("in", "pred", "model")),
    Row("predict-sigterm", _signal_during_first_case(signal.SIGTERM),
        r"^medvol predict: stopped by SIGTERM: 1 of 3 case\(s\) written to .*pred, not written: b, c; rerun the same "
        r"command to predict them \(it predicts every case again\)$", rc=75, untouched=_cache_and("in", "tmp")),
    Row("predict-ctrl-c", _signal_during_first_case(signal.SIGINT),
        r"^medvol predict: stopped by SIGINT: 1 of 3 case\(s\) written to .*pred, not written: b, c; rerun",
        rc=130, untouched=_cache_and("in", "tmp")),
    # issue 35, 3: slice_labels.csv beside a raw dataset (checked by preprocess)
    Row("slice-labels-wrong-columns", _slice_labels("case,slice,grade\na,3,1\n"),
        r"raw/slice_labels\.csv: line 1: expected the columns subject, slice_index, label \(and optionally mask\), "
        r"got case, slice, grade"),
    Row("slice-labels-index-out-of-range", _slice_labels("subject,slice_index,label\na,3,1\nb,20,0\n"),
        r"slice_labels\.csv: line 3: slice_index 20 is out of range: 'b' has 20 slices \(0-19\)"),
    Row("slice-labels-duplicate-slice", _slice_labels("subject,slice_index,label\na,3,1\na,3,0\n"),
        r"slice_labels\.csv: line 3: duplicate row for slice 3 of 'a', first given on line 2"),
    Row("slice-labels-nan-label", _slice_labels("subject,slice_index,label\na,3,nan\n"),
        r"slice_labels\.csv: line 2: label must be a whole number >= 0, got 'nan'"),
    Row("slice-labels-nan-index", _slice_labels("subject,slice_index,label\na,NaN,1\n"),
        r"slice_labels\.csv: line 2: slice_index must be a whole number >= 0, got 'NaN'"),
    Row("slice-labels-negative-index", _slice_labels("subject,slice_index,label\na,-1,1\n"),
        r"slice_labels\.csv: line 2: slice_index must be a whole number >= 0, got -1"),
    Row("slice-labels-utf8-bom", _slice_labels(b"\xef\xbb\xbfsubject,slice_index,label\r\na,3,1\r\nzz,0,1\r\n"),
        r"slice_labels\.csv: line 3: unknown subject 'zz'$"),
    Row("slice-labels-not-utf8", _slice_labels(b"subject,slice_index,label\nb\xe9,3,1\n"),
        r"slice_labels\.csv: cannot read the slice-label CSV \(UnicodeDecodeError"),
    Row("slice-labels-path-like-subject", _slice_labels("subject,slice_index,label\n../a,3,1\n"),
        r"slice_labels\.csv: line 2: unknown subject '\.\./a'"),
    Row("slice-labels-index-along-another-axis", _slice_labels("subject,slice_index,label\na,22,1\n"),
        r"slice_labels\.csv: line 2: slice_index 22 is out of range: 'a' has 20 slices \(0-19\)"),
    Row("slice-labels-mask-not-found", _slice_labels("subject,slice_index,label,mask\na,3,1,masks/a_3.png\n"),
        r"slice_labels\.csv: line 2: mask file not found: .*raw/masks/a_3\.png"),
    Row("slice-labels-extra-field", _slice_labels("subject,slice_index,label\na,3,1,masks/a.png\n"),
        r"slice_labels\.csv: line 2: 4 fields, the header has 3"),
    Row("slice-labels-subject-row-with-a-mask", _slice_labels("subject,slice_index,label,mask\na,,1,a.png\n"),
        r"slice_labels\.csv: line 2: a mask needs a slice_index"),
    # splits_final.json (train --fold K)
    Row("splits-not-json", lambda c: (c.cache().joinpath("splits_final.json").write_text("[{"), _splits(None)(c))[1],
        r"cache/splits_final\.json: invalid JSON", untouched=_cache_and("run")),
    Row("splits-a-mapping", _splits({"0": {"train": ["a"], "val": ["b"]}}),
        r"cache/splits_final\.json: must be a list of \{\"train\": \[\.\.\.\], \"val\": \[\.\.\.\]\}",
        untouched=_cache_and("run")),
    Row("splits-name-a-missing-case", _splits([{"train": ["a", "zz"], "val": ["b"]}]),
        r"cache/splits_final\.json: names cases that are not in the cache: \['zz'\]", untouched=_cache_and("run")),
    Row("splits-path-like-id", _splits([{"train": ["a", "../x"], "val": ["b"]}]),
        r"cache/splits_final\.json: names cases that are not in the cache: \['\.\./x'\]",
        untouched=_cache_and("run")),
    Row("splits-id-not-a-string", _splits([{"train": ["a", ["b"]], "val": ["c"]}]),
        r"cache/splits_final\.json: fold 0: 'train' must list case ids \(strings\), got \['b'\]",
        untouched=_cache_and("run")),
    Row("splits-case-twice-in-a-fold", _splits([{"train": ["a", "b", "a"], "val": ["c"]}]),
        r"cache/splits_final\.json: fold 0: 'train' names 'a' twice", untouched=_cache_and("run")),
    Row("splits-case-in-train-and-val", _splits([{"train": ["a", "b"], "val": ["b", "c"]}]),
        r"cache/splits_final\.json: fold 0: case\(s\) \['b'\] are in both 'train' and 'val'",
        untouched=_cache_and("run")),
    Row("splits-fold-beyond", _splits([{"train": ["a", "b"], "val": ["c"]}], fold="1"),
        r"--fold 1: .*cache/splits_final\.json holds folds 0\.\.0", untouched=_cache_and("run")),
    Row("splits-fold-without-training-cases", _splits([{"train": [], "val": ["a"]}]),
        r"cache/splits_final\.json: fold 0: no training case \('train' is empty\)", untouched=_cache_and("run")),
    Row("raw-splits-name-a-missing-case", _raw_splits,
        r"raw/splits_final\.json: names cases that are not in the dataset: \['zz'\]"),
    # cv over stale, missing, mismatched or tampered folds
    Row("cv-stale-validation", _cv(lambda r: _edit(r / "train_summary.json", lambda s: s.update(steps_total=5))),
        r"fold_0/validation/summary\.json: written at step 1, but the run trained to step 5",
        untouched=_cache_and("runs", "out")),
    Row("cv-missing-run-folder", lambda c: ["cv", str(_run_copy(c, "fold_0")), str(c.tmp / "runs" / "fold_1"), "-o",
                                            str(c.tmp / "out"), "--quiet"],
        r"runs/fold_1: run folder not found", untouched=_cache_and("runs", "out")),
    Row("cv-folds-planned-differently", _cv(None, lambda r: (_other_validation_cases(r),
                                                             _plan_key("target_spacing", [2.0, 2.0, 2.0])(r))),
        r"runs/fold_1: planned differently from .*runs/fold_0 \(target_spacing differ\)",
        untouched=_cache_and("runs", "out")),
    Row("cv-tampered-summary", _cv(lambda r: _edit(r / "validation" / "summary.json",
                                                   lambda s: s.update(cases={"a": 0.9}))),
        r"fold_0/validation/summary\.json: .*case 'a'", untouched=_cache_and("runs", "out")),
    Row("cv-folds-leave-cases-unvalidated",
        lambda c: (_run_copy(c, "fold_0"), ["cv", str(c.tmp / "runs"), "--quiet"])[1],
        r"case\(s\) \['a', 'b'\] of the dataset are validated by no fold given", untouched=_cache_and("runs")),
    Row("cv-a-fold-of-a-split-missing", _cv_fold_missing,
        r"case\(s\) \['a'\] of the dataset are validated by no fold given .*: .*pass the run\(s\) of fold\(s\) 1 "
        r"of .*cache/splits_final\.json too", untouched=_cache_and("runs", "cache", "out")),
    Row("cv-folder-without-runs", lambda c: (c.tmp.joinpath("runs").mkdir(), ["cv", str(c.tmp / "runs"), "--quiet"])[1],
        r"runs: not a medvol run folder \(no recipe\.yaml\)", untouched=_cache_and("runs")),
    # ensembles of runs that do not fit together
    Row("ensemble-other-labels", _ensemble(_plan_key("labels", {"background": 0, "liver": 1})),
        r"runs/other: its plan's labels .* differs from .*: these models cannot be ensembled",
        untouched=_cache_and("in", "pred", "runs")),
    Row("ensemble-other-normalization", _ensemble(lambda r: _edit(r / "plans.json", lambda p: p["normalization"][0]
                                                                  .update(scheme="CTNormalization"))),
        r"runs/other: its plan's normalization .* cannot be ensembled", untouched=_cache_and("in", "pred", "runs")),
    Row("predict-run-plan-disagrees-with-its-checkpoint", _ensemble(_plan_key("labels", {"background": 0, "fg": 1,
                                                                                        "extra": 2})),
        r"runs/other/plans\.json: .*checkpoint", untouched=_cache_and("in", "pred", "runs")),
    Row("ensemble-other-target-spacing", _ensemble(_plan_key("target_spacing", [2.0, 2.0, 2.0])),
        r"runs/other: its plan's target_spacing \(\[2\.0, 2\.0, 2\.0\]\) differs",
        untouched=_cache_and("in", "pred", "runs")),
    Row("ensemble-with-a-missing-run", lambda c: _predict("-m", str(c.tmp / "nope"))(c),
        r"nope: not a medvol run folder", untouched=_cache_and("in", "pred")),
    # export
    Row("export-run-without-checkpoint", _export(lambda r: shutil.rmtree(r / "checkpoints")),
        r"runs/run/checkpoints/latest\.pt", untouched=_cache_and("runs", "model")),
    Row("export-over-a-foreign-file", _export(existing=True),
        r"model/m\.zip: exists and was not written by medvol", untouched=_cache_and("runs", "model")),
    Row("export-not-a-zip", _export(out="m.tar"), r"export -o .*m\.tar: the model file must end in \.zip",
        untouched=_cache_and("runs", "model")),
    # features files for the slice aggregator, and its run file
    Row("features-with-nan", _features(lambda a: a["features"].__setitem__((1, 2), np.nan)),
        r"features/features\.npz: 'features' holds NaN or infinite \(or non-numeric\) values",
        untouched=_cache_and("features", "agg")),
    Row("features-meta-not-an-object", _features(lambda a: a.update(meta=np.array("[1, 2]"))),
        r"features/features\.npz: corrupt features file: 'meta' must hold a JSON object, got list",
        untouched=_cache_and("features", "agg")),
    Row("features-duplicate-subjects", _features(lambda a: a["subjects"].__setitem__(1, "s0")),
        r"features/features\.npz: subject 's0' appears twice", untouched=_cache_and("features", "agg")),
    Row("features-subject-class-out-of-range", _features(lambda a: a["subject_class"].__setitem__(0, 7)),
        r"features/features\.npz: subject 's0': class 7 is not 0-1 or -1 \(unlabelled\)",
        untouched=_cache_and("features", "agg")),
    Row("features-offsets-tampered", _features(lambda a: a["offsets"].__setitem__(-1, 99)),
        r"features/features\.npz: corrupt features file", untouched=_cache_and("features", "agg")),
    Row("features-without-subjects", _features(lambda a: a.update(
        subjects=a["subjects"][:0], offsets=a["offsets"][:1], subject_class=a["subject_class"][:0],
        **{k: a[k][:0] for k in ("features", "logits", "slice_index", "raw_slice")})),
        r"features/features\.npz: holds no subject; write it with `medvol extract-features",
        untouched=_cache_and("features", "agg")),
    Row("features-without-columns", _features(lambda a: a.update(features=a["features"][:, :0])),
        r"features/features\.npz: 'features' has no columns", untouched=_cache_and("features", "agg")),
    Row("features-truncated", _features(raw=lambda b: b[: len(b) // 2]),
        r"features/features\.npz: not a readable features file", untouched=_cache_and("features", "agg")),
    Row("extract-features-of-a-3d-run", lambda c: ["extract-features", str(c.tiny["run"]), "--data",
                                                   str(c.tiny["cache"]), "-o", str(c.tmp / "out"), "--device", "cpu",
                                                   "--quiet"],
        r"run: a 3D model; the slice pipeline needs a 2D slice classifier", untouched=_cache_and("out")),
    Row("predict-aggregator-run-file-not-json", _aggregator_run_file("{not json"),
        r"agg/aggregator\.json: invalid JSON", untouched=_cache_and("in", "pred", "agg")),
    Row("predict-aggregator-run-without-checkpoint", _aggregator_run_file(json.dumps({"classifier": "/nowhere"})),
        r"agg/checkpoints/latest\.pt: no checkpoint here", untouched=_cache_and("in", "pred", "agg")),
    Row("predict-aggregator-with-a-segmentation-option",
        lambda c: _with_model(_predict("--tta")(c), _aggregator_stub(c)),
        r"--tta: .*agg predicts subject classes \(a slice aggregator's run\); the option applies to segmentation "
        r"models only", untouched=_cache_and("in", "pred", "agg")),
    Row("ensemble-with-an-aggregator-run", lambda c: _predict("-m", str(_aggregator_stub(c)))(c),
        r"agg: a slice aggregator's run \(subject classes from slice features\)",
        untouched=_cache_and("in", "pred", "agg")),
    Row("train-aggregator-on-a-cache", lambda c: ["train", "slice_aggregator", "--data", str(c.cache()), "--out",
                                                  str(c.tmp / "agg"), "--quiet", "--device", "cpu"],
        r"cache/features\.npz: no features file here; write one with `medvol extract-features",
        untouched=_cache_and("cache", "agg")),
    # SIGTERM during the end-of-run validation
    Row("train-sigterm-during-final-validation", _sigterm_in_final_validation,
        r"^medvol train: stopped by SIGTERM during the final validation: .*run/checkpoints/latest\.pt .*--resume",
        rc=75, untouched=_cache_and()),
    Row("export-sigterm-while-writing", _sigterm_in(lambda: (zipfile.ZipFile, "writestr"), _export(), "export"),
        r"^medvol export: stopped by SIGTERM: .*model/m\.zip not written", rc=75,
        untouched=_cache_and("runs", "model")),
    Row("cv-sigterm-while-writing", _sigterm_in(lambda: (_crossval_module(), "_write_csv"), _complete_cv, "cv"),
        r"^medvol cv: stopped by SIGTERM: nothing written to .*out ", rc=75, untouched=_cache_and("runs", "out")),
    Row("cv-sigterm-while-rewriting", _sigterm_in(lambda: (_crossval_module(), "_write_chart"),
                                                  lambda c: _complete_cv(c, again=True), "cv"),
        r"^medvol cv: stopped by SIGTERM: nothing written to .*out \(its cv_summary\.json, .* are as they were\)",
        rc=75, untouched=_cache_and("runs", "out")),
    Row("train-sigusr1-during-final-validation", lambda c: _sigterm_in_final_validation(c, signal.SIGUSR1),
        r"^medvol train: stopped by SIGUSR1 during the final validation: the run is complete \(.*run/checkpoints/"
        r"latest\.pt written at step 1\); 0 of 1 validation case\(s\) predicted .*no summary\.json written",
        rc=75, untouched=_cache_and()),
    # recipes with values of the wrong type
    Row("recipe-steps-a-bool", _train("trainer.steps=true"), r"'trainer\.steps' must be an integer, got True",
        untouched=_cache_and("run")),
    Row("recipe-val-cases-a-string", _train("data.val_cases=a"), r"'data\.val_cases' must be a list, got 'a'",
        untouched=_cache_and("run")),
    Row("recipe-val-cases-numbers", _train("data.val_cases=[1, 2]"), r"data\.val_cases: not in the cache: \[1, 2\]",
        untouched=_cache_and("run")),
    Row("recipe-a-list", _recipe_file("- name: x\n"), r"r\.yaml: a recipe is a mapping of sections",
        untouched=_cache_and("run")),
    Row("recipe-model-options-unknown-key", _train("model.options={widths: five}"),
        r"'model\.options': dynunet does not take \['widths'\]", untouched=_cache_and("run")),
    # a dataset adapter (python -m medvol.datasets.covid_semiseg) on a broken folder
    Row("covid-semiseg-image-without-mask", lambda c: _covid(c, masks=("a",)),
        r"Imgs/b\.png: no mask named 'b\.\*' in .*GT", untouched=_cache_and("src", "out"), adapter="covid_semiseg"),
    Row("covid-semiseg-mask-of-another-size", lambda c: _covid(c, mask_size=8),
        r"GT/a\.png: mask shape \(8, 8\) differs from its image's \(12, 12\)", untouched=_cache_and("src", "out"),
        adapter="covid_semiseg"),
    Row("covid-semiseg-into-a-folder-with-files", _covid_into_used_folder,
        r"out: exists and is not an empty folder", untouched=_cache_and("src", "out"), adapter="covid_semiseg"),
    Row("recipe-inference-step-strings", _train("inference.step=[a, b, c]"), r"'inference\.step'",
        untouched=_cache_and("run")),
    *_place_rows(),
]


# --------------------------------------------------------------------------- the runner
def checksums(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file at or under ``paths`` (a path that does not exist has none)."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_process(prefix: list[str], argv: list[str]) -> tuple[int, str]:
    """``medvol ARGV`` as a process behind ``prefix``: (exit status, stderr)."""
    proc = subprocess.run([*prefix, sys.executable, "-m", "medvol", *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return proc.returncode, proc.stderr


def run_cli(argv: list[str], adapter: str | None = None) -> int:
    try:
        if adapter is None:
            return main(argv)
        import importlib

        return importlib.import_module(f"medvol.datasets.{adapter}").main(argv) or 0
    except SystemExit as e:  # argparse: usage errors
        return int(e.code)


def _params(rows: list[Row]) -> list:
    return [pytest.param(r, id=r.id, marks=pytest.mark.xfail(strict=True, reason=r.xfail) if r.xfail else ())
            for r in rows]


@pytest.mark.parametrize("row", _params(CATALOGUE))
def test_bad_input_catalogue(row: Row, tiny, tmp_path, monkeypatch, capsys):
    ctx = Ctx(tmp_path, monkeypatch, tiny)
    try:
        _check_row(row, ctx, capsys)
    finally:
        for cleanup in ctx.cleanups:
            cleanup()


def _check_row(row: Row, ctx: Ctx, capsys) -> None:
    tmp_path = ctx.tmp
    argv = row.make(ctx)
    watched = row.untouched(ctx)
    before = checksums(watched)
    capsys.readouterr()
    if row.prefix is None:
        rc = run_cli(argv, row.adapter)
        err = capsys.readouterr().err
    else:
        rc, err = run_process(row.prefix(ctx), argv)
    if (tmp_path / "out").exists():
        (tmp_path / "out").chmod(0o755)  # let pytest clean up a read-only output folder
    assert "Traceback" not in err, err
    assert rc == row.rc, err
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.startswith(("medvol ", "python -m medvol."))]
        assert len(lines) == 1, err
        prog = f"python -m medvol.datasets.{row.adapter}" if row.adapter else f"medvol {argv[0]}"
        assert lines[0].startswith(f"{prog}: error: "), err
        assert re.search(row.error, lines[0]), lines[0]
    elif rc == 1:
        failed = err.split("failed cases:\n", 1)[1].splitlines()
        assert any(re.search(row.error, ln) for ln in failed), err
    else:  # stopped on a signal: one line saying what was written and what was not
        lines = [ln for ln in err.splitlines() if ln.startswith("medvol ")]
        assert len(lines) == 1 and re.search(row.error, lines[0]), err
    assert checksums(watched) == before


def test_catalogue_ids_are_unique():
    ids = [r.id for r in CATALOGUE]
    assert len(ids) == len(set(ids))
