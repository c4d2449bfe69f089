"""Space-variant PSF deconvolution of galaxy postage stamps.

Each stamp ``Y_i`` was blurred by the PSF at its own position, ``PSF_i``. For every stamp
we solve

    min_X  1/2 ||Y_i - H_i X||_2^2 + ||W_i * Phi X||_1    subject to  X >= 0

with ``H_i`` the linear ('same' size, zero padded) convolution by ``PSF_i`` and ``Phi``
the isotropic undecimated starlet transform without its coarse scale. The solver is the
Condat-Vu primal-dual iteration with per-stamp step sizes, one reweighting pass
(Candes, Wakin & Boyd) by default, and a per-stamp stopping rule; stamps are independent,
so the stack is processed in fixed-size batches with no communication between stamps.

A low-rank alternative replaces the sparsity term by ``lambda ||X||_*``, the nuclear norm
of the stack seen as an (n_stamps, n_pixels) matrix, which couples all stamps.

Boundary convention: pixels outside a stamp are zero. The PSF convolution is a plain
'same'-size linear convolution, whose adjoint is the correlation (convolution with the PSF
rotated by 180 degrees). The starlet applies each a trous smoothing to the stamp with zeros
outside, scale after scale; each smoothing matrix is then symmetric, so the adjoint is
exact and costs the same as the forward transform.

Arrays are (n_stamps, ny, nx); pixel values are in the units of the input stamps.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .metrics import mad_sigma
from .operators import (
    convolve,
    correlate,
    lipschitz_constants,
    psf_spectra,
    rotate_psfs,
    starlet_adjoint,
    starlet_norm_sq,
    starlet_transform,
)

lax = jax.lax

#: Default band thresholds in units of the noise in each band (finest band first).
DEFAULT_KAPPA = (3.0, 3.0, 4.0)
#: Default dual step; scale free because the dual lives in the units of the stamps.
DEFAULT_DUAL_STEP = 0.5
#: Safety factor on the power-iteration estimate of ||Phi||^2 (it approaches from below).
_NORM_MARGIN = 1.02

#: Smallest jitted batch. XLA fuses the starlet and the per-stamp sums differently when the
#: stamp axis has one or two rows, which changes the last bits; padding every batch to at
#: least this many rows keeps each stamp's result independent of how the stack is split.
MIN_BATCH = 8

_DIAG_COLUMNS = ["stamp", "iterations", "cost", "converged", "noise_sigma", "primal_step", "dual_step"]


# ---------------------------------------------------------------------------------------
# Starlet (isotropic undecimated wavelet, a trous)
# ---------------------------------------------------------------------------------------
_starlet_jit = jax.jit(starlet_transform, static_argnums=1)


# ---------------------------------------------------------------------------------------
# PSF convolution ('same' size, zero padded, via real FFTs)
# ---------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------
# Noise and weights
# ---------------------------------------------------------------------------------------
def band_weights(psfs, noise_sigma, *, n_scales: int = 4, kappa=DEFAULT_KAPPA) -> np.ndarray:
    """Sparsity weights W[i, j] = kappa_j * sigma_i * ||Phi_j(rot180 PSF_i)||_2.

    ``sigma_i ||Phi_j(rot180 PSF_i)||`` is the noise level of band j of the back-projected
    noise ``H_i^T n``. Each PSF is rotated on its own axes (:func:`rotate_psfs`), and the
    transform runs on a zero-padded canvas so that no filter response is cut off.

    Returns
    -------
    np.ndarray, shape (n, n_scales - 1)
    """
    kappa = np.asarray(kappa, dtype=np.float64)
    if kappa.shape != (n_scales - 1,):
        raise ValueError(f"kappa needs one value per detail band ({n_scales - 1}), got {kappa.tolist()}")
    rot = rotate_psfs(psfs).astype(np.float64)
    margin = 2 * (2 ** (n_scales - 1) - 1)
    canvas = np.pad(rot, ((0, 0), (margin, margin), (margin, margin)))
    bands = np.asarray(_starlet_jit(jnp.asarray(canvas), n_scales))
    norms = np.sqrt(np.sum(bands**2, axis=(-2, -1)))
    sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float64), (len(rot),))
    return kappa[None, :] * sigma[:, None] * norms


def step_sizes(lipschitz, phi_norm_sq: float, dual_step: float = DEFAULT_DUAL_STEP):
    """Condat-Vu steps: tau = 1 / (beta/2 + sigma ||Phi||^2), which meets
    1/tau - sigma ||Phi||^2 >= beta / 2 with equality (rho < 1 keeps the margin)."""
    lipschitz = np.asarray(lipschitz, dtype=np.float64)
    return 1.0 / (lipschitz / 2.0 + dual_step * phi_norm_sq), np.full_like(lipschitz, dual_step)


# ---------------------------------------------------------------------------------------
# Sparse solver: one stamp, vmapped and jitted at module level
# ---------------------------------------------------------------------------------------
class _State(NamedTuple):
    x: jax.Array          # primal estimate (ny, nx)
    hx: jax.Array         # H x, kept so the cost needs no extra convolution
    phix: jax.Array       # Phi x (bands, ny, nx)
    u: jax.Array          # dual variable (bands, ny, nx)
    cost: jax.Array       # cost at x with the current weights
    k_pass: jax.Array     # iterations in this reweighting pass
    k_total: jax.Array    # iterations over all passes
    done: jax.Array       # relative cost change fell below tol in this pass


def _stalled(cost, previous, tol):
    """The stopping rule |cost_k - cost_{k-1}| <= tol |cost_{k-1}|, never met when tol is 0:
    a float32 cost often repeats exactly long before convergence, and tol = 0 promises
    max_iter iterations."""
    return jnp.logical_and(tol > 0, jnp.abs(cost - previous) <= tol * jnp.abs(previous))


def _sparse_cost(y, hx, phix, w):
    return 0.5 * jnp.sum((y - hx) ** 2) + jnp.sum(jnp.abs(w * phix))


def _sparse_pass(state: _State, y, spec, w, tau, sigma, rho, tol, max_iter):
    """Condat-Vu iterations for one stamp until its relative cost change is below tol."""

    def cond(s):
        return jnp.logical_and(~s.done, s.k_pass < max_iter)

    def body(s):
        grad = correlate(s.hx - y, spec)
        x_half = jnp.maximum(s.x - tau * (grad + starlet_adjoint(s.u)), 0)
        phi_half = starlet_transform(x_half, s.phix.shape[0] + 1)
        # prox of sigma f^*, f the weighted l1 norm: projection on the box |u| <= w
        u_half = jnp.clip(s.u + sigma * (2 * phi_half - s.phix), -w, w)
        hx_half = convolve(x_half, spec)
        x = s.x + rho * (x_half - s.x)
        hx = s.hx + rho * (hx_half - s.hx)
        phix = s.phix + rho * (phi_half - s.phix)
        u = s.u + rho * (u_half - s.u)
        cost = _sparse_cost(y, hx, phix, w)
        done = _stalled(cost, s.cost, tol)
        return _State(x, hx, phix, u, cost, s.k_pass + 1, s.k_total + 1, done)

    return lax.while_loop(cond, body, state)


def _reweight(w, phix):
    """Candes-Wakin-Boyd reweighting W <- W / (1 + |Phi X| / W); zero weights stay zero."""
    safe = jnp.where(w > 0, w, 1)
    return jnp.where(w > 0, w / (1 + jnp.abs(phix) / safe), 0)


def _solve_sparse_one(y, x0, spec, band_w, tau, sigma, rho, tol, max_iter, n_scales, n_reweights):
    n_bands = n_scales - 1
    w = jnp.broadcast_to(band_w[:, None, None], (n_bands,) + y.shape).astype(y.dtype)
    hx = convolve(x0, spec)
    phix = starlet_transform(x0, n_scales)
    zero = jnp.zeros((), jnp.int32)
    state = _State(x0, hx, phix, jnp.zeros_like(phix), _sparse_cost(y, hx, phix, w), zero, zero,
                   jnp.zeros((), bool))
    state = _sparse_pass(state, y, spec, w, tau, sigma, rho, tol, max_iter)
    for _ in range(n_reweights):
        w = _reweight(w, state.phix)
        state = state._replace(cost=_sparse_cost(y, state.hx, state.phix, w), k_pass=zero,
                               done=jnp.zeros((), bool))
        state = _sparse_pass(state, y, spec, w, tau, sigma, rho, tol, max_iter)
    return state.x, state.k_total, state.cost, state.done


@functools.partial(jax.jit, static_argnames=("n_scales", "n_reweights"))
def _solve_sparse_batch(y, x0, spec, band_w, tau, sigma, rho, tol, max_iter, *, n_scales, n_reweights):
    """The vmapped solver: a converged stamp keeps its state while the others iterate."""
    solve = functools.partial(_solve_sparse_one, n_scales=n_scales, n_reweights=n_reweights)
    return jax.vmap(solve, in_axes=(0, 0, 0, 0, 0, 0, None, None, None))(
        y, x0, spec, band_w, tau, sigma, rho, tol, max_iter)


# ---------------------------------------------------------------------------------------
# Low-rank solver: the whole stack at once (the nuclear norm couples stamps)
# ---------------------------------------------------------------------------------------
def _nuclear_norm(x):
    return jnp.sum(jnp.linalg.svd(x.reshape(x.shape[0], -1), compute_uv=False))


def _clip_singular_values(v, radius):
    """Projection onto the spectral-norm ball of ``radius`` = prox of the conjugate of
    radius * nuclear norm (Moreau: v - SVT(v, radius))."""
    mat = v.reshape(v.shape[0], -1)
    u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
    return ((u * jnp.minimum(s, radius)[None, :]) @ vt).reshape(v.shape)


@jax.jit
def _solve_lowrank(y, x0, spec, lam, tau, sigma, rho, tol, max_iter):
    def cost_of(hx, x):
        return 0.5 * jnp.sum((y - hx) ** 2) + lam * _nuclear_norm(x)

    def cond(s):
        x, hx, u, cost, k, done = s
        return jnp.logical_and(~done, k < max_iter)

    def body(s):
        x, hx, u, cost, k, _ = s
        grad = correlate(hx - y, spec)
        x_half = jnp.maximum(x - tau * (grad + u), 0)
        u_half = _clip_singular_values(u + sigma * (2 * x_half - x), lam)
        hx_half = convolve(x_half, spec)
        x_new = x + rho * (x_half - x)
        hx_new = hx + rho * (hx_half - hx)
        u_new = u + rho * (u_half - u)
        cost_new = cost_of(hx_new, x_new)
        return x_new, hx_new, u_new, cost_new, k + 1, _stalled(cost_new, cost, tol)

    hx0 = convolve(x0, spec)
    init = (x0, hx0, jnp.zeros_like(x0), cost_of(hx0, x0), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    x, hx, _, cost, k, done = lax.while_loop(cond, body, init)
    data_term = 0.5 * jnp.sum((y - hx) ** 2, axis=(-2, -1))
    return x, k, cost, done, data_term


# ---------------------------------------------------------------------------------------
# Public driver
# ---------------------------------------------------------------------------------------
def _check_stack(stamps, psfs):
    stamps = np.asarray(stamps)
    psfs = np.asarray(psfs)
    if stamps.ndim != 3:
        raise ValueError(f"stamps must be a (n, ny, nx) stack, got shape {stamps.shape}")
    if psfs.ndim != 3:
        raise ValueError(f"psfs must be a (n, ny, nx) stack, got shape {psfs.shape}")
    if len(stamps) != len(psfs):
        raise ValueError(f"{len(stamps)} stamps but {len(psfs)} PSFs: PSF i must belong to stamp i")
    for name, arr in (("stamps", stamps), ("psfs", psfs)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contain non-finite values")
    return stamps, psfs


def _pad_rows(a, n):
    """Fill a short last batch by repeating its last row (keeps shapes, hence one compile)."""
    a = np.asarray(a)
    if len(a) == n:
        return a
    return np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])


def deconvolve_stack(
    stamps,
    psfs,
    noise_sigma=None,
    *,
    n_scales: int = 4,
    kappa=DEFAULT_KAPPA,
    n_reweights: int = 1,
    tol: float = 1e-4,
    max_iter: int = 300,
    mode: str = "sparse",
    lowrank_lambda: float | None = None,
    rho: float = 0.8,
    dual_step: float = DEFAULT_DUAL_STEP,
    primal_step=None,
    x0=None,
    batch_size: int = 256,
    dtype: str = "float32",
    progress=None,
):
    """Deconvolve a stack of stamps, each by its own PSF.

    Parameters
    ----------
    stamps : array_like, shape (n, ny, nx)
        Observed stamps (background subtracted).
    psfs : array_like, shape (n, sy, sx)
        PSF i belongs to stamp i; centre at pixel ((sy - 1) // 2, (sx - 1) // 2).
    noise_sigma : float or array_like (n,), optional
        Per-pixel Gaussian noise, stamp units; default 1.4826 x MAD of each stamp.
    n_scales : int
        Starlet scales counting the coarse one (which is not penalised).
    kappa : sequence of float
        Threshold per detail band in units of that band's noise (finest first).
    n_reweights : int
        Reweighted-l1 passes after the first solve (each up to ``max_iter`` iterations).
    tol : float
        Per-stamp stop when |cost_k - cost_{k-1}| <= tol |cost_{k-1}|; 0 runs max_iter.
    max_iter : int
        Iteration cap per pass.
    mode : {"sparse", "lowrank"}
        Weighted l1 of the starlet bands per stamp, or lambda x nuclear norm of the stack.
    lowrank_lambda : float, optional
        Nuclear-norm weight; default median(sigma_i ||PSF_i||_2) (sqrt(n) + sqrt(n_px)),
        the expected top singular value of back-projected noise.
    rho : float
        Relaxation, 0 < rho < 1 with the default steps.
    dual_step : float
        Condat-Vu sigma.
    primal_step : float or array_like (n,), optional
        Condat-Vu tau; default 1 / (beta_i / 2 + sigma ||Phi||^2) per stamp.
    x0 : array_like (n, ny, nx), optional
        Starting point; default the positive part of the stamps.
    batch_size : int
        Stamps per jitted batch (sparse mode); short stacks are padded to ``MIN_BATCH``.
    dtype : {"float32", "float64"}
    progress : callable, optional
        Called as ``progress(n_done, n)`` after each batch (sparse mode) or the solve.

    Returns
    -------
    deconvolved : np.ndarray, shape (n, ny, nx), ``dtype``
    diagnostics : pandas.DataFrame
        stamp, iterations, cost (final), converged, noise_sigma, primal_step, dual_step.
        In low-rank mode cost is the stamp's data term plus an equal share of the
        nuclear-norm term (the column sums to the global cost) and converged is global.
    """
    stamps, psfs = _check_stack(stamps, psfs)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if mode not in ("sparse", "lowrank"):
        raise ValueError(f"mode must be 'sparse' or 'lowrank', got {mode!r}")
    n, ny, nx = stamps.shape
    sigma_noise = mad_sigma(stamps) if noise_sigma is None else np.broadcast_to(
        np.asarray(noise_sigma, dtype=np.float64), (n,)).copy()
    spec64 = psf_spectra(psfs, (ny, nx), dtype="float64")
    beta = np.asarray(lipschitz_constants(spec64))
    l_norm_sq = starlet_norm_sq((ny, nx), n_scales) * _NORM_MARGIN if mode == "sparse" else 1.0
    tau_auto, sigma_dual = step_sizes(beta, l_norm_sq, dual_step)
    if primal_step is None:
        tau = tau_auto
    else:
        tau = np.broadcast_to(np.asarray(primal_step, dtype=np.float64), (n,)).copy()
        if np.any(1 / tau - dual_step * l_norm_sq < beta / 2 * (1 - 1e-9)):
            raise ValueError("primal_step breaks the Condat-Vu condition 1/tau - sigma ||L||^2 >= beta/2")
    start = np.maximum(stamps, 0) if x0 is None else np.asarray(x0)
    if start.shape != stamps.shape:
        raise ValueError(f"x0 has shape {start.shape}, stamps {stamps.shape}")
    spec = spec64.astype(jnp.complex64 if dtype == "float32" else jnp.complex128)

    if mode == "lowrank":
        lam = lowrank_lambda
        if lam is None:
            psf_l2 = np.sqrt(np.sum(np.asarray(psfs, dtype=np.float64) ** 2, axis=(-2, -1)))
            lam = float(np.median(sigma_noise * psf_l2) * (math.sqrt(n) + math.sqrt(ny * nx)))
        tau_s = float(np.min(tau))  # coupled problem: one step for the stack
        x, k, cost, done, data_term = _solve_lowrank(
            jnp.asarray(stamps, dtype), jnp.asarray(start, dtype), spec, lam, tau_s, dual_step, rho, tol,
            max_iter)
        nuc_share = (float(cost) - float(jnp.sum(data_term))) / n
        diag = pd.DataFrame({
            "stamp": np.arange(n), "iterations": int(k), "cost": np.asarray(data_term, np.float64) + nuc_share,
            "converged": bool(done), "noise_sigma": sigma_noise, "primal_step": tau_s, "dual_step": dual_step,
        })
        if progress is not None:
            progress(n, n)
        return np.asarray(x), diag[_DIAG_COLUMNS]

    band_w = band_weights(psfs, sigma_noise, n_scales=n_scales, kappa=kappa)
    out_x = np.empty((n, ny, nx), dtype)
    iters = np.empty(n, np.int64)
    costs = np.empty(n, np.float64)
    conv = np.empty(n, bool)
    step = min(batch_size, n)
    size = max(step, MIN_BATCH)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        take = lambda a: _pad_rows(a[lo:hi], size)  # noqa: E731
        x, k, cost, done = _solve_sparse_batch(
            jnp.asarray(take(stamps), dtype), jnp.asarray(take(start), dtype), jnp.asarray(take(np.asarray(spec))),
            jnp.asarray(take(band_w), dtype), jnp.asarray(take(tau), dtype), jnp.asarray(take(sigma_dual), dtype),
            rho, tol, max_iter, n_scales=n_scales, n_reweights=n_reweights)
        m = hi - lo
        out_x[lo:hi] = np.asarray(x)[:m]
        iters[lo:hi] = np.asarray(k)[:m]
        costs[lo:hi] = np.asarray(cost)[:m]
        conv[lo:hi] = np.asarray(done)[:m]
        if progress is not None:
            progress(hi, n)
    diag = pd.DataFrame({"stamp": np.arange(n), "iterations": iters, "cost": costs, "converged": conv,
                         "noise_sigma": sigma_noise, "primal_step": tau, "dual_step": sigma_dual})
    return out_x, diag[_DIAG_COLUMNS]


# ---------------------------------------------------------------------------------------
# I/O, metrics, simulation
