"""How many noise peaks a search of a region of orbit space should expect above a threshold.

The combined SNR over the orbits of a region is, on noise alone, a smooth Gaussian random field
of unit variance. Two orbits whose tracks are offset by delta have filter outputs correlated by
``mean_i exp(-|J_i delta|^2 / (4 sigma_i^2))``, about ``1 - delta^T M delta`` with the covering's
track metric M (``covering.track_metric``), so the field's gradient has covariance
``Lambda = 2 M``. Trial orbits of a covering are far from independent: nearest neighbours
share most of their SNR. What counts is the expected Euler characteristic of the excursion
set {SNR > u} (Adler and Taylor's Gaussian kinematic formula), which at the thresholds of a
search is the expected number of separate noise peaks above u, i.e. of noise detections after
refinement has climbed to each peak::

    E[chi] = sum_j L_j rho_j(u),   rho_0 = Psi(u),   rho_j = (2 pi)^(-(j+1)/2) He_(j-1)(u) e^(-u^2/2)

L_j are the Lipschitz-Killing curvatures of the box in the metric Lambda: for a box with edges
of metric lengths l_1..l_n and right angles, L_j is the sum over j-subsets of edges of the
products of their lengths (L_0 = 1, L_n the volume). In a skewed metric the subsets' j-volumes
(square roots of Gram determinants) stand for the products; that leaves out the external-angle
correction of a parallelotope's faces, a lower-order term at high u. The metric is taken per
tile of the covering (constant in each) and tiles' faces that are inside the box are not counted.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from numpy.polynomial import hermite_e


def tile_lipschitz_killing(m_u: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One tile's share of the box's L_0..L_n: ``m_u`` the metric M in the tile's coordinates
    u in [-1, 1]^n (n varied elements), ``counts`` the tiles along each of those elements.

    A j-face spanned by edges S is the box's own boundary only where the other elements sit at
    the box's ends: a tile holds 1/prod(counts outside S) of the box's j-volume along S."""
    m_u = np.asarray(m_u, np.float64)
    n = m_u.shape[0]
    counts = np.asarray(counts, np.float64).reshape(n)
    gram = 8.0 * m_u  # edges of u-length 2 in the metric Lambda = 2 M: Gram = 4 Lambda
    out = np.zeros(n + 1)
    for j in range(n + 1):
        for s in itertools.combinations(range(n), j):
            idx = list(s)
            vol = math.sqrt(max(np.linalg.det(gram[np.ix_(idx, idx)]), 0.0)) if j else 1.0
            out[j] += vol / np.prod(np.delete(counts, idx))
    return out


def gaussian_tail(u: float) -> float:
    """P(Z > u) for a standard normal Z (accurate far into the tail, where 1 - Phi is not)."""
    return 0.5 * math.erfc(float(u) / math.sqrt(2.0))


def euler_characteristic_densities(u: float, dimension: int) -> np.ndarray:
    """rho_0(u)..rho_dimension(u) for a unit-variance Gaussian field."""
    rho = np.zeros(dimension + 1)
    rho[0] = gaussian_tail(u)
    for j in range(1, dimension + 1):
        coeffs = np.zeros(j)
        coeffs[j - 1] = 1.0
        rho[j] = (2 * math.pi) ** (-(j + 1) / 2) * hermite_e.hermeval(u, coeffs) * math.exp(-0.5 * u * u)
    return rho


def expected_noise_peaks(lipschitz_killing, snr_threshold: float, snr_sd: float = 1.0) -> float:
    """Expected number of noise peaks above ``snr_threshold`` (never below 0), the SNR field's
    noise spread ``snr_sd`` (1 for the plain matched filter)."""
    lk = np.asarray(lipschitz_killing, np.float64)
    u = float(snr_threshold) / float(snr_sd)
    return float(max(np.dot(lk, euler_characteristic_densities(u, len(lk) - 1)), 0.0))


def threshold_for_noise_peaks(lipschitz_killing, max_noise_peaks: float, snr_sd: float = 1.0) -> float:
    """The lowest SNR threshold of at least 3.5 sd at which the expected noise peaks are at most
    ``max_noise_peaks``, by bisection: above 3.5 (the largest root of He_6 is 3.32) every
    density falls with u, and the Euler characteristic counts peaks."""
    if not max_noise_peaks > 0:
        raise ValueError(f"max_noise_peaks must be > 0 (got {max_noise_peaks})")
    lo = hi = 3.5 * snr_sd
    while expected_noise_peaks(lipschitz_killing, hi, snr_sd) > max_noise_peaks:
        lo, hi = hi, hi * 1.5
    if hi == lo:
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected_noise_peaks(lipschitz_killing, mid, snr_sd) > max_noise_peaks else (lo, mid)
    return hi


def scaled_to_filter(lipschitz_killing, width_ratio: float) -> np.ndarray:
    """The curvatures for a filter ``width_ratio`` times narrower (M scales as 1/sigma^2, so
    L_j as width_ratio^j): the coarse pass plans on smoothed images, refinement works at full
    resolution."""
    lk = np.asarray(lipschitz_killing, np.float64)
    return lk * float(width_ratio) ** np.arange(len(lk))
