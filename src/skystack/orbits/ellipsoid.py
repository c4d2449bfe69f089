"""Regions given as a covariance: the ellipsoid ``(x - x0)^T C^-1 (x - x0) <= n_sigma^2``.

An orbit fitted to a short arc comes with a 6 x 6 covariance whose elements are strongly
correlated, so its ellipsoid fills a small part of the box of its marginal widths. The box is
covered as usual (``covering.covering_lattice``) and the trials that no orbit of the ellipsoid
can need are dropped: those whose track distance to the ellipsoid, in the covering's metric M,
is more than ``KEEP_RADII`` covering radii (the metric is taken at the reference; the margin
absorbs its change over the box, where the covering's own tiles use their local metric).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .covering import REGION_ELEMENTS
from .table import ELEMENT_COLUMNS

#: Trials within this many covering radii of the ellipsoid (metric distance) are kept.
KEEP_RADII = 2.0
_ANGLES = np.array([c in ("node_deg", "argperi_deg", "mean_anomaly_deg") for c in REGION_ELEMENTS])


def region_ellipsoid(spec: dict, where: str) -> tuple[np.ndarray, float]:
    """The covariance (6 x 6, REGION_ELEMENTS order and units) and n_sigma of a region spec."""
    cov = np.asarray(spec.get("covariance"), dtype=np.float64)
    n_sigma = float(spec.get("n_sigma", 3.0))
    if cov.shape != (6, 6) or not np.isfinite(cov).all():
        raise ValueError(f"{where}.covariance: a finite 6 x 6 matrix over {', '.join(REGION_ELEMENTS)}")
    if not np.allclose(cov, cov.T, rtol=1e-9, atol=0.0):
        raise ValueError(f"{where}.covariance: not symmetric")
    if not (np.isfinite(n_sigma) and n_sigma > 0):
        raise ValueError(f"{where}.n_sigma: must be > 0 (got {n_sigma})")
    varied = np.flatnonzero(np.diag(cov) > 0)
    if len(varied) == 0:
        raise ValueError(f"{where}.covariance: every variance is 0 (a region of one orbit: use orbits.source: file)")
    sub = cov[np.ix_(varied, varied)]
    lam = np.linalg.eigvalsh(sub)
    if lam.min() <= 1e-12 * lam.max():
        raise ValueError(f"{where}.covariance: not positive definite on the elements it varies "
                         f"({', '.join(REGION_ELEMENTS[i] for i in varied)}; eigenvalues {lam.min():.3g} to "
                         f"{lam.max():.3g})")
    return cov, n_sigma


def ellipsoid_half_width(cov: np.ndarray, n_sigma: float) -> dict:
    """The box that holds the ellipsoid: n_sigma marginal sd per element."""
    return {k: float(n_sigma * np.sqrt(max(cov[i, i], 0.0))) for i, k in enumerate(REGION_ELEMENTS)}


def _offsets(orbits: pd.DataFrame, reference: dict) -> np.ndarray:
    x = orbits[REGION_ELEMENTS].to_numpy(np.float64) - np.array([reference[k] for k in REGION_ELEMENTS])
    x[:, _ANGLES] = (x[:, _ANGLES] + 180.0) % 360.0 - 180.0
    return x


def metric_distance2_to_ellipsoid(orbits: pd.DataFrame, reference: dict, cov: np.ndarray, n_sigma: float,
                                  metric: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Squared metric distance ``min_{y in E} (x - y)^T M (x - y)`` of each orbit x to the
    ellipsoid E (0 inside). In whitened coordinates (E the unit ball) the nearest point is
    ``(M_z + mu I)^-1 M_z z`` with mu >= 0 where it meets the sphere, found by bisection."""
    varied = np.flatnonzero(np.diag(cov) > 0)
    chol = np.linalg.cholesky(cov[np.ix_(varied, varied)]) * n_sigma
    x = _offsets(orbits, reference)
    rest = np.delete(np.arange(6), varied)
    m_vv, m_vr, m_rr = (metric[np.ix_(varied, varied)], metric[np.ix_(varied, rest)], metric[np.ix_(rest, rest)])
    # Offsets in elements the region does not vary cannot be undone: complete the square, so that
    # they shift the varied target by M_vv^+ M_vr x_r and add their Schur complement.
    x_r = x[:, rest]
    shift = np.linalg.pinv(m_vv) @ m_vr
    fixed = np.einsum("ni,ij,nj->n", x_r, m_rr - m_vr.T @ shift, x_r) if len(rest) else np.zeros(len(x))
    z = np.linalg.solve(chol, (x[:, varied] + x_r @ shift.T).T).T
    m_z = chol.T @ m_vv @ chol
    m, q = np.linalg.eigh(0.5 * (m_z + m_z.T))
    m = np.clip(m, 0.0, None)
    y = z @ q

    def radius2(mu):  # |nearest point|^2 for multiplier mu > 0 (directions with m = 0 cost nothing)
        return np.sum((m * y / (m + mu[:, None])) ** 2, axis=1)

    tiny = np.full(len(y), 1e-300)
    outside = radius2(tiny) > 1.0
    lo, hi = tiny.copy(), np.full(len(y), max(m.max(), 1e-300))
    for _ in range(200):  # hi large enough that the nearest point is inside the ball
        grow = outside & (radius2(hi) > 1.0)
        if not grow.any():
            break
        hi[grow] *= 4.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        big = radius2(mid) > 1.0
        lo, hi = np.where(big, mid, lo), np.where(big, hi, mid)
    d2 = np.where(outside, np.sum(m * (hi[:, None] * y / (m + hi[:, None])) ** 2, axis=1), 0.0)
    return d2 + np.maximum(fixed, 0.0)


def prune_to_ellipsoid(trials: pd.DataFrame, reference: dict, cov: np.ndarray, n_sigma: float, metric: np.ndarray,
                       covering_radius2: float, start_id: int) -> pd.DataFrame:
    """The trials of the box's covering within KEEP_RADII covering radii of the ellipsoid,
    renumbered from ``start_id``."""
    d2 = metric_distance2_to_ellipsoid(trials, reference, cov, n_sigma, metric)
    kept = trials[d2 <= KEEP_RADII**2 * covering_radius2].reset_index(drop=True)
    return kept.assign(orbit_id=np.arange(start_id, start_id + len(kept), dtype=np.int64))


def sample_ellipsoid(reference: dict, cov: np.ndarray, n_sigma: float, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` orbits drawn uniformly from the ellipsoid (an orbit table)."""
    rng = np.random.default_rng(seed)
    varied = np.flatnonzero(np.diag(cov) > 0)
    k = len(varied)
    g = rng.standard_normal((n, k))
    ball = g / np.linalg.norm(g, axis=1, keepdims=True) * rng.uniform(0, 1, (n, 1)) ** (1.0 / k)
    x = np.tile(np.array([reference[c] for c in REGION_ELEMENTS]), (n, 1))
    x[:, varied] += ball @ (np.linalg.cholesky(cov[np.ix_(varied, varied)]) * n_sigma).T
    table = pd.DataFrame(x, columns=REGION_ELEMENTS)
    for c in ("node_deg", "argperi_deg", "mean_anomaly_deg"):
        table[c] = table[c] % 360.0
    table.insert(0, "orbit_id", np.arange(n, dtype=np.int64))
    table["epoch_jd_tdb"] = float(reference["epoch_jd_tdb"])
    return table[["orbit_id", *ELEMENT_COLUMNS]]
