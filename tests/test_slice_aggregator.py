"""Slice aggregator trainer on per-slice features: features file, split, mean teacher, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvol.checkpoint import load_checkpoint
from medvol.config import load_recipe
from medvol.errors import ConfigError, InputError
from medvol.evaluation.classification import (
    balanced_accuracy,
    binary_auc,
    classification_metrics,
    majority_accuracy,
    ordinal_auc,
)
from medvol.io.slice_features import SliceFeatures, SubjectSlices, read_features, write_features
from medvol.networks.aggregator import PositionalSum
from medvol.training import get_trainer, train
from medvol.training.distributed import DistInfo

from conftest import AGGREGATOR_STEP_RECIPE, pinned

F_DIM = 12
TINY = "model.options={hidden: [16, 8], gru_hidden: 8, dropout: 0.1}"


def synthetic_features(n: int, seed: int, kinds=("large", "small", "none")) -> SliceFeatures:
    """Subjects as the demo builds them, in feature space: a 'lesion' spans a few slices whose
    features carry its cross-section along a fixed direction, plus noise; a subject is positive
    when its largest cross-section is >= 1 (large lesions: 1.5-3; small ones: 0.3-0.8)."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(123).normal(size=F_DIM)
    items = []
    for i in range(n):
        s = int(rng.integers(12, 30))
        size = np.zeros(s)
        kind = kinds[i % len(kinds)]
        if kind != "none":
            half = int(rng.integers(2, 5))
            centre = int(rng.integers(half, s - half))
            peak = rng.uniform(1.5, 3.0) if kind == "large" else rng.uniform(0.3, 0.8)
            size[centre - half:centre + half] = peak * np.exp(-0.5 * ((np.arange(2 * half) - half) / (half / 2)) ** 2)
        feats = np.maximum(size[:, None] * direction + rng.normal(0, 0.5, (s, F_DIM)), 0).astype(np.float32)
        items.append(SubjectSlices(f"s{i:03d}", feats, np.stack([-size, size], 1).astype(np.float32),
                                   np.arange(s), np.arange(s) * 2, int(size.max() >= 1.0)))
    return SliceFeatures(items, {"classifier": None})


def recipe(seed: int = 0, steps: int = 100, extra=()):
    return load_recipe("slice_aggregator", [
        *AGGREGATOR_STEP_RECIPE, TINY, f"trainer.steps={steps}", f"trainer.val_every={steps}", f"trainer.seed={seed}",
        "trainer.log_every=50", "optimizer.lr=0.003", "optimizer.weight_decay=0", "schedule.name=constant",
        "data.num_workers=0", *extra])


# ---------------------------------------------------------------- features file


def test_features_file_round_trip(tmp_path):
    data = synthetic_features(5, 0)
    data.items[2].subject_class = -1
    back = read_features(write_features(tmp_path / "f.npz", data))
    assert back.subjects == data.subjects and back.meta["classifier"] is None and back.feature_dim == F_DIM
    for a, b in zip(data.items, back.items):
        assert a.subject_class == b.subject_class
        for k in ("features", "logits", "slice_index", "raw_slice"):
            assert np.array_equal(getattr(a, k), getattr(b, k))
    assert back.num_subject_classes == 2


