"""DC-MT's trainer (``docs/methods/dcmt.md``) on the slice path, and its features feeding the GRU
aggregator: input preparation, the teacher-argmax CAM channel of unlabelled slices, save
and resume, a short learning run, subject-level prediction end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvol.networks.aggregator import GRUSliceAggregator
from medvol.networks.slice.dcmt import DCMTNet, normalise_slices
from medvol.networks.slice_adapter import SliceAdapter

from conftest import AGGREGATOR_STEP_RECIPE, metric_series, pinned

TINY = dict(width=0.25, groups=2, layers=(1, 1, 1, 1), head_channels=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def test_normalise_slices_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 30, (3, 2, 20, 16)).astype(np.float32)
    x[1, 0] = 7.0  # a constant slice becomes 0
    out = normalise_slices(torch.from_numpy(x)).numpy()
    for n in range(3):
        for c in range(2):
            lo, hi = np.percentile(x[n, c], [0.1, 99.9])
            want = np.zeros_like(x[n, c]) if hi == lo else (np.clip(x[n, c], lo, hi) - lo) / (hi - lo)
            np.testing.assert_allclose(out[n, c], want, atol=1e-5)
    assert out.min() == 0 and out.max() == pytest.approx(1)
    # invariant to a positive affine change of a whole volume (what the cache's rescale_to_0_1 does)
    np.testing.assert_allclose(normalise_slices(torch.from_numpy(3 * x + 11)).numpy(), out, atol=1e-5)


def test_the_network_prepares_its_input_as_published():
    torch.manual_seed(0)
    net = DCMTNet(num_classes=3, in_channels=1, input_percentiles=(0.1, 99.9), trunk_channels=3, **TINY).eval()
    x = torch.rand(2, 1, 32, 32) * 50
    prepared = net.prepare(x)
    assert prepared.shape == (2, 3, 32, 32) and torch.equal(prepared[:, 0], prepared[:, 2])
    torch.testing.assert_close(prepared[:, :1], normalise_slices(x))
    with torch.no_grad():
        a, b = net(x), net(prepared, prepared=True)
    torch.testing.assert_close(a["logits"], b["logits"])
    with pytest.raises(ValueError, match="needs 1 channel"):
        DCMTNet(in_channels=2, trunk_channels=3, **TINY)


def test_dcmt_features_feed_the_gru_aggregator_end_to_end():
    """Volume -> SliceAdapter (classification) over DC-MT's prepared input -> per-slice 16-d
    features -> GRU aggregator -> one subject prediction; the adapter equals a per-slice loop."""
    torch.manual_seed(0)
    net = DCMTNet(num_classes=3, in_channels=1, input_percentiles=(0.1, 99.9), trunk_channels=3, **TINY).eval()
    volumes = torch.rand(2, 1, 32, 24, 5) * 300  # (B, C, X, Y, Z): 5 slices across Z
    adapter = SliceAdapter(net, axis=-1, slice_batch=3, mode="classification")
    with torch.no_grad():
        out = adapter(volumes)
        assert out.logits.shape == (2, 5, 3) and out.features.shape == (2, 5, 16)
        for b in range(2):
            for z in range(5):
                ref = net(volumes[b:b + 1, :, :, :, z])
                torch.testing.assert_close(out.logits[b, z], ref["logits"][0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(out.features[b, z], ref["features"][0], atol=1e-5, rtol=1e-4)
        agg = GRUSliceAggregator(num_classes=3, in_features=16, hidden=(8, 4), gru_hidden=3).eval()
        mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # the second subject has 3 slices
        subject_logits = agg(out.features, mask)
        assert subject_logits.shape == (2, 3)
        probs = subject_logits.softmax(1)
        torch.testing.assert_close(probs.sum(1), torch.ones(2))
        # the padded slices change nothing: the second subject alone, with its 3 real slices
        torch.testing.assert_close(agg(out.features[1:, :3])[0], subject_logits[1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the trainer on a tiny cache

VAL = "data.val_cases=[knee_000,knee_005,knee_010]"


@pytest.fixture(scope="module")
def demo_pre(tmp_path_factory):
    """The synthetic graded slices (15 subjects x 6 slices of 64 x 64; labelled: fold 1's 3
    subjects), preprocessed."""
    from medvol.datasets.dcmt_demo import build_dcmt_demo
    from medvol.preprocessing import preprocess_dataset

    tmp = tmp_path_factory.mktemp("dcmt")
    raw = build_dcmt_demo(tmp / "raw", n_subjects=15)
    preprocess_dataset(raw, tmp / "pre", num_workers=1, quiet=True)
    return tmp / "pre"


def _recipe(*sets):
    from medvol.config import load_recipe

    return load_recipe("dcmt_demo", [VAL, *sets])


def _trainer(pre, run, *sets):
    from medvol.training import get_trainer
    from medvol.training.distributed import DistInfo

    return get_trainer("dcmt")(_recipe(*sets), pre, run, DistInfo())


def test_recipes_carry_the_papers_settings():
    from medvol.config import load_recipe

    r = load_recipe("dcmt")
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.weight_decay) == ("adam", 2e-4, 1e-4)
    assert (r.data.configuration, r.data.batch_size, r.data.unlabelled_per_batch) == ("2d", 40, 30)
    m = r.method
    assert (m["epochs"], m["lr_decay_every"], m["lr_decay"], m["ema_decay"]) == (50, 15, 0.5, 0.99)
    assert (m["loss"]["warmup_epoch"], m["loss"]["rampup_epochs"]) == (20, 40)
    assert r.model.options == {"lse_r": 6.0, "cam_w": 100.0, "cam_sigma": 0.4, "input_percentiles": [0.1, 99.9],
                               "trunk_channels": 3}  # the paper's full width
    assert _recipe().trainer.name == "dcmt"
    from medvol.training import get_trainer

    assert get_trainer("dcmt").primary_metric == "val/balanced_accuracy"  # published: mean per-class recall


def test_epochs_in_steps_and_the_step_decay(demo_pre, tmp_path):
    # published epoch: the unlabelled training slices (9 subjects x 6) over the 4 unlabelled per batch
    t = _trainer(demo_pre, tmp_path / "r", "method.steps_per_epoch=null", "method.epochs=3", "method.lr_decay_every=1",
                 "method.val_every_epochs=2")
    assert t.steps_per_epoch == 9 * 6 // 4 == 13
    assert (t.recipe.trainer.steps, t.recipe.trainer.val_every) == (39, 26)
    factor = t.schedulers["model"].lr_lambdas[0]
    assert [factor(s) for s in (0, 12, 13, 25, 26, 38)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert (t.epoch(12), t.epoch(13)) == (0, 1)
    assert t.num_classes == 3 and t.models["model"].classifier.out_features == 3
    with pytest.raises(Exception, match="set schedule.name: constant"):
        _trainer(demo_pre, tmp_path / "r2", "schedule.name=poly")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(4, 1, 64, 64, dtype=torch.long)
    label[:, :, 24:34, :] = 1
    label[2:] = -1  # the unlabelled stream has no label map
    return {"image": torch.rand(4, 1, 64, 64, generator=g) + label.clamp_min(0), "label": label,
            "class": torch.tensor([1, 0, 0, 0]), "labelled": torch.tensor([True, True, False, False])}


def test_unlabelled_cam_channel_is_the_teachers_argmax(demo_pre, tmp_path):
    """The teacher's bias makes it say 2 everywhere; the unlabelled slots' CAMs are then
    channel 2, whatever their (leaked) class says, and every term matches a hand computation."""
    from medvol.losses.dcmt import attention_mse, select_cams

    t = _trainer(demo_pre, tmp_path / "r")
    student, teacher = t.models["model"].train(), t.models["teacher"]
    for m in [*student.modules(), *teacher.modules()]:  # batch statistics, but no dropout: outputs repeat
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0
    with torch.no_grad():
        teacher.classifier.bias.copy_(torch.tensor([0.0, 0.0, 100.0]))
    step = 10 * t.steps_per_epoch  # past the warm-up: both consistency terms count
    batch = _batch()
    terms = t.loss_terms(batch, step)
    assert terms["classes"].tolist() == [1, 0, 2, 2] and terms["w_att"] > 0

    with torch.no_grad():
        x = student.prepare(batch["image"])
        sv, tv = t.views(x, step)
        out_s, out_t = student(sv.image, prepared=True), teacher(tv.image, prepared=True)
        cam_t = sv.from_frame(out_t["cams"], tv)
        want = attention_mse(select_cams(cam_t[2:], torch.tensor([2, 2])),
                             select_cams(out_s["cams"][2:], torch.tensor([2, 2])))
        assert not torch.equal(select_cams(out_s["cams"][2:], torch.tensor([0, 0])),
                               select_cams(out_s["cams"][2:], torch.tensor([2, 2])))
    torch.testing.assert_close(terms["consistency_att"], want, rtol=1e-5, atol=1e-7)
    leaked = {**batch, "class": torch.tensor([1, 0, 1, 2])}  # other classes on the unlabelled slots
    again = t.loss_terms(leaked, step)
    for k in ("total", "ce", "mask", "bound", "consistency_cls", "consistency_att"):
        torch.testing.assert_close(again[k], terms[k])


def test_validation_counts_every_graded_slice(demo_pre, tmp_path):
    t = _trainer(demo_pre, tmp_path / "r", "method.validate_student=true")
    m = t.validate()
    assert m["val/graded_slices"] == 18 and 0 <= m["val/accuracy"] <= 1 and 0 < m["val/cam_iou"] < 1
    assert m["val/student_accuracy"] == m["val/accuracy"]  # the teacher starts as the student
    assert t.inference_model() is t.models["teacher"] and {"val/balanced_accuracy", "val/cam_inside"} <= set(m)


# ---------------------------------------------------------------- CAM / mask alignment
# The demo's band spans every column near mid-height, so a mirrored mask overlaps the true one
# almost wholly and no learning bar can see it (a planted "flip the mask" passed). These tests
# give the trainer an oracle whose CAMs are exactly where the bright region of its input is, on
# off-centre regions, and check that the masks (training and validation) and the teacher's
# CAMs meet those CAMs where they should.


class RegionCAM(DCMTNet):
    """An oracle: every grade's CAM is the bright region of the input slice (its 5 x 5 mean above
    half-way between the slice's min and max; ``smooth=1``: no mean), logits 0 (argmax grade 0)."""

    def __init__(self, smooth: int = 5):
        super().__init__(num_classes=3, in_channels=1, input_percentiles=(0.1, 99.9), trunk_channels=3, **TINY)
        self.smooth = smooth

    def forward(self, x, prepared=False):
        g = x[:, :1].float()
        if self.smooth > 1:
            g = torch.nn.functional.avg_pool2d(g, self.smooth, 1, self.smooth // 2, count_include_pad=False)
        lo, hi = g.amin((2, 3), keepdim=True), g.amax((2, 3), keepdim=True)
        cam = ((g - lo) > 0.5 * (hi - lo)).float()
        return {"logits": torch.zeros(len(x), 3), "cams": cam.repeat(1, 3, 1, 1)}


def _off_centre_regions(rng, n, size=64):
    """``(n, size, size)`` 0/1: one rectangle per slice in the upper right (rows 4-27, columns
    30-56): a mirror (either axis), a transpose or a shift by two pixels moves it visibly."""
    m = np.zeros((n, size, size), np.int64)
    for i in range(n):
        r, c = rng.integers(4, 14), rng.integers(30, 40)
        m[i, r:r + rng.integers(10, 15), c:c + rng.integers(12, 19)] = 1
    return m


@pytest.mark.parametrize("seed", range(4))
def test_training_masks_and_teacher_cams_meet_the_students_cams(demo_pre, tmp_path, seed):
    """Through the real views (flips, affine, noise, blur; trainer seed ``seed``), the region
    masks and the teacher's CAMs are carried into the student's frame: with oracle networks on
    off-centre regions the mask term and the attention consistency stay small.

    Measured over trainer seeds 0-3 x 3 steps (one thread): aligned mask term 0.028-0.059, bound
    0.010-0.062, consistency_att 0.022-0.048. With the student-frame masks (or the teacher's
    CAMs) planted mirrored left-right / up-down, transposed, shifted 2 pixels along columns or
    rows: mask term >= 0.88 / 1.0 / 0.54 / 0.128 / 0.153 (bound >= 0.85 / 1.0 / 0.55 / 0.112 /
    0.153; consistency_att >= 0.84 / 0.97 / 0.68 / 0.123 / 0.149). A 1-pixel shift gives
    0.055-0.105, too close to call here (the validation test below catches it). Bar 0.1 for each:
    above the aligned highest (0.062), below every planted lowest (0.112)."""
    t = _trainer(demo_pre, tmp_path / "r", f"trainer.seed={seed}")
    t.models["model"], t.models["teacher"] = RegionCAM(), RegionCAM()
    rng = np.random.default_rng(seed)
    for step in (0, 7, 60 + seed):
        region = torch.from_numpy(_off_centre_regions(rng, 8))[:, None]
        image = 0.15 + 0.65 * region.float() + torch.from_numpy(rng.normal(0, 0.03, region.shape)).float()
        label = region.clone()
        label[4:] = -1  # the unlabelled stream
        batch = {"image": image, "label": label, "class": torch.tensor([0, 1, 2, 1, 0, 0, 0, 0]),
                 "labelled": torch.tensor([True] * 4 + [False] * 4)}
        terms = t.loss_terms(batch, 10 * t.steps_per_epoch + step)  # past the warm-up
        assert terms["w_att"] > 0
        for k in ("mask", "bound", "consistency_att"):
            assert terms[k] < 0.1, (step, k, float(terms[k]))


@pytest.mark.parametrize("seed", range(4))
def test_validation_scores_the_cam_against_its_own_slices_mask(demo_pre, tmp_path, monkeypatch, seed):
    """Validation on off-centre regions (the cache's images and labels swapped for them, the
    cases' slice grades kept) with an oracle teacher: every CAM is its slice's mask, IoU and
    inside share 1. Measured over region seeds 0-3: 1.000 / 1.000 each; with the masks planted
    mirrored (either axis) or transposed IoU <= 0.034 (inside <= 0.058), shifted one pixel
    along columns 0.870-0.876 (inside 0.931-0.933), along rows (2 px) <= 0.717. Bar 0.99."""
    import medvol.training.dcmt as dcmt_trainer

    t = _trainer(demo_pre, tmp_path / "r")
    t.models["model"], t.models["teacher"] = RegionCAM(1), RegionCAM(1)
    rng = np.random.default_rng(seed)
    real_load = dcmt_trainer.load_case

    def load_case(cache, case, mmap=False):
        image, label, props = real_load(cache, case, mmap=mmap)
        region = np.moveaxis(_off_centre_regions(rng, image.shape[-1]), 0, -1)[None]  # (1, X, Y, Z), Z slices
        return region.astype(np.float32), region.astype(label.dtype), props

    monkeypatch.setattr(dcmt_trainer, "load_case", load_case)
    m = t.validate()
    assert m["val/graded_slices"] == 18
    assert m["val/cam_iou"] > 0.99 and m["val/cam_inside"] > 0.99, m


RUN_SETS = ["method.steps_per_epoch=2", "method.epochs=3", "method.val_every_epochs=3", "method.loss.warmup_epoch=1",
            "method.loss.rampup_epochs=1"]


@pytest.fixture(scope="module")
def dcmt_run(demo_pre, tmp_path_factory):
    """6 steps of `dcmt_demo` (consistency from step 2)."""
    from medvol.training import train

    run = tmp_path_factory.mktemp("dcmt_run") / "run"
    with pinned(0, threads=1):
        train(_recipe(*RUN_SETS), demo_pre, run, device="cpu", quiet=True)
    return run


def test_save_and_resume_continue_exactly(demo_pre, dcmt_run, tmp_path):
    from medvol.training import train

    with pinned(0, threads=1):
        train(_recipe(*RUN_SETS), demo_pre, tmp_path / "cut", device="cpu", stop_at=3, quiet=True)
        train(_recipe(*RUN_SETS), demo_pre, tmp_path / "cut", device="cpu", resume=True, quiet=True)
    a = torch.load(dcmt_run / "checkpoints" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["inference_model"] == "teacher" and a["num_classes"] == 3
    for key in ("model", "teacher"):
        assert all(torch.equal(v, b["models"][key][k]) for k, v in a["models"][key].items()), key
    assert not (dcmt_run / "validation").exists()  # no end-of-run scan validation: grades are not label maps


def test_a_dcmt_run_feeds_the_subject_pipeline(demo_pre, dcmt_run, tmp_path):
    """medvol extract-features rebuilds the run's teacher (with its input preparation) and takes
    its 16-d slice features; the slice aggregator trains on them; medvol predict gives every raw
    scan a subject grade."""
    import csv

    from medvol.checkpoint import load_run
    from medvol.config import load_recipe
    from medvol.inference.subjects import extract_features
    from medvol.io.slice_features import read_features
    from medvol.training import train

    with pinned(0, threads=1):
        path = extract_features(dcmt_run, demo_pre, tmp_path / "features", device="cpu", quiet=True)
    data = read_features(path)
    assert data.feature_dim == 16 and len(data.items) == 15 and data.meta["slice_classes"] == 3
    teacher = load_run(dcmt_run, torch.device("cpu")).model
    state = torch.load(dcmt_run / "checkpoints" / "best.pt", weights_only=True)["models"]["teacher"]
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
    item = data.by_subject()["knee_003"]
    image = np.load(demo_pre / "cases" / "knee_003.npy")
    with torch.no_grad():
        want = teacher(torch.from_numpy(np.moveaxis(image, 3, 0).astype(np.float32)))["features"]
    np.testing.assert_allclose(item.features, want.numpy(), atol=1e-5)
    assert item.features.shape == (6, 16) and item.subject_class in (0, 1, 2)

    agg = load_recipe("slice_aggregator", [*AGGREGATOR_STEP_RECIPE, "model.options={hidden: [8, 8], gru_hidden: 4}",
                                           "trainer.steps=4", "trainer.val_every=4", "data.batch_size=4", VAL])
    from medvol import cli

    with pinned(0, threads=1):
        train(agg, path.parent, tmp_path / "agg", device="cpu", quiet=True)
        scans = demo_pre.parent / "raw" / "imagesTr"
        assert cli.main(["predict", "-m", str(tmp_path / "agg"), "-i", str(scans), "-o", str(tmp_path / "out"),
                         "--device", "cpu", "-q"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "subjects.csv")))
    assert [r["subject"] for r in rows] == [f"knee_{i:03d}" for i in range(15)]
    for r in rows:
        p = np.array([float(r[f"p_{k}"]) for k in range(3)])
        assert p.sum() == pytest.approx(1.0, abs=1e-5) and int(r["predicted"]) == p.argmax()


@pytest.mark.slow
def test_short_run_learns_grades_and_attention(demo_pre, tmp_path):
    """`medvol train dcmt_demo` for 100 steps (10 epochs of 10; consistency from epoch 2): the
    classification loss falls and the teacher's CAMs of the true grade overlap the region masks
    of the validation slices better than at initialisation.

    Measured with threads pinned to 2, trainer seeds 0 / 1 / 2 (this test runs seed 0), with the
    published view noise (variance ~ U(0, 0.1), clipped; issue 27): train/ce mean of the last 20
    logged steps over the first 20: 0.674 / 0.540 / 0.480; val/cam_iou at initialisation ->
    after: 0.053 -> 0.286 / 0.226 -> 0.291 / 0.104 -> 0.292; val/cam_inside: 0.063 -> 0.357 /
    0.231 -> 0.315 / 0.154 -> 0.333 (accuracy on the 18 validation slices after: 0.56 / 0.56 /
    0.61; not asserted: 3 labelled subjects and 100 steps are too few for a stable grade). With
    the earlier noise (std ~ U(0, 0.316), not clipped), seeds 0-3: ratio 0.664 / 0.457 / 0.502 /
    0.475, IoU after 0.229 / 0.259 / 0.287 / 0.241, inside after 0.260 / 0.318 / 0.329 / 0.289.
    Re-measured with one thread, trainer seeds 0-4 (the published noise): ratio 0.651 / 0.521 /
    0.496 / 0.478 / 0.563; val/cam_iou 0.053 -> 0.290 / 0.226 -> 0.293 / 0.104 -> 0.299 / 0.140
    -> 0.245 / 0.155 -> 0.290 (gains 0.237 / 0.067 / 0.195 / 0.105 / 0.135); val/cam_inside 0.063
    -> 0.357 / 0.231 -> 0.311 / 0.154 -> 0.331 / 0.235 -> 0.305 / 0.200 -> 0.326 (gains 0.294 /
    0.080 / 0.177 / 0.070 / 0.126). An untrained model reaches IoU 0.226 and inside 0.235 (seed
    1): the former absolute bars (0.2) and gains (+0.01 IoU) were within chance's reach, and
    untrained and trained IoU overlap within 0.02, so IoU is judged by its gain only.
    Bars: ratio < 0.8 (0.15 above the highest); IoU gain > 0.03 and inside gain > 0.035 (about
    half the smallest gain); inside > 0.27 (midway between the untrained highest, 0.235, and the
    trained lowest, 0.305). About 0.3 s a step on one idle core. The demo's band spans every
    column near mid-height, so these bars cannot see a mirrored mask (a planted left-right flip
    of the training masks passed them): the alignment of masks and CAMs is checked by the two
    oracle tests above.
    """
    from medvol import cli

    sets = [VAL, "method.epochs=10", "method.val_every_epochs=10", "trainer.log_every=1"]
    with pinned(0):
        init = _trainer(demo_pre, tmp_path / "init", *sets[1:]).validate()
        args = ["train", "dcmt_demo", "--data", str(demo_pre), "--out", str(tmp_path / "run"), "--device", "cpu",
                "--quiet"]
        assert cli.main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
    s = metric_series(tmp_path / "run")
    ce = np.array(s["train/ce"])
    assert len(ce) == 100 and ce[-20:].mean() < 0.8 * ce[:20].mean(), (ce[:20].mean(), ce[-20:].mean())
    iou, inside = s["val/cam_iou"][-1], s["val/cam_inside"][-1]
    assert iou > init["val/cam_iou"] + 0.03, (init["val/cam_iou"], iou)
    assert inside > max(0.27, init["val/cam_inside"] + 0.035), (init["val/cam_inside"], inside)
    assert s["train/w_att"][0] == 0 and s["train/w_att"][-1] > 0  # the consistency terms came in
