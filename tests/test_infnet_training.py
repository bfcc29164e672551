"""Inf-Net and Semi-Inf-Net training: multi-scale sizes, edge targets, the pseudo-label pools and
their files, and the COVID-SemiSeg adapter on tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch

from medvol.errors import ConfigError, InputError
from medvol.losses.structure import mask_edges
from medvol.training.infnet import rescale_batch, scaled_size
from medvol.training.semi_infnet import (
    SemiInfNetOptions,
    SemiState,
    link_cache,
    load_state,
    n_rounds,
    save_state,
    stage_cases,
    stage_names,
    write_pseudo_label,
)

# ---------------------------------------------------------------- multi-scale, edges


def test_multiscale_sizes_are_rounded_to_multiples_of_32_as_published():
    # int(round(352 * rate / 32) * 32): 264 -> 256, 440 -> 448
    assert [scaled_size((352, 352), r) for r in (0.75, 1.0, 1.25)] == [(256, 256), (352, 352), (448, 448)]
    assert scaled_size((48, 80), 0.75) == (32, 64) and scaled_size((48, 80), 1.25) == (64, 96)
    assert scaled_size((40, 40), 1.0) == (40, 40)  # rate 1 keeps the size, as published
    assert scaled_size((20, 20), 0.75) == (32, 32)  # never below one multiple


def test_rescaled_batch_has_the_size_and_a_binary_label():
    image = torch.rand(2, 1, 48, 48)
    target = torch.zeros(2, 1, 48, 48)
    target[:, :, 10:30, 12:40] = 1
    x, y = rescale_batch(image, target, (64, 64))
    assert x.shape == (2, 1, 64, 64) and y.shape == (2, 1, 64, 64)
    assert set(torch.unique(y).tolist()) == {0.0, 1.0}
    assert abs(float(y.mean()) - float(target.mean())) < 0.02  # same area fraction
    x2, y2 = rescale_batch(image, target, (48, 48))
    assert x2 is image and y2 is target


def test_mask_edges_is_the_band_where_the_3x3_neighbourhood_holds_both_classes():
    m = torch.zeros(1, 1, 12, 12)
    m[..., 3:8, 4:10] = 1
    e = mask_edges(m)[0, 0].numpy()
    mm = m[0, 0].numpy()
    want = np.zeros_like(mm)
    for i in range(12):
        for j in range(12):
            nb = mm[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            want[i, j] = float(nb.min() != nb.max())
    np.testing.assert_array_equal(e, want)
    assert e[5, 6] == 0 and e[3, 6] == 1 and e[2, 6] == 1 and e[1, 6] == 0  # two pixels across the boundary
    assert float(mask_edges(torch.zeros(1, 1, 5, 5)).sum()) == 0


# ---------------------------------------------------------------- Semi-Inf-Net pools


def _state(n_unlabelled=12):
    return SemiState(labelled=["l0", "l1"], unlabelled=[f"u{i:02d}" for i in range(n_unlabelled)], validation=["v"])


def test_a_pseudo_label_round_adds_exactly_k_and_removes_them_from_the_unlabelled_pool():
    s = _state()
    taken = s.take(5)
    assert taken == ["u00", "u01", "u02", "u03", "u04"]
    assert s.pseudo == taken and len(s.unlabelled) == 7 and not set(taken) & set(s.unlabelled)
    assert s.take(5) == ["u05", "u06", "u07", "u08", "u09"] and len(s.pseudo) == 10
    assert s.take(5) == ["u10", "u11"] and s.unlabelled == []  # the last round takes what is left
    assert s.labelled == ["l0", "l1"]  # the labelled pool never changes


def test_stages_and_their_training_cases():
    o = SemiInfNetOptions()
    assert n_rounds(12, o) == 3 and n_rounds(1600, o) == 320  # the paper: 1600 / 5
    assert n_rounds(12, SemiInfNetOptions(max_rounds=2)) == 2
    assert stage_names(2) == ["initial", "round_001", "round_002", "pretrain", "finetune"]
    s = _state()
    s.take(5)
    assert stage_cases("initial", s, o) == ["l0", "l1"] == stage_cases("finetune", s, o)
    assert stage_cases("round", s, o) == ["l0", "l1", "u00", "u01", "u02", "u03", "u04"]
    assert stage_cases("pretrain", s, o) == stage_cases("round", s, o)  # published: the hybrid pool
    assert stage_cases("pretrain", s, SemiInfNetOptions(pretrain_with_labelled=False)) == s.pseudo


def test_state_file_round_trip_and_format_check(tmp_path):
    s = _state()
    s.take(5)
    s.rounds_labelled, s.done = 1, ["initial"]
    save_state(tmp_path, s)
    assert load_state(tmp_path) == s
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file
    (tmp_path / "semi_state.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="not a Semi-Inf-Net state"):
        load_state(tmp_path)


def _fake_cache(root, cases):
    """A minimal cache: top-level json files and, per case, image, properties (and a label)."""
    (root / "cases").mkdir(parents=True)
    (root / "plans.json").write_text("{}")
    (root / "dataset.json").write_text("{}")
    for case, labelled in cases.items():
        np.save(root / "cases" / f"{case}.npy", np.zeros((1, 6, 5, 1), np.float32))
        if labelled:
            np.save(root / "cases" / f"{case}_seg.npy", np.ones((1, 6, 5, 1), np.int8))
        (root / "cases" / f"{case}.json").write_text(json.dumps({"case_id": case, "has_label": labelled}))
    return root


def test_pool_cache_links_the_cache_and_holds_pseudo_labels_without_touching_it(tmp_path):
    src = _fake_cache(tmp_path / "pre", {"a": True, "u": False})
    before = {p.name: p.read_bytes() for p in (src / "cases").iterdir()}
    dst = tmp_path / "run" / "pool_cache"
    link_cache(src, dst)
    link_cache(src, dst)  # a second call changes nothing
    assert sorted(p.name for p in (dst / "cases").iterdir()) == sorted(before)
    assert (dst / "cases" / "u.json").is_symlink() and (dst / "plans.json").is_file()
    fg = np.zeros((6, 5, 1))
    fg[1:4, 2:4] = 0.9
    write_pseudo_label(src, dst, "u", fg, 0.5)
    assert not (dst / "cases" / "u.json").is_symlink()
    props = json.loads((dst / "cases" / "u.json").read_text())
    assert props["has_label"] and props["pseudo_label"] and props["case_id"] == "u"
    seg = np.load(dst / "cases" / "u_seg.npy")
    assert seg.shape == (1, 6, 5, 1) and seg.dtype == np.int8 and int(seg.sum()) == 6
    with np.load(dst / "cases" / "u_locations.npz") as z:
        assert len(z["1"]) == 6  # every foreground voxel, for oversampling
    assert {p.name: p.read_bytes() for p in (src / "cases").iterdir()} == before  # the user's cache untouched


# ---------------------------------------------------------------- COVID-SemiSeg adapter


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r


@pytest.fixture
def covid_layout(tmp_path):
    """Tiny COVID-SemiSeg folders: 2 labelled (RGB jpg/png + 0/255 GT), 3 unlabelled in
    sub-folders, 1 test slice."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for split, names in (("train", ["1", "2"]), ("test", ["18"])):
        (src / split / "Imgs").mkdir(parents=True)
        (src / split / "GT").mkdir()
        for i, n in enumerate(names):
            m = _disc(20, 24, 8 + i, 10, 4)
            grey = (40 + 150 * m + rng.integers(0, 20, m.shape)).astype(np.uint8)
            iio.imwrite(src / split / "Imgs" / f"{n}.png", np.stack([grey] * 3, -1))  # lossless RGB
            iio.imwrite(src / split / "GT" / f"{n}.png", (255 * m).astype(np.uint8))
    for sub, n in (("a", "u1"), ("a", "u2"), ("b", "u3")):
        (src / "unl" / sub).mkdir(parents=True, exist_ok=True)
        iio.imwrite(src / "unl" / sub / f"{n}.jpg", rng.integers(0, 255, (20, 24, 3)).astype(np.uint8))
    return src


