"""Dataset fingerprint: weighted intensity statistics merged from per-case sample runs."""

from __future__ import annotations

import numpy as np
import pytest

from medvol.preprocessing.fingerprint import weighted_quantiles, weighted_statistics


def _pooled_reference(values: np.ndarray, weights: np.ndarray, qs) -> np.ndarray:
    """The definition on the pooled, argsorted samples: each at its midpoint cumulative weight,
    rescaled so the first and last sit at 0 and 1, linear in between."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cw = np.cumsum(w)
    pos = (cw - w / 2 - w[0] / 2) / max(cw[-1] - w[0] / 2 - w[-1] / 2, 1e-12)
    return np.interp(np.asarray(qs, float), pos, v)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_weighted_quantiles_of_runs_equal_the_pooled_definition(dtype):
    rs = np.random.RandomState(0)
    qs = [0.0, 0.005, 0.1, 0.5, 0.77, 0.995, 1.0]
    for _ in range(200):
        runs = [(rs.randint(-5, rs.choice([3, 10, 1000]), rs.randint(1, 30)) if rs.rand() < 0.7
                 else rs.randn(rs.randint(1, 30)) * 100).astype(dtype) for _ in range(rs.randint(1, 5))]
        weights = [float(rs.choice([1.0, rs.rand() * 5 + 0.1])) for _ in runs]  # ties across runs included
        pooled = np.concatenate(runs).astype(np.float64)
        w = np.concatenate([np.full(len(r), x) for r, x in zip(runs, weights)])
        np.testing.assert_allclose(weighted_quantiles(runs, weights, qs), _pooled_reference(pooled, w, qs),
                                   atol=1e-9)


def test_equal_weights_give_numpys_percentiles_and_moments():
    x = np.random.RandomState(1).randn(1001).astype(np.float32) * 50 + 20
    stats = weighted_statistics([x[:300], x[300:]], [1.0, 1.0])
    ref = np.percentile(x.astype(np.float64), [0.5, 50, 99.5])
    assert [stats["percentile_00_5"], stats["median"], stats["percentile_99_5"]] == pytest.approx(ref, abs=1e-9)
    assert stats["mean"] == pytest.approx(x.mean(dtype=np.float64), abs=1e-9)
    assert stats["std"] == pytest.approx(x.std(dtype=np.float64), abs=1e-9)
    assert (stats["min"], stats["max"]) == (float(x.min()), float(x.max()))


def test_a_run_weighs_its_weight():
    """Two values, the second case weighted 3x: the median lies three quarters of the way."""
    stats = weighted_statistics([np.array([0.0], np.float32), np.array([4.0], np.float32)], [1.0, 3.0])
    assert stats["mean"] == pytest.approx(3.0)
    assert stats["median"] == pytest.approx(_pooled_reference(np.array([0.0, 4.0]), np.array([1.0, 3.0]), [0.5])[0])
