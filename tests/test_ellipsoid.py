"""Regions given as a covariance: the metric distance to the ellipsoid against a general-purpose
constrained minimiser, uniform samples inside it, and bad covariances refused by name."""
import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from skystack.orbits.covering import REGION_ELEMENTS
from skystack.orbits.ellipsoid import metric_distance2_to_ellipsoid, region_ellipsoid, sample_ellipsoid

REFERENCE = {"a_au": 13.6, "e": 0.38, "inc_deg": 6.9, "node_deg": 209.0, "argperi_deg": 339.0,
             "mean_anomaly_deg": 100.0, "epoch_jd_tdb": 2460000.5}


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((6, 6))
    cov = a @ a.T * 1e-4
    cov[1, :] = cov[:, 1] = 0.0  # e not varied
    b = rng.standard_normal((6, 6))
    return cov, b @ b.T * 10.0, rng


def test_distance_to_the_ellipsoid_matches_a_constrained_minimiser():
    cov, metric, rng = _problem()
    x0 = np.array([REFERENCE[k] for k in REGION_ELEMENTS])
    points = x0 + rng.standard_normal((8, 6)) * 0.05
    points[-1] = x0 + 0.1 * np.sqrt(np.diag(cov))  # inside: distance 0
    got = metric_distance2_to_ellipsoid(pd.DataFrame(points, columns=REGION_ELEMENTS), REFERENCE, cov, 2.0, metric)
    varied = [0, 2, 3, 4, 5]
    inv = np.linalg.inv(cov[np.ix_(varied, varied)])
    for x, d2 in zip(points - x0, got):
        def cost(y, x=x):
            d = x - np.insert(y, 1, 0.0)
            return d @ metric @ d

        best = min((minimize(cost, rng.standard_normal(5) * 1e-3, method="SLSQP", options={"ftol": 1e-15},
                             constraints=[{"type": "ineq", "fun": lambda y: 4.0 - y @ inv @ y}])
                    for _ in range(3)), key=lambda r: r.fun)
        assert d2 == pytest.approx(best.fun, rel=1e-6, abs=1e-12)
    assert got[-1] == 0.0


def test_samples_fill_the_ellipsoid():
    cov, _, _ = _problem(1)
    s = sample_ellipsoid(REFERENCE, cov, 3.0, 4000, seed=2)
    varied = [0, 2, 3, 4, 5]
    d = s[REGION_ELEMENTS].to_numpy() - np.array([REFERENCE[k] for k in REGION_ELEMENTS])
    d[:, 3:] = (d[:, 3:] + 180) % 360 - 180
    r2 = np.einsum("ni,ij,nj->n", d[:, varied], np.linalg.inv(cov[np.ix_(varied, varied)]), d[:, varied]) / 9.0
    assert r2.max() <= 1.0 + 1e-9
    # Uniform in a 5-ball: the radius^5 is uniform on [0, 1].
    assert np.mean(r2 ** 2.5 < 0.5) == pytest.approx(0.5, abs=0.03)
    assert (s["e"] == REFERENCE["e"]).all()


@pytest.mark.parametrize("cov, message", [
    (np.eye(5), r"a finite 6 x 6 matrix"),
    (np.triu(np.ones((6, 6))), r"not symmetric"),
    (np.ones((6, 6)), r"not positive definite on the elements it varies"),
    (np.zeros((6, 6)), r"every variance is 0"),
])
def test_bad_covariances_are_named(cov, message):
    with pytest.raises(ValueError, match=r"orbits\.regions\[0\]\.covariance: " + message):
        region_ellipsoid({"covariance": cov.tolist()}, "orbits.regions[0]")
