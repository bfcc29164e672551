"""Data sources (medvol.training.sources): every built-in trainer says what it trains on with
one explicit type; the graded-slices checks are one set of one-line messages shared by DC-MT and
the slice classifier; code that needs plans gets a ConfigError from a source without any; and
StepDataset, the base of the training datasets, gives an item as a pure function of
(seed, step, slot)."""

from __future__ import annotations

import shutil
import typing

import numpy as np
import pytest
import torch
from test_slice_aggregator import recipe as aggregator_recipe
from test_slice_aggregator import synthetic_features

from medvol.cache import list_cases
from medvol.config import load_recipe
from medvol.data import make_loader
from medvol.data.dataset import StepDataset
from medvol.errors import ConfigError
from medvol.io.slice_features import write_features
from medvol.training import BUILTIN_TRAINERS, get_trainer
from medvol.training import load_recipe as load_checked_recipe
from medvol.training.cascade import CascadeSamples
from medvol.training.distributed import DistInfo
from medvol.training.seran import SRSlices
from medvol.training.sources import CacheSamples, DataSource, FeatureFile, GradedSlices, PretextVolumes

KINDS = {"supervised": CacheSamples, "canet": CacheSamples, "dodnet": CacheSamples, "ugpcl": CacheSamples,
         "infnet": CacheSamples, "dcmt": GradedSlices, "slice_classifier": GradedSlices,
         "slice_aggregator": FeatureFile, "pcrl": PretextVolumes, "cascade": CascadeSamples,
         "mrnet": CacheSamples, "de_dcgcn_ee": CacheSamples, "seran": SRSlices}


def test_every_builtin_trainer_names_its_source():
    """Each trainer's one data hook returns its kind: the cache's patches/slices are the base
    trainer's (Semi-Inf-Net drives Inf-Net runs)."""
    from medvol.training.engine import Trainer

    assert set(KINDS) == set(BUILTIN_TRAINERS) - {"semi_infnet"}
    for name, kind in KINDS.items():
        hook = get_trainer(name).make_source
        if kind is CacheSamples:
            assert hook is Trainer.make_source, name
        else:
            assert typing.get_type_hints(hook)["return"] is kind, name


def test_the_base_trainer_trains_on_cache_samples(brain_pre, tmp_path):
    r = load_recipe("quickstart", ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]"])
    t = get_trainer("supervised")(r, brain_pre, tmp_path / "run", DistInfo())
    assert type(t.source) is CacheSamples and t.plans is t.source.plans and t.patch_size == [16, 16, 16]


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_grade_oversampling_needs_slice_grades(brain_pre, tmp_path, configuration):
    r = load_recipe("quickstart", ["model.base_features=4", "model.max_features=8", "data.oversample_grades=0.5",
                                   f"data.configuration={configuration}"])
    t = get_trainer("supervised")(r, brain_pre, tmp_path / "run", DistInfo())  # brain_pre: no slice_labels.csv
    with pytest.raises(ConfigError, match="data.oversample_grades: trainer 'supervised' has no slice grades"):
        t.make_dataset()


def test_the_aggregator_trains_on_a_feature_file_without_plans(tmp_path):
    write_features(tmp_path / "features.npz", synthetic_features(8, 0))
    t = get_trainer("slice_aggregator")(aggregator_recipe(extra=["data.val_cases=[s000, s001]"]), tmp_path,
                                        tmp_path / "run", DistInfo())
    assert type(t.source) is FeatureFile and t.source.find_plans() is None
    assert (t.source.root, t.in_channels, t.num_classes) == (tmp_path / "features.npz", 12, 2)
    assert t.source.val_cases == ["s000", "s001"] and len(t.source.labelled) == 6
    for what in (lambda: t.plans, lambda: t.patch_size):
        with pytest.raises(ConfigError) as e:
            what()
        assert "\n" not in str(e.value) and "feature file" in str(e.value)


def test_cache_samples_of_the_base_trainer(brain_pre):
    r = load_recipe("quickstart", ["data.patch_size=[16, 16, 16]", "data.batch_size=3", "data.val_cases=[brain_000]"])
    src = CacheSamples.from_recipe(brain_pre, r)
    assert src.find_plans() is src.plans and src.slice_axis is None and src.patch_size == [16, 16, 16]
    assert (src.in_channels, src.num_outputs, src.batch_size) == (1, src.plans.num_classes, 3)
    assert src.val_cases == ["brain_000"] and "brain_000" not in src.labelled + src.unlabelled
    assert src.split() == {"labelled": src.labelled, "unlabelled": src.unlabelled, "validation": ["brain_000"]}
    assert src.checkpoint_fields() == {}


@pytest.fixture(scope="module")
def graded_cache(brain_pre, tmp_path_factory):
    """A copy of the brain cache: ``(cache, its first case)``; each test writes its own CSV."""
    cache = tmp_path_factory.mktemp("graded") / "pre"
    shutil.copytree(brain_pre, cache)
    return cache, list_cases(cache)[0]


def _graded(cache, trainer: str, *sets: str) -> GradedSlices:
    model = {"dcmt": "dcmt", "slice_classifier": "slice_cnn"}[trainer]
    r = load_recipe("quickstart", ["data.configuration=2d", f"trainer.name={trainer}", f"model.name={model}", *sets])
    return GradedSlices.from_recipe(cache, r)


