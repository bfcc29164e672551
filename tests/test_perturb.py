"""Random views for consistency training: exact flips, frames carried between views, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from medvol.data.perturb import PerturbConfig, gaussian_blur, make_view, warp

SPATIAL_ONLY = dict(brightness_contrast_prob=0.0, blur_prob=0.0, noise_prob=0.0, clip=None)


def _ramp(b: int, h: int, w: int) -> torch.Tensor:
    """A linear map: bilinear resampling reproduces it exactly away from the borders."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return (0.3 * yy + 0.7 * xx)[None, None].repeat(b, 1, 1, 1)


def test_flip_view_is_torch_flip():
    x = torch.rand(3, 2, 9, 7)
    v = make_view(x, PerturbConfig(**SPATIAL_ONLY, affine_prob=0.0, flip_prob=1.0, flip_axes=(1,)), seed=0)
    torch.testing.assert_close(v.image, x.flip(-1), atol=1e-5, rtol=0)
    v = make_view(x, PerturbConfig(**SPATIAL_ONLY, affine_prob=0.0, flip_prob=1.0, flip_axes=(0, 1)), seed=0)
    torch.testing.assert_close(v.image, x.flip(-1, -2), atol=1e-5, rtol=0)


def test_teacher_maps_carried_into_the_student_frame():
    """A map seen through view b, carried into view a's frame, equals the map seen through a
    (exactly for a linear map, inside the borders), while the two views differ a lot."""
    cfg = PerturbConfig(**SPATIAL_ONLY, affine_prob=1.0, rotate_deg=10, scale=0.1, shift=0.05, flip_prob=0.5)
    x = _ramp(4, 16, 12)
    a, b = make_view(x, cfg, seed=1), make_view(x, cfg, seed=2)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    carried = a.from_frame(b.image, other=b)
    assert (b.image - a.image)[inner].abs().max() > 1.0
    torch.testing.assert_close(carried[inner], a.image[inner], atol=1e-4, rtol=0)
    # a target in the source frame comes into a view's frame through from_frame(x)
    torch.testing.assert_close(a.from_frame(x), a.image)


def test_rotation_is_rigid_in_pixels_on_non_square_images():
    cfg = PerturbConfig(**SPATIAL_ONLY, affine_prob=1.0, rotate_deg=30, scale=0.0, shift=0.0, flip_prob=0.0)
    v = make_view(torch.zeros(1, 1, 40, 20), cfg, seed=5)
    half = torch.tensor([10.0, 20.0], dtype=torch.float64)  # grid order (W/2, H/2)
    rot = torch.diag(half) @ v.theta[0, :, :2].double() @ torch.diag(1 / half)
    torch.testing.assert_close(rot @ rot.T, torch.eye(2, dtype=torch.float64))
    assert 0 < abs(math.degrees(math.atan2(rot[1, 0], rot[0, 0]))) <= 30


def test_labels_warped_with_a_fill_for_unknown_pixels():
    lab = torch.ones(1, 1, 8, 8)
    theta = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # read a quarter of the width further right
    out = warp(lab, theta, mode="nearest", fill=-1)
    assert set(out.unique().tolist()) == {-1.0, 1.0} and (out[..., -2:] == -1).all() and (out[..., :4] == 1).all()


def test_views_are_pure_functions_of_their_seed_and_independent():
    x = torch.rand(4, 1, 16, 16)
    cfg = PerturbConfig()
    v1, v2, w = make_view(x, cfg, 7), make_view(x, cfg, 7), make_view(x, cfg, 8)
    assert torch.equal(v1.image, v2.image) and torch.equal(v1.theta, v2.theta)
    assert not torch.equal(v1.image, w.image)


def test_gaussian_blur_preserves_mass_and_matches_the_kernel():
    z = torch.zeros(1, 2, 11, 11)
    z[:, :, 5, 5] = 1
    out = gaussian_blur(z, 1.0)
    torch.testing.assert_close(out.sum((2, 3)), torch.ones(1, 2))
    g = torch.exp(-0.5 * torch.arange(-3, 4, dtype=torch.float32) ** 2)
    g = g / g.sum()
    torch.testing.assert_close(out[0, 0, 2:9, 2:9], torch.outer(g, g))


@pytest.mark.parametrize("shape", [(2, 1, 10, 12), (2, 1, 6, 8, 10)])
def test_default_perturbation_runs_in_2d_and_3d(shape):
    v = make_view(torch.rand(*shape), PerturbConfig(affine_prob=1.0, flip_prob=1.0), seed=3)
    assert v.image.shape == shape and v.theta.shape == (2, len(shape) - 2, len(shape) - 1)
    assert torch.isfinite(v.image).all()


def test_noise_variance_is_drawn_uniformly_as_published_and_the_view_clipped():
    """DC-MT's noise: variance ~ U(0, 0.1) on [0, 1] images (mean power 0.05; a uniformly drawn
    std would give 0.1 / 3 = 0.033), then clipped to [0, 1]."""
    noise_only = dict(brightness_contrast_prob=0.0, blur_prob=0.0, affine_prob=0.0, flip_prob=0.0)
    x = torch.full((1, 1, 64, 64), 0.5)
    powers = [float(make_view(x, PerturbConfig(**noise_only, clip=None), seed=s).image.var()) for s in range(300)]
    assert abs(sum(powers) / len(powers) - 0.05) < 0.005
    clipped = make_view(torch.rand(2, 1, 32, 32), PerturbConfig(**noise_only), seed=0).image
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0 and (clipped == 1.0).any()
