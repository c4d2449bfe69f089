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


#: Fit quality the component search stops at: the flux a PSF-fit of the PSF itself recovers
#: (sky-limited weights) is within this fraction of one, and the misplaced flux (sum of
#: absolute residuals over the PSF's sum) is below ``MAX_L1_RESIDUAL``.
MAX_FLUX_BIAS = 2e-3
MAX_L1_RESIDUAL = 0.03
MAX_COMPONENTS = 5


@dataclass(frozen=True)
class PsfFit:
    """A mixture fitted to a pixelised PSF, and how well it fits.

    flux_bias : ``sum(m p) / sum(m m) - 1`` for the unit-sum mixture ``m`` and PSF ``p``: the
        relative error of a sky-limited PSF-fit flux of a star whose PSF is ``p``
    l1_residual : ``sum |m - p| / sum p``, the fraction of the PSF's light misplaced
    """

    mixture: PsfMixture
    flux_bias: float
    l1_residual: float

    @property
    def n_components(self) -> int:
        return self.mixture.n_components


def _moments(img, center):
    ny, nx = img.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    pos = np.clip(img, 0, None)
    cx = (pos * x).sum() / pos.sum() - center[0]
    cy = (pos * y).sum() / pos.sum() - center[1]
    # Moments of the core only: the wings of a Moffat make the plain second moment diverge.
    core = pos * (pos >= 0.05 * pos.max())
    var = 0.5 * ((core * ((x - center[0] - cx) ** 2 + (y - center[1] - cy) ** 2)).sum() / core.sum())
    return cx, cy, np.sqrt(max(var, 0.1))


def _pack(amp, mean, sx, sy, rho):
    return np.concatenate([[np.log(a), m[0], m[1], np.log(a_), np.log(b_), np.arctanh(r)]
                           for a, m, a_, b_, r in zip(amp, mean, sx, sy, rho)])


def _fit_k(img, center, p0, k):
    def resid(p):
        return (mixture_image(_unpack(p, k), img.shape, center) - img).ravel()

    # A capped budget: a Gaussian PSF makes a mixture degenerate, and the fit then wanders
    # along a flat valley to no benefit.
    fit = least_squares(resid, p0, method="lm", xtol=1e-10, ftol=1e-10, max_nfev=200 * k)
    return fit.x, float(np.sum(fit.fun ** 2))


def _quality(mix: PsfMixture, img, center) -> PsfFit:
    unit = PsfMixture(mix.amp / mix.amp.sum(), mix.mean_px, mix.cov_px2)
    m = mixture_image(unit, img.shape, center)
    return PsfFit(unit, float((m * img).sum() / (m * m).sum() - 1.0), float(np.abs(m - img).sum() / img.sum()))


def fit_psf_mixture(psf_image: np.ndarray, max_components: int = MAX_COMPONENTS,
                    max_flux_bias: float = MAX_FLUX_BIAS, max_l1_residual: float = MAX_L1_RESIDUAL) -> PsfFit:
    """The smallest Gaussian mixture (1 to ``max_components``) that fits a pixelised PSF.

    Components are added one at a time, each new one wider than the widest so far (a PSF's
    wings: Moffat, the SDSS power-law wing, a PSFEx halo), starting from the previous fit; the
    search stops at the first mixture whose flux bias and misplaced light (see
    :class:`PsfFit`) are below the limits, else returns the best one tried; a fit with a
    component wider than half the stamp ends the search (the previous mixture stands). The least-squares
    fit is unweighted, as a sky-limited PSF fit of a star is. The image is normalised to unit
    sum, its centre is pixel ((nx-1)/2, (ny-1)/2), and the mixture is evaluated at pixel
    centres, so the pixel response the image already holds is not added again.
    """
    img = np.asarray(psf_image, dtype=float)
    img = np.where(np.isfinite(img), img, 0.0)
    img = img / img.sum()
    ny, nx = img.shape
    center = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    cx, cy, sigma = _moments(img, center)
    p = _pack([1.0], [(cx, cy)], [sigma], [sigma], [0.0])
    best = None
    widest_allowed = 0.5 * max(nx, ny)
    for k in range(1, max_components + 1):
        if k > 1:
            prev = _unpack(p, k - 1)
            widest = float(np.sqrt(np.max(np.linalg.eigvalsh(prev.cov_px2))))
            p = np.concatenate([p, _pack([0.1 * prev.amp.sum()], [(cx, cy)], [2.0 * widest], [2.0 * widest],
                                         [0.0])])
        p_new, _ = _fit_k(img, center, p, k)
        mix = _unpack(p_new, k)
        with np.errstate(all="ignore"):
            widths = np.sqrt(np.max(np.linalg.eigvalsh(mix.cov_px2), axis=-1)) if np.isfinite(mix.cov_px2).all() \
                else np.array([np.inf])
        if best is not None and not (np.isfinite(mix.amp).all() and np.all(widths <= widest_allowed)):
            # A component wider than the stamp is not a PSF wing but a pedestal the stamp cannot
            # constrain (its width runs away): the fewer components fitted so far stand.
            break
        p = p_new
        q = _quality(mix, img, center)
        if best is None or abs(q.flux_bias) + q.l1_residual < abs(best.flux_bias) + best.l1_residual:
            best = q
        if abs(q.flux_bias) <= max_flux_bias and q.l1_residual <= max_l1_residual:
            return q
    return best


def fit_psf_image(psf_image: np.ndarray, n_components: int | None = None) -> PsfMixture:
    """A Gaussian mixture for a pixelised PSF (see :func:`fit_psf_mixture`).

    ``n_components`` fixes the mixture size; None (the default) lets the fit's residual choose it.
    Weights sum to one so that fluxes are conserved; means are relative to the image centre.
    """
    if n_components is None:
        return fit_psf_mixture(psf_image).mixture
    return fit_psf_mixture(psf_image, max_components=n_components, max_flux_bias=0.0,
                           max_l1_residual=0.0).mixture
