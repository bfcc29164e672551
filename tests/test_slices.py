"""2D samples from the 3D cache: slice choice, foreground oversampling per slice, 2.5D context,
streams, determinism, 2D augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvol.cache import case_paths, save_locations
from medvol.config import AugmentConfig
from medvol.data import Streams, build_augmentation
from medvol.data.slices import SliceDataset, extract_slices, raw_slice_counts, raw_slice_of, slice_config
from medvol.errors import CacheError
from medvol.io.slice_labels import read_slice_labels
from medvol.networks.slice_adapter import SliceAdapter
from medvol.utils import save_npy, write_json

SHAPE = (20, 24, 30)  # X, Y, Z


def _write_case(out, case_id, fg_z: int | None):
    """Channel 0 holds the voxel's Z index, channel 1 its X index; with ``fg_z`` a 3 x 3 square
    of class 1 at X 8-10, Y 5-7 in that one Z slice. Geometry: the raw scan had 40 Z slices,
    cropped to 5..19 (15 slices) and resampled to 30 (twice as fine)."""
    x, _, z = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    image = np.stack([z, x]).astype(np.float32)
    img_p, seg_p, props_p = case_paths(out, case_id)
    save_npy(img_p, image)
    props = {"case_id": case_id, "shape_after_resampling": list(SHAPE), "has_label": fg_z is not None,
             "original_shape": [20, 24, 40], "crop_bbox": [[0, 20], [0, 24], [5, 20]], "shape_after_crop": [20, 24, 15]}
    if fg_z is not None:
        label = np.zeros((1,) + SHAPE, np.int8)
        label[0, 8:11, 5:8, fg_z] = 1
        save_npy(seg_p, label)
        save_locations(out, case_id, {"1": np.argwhere(label[0] == 1)})
    write_json(props_p, props)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("slicecache")
    _write_case(out, "a", fg_z=4)
    _write_case(out, "b", fg_z=25)
    _write_case(out, "u", fg_z=None)
    return out


def test_forced_slots_cut_the_foreground_slice_and_centre_on_it(cache):
    streams = Streams(["a", "b"], [], global_batch=3)
    ds = SliceDataset(cache, streams, (8, 8), slice_axis=2, oversample=0.34, seed=0)
    assert ds.first_fg_slot == 2  # round(3 * 0.66): the last slot is forced
    random_z = []
    for step in range(40):
        forced = ds.item(step, 2)
        z = int(forced["slice_index"])
        assert z in (4, 25)
        assert forced["image"].shape == (2, 8, 8)  # (C, X, Y)
        np.testing.assert_array_equal(forced["image"][0].numpy(), z)  # channel 0 = the Z index
        assert forced["label"][0, 4, 4] == 1  # centred on a voxel of the square (no clipping here)
        random_z += [int(ds.item(step, s)["slice_index"]) for s in (0, 1)]
    assert len(set(random_z)) > 20  # random slots spread over the 30 slices
    assert np.mean([z in (4, 25) for z in random_z]) < 0.2


def test_other_slice_axes_put_the_remaining_axes_in_xyz_order(cache):
    ds = SliceDataset(cache, Streams(["a"], [], global_batch=1), (6, 10), slice_axis=0, oversample=1.0)
    s = ds.item(0, 0)
    assert s["image"].shape == (2, 6, 10)  # (C, Y, Z)
    x = int(s["slice_index"])
    assert 8 <= x <= 10  # the foreground square's X range
    np.testing.assert_array_equal(s["image"][1].numpy(), x)  # channel 1 = the X index
    z = s["image"][0, 0].numpy()
    np.testing.assert_array_equal(np.diff(z), 1)  # Z runs along the patch's second axis
    assert s["label"].sum() > 0


def test_context_stacks_neighbours_like_the_slice_adapter():
    vol = np.random.default_rng(0).normal(size=(2, 5, 4, 6)).astype(np.float32)
    adapter = SliceAdapter(torch.nn.Identity(), axis=-1, context=2)
    xs = torch.from_numpy(vol)[None].movedim(-1, 2)  # (B, C, S, H, W)
    for z in (0, 1, 3, 5):
        ours = extract_slices(vol, 2, z, (0, 0), (5, 4), context=2, pad_value=0.0)
        theirs = adapter.gather_slices(xs, torch.tensor([z]))[0].numpy()
        assert ours.shape == (10, 5, 4)
        np.testing.assert_array_equal(ours, theirs)
    # slice 0 with context 2: slices 0, 0, 0, 1, 2 (the end repeats), channel 0 first
    ctx = extract_slices(vol, 2, 0, (0, 0), (5, 4), 2, 0.0)
    np.testing.assert_array_equal(ctx[[0, 2, 4, 6, 8]], vol[0][..., [0, 0, 0, 1, 2]].transpose(2, 0, 1))


def test_context_samples_and_padding(cache):
    ds = SliceDataset(cache, Streams(["a"], [], global_batch=1), (24, 8), slice_axis=2, context=1,
                      oversample=1.0, seed=1)
    s = ds.item(0, 0)
    assert s["image"].shape == (6, 24, 8)  # 3 slices x 2 channels; X padded from 20 to 24
    np.testing.assert_array_equal(s["image"][[0, 2, 4], 2:22, 0].numpy().mean(1), [3, 4, 5])  # Z of slices 3, 4, 5
    np.testing.assert_array_equal(s["image"][0, :2].numpy(), 0)  # padded image: 0
    assert (s["label"][0, :2] == 0).all()  # padded label -1 counts as background, as in 3D


def test_unlabelled_stream_and_determinism(cache):
    streams = Streams(["a", "b"], ["u"], global_batch=4, unlabelled_per_batch=1)
    aug = build_augmentation(AugmentConfig(), ndim=2)
    ds = SliceDataset(cache, streams, (8, 8), slice_axis=2, augment=aug, seed=5)
    again = SliceDataset(cache, streams, (8, 8), slice_axis=2, augment=build_augmentation(AugmentConfig(), ndim=2),
                         seed=5)
    for slot in range(4):
        a, b = ds.item(7, slot), again.item(7, slot)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    u = ds.item(7, 3)
    assert not bool(u["labelled"]) and (u["label"] == -1).all()
    assert bool(ds.item(7, 0)["labelled"])
    assert not torch.equal(ds.item(7, 0)["image"], ds.item(8, 0)["image"])
    assert ds[7 * 4 + 2]["slice_index"] == ds.item(7, 2)["slice_index"]


def test_2d_augmentation_keeps_image_and_label_aligned():
    cfg = AugmentConfig(rotate_prob=1.0, scale_prob=1.0, flip_prob=0.5, noise_prob=0, blur_prob=0,
                        brightness_prob=0, contrast_prob=0, lowres_prob=0, gamma_prob=0)
    aug = build_augmentation(cfg, ndim=2)
    assert sum(type(t).__name__ == "RandFlipd" for t in aug.transforms) == 2  # axes 0, 1; no Z in a slice
    lab = np.zeros((1, 32, 24), np.int64)
    lab[0, 8:20, 6:18] = 1
    from medvol.data import seed_transforms

    seed_transforms(aug, 3)
    out = aug({"image": torch.from_numpy(lab * 100.0).float(), "label": torch.from_numpy(lab)})
    img, l2 = np.asarray(out["image"]), np.asarray(out["label"])
    assert img.shape == (1, 32, 24) and (l2 != lab).mean() > 0.02
    assert (np.round(img / 100.0) == l2).mean() > 0.97  # the label-derived image moved with the label
    lowres = build_augmentation(AugmentConfig(rotate_prob=0, scale_prob=0, flip_prob=0, noise_prob=0, blur_prob=0,
                                              brightness_prob=0, contrast_prob=0, lowres_prob=1.0, gamma_prob=0,
                                              lowres_zoom=(0.5, 0.5)), ndim=2)
    square = torch.from_numpy(lab * 100.0).float()
    blurred = np.asarray(lowres({"image": square, "label": torch.from_numpy(lab)})["image"])
    assert blurred.shape == (1, 32, 24) and 0 < np.abs(blurred - square.numpy()).max() < 100  # bilinear, in 2D


def test_elastic_is_refused_for_slices():
    from medvol.errors import ConfigError

    with pytest.raises(ConfigError, match="elastic_prob"):
        build_augmentation(AugmentConfig(elastic_prob=0.2), ndim=2)


def test_plans_without_a_2d_configuration():
    with pytest.raises(CacheError, match="rerun `medvol plan`"):
        slice_config({"patch_size": [8, 8, 8]})
    assert slice_config({"configurations": {"2d": {"slice_axis": 2}}})["slice_axis"] == 2


def test_loader_batches_and_ranks_take_their_slots(cache):
    from medvol.data import make_loader

    streams = Streams(["a", "b"], ["u"], global_batch=4, unlabelled_per_batch=1, per_process_batch=2)
    ds = SliceDataset(cache, streams, (8, 6), slice_axis=2, context=1, seed=9)
    ranks = [list(make_loader(ds, 3, 5, per_process_batch=2, rank=r, world_size=2, num_workers=0)) for r in (0, 1)]
    assert ranks[0][0]["image"].shape == (2, 6, 8, 6) and ranks[0][0]["label"].shape == (2, 1, 8, 6)
    for step in range(2):
        expect = [ds.item(3 + step, slot) for slot in range(4)]  # rank r takes slots 2r, 2r + 1
        got = torch.cat([ranks[0][step]["image"], ranks[1][step]["image"]])
        assert torch.equal(got, torch.stack([e["image"] for e in expect]))
        assert ranks[1][step]["labelled"].tolist() == [True, False]  # each rank's last slot is unlabelled


def test_cached_slices_take_the_class_of_the_nearest_raw_slice(cache, tmp_path):
    props = {"shape_after_crop": [20, 24, 15], "shape_after_resampling": list(SHAPE),
             "crop_bbox": [[0, 20], [0, 24], [5, 20]]}
    # cached j sits at cropped (j + 0.5) / 2 - 0.5 = j / 2 - 0.25: nearest j // 2, plus the crop's 5
    np.testing.assert_array_equal(raw_slice_of(props, 2), np.arange(30) // 2 + 5)
    np.testing.assert_array_equal(raw_slice_of(props, 0), np.arange(20))  # untouched axis
    with pytest.raises(CacheError, match="case 'r': cached with --orientation RAS"):
        raw_slice_of(dict(props, orientation="RAS", case_id="r"), 2)  # reordered axes: raw indices mean nothing
    assert raw_slice_counts(cache, 2) == {"a": 40, "b": 40, "u": 40}
    csv = tmp_path / "slice_labels.csv"
    csv.write_text("subject,slice_index,label\na,7,2\na,,1\nb,17,3\nu,2,1\n")  # fg: a at 4 -> 7, b at 25 -> 17
    labels = read_slice_labels(csv, raw_slice_counts(cache, 2))
    streams = Streams(["a", "b"], ["u"], global_batch=3, unlabelled_per_batch=1)
    ds = SliceDataset(cache, streams, (8, 8), slice_axis=2, oversample=1.0, seed=0, slice_labels=labels)
    seen = set()
    for step in range(12):
        s = ds.item(step, 0)
        z = int(s["slice_index"])
        expect = {4: (2, 1), 25: (3, -1)}[z]  # b has no subject class
        assert (int(s["class"]), int(s["subject_class"])) == expect
        seen.add(z)
        u = ds.item(step, 2)  # unlabelled stream: labels hidden even where the CSV has one
        assert int(u["class"]) == -1 and int(u["subject_class"]) == -1
    assert seen == {4, 25}
    # random slices of a: cached 4 and 5 both come from raw slice 7, the others have no class
    random = SliceDataset(cache, Streams(["a"], [], global_batch=1), (8, 8), slice_axis=2, oversample=0.0,
                          slice_labels=labels)
    classes = {int(s["slice_index"]): int(s["class"]) for s in (random.item(t, 0) for t in range(200))}
    assert len(classes) == 30 and all(c == (2 if z in (4, 5) else -1) for z, c in classes.items())


def test_from_a_real_preprocessed_cache(tmp_path):
    from medvol.preprocessing import load_plans, preprocess_dataset

    from conftest import write_v2_dataset

    cases = {}
    for i in range(2):
        img = np.random.default_rng(i).normal(10, 1, (32, 28, 8)).astype(np.float32)
        lab = np.zeros(img.shape, np.uint8)
        lab[10:14, 12:16, 3 + i] = 1
        cases[f"c{i}"] = ([img + 40 * lab], lab, np.diag([1.0, 1.0, 4.0, 1.0]))  # thick Z slices
    preprocess_dataset(write_v2_dataset(tmp_path / "Dataset011_Thick", cases), tmp_path / "pre", num_workers=1,
                       quiet=True)
    plans = load_plans(tmp_path / "pre")
    cfg = slice_config(plans)
    assert cfg["slice_axis"] == 2 and cfg["patch_size"] == [32, 28]  # the whole X, Y plane
    ds = SliceDataset.from_plans(tmp_path / "pre", plans, Streams(["c0", "c1"], [], global_batch=2), oversample=0.5)
    s = ds.item(0, 1)  # the forced slot
    assert s["image"].shape == (1, 32, 28) and int(s["slice_index"]) in (3, 4)
    assert int(s["label"].sum()) == 16  # the 4 x 4 square of that slice


def test_grade_oversampling_balances_the_labelled_slots(cache, tmp_path):
    csv = tmp_path / "slice_labels.csv"
    # raw slices 5..19 survive the crop; a: raw 7 is grade 2, raw 8 grade 1, the rest 0; b: all 0; u unlabelled
    rows = [f"a,{r},{2 if r == 7 else 1 if r == 8 else 0}" for r in range(5, 20)]
    rows += [f"b,{r},0" for r in range(5, 20)] + ["u,9,2"]
    csv.write_text("subject,slice_index,label\n" + "\n".join(rows) + "\n")
    labels = read_slice_labels(csv, raw_slice_counts(cache, 2))
    streams = Streams(["a", "b"], ["u"], global_batch=5, unlabelled_per_batch=1)  # 4 labelled slots
    ds = SliceDataset(cache, streams, (8, 8), slice_axis=2, oversample=0.0, seed=0, slice_labels=labels,
                      oversample_grades=0.5)
    assert ds.grade_slots == 2  # round(4 * 0.5): labelled slots 0 and 1
    drawn: dict[str, list[int]] = {"graded": [], "plain": []}
    for step in range(300):
        for slot in range(4):
            s = ds.item(step, slot)
            z, c = int(s["slice_index"]), int(s["class"])
            # cached z comes from raw z // 2 + 5 (the fixture's geometry): a's 4, 5 are grade 2, 6, 7 grade 1
            assert c in ({4: 2, 5: 2, 6: 1, 7: 1}.get(z, 0), 0)  # 0: any slice of b
            drawn["graded" if slot < 2 else "plain"].append(c)
        assert int(ds.item(step, 4)["class"]) == -1  # the unlabelled slot keeps its label hidden
    graded = np.bincount(drawn["graded"], minlength=3) / len(drawn["graded"])
    plain = np.bincount(drawn["plain"], minlength=3) / len(drawn["plain"])
    np.testing.assert_allclose(graded, [1 / 3] * 3, atol=0.06)  # 600 draws: 3 sigma ~ 0.058
    assert plain[0] > 0.85 and plain[1:].sum() < 0.15  # random slices: 4 of 60 cached slices are graded > 0
    again = SliceDataset(cache, streams, (8, 8), slice_axis=2, oversample=0.0, seed=0, slice_labels=labels,
                         oversample_grades=0.5)
    assert torch.equal(again.item(7, 0)["image"], ds.item(7, 0)["image"])  # (seed, step, slot) still pure
    with pytest.raises(ValueError, match="oversample_grades needs slice_labels"):
        SliceDataset(cache, streams, (8, 8), slice_axis=2, oversample_grades=0.5)