def test_covid_semiseg_adapter_writes_one_nifti_slice_per_image(covid_layout, tmp_path):
    from medvol.datasets.covid_semiseg import convert_covid_semiseg

    src = covid_layout
    out = convert_covid_semiseg(src / "train", tmp_path / "raw", src / "unl", src / "test")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labelled_cases"] == ["lab_1", "lab_2"] and meta["numTraining"] == 5
    assert meta["labels"] == {"background": 0, "infection": 1} and meta["channel_names"] == {"0": "zscore"}
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "lab_1_0000.nii.gz", "lab_2_0000.nii.gz", "unl_u1_0000.nii.gz", "unl_u2_0000.nii.gz", "unl_u3_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["lab_1.nii.gz", "lab_2.nii.gz"]
    assert [p.name for p in (out / "labelsTs").iterdir()] == ["test_18.nii.gz"]
    img = nib.load(out / "imagesTr" / "lab_1_0000.nii.gz")
    lab = nib.load(out / "labelsTr" / "lab_1.nii.gz")
    assert img.shape == (20, 24, 1) and lab.shape == (20, 24, 1)
    np.testing.assert_array_equal(img.affine, np.diag([1.0, 1.0, 999.0, 1.0]))
    rgb = iio.imread(src / "train" / "Imgs" / "1.png")
    np.testing.assert_allclose(img.get_fdata()[..., 0], rgb.mean(-1), atol=1e-4)  # grey = channel mean
    np.testing.assert_array_equal(lab.get_fdata()[..., 0], _disc(20, 24, 8, 10, 4))  # 0/255 -> 0/1
    assert meta["source_ids"]["unl_u3"].endswith("b/u3.jpg")


