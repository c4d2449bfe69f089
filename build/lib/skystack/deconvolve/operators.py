"""Linear operators of the deconvolution: the starlet transform and its adjoint, and the
PSF convolution (zero-padded FFT, 'same' size) with its adjoint, the correlation.

Boundary convention: pixels outside a stamp are zero. Each a trous smoothing of the starlet
is applied with zeros outside, scale after scale, so each smoothing matrix is symmetric and
the adjoint is exact and costs the same as the forward transform.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

lax = jax.lax

#: B3-spline smoothing kernel of the starlet, applied separably along each axis.
B3_TAPS = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def _smooth_axis(c, step: int, axis: int):
    """B3-spline smoothing with holes of ``step`` pixels along ``axis``, zero outside.

    The kernel is symmetric, so with zero boundaries this operator is its own adjoint.
    """
    n = c.shape[axis]
    pad = [(0, 0)] * c.ndim
    pad[axis] = (2 * step, 2 * step)
    padded = jnp.pad(c, pad)
    out = B3_TAPS[2] * c
    for k in (0, 1, 3, 4):
        out = out + B3_TAPS[k] * lax.slice_in_dim(padded, k * step, k * step + n, axis=axis)
    return out


def _smooth(c, level: int):
    """Separable 2-D a trous smoothing at ``level`` (holes of 2**level pixels)."""
    step = 2**level
    return _smooth_axis(_smooth_axis(c, step, -1), step, -2)


def starlet_transform(images, n_scales: int = 4, *, coarse: bool = False):
    """Starlet transform of images (..., ny, nx).

    Parameters
    ----------
    images : array_like, shape (..., ny, nx)
    n_scales : int
        Number of scales counting the coarse one; ``n_scales - 1`` detail bands.
    coarse : bool
        Append the coarse (smooth) scale as the last band; then the bands sum to the
        input exactly.

    Returns
    -------
    jax.Array, shape (..., n_scales - 1 [+ 1], ny, nx)
        Detail bands, finest first.
    """
    if n_scales < 2:
        raise ValueError(f"n_scales must be at least 2 (one detail band), got {n_scales}")
    c = jnp.asarray(images)
    bands = []
    for level in range(n_scales - 1):
        smoother = _smooth(c, level)
        bands.append(c - smoother)
        c = smoother
    if coarse:
        bands.append(c)
    return jnp.stack(bands, axis=-3)


def starlet_adjoint(coeffs):
    """Exact adjoint of :func:`starlet_transform` without the coarse scale.

    Parameters
    ----------
    coeffs : array_like, shape (..., n_bands, ny, nx)

    Returns
    -------
    jax.Array, shape (..., ny, nx)

    Notes
    -----
    Band j is ``(I - S_j) S_{j-1} ... S_0 x`` with symmetric smoothers ``S``; the adjoint
    is evaluated from the coarsest band inwards, one smoothing per band, the same cost as
    the forward transform.
    """
    coeffs = jnp.asarray(coeffs)
    n_bands = coeffs.shape[-3]
    last = coeffs[..., n_bands - 1, :, :]
    acc = last - _smooth(last, n_bands - 1)
    for level in range(n_bands - 2, -1, -1):
        band = coeffs[..., level, :, :]
        acc = band + _smooth(acc - band, level)
    return acc


@functools.lru_cache(maxsize=32)
def starlet_norm_sq(shape: tuple[int, int], n_scales: int = 4, n_iter: int = 200) -> float:
    """Squared spectral norm ||Phi||^2 of the starlet (no coarse scale) on ``shape`` stamps.

    Estimated once per (shape, n_scales) by power iteration on Phi^T Phi in float64.
    """
    fwd = jax.jit(lambda x: starlet_adjoint(starlet_transform(x, n_scales)))
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape))
    value = 0.0
    for _ in range(n_iter):
        y = fwd(x)
        value = float(jnp.linalg.norm(y))
        x = y / value
    return value


def _next_fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n, sizes the FFT handles quickly."""
    best = n
    while True:
        m = best
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return best
        best += 1


def fft_shape(stamp_shape, psf_shape) -> tuple[int, int]:
    """FFT size at which circular convolution equals 'same' linear convolution.

    The kernel centre is pixel (s - 1) // 2 (scipy's 'same' convention). Wrap-around stays
    outside the stamp when the padded size reaches n + max(c, s - 1 - c).
    """
    out = []
    for n, s in zip(stamp_shape, psf_shape):
        c = (s - 1) // 2
        out.append(_next_fast_len(n + max(c, s - 1 - c)))
    return tuple(out)


def rotate_psfs(psfs):
    """Rotate every PSF of a stack by 180 degrees on its own spatial axes.

    ``np.rot90(stack, 2)`` would instead rotate in the (stamp, row) plane, reversing the
    stack order; that would hand each stamp another stamp's PSF.
    """
    return np.rot90(np.asarray(psfs), 2, axes=(-2, -1))


def psf_spectra(psfs, stamp_shape, dtype="float32"):
    """Real-FFT spectra of the PSFs, centred at the origin of the padded grid.

    Parameters
    ----------
    psfs : array_like, shape (n, sy, sx)
    stamp_shape : (ny, nx)

    Returns
    -------
    jax.Array, complex, shape (n, Ny, Nx // 2 + 1) with (Ny, Nx) = fft_shape(...)
    """
    psfs = np.asarray(psfs, dtype=np.float64)
    sy, sx = psfs.shape[-2:]
    big = fft_shape(stamp_shape, (sy, sx))
    grid = np.zeros(psfs.shape[:-2] + big)
    grid[..., :sy, :sx] = psfs
    # move the kernel centre to pixel (0, 0) so that no output shift is needed
    grid = np.roll(grid, (-((sy - 1) // 2), -((sx - 1) // 2)), axis=(-2, -1))
    spec = np.fft.rfft2(grid)
    ctype = jnp.complex64 if jnp.dtype(dtype) == jnp.float32 else jnp.complex128
    return jnp.asarray(spec, dtype=ctype)


def _fft_conv(x, spec, conj: bool):
    big = (spec.shape[-2], 2 * (spec.shape[-1] - 1))
    ny, nx = x.shape[-2:]
    xs = jnp.fft.rfft2(x, s=big)
    prod = xs * (jnp.conj(spec) if conj else spec)
    return jnp.fft.irfft2(prod, s=big)[..., :ny, :nx].astype(x.dtype)


def convolve(x, spec):
    """H x: 'same'-size linear convolution of x (..., ny, nx) by PSFs given as spectra."""
    return _fft_conv(x, spec, conj=False)


def correlate(x, spec):
    """H^T x: exact adjoint of :func:`convolve` (convolution by the 180-degree-rotated PSF)."""
    return _fft_conv(x, spec, conj=True)


def lipschitz_constants(spec):
    """Per-stamp Lipschitz constant of the data-term gradient, max |FFT(PSF)|^2.

    The 'same' crop can only lower the norm of the circulant, so this bounds
    ||H^T H|| from above, as the step-size condition needs.
    """
    return jnp.max(jnp.abs(spec) ** 2, axis=(-2, -1))
