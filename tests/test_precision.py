"""Precision and layout by capability; windows outside the body mask skipped; batched TTA;
bf16 predictions against fp32 on a real case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from medvol.errors import ConfigError
from medvol.inference.sliding_window import sliding_window_probabilities
from medvol.precision import Precision, choose_precision, cpu_has_native_bf16

from conftest import pinned

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16, whatever this machine has."""
    def set_to(value: bool):
        monkeypatch.delenv("MEDVOL_CPU_BF16", raising=False)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: value)
    return set_to


def test_auto_follows_the_cpu_capability(native_bf16):
    native_bf16(True)
    assert cpu_has_native_bf16()
    p = choose_precision("cpu")
    assert (p.name, p.dtype, p.channels_last) == ("bf16", torch.bfloat16, True)
    assert choose_precision("cpu", amp=False).name == "fp32"  # trainer.amp: false
    assert choose_precision("cpu", "fp32") == Precision("fp32", "cpu", False)
    native_bf16(False)
    assert choose_precision("cpu") == Precision("fp32", "cpu", False)
    assert choose_precision("cpu", "bf16") == Precision("bf16", "cpu", False)  # asked for: given


def test_training_under_auto_follows_the_cpu_capability(native_bf16, brain_pre, tmp_path):
    """CPU training picks bf16 + channels-last under ``auto`` where the CPU has native bf16 (the
    demo's Dice is unchanged within fp32's seed spread, benchmarks/RESULTS.md), else fp32; the
    run records what it used and validates to finite metrics either way."""
    from medvol.config import load_recipe
    from medvol.training import train

    recipe = ["model.base_features=4", "model.max_features=16", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
              "data.num_workers=0", "trainer.steps=3", "trainer.val_every=3"]
    for native, want in ((True, ("bf16", True)), (False, ("fp32", False))):
        native_bf16(native)
        run = tmp_path / str(native)
        with pinned(0):
            train(load_recipe("quickstart", recipe), brain_pre, run, device="cpu", quiet=True)
        summary = json.loads((run / "train_summary.json").read_text())
        assert (summary["precision"], summary["channels_last"]) == want
        assert summary["steps_done"] == 3
        assert summary["last_validation"] and all(np.isfinite(v) for v in summary["last_validation"].values())


def test_environment_switch_and_bad_requests(native_bf16, monkeypatch):
    native_bf16(True)
    monkeypatch.setenv("MEDVOL_CPU_BF16", "0")
    assert choose_precision("cpu").name == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        choose_precision("cpu", "fp16")
    with pytest.raises(ConfigError, match="precision 'half'"):
        choose_precision("cpu", "half")


def test_auto_on_cuda_follows_the_gpu_capability(monkeypatch):
    for supported, want in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        p = choose_precision("cuda")
        assert (p.name, p.device_type, p.channels_last) == (want, "cuda", False)
    with pytest.raises(ConfigError, match="does not support bf16"):
        choose_precision("cuda", "bf16")


