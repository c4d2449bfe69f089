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

#: Patches per kernel call on a CPU: the kernel's float64 intermediates (~1 kB per 11 x 11
#: patch) then stay in the caches, about 3x faster than 128k-patch batches on 2 cores.
CPU_BATCH_PATCHES = 8192
#: Smallest kernel call: fewer patches are padded (to a power of two from here: few shapes).
#: Below 64 patches XLA's CPU reduction adds in another order (1e-15 relative), and the sums
#: must not depend on the batch.
MIN_BATCH_PATCHES = 256
#: Kernel batches gathered at once: fewer, larger gathers share each image's assembled tiles.
GATHER_BATCHES = 2


class PatchModel(NamedTuple):
    """What the matched filter needs per patch besides its pixels (leading axis = patch)."""

    dx_px: jnp.ndarray  # source position minus the patch's centre pixel, x
    dy_px: jnp.ndarray  # the same in y
    psf_sigma_px: jnp.ndarray  # Gaussian PSF width
    noise_sigma: jnp.ndarray  # pixel noise (ADU)
    adu_per_nmgy: jnp.ndarray  # zero-point scale
    background: jnp.ndarray  # float32 ADU subtracted from the pixels (0 for difference images)
    radius_px: jnp.ndarray  # int, the patch's own radius: pixels farther out are left out


@jax.jit
def _matched_filter(patches, model: PatchModel):
    """psi, phi for a batch of patches (float32 PSF model, float64 sums and scaling)."""
    dx_px, dy_px, psf_sigma_px, noise_sigma, adu_per_nmgy, background, radius_px = model
    k = patches.shape[-1]
    r = (k - 1) // 2
    off = jnp.arange(-r, r + 1, dtype=jnp.float32)
    sx = psf_sigma_px.astype(jnp.float32)[:, None]
    # Each patch's own radius: the patches of a batch share the widest PSF's size, and the
    # sums must not depend on which images share the batch.
    inside = jnp.abs(jnp.arange(-r, r + 1))[None, :] <= radius_px[:, None]
    gx = off[None, :] - dx_px.astype(jnp.float32)[:, None]
    gy = off[None, :] - dy_px.astype(jnp.float32)[:, None]
    # The Gaussian is separable: 2k exps per patch instead of k^2 (the kernel's main cost),
    # the same PSF to float32 rounding.
    ex = jnp.where(inside, jnp.exp(-(gx * gx) / (2 * sx * sx)), 0.0)
    ey = jnp.where(inside, jnp.exp(-(gy * gy) / (2 * sx * sx)), 0.0) / (2 * jnp.pi * sx * sx)
    d = patches - background.astype(jnp.float32)[:, None, None]
    good = jnp.isfinite(d)
    d = jnp.where(good, d, 0.0)
    p = jnp.where(good, ey[:, :, None] * ex[:, None, :], 0.0)
    # float64 sums: a float32 reduction's rounding depends on the patch size, which depends
    # on the widest PSF in the batch, and results must not depend on how work is batched.
    d, p = d.astype(jnp.float64), p.astype(jnp.float64)
    s_dp = jnp.sum(d * p, axis=(1, 2))
    s_pp = jnp.sum(p * p, axis=(1, 2))
    var = noise_sigma.astype(jnp.float64) ** 2
    c = adu_per_nmgy.astype(jnp.float64)
    return s_dp * c / var, s_pp * c * c / var


def matched_filter(patches, x, y, psf_sigma_px, noise_sigma, adu_per_nmgy, batch: int = 65536, *,
                   background=None, radius_px=None):
    """Matched-filter terms for patches centred on ``round(x), round(y)``.

    Parameters
    ----------
    patches : ndarray (n, k, k) float32
        Pixels (ADU), NaN where bad.
    x, y : ndarray (n,)
        Sub-pixel source positions (0-based px) whose nearest pixel is the patch centre.
    psf_sigma_px, noise_sigma, adu_per_nmgy : ndarray (n,)
        Per-intersection PSF width (px), pixel noise (ADU) and zero-point scale.
    batch : int
        Patches per kernel call (the results do not depend on it).
    background : ndarray (n,), optional
        ADU subtracted (in float32) from each patch's pixels first; none by default.
    radius_px : ndarray (n,) of int, optional
        Each patch's own radius: pixels farther from the centre are left out of both sums;
        by default all of the patch.

    Returns
    -------
    psi, phi : ndarray (n,) float64
        In nmgy / nmgy^2 units: flux = psi / phi, snr = psi / sqrt(phi).
    """
    patches = np.asarray(patches)
    return gathered_matched_filter(lambda rows: patches[rows], patches.shape[-1], x, y, psf_sigma_px, noise_sigma,
                                   adu_per_nmgy, batch=batch, background=background, radius_px=radius_px)


