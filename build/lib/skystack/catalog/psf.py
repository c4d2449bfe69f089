"""Point-spread functions as small Gaussian mixtures.

The catalog model needs the PSF as a Gaussian mixture so that galaxy profiles (also
Gaussian mixtures) convolve with it analytically. An image gives its PSF either as a
Gaussian sigma (pixels, before pixelisation) or as a pixelised PSF image; the latter is fitted
here with a 2-3 component mixture by least squares on the pixel values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from .model import PIXEL_BOX_VAR_PX2


@dataclass(frozen=True)
class PsfMixture:
    """A PSF as a Gaussian mixture in pixel units, centred on the source.

    Attributes
    ----------
    amp : (K,) component weights, summing to one
    mean_px : (K, 2) component centres (x, y), px
    cov_px2 : (K, 2, 2) component covariances, px^2, pixel response included
    """

    amp: np.ndarray
    mean_px: np.ndarray
    cov_px2: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.amp.size)

    def padded(self, n_components: int) -> "PsfMixture":
        """The same mixture with zero-weight components appended up to ``n_components``."""
        k = self.n_components
        if k > n_components:
            raise ValueError(f"PSF has {k} components, more than {n_components}")
        pad = n_components - k
        eye = np.broadcast_to(np.eye(2), (pad, 2, 2))
        return PsfMixture(np.concatenate([self.amp, np.zeros(pad)]),
                          np.concatenate([self.mean_px, np.zeros((pad, 2))]),
                          np.concatenate([self.cov_px2, eye]))

    def second_moment_px2(self) -> float:
        """Mean of the two diagonal second moments about the centroid (px^2)."""
        c = self.amp @ self.mean_px
        d = self.mean_px - c
        m = np.einsum("k,kij->ij", self.amp, self.cov_px2) + np.einsum("k,ki,kj->ij", self.amp, d, d)
        return float(0.5 * (m[0, 0] + m[1, 1]))


def gaussian_psf(sigma_px: float) -> PsfMixture:
    """A circular Gaussian PSF of ``sigma_px`` (before the pixel response, which is added)."""
    var = float(sigma_px) ** 2 + PIXEL_BOX_VAR_PX2
    return PsfMixture(np.ones(1), np.zeros((1, 2)), var * np.eye(2)[None])


def mixture_image(psf: PsfMixture, shape, center_px) -> np.ndarray:
    """Evaluate a PSF mixture at the pixel centres of an image of ``shape`` (ny, nx)."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    out = np.zeros(shape)
    for a, m, c in zip(psf.amp, psf.mean_px, psf.cov_px2):
        dx, dy = x - center_px[0] - m[0], y - center_px[1] - m[1]
        det = c[0, 0] * c[1, 1] - c[0, 1] ** 2
        q = (c[1, 1] * dx * dx - 2 * c[0, 1] * dx * dy + c[0, 0] * dy * dy) / det
        out += a / (2 * np.pi * np.sqrt(det)) * np.exp(-0.5 * q)
    return out


def _unpack(p, k):
    p = p.reshape(k, 6)
    amp = np.exp(p[:, 0])
    mean = p[:, 1:3]
    sx, sy, rho = np.exp(p[:, 3]), np.exp(p[:, 4]), np.tanh(p[:, 5])
    cov = np.stack([np.stack([sx * sx, rho * sx * sy], -1), np.stack([rho * sx * sy, sy * sy], -1)], -2)
    return PsfMixture(amp, mean, cov)


def fit_psf_image(psf_image: np.ndarray, n_components: int = 2) -> PsfMixture:
    """Fit a Gaussian mixture to a pixelised PSF image.

    The image is normalised to unit sum and its centre is pixel ((nx-1)/2, (ny-1)/2); the
    mixture is evaluated at pixel centres, so the pixel response it already contains is
    not added again. Weights are renormalised to sum to one so that fluxes are conserved.

    Parameters
    ----------
    psf_image : (ny, nx) array, any normalisation
    n_components : number of Gaussians (1-3)

    Returns
    -------
    PsfMixture with means relative to the image centre.
    """
    img = np.asarray(psf_image, dtype=float)
    img = np.where(np.isfinite(img), img, 0.0)
    img = img / img.sum()
    ny, nx = img.shape
    center = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    pos = np.clip(img, 0, None)
    cx, cy = (pos * x).sum() / pos.sum() - center[0], (pos * y).sum() / pos.sum() - center[1]
    var = 0.5 * ((pos * (x - center[0] - cx) ** 2).sum() + (pos * (y - center[1] - cy) ** 2).sum()) / pos.sum()
    sigma = np.sqrt(max(var, 0.1))
    scales = [0.8, 1.4, 2.5][:n_components]
    weights = [0.7, 0.25, 0.05][:n_components]
    p0 = np.concatenate([[np.log(w), cx, cy, np.log(s * sigma), np.log(s * sigma), 0.0]
                         for w, s in zip(weights, scales)])

    def resid(p):
        return (mixture_image(_unpack(p, n_components), img.shape, center) - img).ravel()

    # A capped budget: a Gaussian PSF makes the mixture degenerate, and the fit then
    # wanders along a flat valley to no benefit.
    fit = least_squares(resid, p0, method="lm", xtol=1e-10, ftol=1e-10, max_nfev=300)
    mix = _unpack(fit.x, n_components)
    return PsfMixture(mix.amp / mix.amp.sum(), mix.mean_px, mix.cov_px2)