def test_channels_last_is_the_same_function():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU(),
                        nn.Conv3d(4, 2, 1)).eval()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        ref = net(x)
        p = Precision("fp32", "cpu", channels_last=True)
        out = p.prepare(net)(p.layout(x))
    assert p.layout(x).is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class _Fg(nn.Module):
    """Foreground logit = 10 * (input - 0.5): class 1 where the image is bright."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 10 * (x - 0.5)], 1)


def test_windows_outside_the_mask_are_skipped_and_the_inside_is_unchanged():
    image = np.zeros((1, 64, 32, 32), np.float32)
    image[0, 2:8, 5:20, 5:20] = 1.0
    mask = np.zeros((64, 32, 32), bool)
    mask[:10] = True  # the body: x < 10
    stats = {}
    kw = dict(n_channels=2, overlap=0.5, precision=Precision("fp32", "cpu"))
    skipped = sliding_window_probabilities(_Fg(), image, [32, 32, 32], CPU, mask=mask, stats=stats, **kw)
    every = sliding_window_probabilities(_Fg(), image, [32, 32, 32], CPU, **kw)
    # windows start at x = 0, 16, 32: only the first touches x < 10
    assert stats == {"windows_run": 1, "windows_skipped": 2}
    torch.testing.assert_close(skipped[:, :10], every[:, :10], atol=0, rtol=0)  # inside: the very same
    assert float(skipped[0, 32:].min()) > 0.999  # only skipped windows there: background
    assert torch.equal(skipped.argmax(0), every.argmax(0))


def test_a_mask_that_touches_a_window_in_one_voxel_keeps_it():
    image = np.zeros((1, 40, 20, 20), np.float32)
    mask = np.zeros((40, 20, 20), bool)
    mask[39, 19, 19] = True  # the last voxel only: the last window along every axis
    stats = {}
    sliding_window_probabilities(_Fg(), image, [20, 20, 20], CPU, n_channels=2, overlap=0.0, mask=mask,
                                 stats=stats, precision=Precision("fp32", "cpu"))
    assert stats == {"windows_run": 1, "windows_skipped": 1}


def test_ct_body_leaves_out_the_air_and_keeps_what_the_body_encloses():
    """A CT's nonzero mask is its whole field of view (air is -1000 HU): the body mask that
    window skipping uses is the tissue above -500 HU plus what it encloses within a plane, so a
    lung-like cavity open to the outside along one axis (a trachea) still counts as body."""
    from medvol.preprocessing.cropping import ct_body_mask

    hu = np.full((40, 40, 24), -1000.0)
    hu[8:32, 8:32, 2:22] = 40  # soft tissue
    hu[12:28, 12:20, 4:20] = -850  # a lung, enclosed in every plane
    hu[22:26, 22:26, :] = -900  # an airway through the body along z, open at both ends in 3D
    body = ct_body_mask(hu)
    assert body[20, 16, 12] and body[24, 24, 12]  # the lung and the airway inside the body
    assert not body[2, 2, 12] and not body[20, 20, 0] and not body[24, 24, 0]  # air outside
    assert body.sum() == 24 * 24 * 20  # exactly the body box, nothing of the air around it


def test_batched_mirroring_equals_one_flip_at_a_time():
    torch.manual_seed(0)
    net = nn.Conv3d(1, 3, 3, padding=1).eval()
    image = np.random.default_rng(0).normal(size=(1, 20, 18, 16)).astype(np.float32)
    kw = dict(mirror_axes=(0, 1, 2), precision=Precision("fp32", "cpu"))
    together = sliding_window_probabilities(net, image, [16, 16, 16], CPU, **kw)
    one_by_one = sliding_window_probabilities(net, image, [16, 16, 16], CPU, tta_batch=1, **kw)
    torch.testing.assert_close(together, one_by_one, atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def brain_model(brain_pre, tmp_path_factory):
    """A narrow quickstart U-Net trained 40 steps on the real brain-tissue cases (fp32)."""
    from medvol.config import load_recipe
    from medvol.training import train

    run = tmp_path_factory.mktemp("prec") / "run"
    r = load_recipe("quickstart", ["model.base_features=8", "model.max_features=32", "data.patch_size=[32, 32, 32]",
                                   "data.batch_size=2", "data.num_workers=0", "trainer.steps=40",
                                   "trainer.val_every=40", "trainer.precision=fp32"])
    with pinned(0):
        train(r, brain_pre, run, device="cpu", quiet=True)
    return run


@pytest.mark.slow
def test_bf16_predictions_match_fp32_on_a_real_case(brain_model, brain_raw, tmp_path):
    """The accuracy gate of bf16 inference (issue 22): per-class Dice of the bf16 labels
    against the fp32 labels >= 0.995 on a real case, window skipping on (the default)."""
    from medvol.evaluation.metrics import dice
    from medvol.inference import predict
    from medvol.io import read_volume

    images = brain_raw / "imagesTs"
    predict(brain_model, images, tmp_path / "fp32", device="cpu", precision="fp32", all_windows=True, quiet=True)
    predict(brain_model, images, tmp_path / "bf16", device="cpu", precision="bf16", quiet=True)
    record = json.loads((tmp_path / "bf16" / "predict.json").read_text())
    assert record["precision"] == "bf16" and record["settings"]["all_windows"] is False
    for f in sorted((tmp_path / "fp32").glob("*.nii.gz")):
        a, b = read_volume(f).array, read_volume(tmp_path / "bf16" / f.name).array
        for c in (1, 2, 3):
            if (a == c).any():
                assert dice(a == c, b == c) >= 0.995, (f.name, c)