def gathered_matched_filter(gather, k: int, x, y, psf_sigma_px, noise_sigma, adu_per_nmgy, *, batch: int,
                            background=None, radius_px=None):
    """``matched_filter`` with the patches fetched span by span: ``gather(rows)`` (``rows`` a
    slice) gives the (rows, k, k) pixels (float32) of those intersections. A span is
    ``GATHER_BATCHES`` kernel batches (fewer, larger gathers); each batch is handed to the
    device as soon as it is gathered (JAX dispatches asynchronously), so the host gathers
    the next span while the device filters this one."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n = len(x)
    r = (k - 1) // 2
    dx = x - np.floor(x + 0.5)
    dy = y - np.floor(y + 0.5)
    background = np.zeros(n, np.float32) if background is None else np.asarray(background, np.float32)
    radius_px = np.full(n, r, np.int32) if radius_px is None else np.asarray(radius_px, np.int32)
    per_patch = (dx, dy, np.asarray(psf_sigma_px, np.float64), np.asarray(noise_sigma, np.float64),
                 np.asarray(adu_per_nmgy, np.float64), background, radius_px)
    size = _batch_size(n, batch)
    done = []
    for span in range(0, n, size * GATHER_BATCHES):
        stop = min(span + size * GATHER_BATCHES, n)
        pixels = np.asarray(gather(slice(span, stop)))
        for start in range(span, stop, size):
            sl = slice(start, min(start + size, stop))
            m = sl.stop - sl.start
            # The last batch is padded only to the power of two that holds it (few shapes).
            done.append((m, _filter_batch(pixels[start - span:sl.stop - span], [a[sl] for a in per_patch],
                                          _batch_size(m, size))))
    psi = np.concatenate([np.asarray(a)[:m] for m, (a, _) in done]) if done else np.empty(0)
    phi = np.concatenate([np.asarray(b)[:m] for m, (_, b) in done]) if done else np.empty(0)
    return psi, phi


def _filter_batch(pixels: np.ndarray, model: list, size: int):
    """One kernel call on ``size`` patches, the missing ones NaN padding (fixed shape: one
    compilation); numpy arguments, since jit's own transfer costs far less per call than
    ``jnp.asarray``'s."""
    pad = size - len(pixels)
    if pad:
        pixels = np.concatenate([pixels, np.full((pad,) + pixels.shape[1:], np.nan, pixels.dtype)])
        model = [np.concatenate([a, np.ones(pad, a.dtype)]) for a in model]
    return _matched_filter(pixels, PatchModel(*model))


def _batch_size(n: int, batch: int) -> int:
    """Patches per kernel call: ``batch`` (at least ``MIN_BATCH_PATCHES``), or for fewer
    patches the power of two from ``MIN_BATCH_PATCHES`` that holds them (few shapes)."""
    batch = max(MIN_BATCH_PATCHES, int(batch))
    if n >= batch:
        return batch
    return min(batch, max(MIN_BATCH_PATCHES, 1 << max(0, int(n) - 1).bit_length()))


def patch_radius_px(psf_sigma_px: float, smoothing_sigma_px: float = 0.0) -> int:
    """Patch half-size covering 3 sigma of the (smoothed) PSF."""
    return int(patch_radii_px(np.asarray(psf_sigma_px), smoothing_sigma_px))


def patch_radii_px(psf_sigma_px: np.ndarray, smoothing_sigma_px: float = 0.0) -> np.ndarray:
    """``patch_radius_px`` for an array of PSF widths."""
    return np.ceil(3.0 * np.hypot(np.asarray(psf_sigma_px, np.float64), smoothing_sigma_px)).astype(np.int64)
