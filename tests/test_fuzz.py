"""Property-based tests: whatever dataset.json, command line or recipe override a user
gives, medvol answers with a result or one of its own errors, never a traceback, and what it
accepts satisfies the checks (NaN included)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medvol import validation
from medvol.cli import build_parser
from medvol.config import load_recipe
from medvol.errors import ConfigError, InputError
from medvol.preprocessing import open_raw_dataset

from conftest import sphere_case, write_v2_dataset

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])  # the same examples on every run and machine

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
DATASET_KEYS = ["channel_names", "labels", "numTraining", "file_ending", "modality", "training", "test",
                "labelled_cases", "case_tasks", "tasks", "name", "numTest"]


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    img, lab, aff = sphere_case()
    return write_v2_dataset(tmp_path_factory.mktemp("fuzz") / "Dataset011_Fuzz", {"a": ([img], lab, aff)})


def _open_with(root: Path, content: bytes):
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "ds"
        copy.mkdir()
        (copy / "imagesTr").symlink_to(root / "imagesTr")
        (copy / "labelsTr").symlink_to(root / "labelsTr")
        (copy / "dataset.json").write_bytes(content)
        try:
            return open_raw_dataset(copy)
        except InputError as e:
            assert "dataset.json" in str(e) or "imagesTr" in str(e) or "labelsTr" in str(e), e
            return None


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(DATASET_KEYS), json_values, max_size=4),
       drop=st.sets(st.sampled_from(DATASET_KEYS), max_size=2))
def test_any_dataset_json_opens_or_is_one_input_error(raw_root, changes, drop):
    meta = json.loads((raw_root / "dataset.json").read_text())
    meta.update(changes)
    for k in drop:
        meta.pop(k, None)
    ds = _open_with(raw_root, json.dumps(meta).encode())
    if ds is not None:  # what was accepted is what training relies on
        assert ds.label_values == list(range(len(ds.label_values)))
        assert sorted(ds.channel_names) == list(range(ds.num_channels))


@FUZZ
@given(content=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_as_dataset_json_are_one_input_error(raw_root, content):
    _open_with(raw_root, content)  # a dataset, or an InputError naming dataset.json; nothing else


numbers = st.sampled_from(["0", "-0", "1", "-5", "1e400", "-1e400", "nan", "NaN", "inf", "-inf", "0.5", "1.0",
                           "abc", "", "1e-320", "100", "-100", "2"]) | st.floats(allow_nan=True).map(repr)
OPTIONS = {"--gpu-memory": 1, "--target-spacing": 3, "--ct-window": 2, "-j": 1}
PREDICT_OPTIONS = {"--overlap": 1, "--sw-batch-size": 1, "--device": 1}


def _parse(argv):
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return None


@FUZZ
@given(opts=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.lists(numbers, min_size=1, max_size=3), max_size=3))
def test_preprocess_options_parse_or_exit_2(opts):
    argv = ["preprocess", "raw", "-o", "out"] + [x for k, v in opts.items() for x in [k, *v]]
    a = _parse(argv)
    if a is not None:  # accepted values are usable
        # None: the planner's own memory target
        assert a.gpu_memory_gb is None or (math.isfinite(a.gpu_memory_gb) and a.gpu_memory_gb > 0)
        assert a.workers is None or a.workers >= 1  # None: the usable CPUs
        if a.ct_window is not None:
            assert all(map(math.isfinite, a.ct_window)) and a.ct_window[0] < a.ct_window[1]
        if a.target_spacing is not None:
            assert all(math.isfinite(s) and s > 0 for s in a.target_spacing)


@FUZZ
@given(opts=st.dictionaries(st.sampled_from(sorted(PREDICT_OPTIONS)),
                            numbers | st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "cpu:0", "gpu"]), max_size=3))
def test_predict_options_parse_or_exit_2(opts):
    a = _parse(["predict", "-m", "run", "-i", "in", "-o", "out"] + [x for kv in opts.items() for x in kv])
    if a is not None:
        assert a.overlap is None or 0 <= a.overlap < 1
        assert a.sw_batch_size >= 1
        assert a.device in ("auto", "cpu") or a.device.startswith("cuda")


RECIPE_KEYS = ["trainer.steps", "optimizer.lr", "data.patch_size", "data.batch_size", "data.val_fraction",
               "trainer.val_overlap", "inference.overlap", "data.oversample_foreground", "schedule.power",
               "data.oversample_grades"]


@FUZZ
@given(sets=st.lists(st.tuples(st.sampled_from(RECIPE_KEYS),
                               numbers | st.sampled_from(["[32, 32]", "[32, 32, 32]", "[0, 8, 8]", "[.nan]", ".nan",
                                                          "true", "{a: 1}", "[1, 2, 3, 4]"])), max_size=3))
def test_recipe_overrides_load_or_are_one_config_error(sets):
    try:
        r = load_recipe("quickstart", [f"{k}={v}" for k, v in sets])
    except ConfigError:
        return
    assert r.trainer.steps >= 1 and math.isfinite(r.optimizer.lr) and r.optimizer.lr > 0
    assert r.data.patch_size is None or (len(r.data.patch_size) == 3 and min(r.data.patch_size) >= 1)
    assert math.isfinite(r.schedule.power)
    assert 0 <= r.data.oversample_grades <= 1


@FUZZ
@given(x=st.floats(allow_nan=True) | st.integers() | st.text(max_size=4) | st.none())
def test_validation_checks_let_nothing_non_finite_through(x):
    for check in (validation.finite, validation.positive, validation.fraction):
        try:
            v = check(x, "--opt")
        except ConfigError:
            continue
        assert np.isfinite(v)
