"""SERAN (issue 30): network, LR/HR pairs, trainer, enhance geometry, PSNR/SSIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvol.checkpoint import load_checkpoint
from medvol.data.sr_pairs import bicubic_downsample, degrade, kspace_truncate
from medvol.errors import ConfigError
from medvol.evaluation.image import psnr, ssim
from medvol.inference.enhance import upsampled_affine
from medvol.networks.seran import SERAN, ReasoningAttention, parameter_count

from conftest import metric_series, pinned

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["model.base_features=8", "model.options.groups=1", "model.options.blocks=2", "model.options.descriptors=4",
        "data.batch_size=4", "method.lr_patch=12", "method.val_slices=2", "data.num_workers=0",
        "optimizer.lr=1.0e-3", "trainer.log_every=1"]


# ---------------------------------------------------------------- network


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_is_scale_times_the_input(scale):
    net = SERAN(1, 1, scale, features=8, groups=2, blocks=1, descriptors=4)
    assert net(torch.randn(2, 1, 9, 11)).shape == (2, 1, 9 * scale, 11 * scale)
    assert SERAN(2, 3, scale, features=8, groups=1, blocks=1)(torch.randn(1, 2, 5, 6)).shape == (1, 3, 5 * scale,
                                                                                                   6 * scale)


def test_unknown_scale_is_one_config_error():
    from medvol.errors import ConfigError

    with pytest.raises(ConfigError, match="scale"):
        SERAN(scale=5)


def test_attention_reads_the_whole_slice_and_depends_on_the_input():
    """The descriptors are pooled over every position: a change at one corner changes the
    output at the far corner (1x1 convolutions alone could not); the attention vectors are
    softmax weights over the descriptors that differ between positions and between inputs."""
    torch.manual_seed(0)
    att = ReasoningAttention(8, descriptors=4).eval()
    x = torch.randn(1, 8, 10, 10)
    y = x.clone()
    y[..., 0, 0] += 3.0
    with torch.no_grad():
        out_x, out_y = att(x), att(y)
        v = att.attention_vectors(x)
    assert (out_x[..., 9, 9] - out_y[..., 9, 9]).abs().max() > 1e-4
    torch.testing.assert_close(v.sum(1), torch.ones(1, 100))
    assert v.std(-1).mean() > 1e-3  # per-position weights, not one global vector
    g_x, g_y = att.descriptors(x), att.descriptors(torch.randn(1, 8, 10, 10))
    assert g_x.shape == (1, 8, 4) and (g_x - g_y).abs().max() > 1e-3
    att.res_scale = 0.0  # residual scaling: 0 leaves the input unchanged
    torch.testing.assert_close(att(x), x)


def test_plain_variant_has_no_attention_and_fewer_parameters():
    a = SERAN(1, 1, 2, features=8, groups=1, blocks=2, descriptors=4)
    b = SERAN(1, 1, 2, features=8, groups=1, blocks=2, descriptors=4, attention=False)
    assert not any(isinstance(m, ReasoningAttention) for m in b.modules())
    assert parameter_count(b) < parameter_count(a)


def test_zero_initialised_attention_starts_as_the_plain_network_and_still_learns():
    """``zero_init``: the attention's output convolution starts at zero, so SERAN computes
    exactly what the plain residual CNN with the same convolution weights computes; the
    gradient reaches that convolution, so training can move the attention away from zero."""
    torch.manual_seed(0)
    seran = SERAN(1, 1, 2, features=8, groups=2, blocks=2, descriptors=4, zero_init=True)
    plain = SERAN(1, 1, 2, features=8, groups=2, blocks=2, descriptors=4, attention=False)
    missing, unexpected = plain.load_state_dict(seran.state_dict(), strict=False)
    assert not missing and all(".attention." in k for k in unexpected)
    x = torch.randn(2, 1, 10, 12)
    torch.testing.assert_close(seran(x), plain(x), atol=0, rtol=0)
    seran(x).square().mean().backward()
    grads = [m.project.weight.grad for m in seran.modules() if isinstance(m, ReasoningAttention)]
    assert len(grads) == 4 and all(g.abs().max() > 0 for g in grads)



def test_gate_excitation_recalibrates_the_features_by_a_sigmoid_of_the_distributed_descriptors():
    """``excitation: gate``: out = X * sigmoid(project(G' V)) by hand, per channel and position;
    res_scale and zero_init (the additive form's) are refused with it, unknown forms too."""
    torch.manual_seed(0)
    att = ReasoningAttention(6, descriptors=3, excitation="gate")
    x = torch.randn(2, 6, 5, 7)
    z = (att.descriptors(x) @ att.attention_vectors(x)).view(2, 6, 5, 7)
    torch.testing.assert_close(att(x), x * torch.sigmoid(att.project(z)))
    add = ReasoningAttention(6, descriptors=3)
    add.load_state_dict(att.state_dict())
    torch.testing.assert_close(add(x), x + att.project(z))
    for bad in ({"res_scale": 0.5}, {"zero_init": True}):
        with pytest.raises(ConfigError, match="excitation 'add' only"):
            ReasoningAttention(6, 3, excitation="gate", **bad)
    with pytest.raises(ConfigError, match="excitation must be one of"):
        SERAN(1, 1, 2, features=8, groups=1, blocks=1, descriptors=2, excitation="mul")

# ---------------------------------------------------------------- degradations


def test_degradations_keep_a_constant_and_halve_the_size():
    hr = torch.full((1, 1, 16, 12), 3.5)
    for kind in ("bicubic", "kspace"):
        lr = degrade(hr, 2, kind)
        assert lr.shape == (1, 1, 8, 6)
        torch.testing.assert_close(lr, torch.full_like(lr, 3.5), atol=1e-5, rtol=0)


def test_kspace_truncation_samples_a_band_limited_image_at_half_pixel_centres():
    """A cosine below the LR Nyquist frequency survives truncation exactly, sampled where LR
    pixel i is centred: HR coordinate (i + 0.5) * s - 0.5 (the bicubic convention)."""
    n, s = 24, 3
    x = np.arange(n)
    hr = np.cos(2 * np.pi * 2 * x / n)[:, None] * np.cos(2 * np.pi * 1 * x / n)[None, :]
    lr = kspace_truncate(torch.from_numpy(hr)[None, None], s)[0, 0].numpy()
    c = (np.arange(n // s) + 0.5) * s - 0.5
    expected = np.cos(2 * np.pi * 2 * c / n)[:, None] * np.cos(2 * np.pi * 1 * c / n)[None, :]
    np.testing.assert_allclose(lr, expected, atol=1e-10)


def test_bicubic_downsampling_of_a_ramp_sits_at_half_pixel_centres():
    hr = torch.arange(16.0)[None, None, :, None].repeat(1, 1, 1, 8)
    lr = bicubic_downsample(hr, 2)[0, 0, 2:6, 0]  # away from the borders
    torch.testing.assert_close(lr, torch.tensor([4.5, 6.5, 8.5, 10.5]))


# ---------------------------------------------------------------- metrics


def test_psnr_by_hand():
    ref = np.zeros((8, 8))
    ref[0, 0] = 1.0  # range 1
    assert psnr(ref + 0.1, ref) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert psnr(ref + 0.1, ref, data_range=2.0) == pytest.approx(10 * np.log10(4 / 0.01))
    assert psnr(2 * ref, ref) == pytest.approx(10 * np.log10(64))  # MSE 1/64; the range is the reference's


def test_ssim_by_hand():
    """A 7x7 image is one window (scikit-image scores its centre only): SSIM by the formula with
    the sample (co)variances, K1 0.01, K2 0.03."""
    rng = np.random.default_rng(0)
    ref = rng.random((7, 7))
    pred = 0.5 * ref + 0.2 * rng.random((7, 7))
    L = ref.max() - ref.min()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mx, my = pred.mean(), ref.mean()
    vx, vy = pred.var(ddof=1), ref.var(ddof=1)
    cxy = ((pred - mx) * (ref - my)).sum() / 48
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ssim(pred, ref) == pytest.approx(expected, rel=1e-9)
    assert ssim(ref, ref) == pytest.approx(1.0)


# ---------------------------------------------------------------- geometry of enhance


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_upsampled_affine_covers_the_same_field_of_view(scale):
    rng = np.random.default_rng(scale)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag([0.9, 1.3, 4.0])
    affine[:3, 3] = rng.normal(size=3) * 50
    shape = np.array([10, 7, 5])
    out = upsampled_affine(affine, (0, 1), scale)
    out_shape = shape * [scale, scale, 1]
    to_input = np.linalg.inv(affine) @ out
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), -1).reshape(-1, 3)
    centres = (to_input[:3, :3] @ idx.T).T + to_input[:3, 3]  # output voxel centres in input voxel coordinates
    assert (centres > -0.5).all() and (centres < shape - 0.5).all()
    # the extent (first edge to last edge) along every axis is the input's
    lo = to_input[:3, :3] @ np.full(3, -0.5) + to_input[:3, 3]
    hi = to_input[:3, :3] @ (out_shape - 0.5) + to_input[:3, 3]
    np.testing.assert_allclose(lo, -0.5, atol=1e-9)
    np.testing.assert_allclose(hi, shape - 0.5, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(out[:3, :3], axis=0), [0.9 / scale, 1.3 / scale, 4.0], rtol=1e-12)


# ---------------------------------------------------------------- training, resume, enhance


@pytest.fixture(scope="module")
def seran_run(brain_pre, tmp_path_factory):
    from medvol.training import load_recipe, train

    run = tmp_path_factory.mktemp("seran") / "run"
    with pinned(0, threads=1):
        train(load_recipe("seran_demo", TINY + ["trainer.steps=60", "trainer.val_every=30"]), brain_pre, run,
              device="cpu", quiet=True)
    return run


def test_l1_falls_and_validation_psnr_rises(seran_run):
    m = metric_series(seran_run)
    loss = m["train/loss"]
    # measured over trainer seeds 0-3: last/first loss 0.58-0.64, PSNR +0.9 to +1.5 dB from step 30 to 60
    assert np.mean(loss[-10:]) < 0.75 * np.mean(loss[:5]), (loss[:5], loss[-10:])
    assert m["val/psnr"][-1] > m["val/psnr"][0] + 0.4, m["val/psnr"]
    assert {"val/ssim", "val/psnr_bicubic", "val/ssim_bicubic"} <= set(m)


def test_degradation_and_scale_are_recorded(seran_run):
    ckpt = load_checkpoint(seran_run / "checkpoints" / "latest.pt")
    assert ckpt["degradation"] == "bicubic" and ckpt["scale"] == 2 and ckpt["num_classes"] == 1
    assert "degradation: bicubic" in (seran_run / "recipe.yaml").read_text()


def test_resume_is_exact(brain_pre, tmp_path):
    from medvol.training import load_recipe, train

    sets = TINY + ["trainer.steps=6", "trainer.val_every=6", "method.degradation=kspace", "method.lr_halve_every=3"]
    with pinned(0, threads=1):
        train(load_recipe("seran_demo", sets), brain_pre, tmp_path / "full", device="cpu", quiet=True)
        train(load_recipe("seran_demo", sets), brain_pre, tmp_path / "cut", device="cpu", quiet=True, stop_at=3)
        train(load_recipe("seran_demo", sets), brain_pre, tmp_path / "cut", device="cpu", quiet=True, resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")
    for key in a["models"]["model"]:
        torch.testing.assert_close(a["models"]["model"][key], b["models"]["model"][key], rtol=0, atol=0, msg=key)
    full, cut = metric_series(tmp_path / "full"), metric_series(tmp_path / "cut")
    assert full["train/loss"] == cut["train/loss"]
    assert full["train/lr"][-1] == pytest.approx(0.5e-3)  # halved at step 3


def test_enhance_writes_the_same_field_of_view_at_finer_spacing(seran_run, brain_raw, tmp_path):
    from medvol.cli import main
    from medvol.io import read_volume

    scan = sorted((brain_raw / "imagesTs").glob("*.nii.gz"))[0]
    assert main(["enhance", "-m", str(seran_run), "-i", str(scan.parent), "-o", str(tmp_path / "out"), "-q",
                 "--device", "cpu"]) == 0
    src, out = read_volume(scan), read_volume(tmp_path / "out" / scan.name.replace("_0000", ""))
    assert out.array.shape == (src.array.shape[0] * 2, src.array.shape[1] * 2, src.array.shape[2])
    np.testing.assert_allclose(out.spacing, np.array(src.spacing) / [2, 2, 1], rtol=1e-5)
    np.testing.assert_allclose(out.affine, upsampled_affine(src.affine, (0, 1), 2), atol=1e-4)
    # intensities come back in the scan's units: close to the scan's own voxels repeated 2x2
    # (a tiny, briefly trained model), background (0 outside the nonzero mask) kept at 0
    near = np.repeat(np.repeat(src.array, 2, 0), 2, 1)
    inside = near != 0
    assert (out.array[~inside] == 0).all()
    assert np.corrcoef(out.array[inside], near[inside])[0, 1] > 0.85  # measured 0.949


def test_evaluate_kind_image(tmp_path, capsys):
    from medvol.cli import main
    from medvol.io import Volume, write_volume

    rng = np.random.default_rng(0)
    ref = rng.random((12, 12, 9)).astype(np.float32)
    for folder, arr in (("ref", ref), ("pred", ref + 0.05)):
        (tmp_path / folder).mkdir()
        write_volume(Volume(arr, np.eye(4)), tmp_path / folder / "a.nii.gz")
    assert main(["evaluate", "--kind", "image", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "-o", str(tmp_path / "m")]) == 0
    import json

    res = json.loads((tmp_path / "m.json").read_text())
    expected = 10 * np.log10(float(ref.max() - ref.min()) ** 2 / 0.05 ** 2)
    assert res["cases"]["a"]["psnr"] == pytest.approx(expected, rel=1e-4)
    assert "PSNR" in capsys.readouterr().out


def test_enhance_reads_a_dicom_series(seran_run, tmp_path):
    """A DICOM series in (medvol.io's reader), NIfTI out on the series' own grid made finer."""
    from medvol.datasets.dicom import write_dicom_series
    from medvol.inference.enhance import enhance
    from medvol.io import Volume, read_volume

    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.2, 3.0, 1.0])
    affine[:3, 3] = [-20.0, 10.0, 5.0]
    arr = np.zeros((20, 18, 4), np.float32)
    arr[3:17, 2:16] = 300 + 40 * rng.random((14, 14, 4))
    write_dicom_series(Volume(arr, affine), tmp_path / "series", modality="MR", intercept=0.0)
    src = read_volume(tmp_path / "series")
    [out_path] = enhance(seran_run, tmp_path / "series", tmp_path / "out", torch.device("cpu"), quiet=True)
    out = read_volume(out_path)
    assert out.array.shape == (40, 36, 4)
    np.testing.assert_allclose(out.affine, upsampled_affine(src.affine, (0, 1), 2), atol=1e-4)


def test_label_options_are_refused(brain_pre, tmp_path):
    from medvol.errors import ConfigError
    from medvol.training import load_recipe, train

    with pytest.raises(ConfigError, match="without labels"):
        train(load_recipe("seran_demo", TINY + ["data.labelled=2"]), brain_pre, tmp_path / "r", device="cpu",
              quiet=True)