def test_bad_features_files_are_named(tmp_path):
    with pytest.raises(InputError, match="no features file here"):
        read_features(tmp_path)
    (tmp_path / "features.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="features.npz: not a readable features file"):
        read_features(tmp_path)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(InputError, match="other.npz: not a medvol features file"):
        read_features(tmp_path / "other.npz")
    data = synthetic_features(2, 0)
    data.items[1].subject = data.items[0].subject
    with pytest.raises(InputError, match="duplicate subject"):
        write_features(tmp_path / "dup.npz", data)
    assert not (tmp_path / "dup.npz").exists()


# ---------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    target = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7], [0.7, 0.3]])
    m = classification_metrics(probs, target)
    assert m["val/accuracy"] == pytest.approx(3 / 5)
    assert m["val/balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # positive scores 0.7, 0.3 against negatives 0.1, 0.6, 0.2: pairs won 3 + 2 of 6
    assert m["val/auc"] == pytest.approx(5 / 6)
    assert binary_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5  # a tie counts half
    assert np.isnan(binary_auc(np.array([0.1, 0.2]), np.array([0, 0])))
    assert balanced_accuracy(np.array([2, 2, 1]), np.array([2, 2, 0])) == pytest.approx(0.5)
    assert majority_accuracy(target) == pytest.approx(0.6)


def test_ordinal_auc_by_hand():
    """The mean of the AUCs of P(grade >= 1) and P(grade >= 2); two classes: binary_auc."""
    target = np.array([0, 1, 2, 2])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    # P(>=1) 0.4, 0.8, 0.5, 0.9: the three graded above the 0.4 of grade 0 -> 1; P(>=2) 0.1, 0.1,
    # 0.4, 0.8: grades 2 above both others -> 1
    assert ordinal_auc(probs, target) == pytest.approx(1.0)
    target = np.array([0, 2, 1, 2])  # P(>=1): 1; P(>=2) of 0.1, 0.8 against 0.1, 0.4: (0.5 + 0 + 1 + 1) / 4
    assert ordinal_auc(probs, target) == pytest.approx((1.0 + 2.5 / 4) / 2)
    two = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
    assert ordinal_auc(two, np.array([0, 1, 0])) == binary_auc(two[:, 1], np.array([0, 1, 0]))
    assert ordinal_auc(probs, np.array([1, 1, 2, 2])) == pytest.approx(1.0)  # no grade 0: the >= 1 cut-off left out
    assert np.isnan(ordinal_auc(probs, np.array([0, 0, 0, 0])))


# ---------------------------------------------------------------- trainer


def _trainer(tmp_path, data: SliceFeatures, overrides=()):
    write_features(tmp_path / "features.npz", data)
    r = recipe(extra=overrides)
    return get_trainer(r.trainer.name)(r, tmp_path, tmp_path / "run", DistInfo())


def test_subject_split_and_batches(tmp_path):
    data = synthetic_features(12, 0)
    for i in (9, 10, 11):
        data.items[i].subject_class = -1  # no subject label
    t = _trainer(tmp_path, data, ["data.val_cases=[s000, s001]", "data.labelled=3", "method.mean_teacher=true",
                                  "data.batch_size=4", "data.unlabelled_per_batch=1"])
    assert t.source.find_plans() is None and t.in_channels == F_DIM and t.num_classes == 2
    assert t.source.val_cases == ["s000", "s001"] and t.source.labelled == ["s002", "s003", "s004"]
    assert t.source.unlabelled == ["s009", "s010", "s011", "s005", "s006", "s007", "s008"]
    ds = t.make_dataset()
    batch = [ds[i] for i in range(4)]  # step 0: three labelled slots, then one unlabelled
    assert [bool(b["labelled"]) for b in batch] == [True, True, True, False]
    assert int(batch[3]["subject_class"]) == -1
    longest = max(len(s.features) for s in data.items)
    for b in batch:
        n = int(b["mask"].sum())
        assert b["features"].shape == (longest, F_DIM) and not b["features"][n:].any()
        assert bool(b["mask"][:n].all())
    assert torch.equal(ds[5]["features"], t.make_dataset()[5]["features"])  # a pure function of (seed, step, slot)


def test_the_24_slice_mode_trains_on_padded_batches(tmp_path):
    """model.options.fixed_slices 24: subjects of 12-29 slices, cropped / padded by the model."""
    data = synthetic_features(8, 0)
    write_features(tmp_path / "features.npz", data)
    r = recipe(0, 2, ["model.options={hidden: [8, 8], gru_hidden: 4, fixed_slices: 24}", "data.batch_size=4",
                      "data.val_cases=[s000, s001, s002]"])
    with pinned(0, threads=1):
        metrics = train(r, tmp_path, tmp_path / "run", device="cpu", quiet=True)
    assert set(metrics) == {"val/accuracy", "val/balanced_accuracy", "val/auc"}
    assert {len(s.features) for s in data.items} - {24}  # lengths other than 24 were there


def test_bad_aggregator_settings(tmp_path):
    data = synthetic_features(6, 0)
    with pytest.raises(ConfigError, match="mean_teacher"):
        _trainer(tmp_path, data, ["data.unlabelled_per_batch=1", "data.batch_size=4"])
    with pytest.raises(ConfigError, match="method.ema_decay"):
        _trainer(tmp_path, data, ["method.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="not labelled subjects"):
        _trainer(tmp_path, data, ["data.val_cases=[nobody]"])
    for s in data.items:
        s.subject_class = -1
    with pytest.raises(ConfigError, match="no subject class"):
        _trainer(tmp_path, data)


def test_mean_teacher_gets_no_gradient_and_follows_the_ema(tmp_path):
    t = _trainer(tmp_path, synthetic_features(10, 0), ["method.mean_teacher=true", "data.batch_size=4",
                                                       "data.unlabelled_per_batch=2", "data.labelled=3"])
    student, teacher = t.models["model"], t.models["teacher"]
    assert t.inference_key == "teacher" and "teacher" not in t.optimizers
    assert not any(p.requires_grad for p in teacher.parameters())
    ds = t.make_dataset()
    for step in range(3):
        batch = torch.utils.data.default_collate([ds[step * 4 + i] for i in range(4)])
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        with pinned(step, threads=1):
            losses = t.optimization_step(batch, step)
        assert losses["consistency"] >= 0 and all(p.grad is None for p in teacher.parameters())
        decay = min(1 - 1 / (step + 1), 0.99)
        for k, p in teacher.named_parameters():
            want = decay * before[k] + (1 - decay) * dict(student.named_parameters())[k].detach()
            assert torch.allclose(p, want, atol=1e-6), k
        for k, b in teacher.named_buffers():  # BatchNorm statistics: the student's
            assert torch.equal(b, dict(student.named_buffers())[k])
    assert step == 2 and not torch.equal(before["classifier.weight"], student.state_dict()["classifier.weight"])


def _published(tmp_path, data: SliceFeatures, overrides=()):
    """The trainer of the shipped recipe (DC-MT's published settings), narrowed by ``overrides``."""
    write_features(tmp_path / "features.npz", data)
    r = load_recipe("slice_aggregator", ["model.options.hidden=[16, 8]", "model.options.gru_hidden=4", *overrides])
    return get_trainer(r.trainer.name)(r, tmp_path, tmp_path / "run", DistInfo())


def test_the_recipe_holds_the_published_settings(tmp_path):
    """40 subjects: 8 validation (20 %), a quarter of the 32 others labelled; 6 unlabelled per
    batch of 8 make an epoch of 24 // 6 = 4 steps; 150 epochs = 600 steps, validation every 5
    epochs, lr x0.5 every 50 epochs; consistency 0 before epoch 20, then
    exp(-5 (1 - (min(e, 100) - 20) / 100)^2); the teacher's decay min(1 - 1/(e + 1), 0.99)."""
    r = load_recipe("slice_aggregator")
    assert (r.model.options["pooling"], r.model.options["fixed_slices"]) == ("positional", 24)
    assert (r.data.batch_size, r.data.unlabelled_per_batch) == (64, 48)
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.weight_decay) == ("adam", 1e-3, 1e-4)
    assert r.trainer.grad_clip is None and r.method["mean_teacher"] and r.method["consistency"] == 1.0
    t = _published(tmp_path, synthetic_features(40, 0), ["data.batch_size=8", "data.unlabelled_per_batch=6"])
    src = t.source
    assert (len(src.val_cases), len(src.labelled), len(src.unlabelled)) == (8, 8, 24)
    assert src.labelled == [s.subject for s in src.features.items if s.subject not in src.val_cases][:8]
    assert t.steps_per_epoch == 4 and (t.recipe.trainer.steps, t.recipe.trainer.val_every) == (600, 20)
    assert isinstance(t.models["model"].pool_a, PositionalSum)
    lrs = []
    for _ in range(600):
        lrs.append(t.optimizers["model"].param_groups[0]["lr"])
        t.optimizers["model"].step()
        t.schedulers["model"].step()
    assert lrs[0] == lrs[199] == 1e-3 and lrs[200] == lrs[399] == 5e-4 and lrs[400] == lrs[599] == 2.5e-4
    epoch_start = {e: (e - 1) * 4 for e in (1, 19, 20, 60, 100, 150)}  # the first step of (1-based) epoch e
    assert t.consistency_weight(epoch_start[19] + 3) == 0.0
    assert t.consistency_weight(epoch_start[20]) == pytest.approx(np.exp(-5.0))
    assert t.consistency_weight(epoch_start[60]) == pytest.approx(np.exp(-5.0 * 0.6**2))
    assert t.consistency_weight(epoch_start[100]) == t.consistency_weight(epoch_start[150]) == pytest.approx(
        np.exp(-5.0 * 0.2**2))
    assert [t.clock(s) for s in (0, 3, 4, 7, 8)] == [1, 1, 2, 2, 3]


def test_published_teacher_follows_by_epoch_and_keeps_its_own_batch_statistics(tmp_path):
    """method.epochs: the decay is min(1 - 1/(e + 1), 0.99) for the 1-based epoch e (0.5 through
    epoch 1, 2/3 in epoch 2); method.ema_buffers false: the teacher's BatchNorm statistics are
    its own (it runs in train mode), not the student's."""
    t = _published(tmp_path, synthetic_features(20, 0), ["data.batch_size=4", "data.unlabelled_per_batch=3",
                                                         "method.steps_per_epoch=2"])
    student, teacher = t.models["model"], t.models["teacher"]
    ds = t.make_dataset()
    for step, decay in zip(range(3), (0.5, 0.5, 2 / 3)):
        batch = torch.utils.data.default_collate([ds[step * 4 + i] for i in range(4)])
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        with pinned(step, threads=1):
            losses = t.optimization_step(batch, step)
        assert losses["consistency"] >= 0 and all(p.grad is None for p in teacher.parameters())
        for k, p in teacher.named_parameters():
            want = decay * before[k] + (1 - decay) * dict(student.named_parameters())[k].detach()
            assert torch.allclose(p, want, atol=1e-6), k
        mean = "embed.2.running_mean"
        assert not torch.equal(teacher.state_dict()[mean], student.state_dict()[mean])
        assert not torch.equal(teacher.state_dict()[mean], before[mean])  # its own forward in train mode


def test_the_published_recipe_trains(tmp_path):
    """Two epochs of the shipped recipe (narrowed): the run's recipe.yaml records the steps used."""
    data = synthetic_features(24, 0)
    write_features(tmp_path / "features.npz", data)
    r = load_recipe("slice_aggregator", ["model.options.hidden=[8, 8]", "model.options.gru_hidden=4",
                                         "data.batch_size=8", "data.unlabelled_per_batch=6", "method.epochs=2",
                                         "method.val_every_epochs=1", "method.steps_per_epoch=2"])
    with pinned(0, threads=1):
        metrics = train(r, tmp_path, tmp_path / "run", device="cpu", quiet=True)
    assert set(metrics) == {"val/accuracy", "val/balanced_accuracy", "val/auc"}
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert (saved.trainer.steps, saved.trainer.val_every) == (4, 2)


def test_bad_published_settings(tmp_path):
    data = synthetic_features(12, 0)
    with pytest.raises(ConfigError, match="data.labelled and method.labelled_fraction"):
        _published(tmp_path, data, ["data.labelled=3", "data.batch_size=4", "data.unlabelled_per_batch=2"])
    with pytest.raises(ConfigError, match="set schedule.name: constant"):
        _published(tmp_path, data, ["schedule.name=step", "data.batch_size=4", "data.unlabelled_per_batch=2"])
    for key, value in (("labelled_fraction", 0), ("epochs", 0), ("steps_per_epoch", 0), ("lr_decay", 0),
                       ("consistency_start", -1)):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            _published(tmp_path, data, [f"method.{key}={value}"])


# Held-out subject accuracy after 200 steps on 45 synthetic subjects (data and trainer seed s,
# 15 validation subjects, 5 of them positive: majority baseline 0.667), one thread, s = 0..4:
#   supervised (30 labelled):         1.000, 0.933, 0.867, 1.000, 1.000
#   mean teacher (6 labelled, 24 not): 1.000, 0.933, 0.867, 0.933, 0.933
# A bar of 0.8 there was one subject below the lowest. Validated on 60 subjects instead (the
# same 30 training subjects, then 60 more drawn after them; 20 positive: majority 0.667; the
# untrained model predicts one class: 0.333 or 0.667), one thread, s = 0..4:
#   supervised:   0.983, 0.983, 0.917, 1.000, 1.000
#   mean teacher: 1.000, 0.967, 0.883, 0.967, 0.983
# Bar 0.8 (48 of 60): 5 subjects below the lowest measurement, 8 above the majority baseline.
# (One thread: with two, on two shared cores, the run takes 20x longer.)
@pytest.mark.parametrize("mean_teacher", [False, True])
def test_aggregator_beats_the_majority_baseline(tmp_path, mean_teacher):
    data = synthetic_features(90, 0)  # its first 45 are synthetic_features(45, 0)
    write_features(tmp_path / "features.npz", data)
    val = [s.subject for s in data.items[30:]]
    extra = [f"data.val_cases={val}"]
    if mean_teacher:
        extra += ["method.mean_teacher=true", "data.labelled=6", "data.unlabelled_per_batch=4"]
    with pinned(0, threads=1):
        metrics = train(recipe(0, 200, extra), tmp_path, tmp_path / "run", device="cpu", quiet=True)
    baseline = majority_accuracy(np.array([s.subject_class for s in data.items[30:]]))
    assert baseline == pytest.approx(2 / 3)
    assert metrics["val/accuracy"] >= 0.8 > baseline


def test_mean_teacher_resume_is_exact(tmp_path):
    """Stopped after 3 of 6 steps and resumed, the student and the teacher end as in one run."""
    data = synthetic_features(12, 0)
    write_features(tmp_path / "features.npz", data)
    extra = ["method.mean_teacher=true", "data.labelled=4", "data.unlabelled_per_batch=2", "data.batch_size=4",
             "data.val_cases=[s000, s001]"]
    with pinned(0, threads=1):
        train(recipe(0, 6, extra), tmp_path, tmp_path / "once", device="cpu", quiet=True)
        train(recipe(0, 6, extra), tmp_path, tmp_path / "twice", device="cpu", quiet=True, stop_at=3)
        train(recipe(0, 6, extra), tmp_path, tmp_path / "twice", device="cpu", quiet=True, resume=True)
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "latest.pt")["models"] for r in ("once", "twice"))
    for key in ("model", "teacher"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
