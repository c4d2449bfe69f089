"""The operators of :mod:`.operators` on chunks of stamps laid out (ny, nx, n_stamps).

The sparse solver spends nearly all its time here, so the layout and the transforms are
chosen for a CPU:

* Stamp axis last. Every per-pixel operation then runs across stamps in SIMD lanes with no
  boundary tests in the inner loop, and a starlet shift along either image axis is a shift
  of whole rows of lanes. Per-stamp sums are column reductions, one lane per stamp, so a
  stamp's sums do not depend on its neighbours.
* PSF convolution by DFT matrices instead of FFTs. The 'same'-size convolution needs a
  circular size N >= n + max(c, s - 1 - c) (61 for 41 px stamps and PSFs) but only n of N
  inputs are non-zero and only n outputs are kept. Matrix transforms skip the zeros that an
  FFT would pad and transform; taking the origin at the stamp centre makes the cosine part
  even and the sine part odd, so folding the stamp about its centre halves the products
  again. The matrix products are shared by all stamps of a chunk, so they run as large GEMMs.

Transform conventions (one axis of length n, circular size N, centre c = (n - 1) // 2,
offsets t = j - c): ``cos[k, t] = cos(2 pi k t / N)`` and ``sin[k, t] = sin(2 pi k t / N)``
for k = 0 .. N // 2 (sine rows 0 and N / 2 are zero and kept for uniform shapes). The
centred DFT is then ``X[k] = (cos x)[k] - i (sin x)[k]``, and for a real signal
``x = sum_k w_k (cos^T Xc + sin^T Xs)`` with ``w_k = 1/N`` at k = 0 and N / 2, else 2/N.
The PSF multiplication needs the full 2-D spectrum of a real image: rows +p and -p of the
half spectrum (columns k = 0 .. N // 2), which the four real cos/sin products give.

Boundary convention as in :mod:`.operators`: pixels outside a stamp are zero, for the PSF
convolution and for every a trous smoothing.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .operators import B3_TAPS

lax = jax.lax


class DftAxis(NamedTuple):
    """Folded DFT matrices of one image axis (see the module notes); t = 0 .. half."""

    cos: np.ndarray     # (K, half + 1): cos(2 pi k t / N)
    sin: np.ndarray     # (K, half + 1): sin(2 pi k t / N), zero at t = 0
    weight: np.ndarray  # (K,): w_k of the inverse
    centre: int         # c: index of offset 0
    half: int           # largest |t| on the stamp
    n_fft: int          # N


def _kernel_reach(n: int, s: int) -> tuple[int, int]:
    """Kernel offsets (left, right of the centre (s - 1) // 2) that can join two of n
    pixels; entries farther out never touch the stamp."""
    c = (s - 1) // 2
    return min(c, n - 1), min(s - 1 - c, n - 1)


def exact_size(n: int, s: int) -> int:
    """Smallest circular size at which circular convolution by an s-pixel kernel equals
    the 'same'-size linear one on n pixels: no wrapped term lands on the stamp."""
    return n + max(_kernel_reach(n, s))


@functools.lru_cache(maxsize=64)
def dft_axis(n: int, n_fft: int) -> DftAxis:
    """The folded DFT matrices of an n-pixel axis at circular size ``n_fft``."""
    centre = (n - 1) // 2
    half = max(centre, n - 1 - centre)
    k = np.arange(n_fft // 2 + 1)[:, None]
    t = np.arange(half + 1)[None, :]
    phase = 2 * np.pi * k * t / n_fft
    self_conjugate = (k[:, 0] == 0) | (2 * k[:, 0] == n_fft)
    weight = np.where(self_conjugate, 1.0, 2.0) / n_fft
    return DftAxis(np.cos(phase), np.sin(phase), weight, centre, half, n_fft)


def _kernel_dft(offsets: np.ndarray, axis: DftAxis):
    """cos and sin of 2 pi k t / N for k = 0 .. N // 2 and kernel offsets t."""
    phase = 2 * np.pi * np.arange(len(axis.weight))[:, None] * offsets[None, :] / axis.n_fft
    return np.cos(phase), np.sin(phase)


def psf_multipliers(psfs, stamp_shape, axes: tuple[DftAxis, DftAxis]) -> np.ndarray:
    """Per-stamp PSF spectra for :func:`convolve`, float64, shape (n, 4, Ky, Kx).

    Planes: real and imaginary parts of the spectrum H(p, k) = sum K[t, u] e^(-2 pi i
    (p t / Ny + k u / Nx)) of the kernel K (offsets t, u from its centre) at rows +p and
    -p, each scaled by the inverse weights w_p w_k / 2 so that the inverse transform needs
    no scaling. Matrix products of the kernel with the DFT matrices, for any N (an FFT of
    a prime size such as 61 is slow).
    """
    ay, ax = axes
    psfs = np.asarray(psfs, dtype=np.float64)
    (ly, hy), (lx, hx) = (_kernel_reach(n, s) for n, s in zip(stamp_shape, psfs.shape[-2:]))
    cy, cx = ((s - 1) // 2 for s in psfs.shape[-2:])
    kernel = psfs[..., cy - ly:cy + hy + 1, cx - lx:cx + hx + 1]
    cos_y, sin_y = _kernel_dft(np.arange(-ly, hy + 1), ay)
    cos_x, sin_x = _kernel_dft(np.arange(-lx, hx + 1), ax)
    # H(+p) = (cos_y - i sin_y) K (cos_x - i sin_x)^T, H(-p) the same with +i sin_y
    t_re, t_im = kernel @ cos_x.T, -(kernel @ sin_x.T)
    a, b = cos_y @ t_re, sin_y @ t_im
    c, d = cos_y @ t_im, sin_y @ t_re
    scale = (ay.weight[:, None] * ax.weight[None, :]) / 2
    return np.stack([a + b, c - d, a - b, c + d], axis=1) * scale


def _fold(a, axis: DftAxis, dim: int):
    """Even and odd parts of ``a`` about the centre along ``dim``, t = 0 .. half:
    a[c + t] + a[c - t] and a[c + t] - a[c - t] (zero off the stamp). The even part counts
    a[c] twice, which the analysis matrix corrects; the odd part is zero at t = 0."""
    n, c, h = a.shape[dim], axis.centre, axis.half
    pad = [(0, 0)] * a.ndim
    pad[dim] = (h - c, h - (n - 1 - c))
    a = jnp.pad(a, pad)                            # centre at index h
    pos = lax.slice_in_dim(a, h, 2 * h + 1, axis=dim)
    neg = lax.rev(lax.slice_in_dim(a, 0, h + 1, axis=dim), (dim,))
    return pos + neg, pos - neg


def _unfold(even, odd, axis: DftAxis, n: int, dim: int):
    """Inverse of the folding: a[c + t] = even[t] + odd[t], a[c - t] = even[t] - odd[t]
    (odd[0] = 0, so both give a[c])."""
    left = lax.slice_in_dim(even - odd, 1, axis.half + 1, axis=dim)
    full = jnp.concatenate([lax.rev(left, (dim,)), even + odd], axis=dim)
    lo = axis.half - axis.centre
    return lax.slice_in_dim(full, lo, lo + n, axis=dim)


class Convolver(NamedTuple):
    """The DFT matrices of a stamp shape in the working dtype, built once per solve.

    Along y (axis 0) a transform is one GEMM, (K, n) @ (n, nx B). Along x (axis 1) it is a
    GEMM batched over axis 0 with the matrix repeated per batch (the ``*_x`` repeats):
    written so, every operand is already in the layout the GEMM wants, where a plain
    contraction over the middle axis makes XLA transpose the operand and the result, each
    transpose a slow pass of its own.
    """

    axes: tuple        # (DftAxis along y, DftAxis along x)
    analyse_y: tuple   # cos (first column halved), sin: (Ky, hy + 1) each
    synth_y: tuple     # cos^T, sin^T: (hy + 1, Ky)
    analyse_x: tuple   # (Ky, Kx, hx + 1), repeated over the Ky rows
    synth_x: tuple     # (Ky, hx + 1, Kx)


def _analysis(axis: DftAxis):
    cos = axis.cos.copy()
    cos[:, 0] *= 0.5                                # the even part holds 2 a[c]
    return cos, axis.sin


def convolver(shape, fft_shape, dtype) -> Convolver:
    """:class:`Convolver` for (ny, nx) stamps at circular sizes ``fft_shape``
    (:func:`exact_size`)."""
    ay, ax = (dft_axis(n, m) for n, m in zip(shape, fft_shape))
    ky = len(ay.weight)

    def const(m):
        return jnp.asarray(m, dtype)

    def repeat(m):
        return jnp.broadcast_to(const(m), (ky,) + m.shape)

    return Convolver((ay, ax), tuple(map(const, _analysis(ay))), (const(ay.cos.T), const(ay.sin.T)),
                     tuple(map(repeat, _analysis(ax))), (repeat(ax.cos.T), repeat(ax.sin.T)))


def _apply(matrix, a, dim: int):
    """matrix @ a along ``dim`` of a (n0, n1, B); along dim 1 ``matrix`` is repeated per row."""
    if dim == 0:
        return jnp.tensordot(matrix, a, axes=1)
    return lax.dot_general(matrix, a, (((2,), (1,)), ((0,), (0,))))


def _analyse(a, axis: DftAxis, mats, dim: int):
    """cos and sin coefficients of ``a`` along ``dim``."""
    even, odd = _fold(a, axis, dim)
    return _apply(mats[0], even, dim), _apply(mats[1], odd, dim)


def _synthesise(c_part, s_part, axis: DftAxis, mats, n: int, dim: int):
    """cos^T c_part + sin^T s_part along ``dim`` (the inverse weights are in the PSF planes)."""
    return _unfold(_apply(mats[0], c_part, dim), _apply(mats[1], s_part, dim), axis, n, dim)


def _spectrum(x, op: Convolver):
    """(ny, nx, B) -> the four products X_ab (Ky, Kx, B), a the y basis, b the x basis."""
    ay, ax = op.axes
    zc, zs = _analyse(x, ay, op.analyse_y, 0)                 # (Ky, nx, B) each
    xcc, xcs = _analyse(zc, ax, op.analyse_x, 1)
    xsc, xss = _analyse(zs, ax, op.analyse_x, 1)
    return xcc, xcs, xsc, xss


def _image(ycc, ycs, ysc, yss, op: Convolver, shape):
    ay, ax = op.axes
    ny, nx = shape
    u_c = _synthesise(ycc, ycs, ax, op.synth_x, nx, 1)       # (Ky, nx, B), y basis cos
    u_s = _synthesise(ysc, yss, ax, op.synth_x, nx, 1)
    return _synthesise(u_c, u_s, ay, op.synth_y, ny, 0)


def _multiply(spec, mult, adjoint: bool):
    """Multiply the spectrum by the PSF's (its conjugate for the adjoint), in real arithmetic.

    With X(+p, k) = (xcc - xss) - i (xsc + xcs) and X(-p, k) = (xcc + xss) - i (xcs - xsc)
    (first letter: the basis along y), the products are split back into the four planes.
    """
    xcc, xcs, xsc, xss = spec
    hp_re, hp_im, hm_re, hm_im = (mult[i] for i in range(4))
    if adjoint:
        hp_im, hm_im = -hp_im, -hm_im
    p_re, p_im = xcc - xss, -(xsc + xcs)
    m_re, m_im = xcc + xss, xsc - xcs
    yp_re, yp_im = hp_re * p_re - hp_im * p_im, hp_re * p_im + hp_im * p_re
    ym_re, ym_im = hm_re * m_re - hm_im * m_im, hm_re * m_im + hm_im * m_re
    return yp_re + ym_re, -(yp_im + ym_im), ym_im - yp_im, ym_re - yp_re


def convolve(x, mult, op: Convolver, adjoint: bool = False):
    """H x (or H^T x) for a chunk x (ny, nx, B); ``mult`` (4, Ky, Kx, B) from
    :func:`psf_multipliers`."""
    return _image(*_multiply(_spectrum(x, op), mult, adjoint), op, x.shape[:2])


# ---------------------------------------------------------------------------------------
# Starlet, bands on axis 0, images on the two axes after it
# ---------------------------------------------------------------------------------------
#: The B3 taps times 16, so that the smoothing is (6 c + 4 (...) + (...)) / 16.
_B3_TIMES_16 = tuple(int(round(16 * t)) for t in B3_TAPS)


def _smooth_axis(c, step: int, axis: int, norm):
    """B3-spline smoothing with holes of ``step`` pixels along ``axis``, zero outside.

    ``norm`` is the taps' sum (16) passed as data, not as a constant: XLA then keeps a
    division, which it counts as costly and will not recompute inside each consumer. With a
    constant (a multiplication), XLA fuses every level of the a trous cascade into the next
    and into the bands, and repeats each level's taps several times (twice as slow here).
    """
    n = c.shape[axis]
    pad = [(0, 0)] * c.ndim
    pad[axis] = (2 * step, 2 * step)
    padded = jnp.pad(c, pad)

    def tap(k):
        return lax.slice_in_dim(padded, k * step, k * step + n, axis=axis)

    w0, w1, w2 = _B3_TIMES_16[:3]
    # the kernel is symmetric: pair the taps
    return (w2 * c + w1 * (tap(1) + tap(3)) + w0 * (tap(0) + tap(4))) / norm


def _smooth(c, level: int, norm):
    step = 2**level
    return _smooth_axis(_smooth_axis(c, step, 1, norm), step, 0, norm)


def starlet(x, n_bands: int, norm):
    """Detail bands (n_bands, ny, nx, B) of a chunk x (ny, nx, B), finest first.
    ``norm``: 16, as an array (see :func:`_smooth_axis`)."""
    bands = []
    for level in range(n_bands):
        smoother = _smooth(x, level, norm)
        bands.append(x - smoother)
        x = smoother
    return jnp.stack(bands)


def starlet_adjoint(coeffs, norm):
    """Exact adjoint of :func:`starlet`, coarsest band inwards (see operators.starlet_adjoint)."""
    n_bands = coeffs.shape[0]
    acc = coeffs[-1] - _smooth(coeffs[-1], n_bands - 1, norm)
    for level in range(n_bands - 2, -1, -1):
        acc = coeffs[level] + _smooth(acc - coeffs[level], level, norm)
    return acc
