"""Patch sampling, foreground oversampling, augmentation alignment, batch composition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvol.config import AugmentConfig
from medvol.data import PatchDataset, StepSampler, Streams, build_augmentation, extract_patch, split_cases
from medvol.preprocessing import preprocess_dataset

from conftest import write_v2_dataset


@pytest.fixture(scope="module")
def small_fg_cache(tmp_path_factory):
    """Cases with a small sphere in a large head: a random patch rarely hits it."""
    tmp = tmp_path_factory.mktemp("fg")
    cases = {}
    for i in range(3):
        shape = (64, 64, 48)
        img = np.zeros(shape, np.float32)
        img[2:-2, 2:-2, 2:-2] = 10 + np.random.default_rng(i).normal(0, 1, (60, 60, 44))
        lab = np.zeros(shape, np.uint8)
        lab[10 + i:14 + i, 40:44, 30:34] = 1
        img[lab > 0] += 50
        cases[f"c{i}"] = ([img], lab, np.eye(4))
    root = write_v2_dataset(tmp / "Dataset010_Small", cases)
    out = tmp / "pre"
    preprocess_dataset(root, out, num_workers=1, quiet=True)
    return out


def test_foreground_oversampling_ratio(small_fg_cache):
    streams = Streams(["c0", "c1", "c2"], [], global_batch=6)
    ds = PatchDataset(small_fg_cache, streams, (16, 16, 16), oversample=0.33, augment=None, seed=0)
    centre_fg, random_fg = [], []
    for step in range(60):
        for slot in range(6):
            s = ds.item(step, slot)
            hit = bool(s["label"][0, 8, 8, 8] > 0)
            (centre_fg if slot >= ds.first_fg_slot else random_fg).append(hit)
    assert ds.first_fg_slot == 4  # round(6 * 0.67): the last 2 of 6 slots are forced
    assert all(centre_fg)  # forced patches are centred on foreground
    ratio = (sum(centre_fg) + sum(random_fg)) / (len(centre_fg) + len(random_fg))
    assert ratio == pytest.approx(1 / 3, abs=0.05)  # random patches almost never centre on the sphere


def test_small_cases_are_padded():
    arr = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    p = extract_patch(arr, (-1, 0, 1), (4, 3, 2), pad_value=-5)
    assert p.shape == (1, 4, 3, 2)
    np.testing.assert_array_equal(p[0, 0], -5)
    np.testing.assert_array_equal(p[0, 1:3], arr[0, :, :, 1:3])
    np.testing.assert_array_equal(p[0, 3], -5)


def test_augmentation_keeps_image_and_label_aligned():
    cfg = AugmentConfig(rotate_prob=1.0, scale_prob=1.0, flip_prob=0.5, noise_prob=0, blur_prob=0,
                        brightness_prob=0, contrast_prob=0, lowres_prob=0, gamma_prob=0)
    aug = build_augmentation(cfg)
    lab = np.zeros((1, 32, 32, 24), np.int64)
    lab[0, 8:20, 10:26, 6:18] = 1
    lab[0, 12:16, 14:20, 9:14] = 2
    from medvol.data import seed_transforms

    for seed in range(5):
        seed_transforms(aug, seed)
        out = aug({"image": torch.from_numpy(lab * 100.0).float(), "label": torch.from_numpy(lab)})
        img, l2 = np.asarray(out["image"]), np.asarray(out["label"])
        moved = (l2 != lab).mean()
        assert moved > 0.02, "the transform did nothing"
        agree = (np.round(img / 100.0) == l2).mean()  # the label-derived image moved with the label
        assert agree > 0.97


def test_same_seed_same_sample_different_step_different_sample(small_fg_cache):
    streams = Streams(["c0", "c1"], ["c2"], global_batch=4, unlabelled_per_batch=1)
    ds = PatchDataset(small_fg_cache, streams, (16, 16, 16), augment=build_augmentation(AugmentConfig()), seed=3)
    a, b = ds.item(5, 1), ds.item(5, 1)
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(ds.item(6, 1)["image"], a["image"])
    u = ds.item(5, 3)  # last slot: unlabelled stream
    assert not bool(u["labelled"]) and bool(torch.all(u["label"] == -1))
    assert bool(ds.item(5, 0)["labelled"])


def test_step_sampler_shards_the_global_batch():
    one = list(StepSampler(2, 4, 8, 0, 1))
    two = [list(StepSampler(2, 4, 8, r, 2)) for r in range(2)]
    assert one == list(range(16, 32))
    assert sorted(two[0] + two[1]) == one and two[0][:4] == [16, 17, 18, 19]


def test_validation_split_is_seeded_and_explicit_cases_win():
    cases = [f"c{i}" for i in range(10)]
    tr, va = split_cases(cases, 0.2, None, seed=0)
    assert len(va) == 2 and set(tr) | set(va) == set(cases) and split_cases(cases, 0.2, None, 0) == (tr, va)
    tr, va = split_cases(cases, 0.2, ["c3"], seed=0)
    assert va == ["c3"] and len(tr) == 9


def test_worker_processes_give_the_same_batches(small_fg_cache):
    from medvol.data import make_loader

    streams = Streams(["c0", "c1", "c2"], [], global_batch=2)
    ds = PatchDataset(small_fg_cache, streams, (16, 16, 16), augment=build_augmentation(AugmentConfig()), seed=1)
    a = [b["image"] for b in make_loader(ds, 3, 6, 2, 0, 1, num_workers=0)]
    b = [b["image"] for b in make_loader(ds, 3, 6, 2, 0, 1, num_workers=2)]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_partial_label_fields_travel_with_the_sample(small_fg_cache, tmp_path):
    import json
    import shutil

    cache = tmp_path / "c"
    shutil.copytree(small_fg_cache, cache)
    props = cache / "cases" / "c1.json"
    p = json.loads(props.read_text())
    p.update(task_id=4, annotated=[0, 1])  # e.g. a tumour-only dataset of a partially labelled union
    props.write_text(json.dumps(p))
    ds = PatchDataset(cache, Streams(["c1"], [], 2), (16, 16, 16), seed=0)
    s = ds.item(0, 0)
    assert int(s["task_id"]) == 4 and s["annotated"].tolist() == [0, 1]


def test_samples_are_plain_tensors(small_fg_cache):
    ds = PatchDataset(small_fg_cache, Streams(["c0"], [], 2), (16, 16, 16), augment=build_augmentation(AugmentConfig()))
    s = ds.item(0, 0)
    assert type(s["image"]) is torch.Tensor and type(s["label"]) is torch.Tensor


def test_two_streams_are_mixed_inside_every_process_batch():
    s = Streams(["a"], ["u"], global_batch=8, unlabelled_per_batch=1, per_process_batch=4)  # 2 processes
    assert [s.labelled_index(k) for k in range(8)] == [0, 1, 2, None, 3, 4, 5, None]
    assert s.labelled_slots() == 6
