"""The matched filter: partial sums psi, phi of one orbit on one image.

Per intersection of an orbit with an image, with the image's PSF ``P`` (a Gaussian of the
indexed width, optionally widened by smoothing) centred at the sub-pixel position, and data
``d`` in ADU scaled to nanomaggies by the zero point (``c`` ADU per nmgy)::

    psi = sum(d c P) / sigma^2        phi = sum((c P)^2) / sigma^2

so that for a constant-flux object ``sum(psi) / sum(phi)`` is its flux in nmgy and
``sum(psi) / sqrt(sum(phi))`` its combined SNR. Bad (NaN) pixels are left out of both sums.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

class PatchModel(NamedTuple):
    """What the matched filter needs per patch besides its pixels (leading axis = patch)."""

    dx_px: jnp.ndarray  # source position minus the patch's centre pixel, x
    dy_px: jnp.ndarray  # the same in y
    psf_sigma_px: jnp.ndarray  # Gaussian PSF width
    noise_sigma: jnp.ndarray  # pixel noise (ADU)
    adu_per_nmgy: jnp.ndarray  # zero-point scale


@jax.jit
def _matched_filter(patches, model: PatchModel):
    """psi, phi for a batch of patches (float32 PSF model, float64 sums and scaling)."""
    dx_px, dy_px, psf_sigma_px, noise_sigma, adu_per_nmgy = model
    k = patches.shape[-1]
    r = (k - 1) // 2
    off = jnp.arange(-r, r + 1, dtype=jnp.float32)
    sx = psf_sigma_px.astype(jnp.float32)[:, None, None]
    gx = off[None, None, :] - dx_px.astype(jnp.float32)[:, None, None]
    gy = off[None, :, None] - dy_px.astype(jnp.float32)[:, None, None]
    psf = jnp.exp(-(gx * gx + gy * gy) / (2 * sx * sx)) / (2 * jnp.pi * sx * sx)
    good = jnp.isfinite(patches)
    d = jnp.where(good, patches, 0.0)
    p = jnp.where(good, psf, 0.0)
    # float64 sums: a float32 reduction's rounding depends on the patch size, which depends
    # on the widest PSF in the batch, and results must not depend on how work is batched.
    d, p = d.astype(jnp.float64), p.astype(jnp.float64)
    s_dp = jnp.sum(d * p, axis=(1, 2))
    s_pp = jnp.sum(p * p, axis=(1, 2))
    var = noise_sigma.astype(jnp.float64) ** 2
    c = adu_per_nmgy.astype(jnp.float64)
    return s_dp * c / var, s_pp * c * c / var


def matched_filter(patches, x, y, psf_sigma_px, noise_sigma, adu_per_nmgy, batch: int = 65536):
    """Matched-filter terms for patches centred on ``round(x), round(y)``.

    Parameters
    ----------
    patches : ndarray (n, k, k) float32
        Pixels (ADU, background-subtracted), NaN where bad.
    x, y : ndarray (n,)
        Sub-pixel source positions (0-based px) whose nearest pixel is the patch centre.
    psf_sigma_px, noise_sigma, adu_per_nmgy : ndarray (n,)
        Per-intersection PSF width (px), pixel noise (ADU) and zero-point scale.

    Returns
    -------
    psi, phi : ndarray (n,) float64
        In nmgy / nmgy^2 units: flux = psi / phi, snr = psi / sqrt(phi).
    """
    n = len(patches)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    dx = x - np.floor(x + 0.5)
    dy = y - np.floor(y + 0.5)
    psi = np.empty(n)
    phi = np.empty(n)
    size = max(1, min(batch, n))
    for start in range(0, n, size):
        sl = slice(start, min(start + size, n))
        m = sl.stop - sl.start
        pad = size - m  # fixed batch shape: one compilation
        args = [np.asarray(a[sl]) for a in (patches, dx, dy, psf_sigma_px, noise_sigma, adu_per_nmgy)]
        if pad:
            args[0] = np.concatenate([args[0], np.full((pad,) + args[0].shape[1:], np.nan, np.float32)])
            args[1:] = [np.concatenate([a, np.ones(pad)]) for a in args[1:]]
        a, b = _matched_filter(jnp.asarray(args[0]), PatchModel(*(jnp.asarray(v) for v in args[1:])))
        psi[sl] = np.asarray(a)[:m]
        phi[sl] = np.asarray(b)[:m]
    return psi, phi


def patch_radius_px(psf_sigma_px: float, smoothing_sigma_px: float = 0.0) -> int:
    """Patch half-size covering 3 sigma of the (smoothed) PSF."""
    return int(patch_radii_px(np.asarray(psf_sigma_px), smoothing_sigma_px))


def patch_radii_px(psf_sigma_px: np.ndarray, smoothing_sigma_px: float = 0.0) -> np.ndarray:
    """``patch_radius_px`` for an array of PSF widths."""
    return np.ceil(3.0 * np.hypot(np.asarray(psf_sigma_px, np.float64), smoothing_sigma_px)).astype(np.int64)


# ----------------------------------------------------------------------------- shard driver
def _crop_to_own_radius(patches: np.ndarray, sigma_px: np.ndarray) -> np.ndarray:
    """NaN outside each intersection's own patch radius: the patches of a batch share the
    widest PSF's size, and the sums must not depend on which images share the batch."""
    radius = patch_radii_px(sigma_px)
    half = patches.shape[-1] // 2
    if (radius >= half).all():
        return patches
    offset = np.abs(np.arange(-half, half + 1))
    outside = (offset[None, :, None] > radius[:, None, None]) | (offset[None, None, :] > radius[:, None, None])
    return np.where(outside, np.float32(np.nan), patches)


