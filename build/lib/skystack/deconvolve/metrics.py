"""Quality measures of deconvolved stamps: noise estimate, NMSE, ellipticity, reduced chi2."""
from __future__ import annotations

import numpy as np

from ..core.units import MAD_TO_SIGMA
from .operators import convolve, psf_spectra


def mad_sigma(stamps) -> np.ndarray:
    """Per-stamp Gaussian noise estimate, 1.4826 x the median absolute deviation."""
    flat = np.asarray(stamps, dtype=np.float64).reshape(len(stamps), -1)
    med = np.median(flat, axis=1, keepdims=True)
    return MAD_TO_SIGMA * np.median(np.abs(flat - med), axis=1)


def nmse(x, truth) -> np.ndarray:
    """Per-stamp normalised squared error ||x - truth||^2 / ||truth||^2."""
    x = np.asarray(x, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    return np.sum((x - truth) ** 2, axis=(-2, -1)) / np.sum(truth**2, axis=(-2, -1))


def ellipticity(stamps) -> tuple[np.ndarray, np.ndarray]:
    """Ellipticity (e1, e2) from unweighted quadrupole moments of the positive pixels.

    e1 = (Qxx - Qyy) / (Qxx + Qyy), e2 = 2 Qxy / (Qxx + Qyy), moments about the
    centroid; x runs along columns.
    """
    img = np.maximum(np.asarray(stamps, dtype=np.float64), 0)
    ny, nx = img.shape[-2:]
    yy, xx = np.mgrid[:ny, :nx]
    flux = np.sum(img, axis=(-2, -1))
    cx = np.sum(img * xx, axis=(-2, -1)) / flux
    cy = np.sum(img * yy, axis=(-2, -1)) / flux
    dx = xx - cx[..., None, None]
    dy = yy - cy[..., None, None]
    qxx = np.sum(img * dx**2, axis=(-2, -1)) / flux
    qyy = np.sum(img * dy**2, axis=(-2, -1)) / flux
    qxy = np.sum(img * dx * dy, axis=(-2, -1)) / flux
    return (qxx - qyy) / (qxx + qyy), 2 * qxy / (qxx + qyy)


def reduced_chi2(stamps, psfs, deconvolved, noise_sigma) -> np.ndarray:
    """Per stamp, mean((Y - H X)^2) / sigma^2: about 1 when the model leaves only noise."""
    stamps = np.asarray(stamps, dtype=np.float64)
    if len(stamps) == 0:
        return np.zeros(0)
    spec = psf_spectra(psfs, stamps.shape[1:], dtype="float64")
    model = np.asarray(convolve(np.asarray(deconvolved, dtype=np.float64), spec))
    return np.mean((stamps - model) ** 2, axis=(1, 2)) / np.asarray(noise_sigma, dtype=np.float64) ** 2