@pytest.mark.parametrize("trainer", ["dcmt", "slice_classifier"])
def test_graded_slices_checks_fail_with_one_line(graded_cache, trainer):
    cache, case = graded_cache
    csv = cache / "slice_labels.csv"
    csv.unlink(missing_ok=True)
    cases = [(["data.configuration=3d_fullres"], f"trainer '{trainer}' trains on graded slices: set "
                                                 "data.configuration: 2d"),
             ([], f"no slice_labels.csv (trainer '{trainer}' needs slice grades"),
             ("subject_rows", f"slice_labels.csv: no slice grade (rows with a slice_index); trainer '{trainer}'")]
    for sets, message in cases:
        if sets == "subject_rows":
            csv.write_text(f"subject,slice_index,label\n{case},,1\n")
            sets = []
        with pytest.raises(ConfigError) as e:
            _graded(cache, trainer, *sets)
        assert message in str(e.value) and "\n" not in str(e.value)
    csv.unlink()


def test_graded_slices_give_the_grades_of_the_cached_slices(graded_cache):
    from medvol.cache import load_case

    cache, case = graded_cache
    (cache / "slice_labels.csv").write_text(f"subject,slice_index,label\n{case},3,2\n{case},4,0\n{case},,5\n")
    try:
        src = _graded(cache, "dcmt")
    finally:
        (cache / "slice_labels.csv").unlink()
    assert src.num_outputs == 3  # grades 0..2 of the slices (the subject's own class is not a slice grade)
    assert src.checkpoint_fields() == {"num_classes": 3} and src.slice_labels() is src.grades
    props = load_case(cache, case)[2]
    grades = src.cached_grades(props)
    assert len(grades) == props["shape_after_resampling"][src.slice_axis]
    from medvol.data.slices import raw_slice_of

    raw = raw_slice_of(props, src.slice_axis)
    want = np.where(raw == 3, 2, np.where(raw == 4, 0, -1))
    assert np.array_equal(grades, want) and {2, 0} <= set(grades.tolist())


def test_dcmt_draws_grade_balanced_slots_when_asked(graded_cache, tmp_path):
    cache, case = graded_cache
    (cache / "slice_labels.csv").write_text(f"subject,slice_index,label\n{case},3,2\n{case},4,0\n")
    try:
        r = load_recipe("dcmt_demo", ["data.oversample_grades=0.5", "data.val_cases=null", "data.val_fraction=0",
                                      "data.unlabelled_per_batch=0", "data.batch_size=4"])
        ds = get_trainer("dcmt")(r, cache, tmp_path / "run", DistInfo()).make_dataset()
        assert ds.grade_slots == 2  # round(4 labelled slots * 0.5)
        drawn = [int(ds.item(step, 0)["class"]) for step in range(40)]  # a graded slot: only graded slices
    finally:
        (cache / "slice_labels.csv").unlink()
    assert set(drawn) == {0, 2} and 10 <= drawn.count(2) <= 30  # grade 2 and 0 drawn alike, never ungraded (-1)


def test_a_source_without_plans_says_so():
    src = DataSource(root="features.npz", in_channels=4, num_outputs=2, batch_size=2, labelled=["a"], unlabelled=[],
                     val_cases=[])
    with pytest.raises(ConfigError, match="the end-of-run validation needs preprocessing plans, but its data"):
        src.require_plans("the end-of-run validation")


def test_method_options_are_checked_when_the_recipe_is_loaded():
    with pytest.raises(ConfigError, match=r"method.ema_decay must be in \[0, 1\), got 1.0"):
        load_checked_recipe("slice_aggregator", ["method.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="method.lr_decay must be in"):
        load_checked_recipe("slice_aggregator", ["method.lr_decay=0"])
    with pytest.raises(ConfigError, match="method.steps_per_epoch must be >= 1, got 0"):
        load_checked_recipe("dcmt_demo", ["method.steps_per_epoch=0"])
    assert load_checked_recipe("slice_aggregator").trainer.name == "slice_aggregator"
    assert load_checked_recipe("dcmt_demo").trainer.name == "dcmt"


class Draws(StepDataset):
    """Three numbers from the item's generator, and where they were drawn."""

    def sample(self, step: int, slot: int, rng: np.random.Generator) -> dict:
        return {"x": torch.from_numpy(rng.random(3)), "step": torch.tensor(step), "slot": torch.tensor(slot)}


def test_a_step_dataset_item_is_a_pure_function_of_seed_step_and_slot():
    ds = Draws(global_batch=4, seed=7)
    a = ds[5 * 4 + 2]
    assert (int(a["step"]), int(a["slot"])) == (5, 2)
    assert torch.equal(a["x"], ds.item(5, 2)["x"]) and torch.equal(a["x"], Draws(4, seed=7)[22]["x"])
    others = [Draws(4, seed=8).item(5, 2), ds.item(6, 2), ds.item(5, 3), ds.item(2, 5)]
    assert all(not torch.equal(a["x"], o["x"]) for o in others)


def test_two_ranks_draw_what_one_process_draws():
    ds = Draws(global_batch=4, seed=3)
    one = [b["x"] for b in make_loader(ds, 2, 5, 4, 0, 1, 0)]
    ranks = [[b["x"] for b in make_loader(ds, 2, 5, 2, r, 2, 0)] for r in (0, 1)]
    for step in range(3):
        assert torch.equal(one[step], torch.cat([ranks[0][step], ranks[1][step]]))