def test_covid_semiseg_adapter_names_the_bad_file(covid_layout, tmp_path):
    from medvol.datasets.covid_semiseg import convert_covid_semiseg

    src = covid_layout
    (src / "train" / "GT" / "2.png").unlink()
    with pytest.raises(InputError, match=r"2\.png.*no mask named '2"):
        convert_covid_semiseg(src / "train", tmp_path / "raw")
    iio.imwrite(src / "train" / "GT" / "2.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match=r"GT/2\.png.*differs from its image"):
        convert_covid_semiseg(src / "train", tmp_path / "raw2")
    (src / "unl" / "b" / "u1.jpg").write_bytes((src / "unl" / "a" / "u1.jpg").read_bytes())
    iio.imwrite(src / "train" / "GT" / "2.png", (255 * _disc(20, 24, 9, 10, 4)).astype(np.uint8))
    with pytest.raises(InputError, match="two images named 'u1'"):
        convert_covid_semiseg(src / "train", tmp_path / "raw3", src / "unl")


def test_stage_recipes_turn_epochs_into_steps_and_decay_once():
    from medvol.config import Recipe
    from medvol.training.schedules import make_scheduler
    from medvol.training.semi_infnet import Stage, stage_recipe

    recipe = Recipe()
    recipe.data.batch_size, recipe.optimizer.name, recipe.optimizer.lr = 4, "adam", 1e-4
    recipe.init_from = "backbone.pt"
    o = SemiInfNetOptions(initial=Stage(epochs=10, decay_epoch=5))
    s = _state()
    r = stage_recipe(recipe, o, "initial", s, None)
    # 2 labelled slices, batch 4: one batch per epoch, at 3 scales -> 3 steps an epoch
    assert r.trainer.name == "infnet" and r.trainer.steps == 30 and r.schedule.milestones == [15]
    assert r.data.labelled == ["l0", "l1"] and r.data.val_cases == ["v"] and r.init_from == "backbone.pt"
    assert set(r.method) == {"scales", "size_multiple", "clip", "official_compat"}
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = make_scheduler(r.schedule, opt, r.trainer.steps, 1e-4)
    lrs = []
    for _ in range(r.trainer.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:15] == [1e-4] * 15 and lrs[15:] == pytest.approx([1e-5] * 15)  # one decay, never compounded
    s.take(5)
    previous = Path("runs/initial")
    rr = stage_recipe(recipe, o, "round_001", s, previous)
    # the published round: 9 epochs at 3e-4, batch 16, no decay; 7 slices -> 1 batch x 3 scales
    assert rr.trainer.steps == 27 and rr.schedule.name == "constant" and rr.optimizer.lr == 3e-4
    assert rr.data.batch_size == 16 and len(rr.data.labelled) == 7 and rr.trainer.val_every == 27
    assert rr.init_from == str(previous / "checkpoints" / "latest.pt")  # fine-tunes the previous stage
