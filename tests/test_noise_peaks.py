"""Expected noise peaks of a region search against smooth Gaussian fields made by FFT.

The fields are white noise convolved with a Gaussian kernel of sd s (correlation
exp(-d^2 / (4 s^2)), i.e. the metric M = 1/(4 s^2) per pixel^2), independently of the formula.
The Euler characteristic of {field > u} inside a parallelogram is counted with
scipy.ndimage: components minus the holes that do not reach the region's boundary."""
import numpy as np
import pytest
from scipy import ndimage

from skystack.orbits.noise_peaks import (
    expected_noise_peaks,
    threshold_for_noise_peaks,
    tile_lipschitz_killing,
)

KERNEL_SD_PX = 4.0
EDGES_PX = np.array([[400.0, 0.0], [160.0, 330.0]])  # the parallelogram's two edges (rows), skewed
SHAPE = (512, 768)  # (y, x), the region and the kernel's reach fit inside
ORIGIN_PX = np.array([60.0, 80.0])  # (x, y) of the parallelogram's corner


def _field(rng) -> np.ndarray:
    ky = np.fft.fftfreq(SHAPE[0])[:, None]
    kx = np.fft.fftfreq(SHAPE[1])[None, :]
    transfer = np.exp(-2 * np.pi**2 * KERNEL_SD_PX**2 * (kx**2 + ky**2))  # Gaussian kernel's transform
    f = np.fft.ifft2(np.fft.fft2(rng.standard_normal(SHAPE)) * transfer).real
    return f / np.sqrt(np.mean(transfer**2))  # unit variance (Parseval), not each field's own spread


def _region_mask() -> np.ndarray:
    y, x = np.mgrid[:SHAPE[0], :SHAPE[1]]
    p = np.stack([x - ORIGIN_PX[0], y - ORIGIN_PX[1]], axis=-1)
    coef = p @ np.linalg.inv(EDGES_PX)  # p = c1 e1 + c2 e2
    return ((coef >= 0) & (coef <= 1)).all(axis=-1)


def _euler_characteristic(excursion: np.ndarray, region: np.ndarray) -> int:
    _, n_components = ndimage.label(excursion & region, structure=np.ones((3, 3)))
    background, n_back = ndimage.label(~(excursion & region))  # 4-connected: the dual of 8
    outside = np.unique(background[~region])
    return n_components - (n_back - len(outside[outside > 0]))


def _metric_u() -> np.ndarray:
    """M in the box's coordinates u in [-1, 1]^2: position = centre + B u, B = edges / 2."""
    b = EDGES_PX.T / 2.0
    return b.T @ b / (4 * KERNEL_SD_PX**2)


THRESHOLDS = (2.5, 3.0, 3.5)


@pytest.fixture(scope="module")
def simulated_counts():
    """The Euler characteristic at each threshold of the same 60 fields."""
    rng = np.random.default_rng(20261201)
    region = _region_mask()
    counts = {u: [] for u in THRESHOLDS}
    for _ in range(60):
        field = _field(rng)
        for u in THRESHOLDS:
            counts[u].append(_euler_characteristic(field > u, region))
    return counts


@pytest.mark.parametrize("u", THRESHOLDS)
def test_expected_peaks_match_simulated_gaussian_fields(simulated_counts, u):
    counts = simulated_counts[u]
    predicted = expected_noise_peaks(tile_lipschitz_killing(_metric_u(), [1, 1]), u)
    mean, err = np.mean(counts), np.std(counts) / np.sqrt(len(counts))
    # Within 3 standard errors of the simulation and 8% (pixelisation of the excursion sets).
    assert abs(mean - predicted) < 3 * err + 0.08 * predicted, (u, mean, err, predicted)


def test_tiles_add_up_to_the_box():
    """A constant metric cut into 2 x 3 tiles: the tiles' shares sum to the whole box's curvatures."""
    m_u = _metric_u()
    counts = np.array([2, 3])
    tile = np.diag(1.0 / counts) @ m_u @ np.diag(1.0 / counts)
    np.testing.assert_allclose(6 * tile_lipschitz_killing(tile, counts), tile_lipschitz_killing(m_u, [1, 1]),
                               rtol=1e-12)


def test_threshold_for_noise_peaks_inverts_the_expectation():
    lk = tile_lipschitz_killing(_metric_u(), [1, 1]) * 1e3
    u = threshold_for_noise_peaks(lk, 0.01)
    assert expected_noise_peaks(lk, u) == pytest.approx(0.01, rel=1e-6)
    assert expected_noise_peaks(lk, u - 0.05) > 0.01
