"""Space-variant PSF deconvolution of galaxy postage stamps.

Each stamp ``Y_i`` was blurred by the PSF at its own position, ``PSF_i``. For every stamp
we solve

    min_X  1/2 ||Y_i - H_i X||_2^2 + ||W_i * Phi X||_1    subject to  X >= 0

with ``H_i`` the linear ('same' size, zero padded) convolution by ``PSF_i`` and ``Phi``
the isotropic undecimated starlet transform without its coarse scale. The solver is the
Condat-Vu primal-dual iteration with per-stamp step sizes, one reweighting pass
(Candes, Wakin & Boyd) by default, and a per-stamp stopping rule; stamps are independent,
so the stack is solved in fixed-size chunks (on CPU one per core at a time) with no
communication between stamps. The operators of the iterations are in :mod:`.batch_last`:
chunks laid out with the stamp axis last and the PSF convolution by DFT matrices; those of
:mod:`.operators` define the same operators stamp by stamp.

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
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import batch_last
from .metrics import mad_sigma
from .operators import (
    convolve,
    correlate,
    lipschitz_constants,
    psf_spectra,
    rotate_psfs,
    starlet_norm_sq,
)

lax = jax.lax

#: Default band thresholds in units of the noise in each band (finest band first).
DEFAULT_KAPPA = (3.0, 3.0, 4.0)
#: Default dual step; scale free because the dual lives in the units of the stamps.
DEFAULT_DUAL_STEP = 0.5
#: Safety factor on the power-iteration estimate of ||Phi||^2 (it approaches from below).
_NORM_MARGIN = 1.02

#: Stamps per compiled chunk on CPU (the stamp axis is the SIMD axis, see batch_last). Every
#: chunk has exactly this many rows (a short one is padded), so one compiled program solves
#: every stamp and a stamp's result is independent of how the stack is split. At 32 stamps
#: an image plane is 215 kB in float32, so most fused passes stay within a core's 1 MB L2,
#: and XLA's fixed cost per operation is small against the work (64 and 128 measured the
#: same per stamp on one core, 16 took 1.5 times as long).
CPU_CHUNK_STAMPS = 32

_DIAG_COLUMNS = ["stamp", "iterations", "cost", "converged", "noise_sigma", "primal_step", "dual_step"]


# ---------------------------------------------------------------------------------------
# Noise and weights
# ---------------------------------------------------------------------------------------
#: PSFs per block of the set-up (weights, Lipschitz constants): bounds its memory for large
#: stacks. The weights' blocks are all compiled at this size (the last one padded), so a
#: stamp's weights do not depend on the stack it came in.
SETUP_BLOCK = 32


@functools.partial(jax.jit, static_argnames="n_bands")
def _band_norms(canvas, b3_norm, *, n_bands):
    """||Phi_j(canvas_i)||_2, (n, n_bands), for a block of canvases (n, ny, nx)."""
    bands = batch_last.starlet(jnp.moveaxis(canvas, 0, -1), n_bands, b3_norm)
    return jnp.sqrt(jnp.sum(bands**2, axis=(1, 2))).T


def _blocks(n: int, size: int = SETUP_BLOCK):
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


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
    norms = np.concatenate([
        np.asarray(_band_norms(jnp.asarray(_pad_rows(canvas[lo:hi], SETUP_BLOCK)), jnp.float64(16),
                               n_bands=n_scales - 1))[: hi - lo]
        for lo, hi in _blocks(len(canvas))]) if len(canvas) else np.zeros((0, n_scales - 1))
    sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float64), (len(rot),))
    return kappa[None, :] * sigma[:, None] * norms


def _lipschitz(psfs, stamp_shape) -> np.ndarray:
    """:func:`lipschitz_constants` of the PSFs, block by block (the spectra of a whole
    stack in complex128 would take 34 kB a stamp)."""
    if len(psfs) == 0:
        return np.zeros(0)
    return np.concatenate([np.asarray(lipschitz_constants(psf_spectra(psfs[lo:hi], stamp_shape, dtype="float64")))
                           for lo, hi in _blocks(len(psfs))])


def step_sizes(lipschitz, phi_norm_sq: float, dual_step: float = DEFAULT_DUAL_STEP):
    """Condat-Vu steps: tau = 1 / (beta/2 + sigma ||Phi||^2), which meets
    1/tau - sigma ||Phi||^2 >= beta / 2 with equality (rho < 1 keeps the margin)."""
    lipschitz = np.asarray(lipschitz, dtype=np.float64)
    return 1.0 / (lipschitz / 2.0 + dual_step * phi_norm_sq), np.full_like(lipschitz, dual_step)


# ---------------------------------------------------------------------------------------
# Sparse solver: chunks of stamps, stamp axis last (see batch_last), jitted at module level
# ---------------------------------------------------------------------------------------
class _State(NamedTuple):
    """Loop state of a chunk of B stamps; images (ny, nx, B), bands (n_bands, ny, nx, B)."""

    x: jax.Array          # primal estimate
    hx: jax.Array         # H x, kept so the cost needs no extra convolution
    phix: jax.Array       # Phi x
    u: jax.Array          # dual variable
    cost: jax.Array       # (B,) cost at x with the current weights
    k_pass: jax.Array     # (B,) iterations in this reweighting pass
    k_total: jax.Array    # (B,) iterations over all passes
    done: jax.Array       # (B,) relative cost change fell below tol in this pass


class _Problem(NamedTuple):
    """What a chunk's iterations read; per-stamp scalars are (B,), broadcast on the last axis."""

    y: jax.Array          # observed stamps (ny, nx, B)
    mult: jax.Array       # PSF planes (4, Ky, Kx, B), batch_last.psf_multipliers
    tau: jax.Array
    sigma: jax.Array
    rho: jax.Array
    b3_norm: jax.Array    # 16, as data (batch_last._smooth_axis)


def _stalled(cost, previous, tol):
    """The stopping rule |cost_k - cost_{k-1}| <= tol |cost_{k-1}|, never met when tol is 0:
    a float32 cost often repeats exactly long before convergence, and tol = 0 promises
    max_iter iterations."""
    return jnp.logical_and(tol > 0, jnp.abs(cost - previous) <= tol * jnp.abs(previous))


def _sum_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _pixel_sum(a):
    """Per-stamp sum (B,) of a (ny, nx, B), as the product of a vector of ones with the
    (ny nx, B) matrix: sums over the leading axes are slow both in XLA's own reductions
    and in its GEMM library's (they took a sixth of an iteration); the product streams."""
    flat = a.reshape(-1, a.shape[-1])
    return jnp.ones(flat.shape[0], a.dtype) @ flat


def _sparse_cost(y, hx, phix, w):
    """Per-stamp cost (B,): each term summed in the pixel dtype, as before; the total and
    the stopping rule in float64."""
    prior = functools.reduce(jnp.add, [jnp.abs(w[j] * phix[j]) for j in range(phix.shape[0])])
    acc = _sum_dtype()
    return _pixel_sum(0.5 * (y - hx) ** 2).astype(acc) + _pixel_sum(prior).astype(acc)


def _condat_step(s: _State, p: _Problem, w, op: batch_last.Convolver, rho):
    """One Condat-Vu iteration of every stamp of the chunk, relaxed by ``rho`` (B,):
    (x, hx, phix, u) after it."""
    n_bands = s.phix.shape[0]
    grad = batch_last.convolve(s.hx - p.y, p.mult, op, adjoint=True)
    x_half = jnp.maximum(s.x - p.tau * (grad + batch_last.starlet_adjoint(s.u, p.b3_norm)), 0)
    phi_half = batch_last.starlet(x_half, n_bands, p.b3_norm)
    # prox of sigma f^*, f the weighted l1 norm: projection on the box |u| <= w
    u_half = jnp.minimum(jnp.maximum(s.u + p.sigma * (2 * phi_half - s.phix), -w), w)
    hx_half = batch_last.convolve(x_half, p.mult, op)
    relax = lambda old, half: old + rho * (half - old)  # noqa: E731
    return relax(s.x, x_half), relax(s.hx, hx_half), relax(s.phix, phi_half), relax(s.u, u_half)


def _sparse_pass(state: _State, p: _Problem, w, tol, max_iter, op: batch_last.Convolver):
    """Iterate until every stamp's relative cost change is below tol (or max_iter); a
    stamp that has stopped keeps its state while the others go on."""

    def running(s):
        return jnp.logical_and(~s.done, s.k_pass < max_iter)

    def body(s):
        live = running(s)
        # a stamp that has stopped takes a zero step: x + 0 (x_half - x) is x exactly, so
        # it keeps its state without a select over every image of the state
        x, hx, phix, u = _condat_step(s, p, w, op, jnp.where(live, p.rho, 0))
        cost = _sparse_cost(p.y, hx, phix, w)
        keep = lambda a, b: jnp.where(live, a, b)  # noqa: E731
        return _State(x, hx, phix, u, keep(cost, s.cost), keep(s.k_pass + 1, s.k_pass),
                      keep(s.k_total + 1, s.k_total), keep(_stalled(cost, s.cost, tol), s.done))

    return lax.while_loop(lambda s: jnp.any(running(s)), body, state)


def _reweight(w, phix):
    """Candes-Wakin-Boyd reweighting W <- W / (1 + |Phi X| / W); zero weights stay zero."""
    safe = jnp.where(w > 0, w, 1)
    return jnp.where(w > 0, w / (1 + jnp.abs(phix) / safe), 0)


def _stamps_last(a):
    return jnp.moveaxis(a, 0, -1)


@functools.partial(jax.jit, static_argnames=("n_scales", "n_reweights", "fft_shape"))
def _solve_sparse_chunk(y, x0, mult, weights, tau, sigma, rho, tol, max_iter, b3_norm, *, n_scales,
                        n_reweights, fft_shape):
    """Solve a chunk of stamps; inputs and outputs have the stamp axis first.

    ``weights`` (B, n_bands, ny, nx) are the band weights spread over the pixels: as an
    input XLA reads them, where a broadcast inside the loop would be rebuilt every iteration.

    Every chunk has the same number of stamps and each stamp's arithmetic involves no other
    stamp, so a stamp's result does not depend on which chunk, shard or position it is in.
    """
    n_bands = n_scales - 1
    op = batch_last.convolver(y.shape[1:], fft_shape, y.dtype)
    p = _Problem(_stamps_last(y), _stamps_last(mult), tau, sigma, rho, b3_norm)
    x = _stamps_last(x0)
    w = _stamps_last(weights)
    hx = batch_last.convolve(x, p.mult, op)
    phix = batch_last.starlet(x, n_bands, b3_norm)
    zero = jnp.zeros(tau.shape, jnp.int32)
    no = jnp.zeros(tau.shape, bool)
    state = _State(x, hx, phix, jnp.zeros_like(phix), _sparse_cost(p.y, hx, phix, w), zero, zero, no)
    state = _sparse_pass(state, p, w, tol, max_iter, op)
    for _ in range(n_reweights):
        w = _reweight(w, state.phix)
        state = state._replace(cost=_sparse_cost(p.y, state.hx, state.phix, w), k_pass=zero, done=no)
        state = _sparse_pass(state, p, w, tol, max_iter, op)
    return jnp.moveaxis(state.x, -1, 0), state.k_total, state.cost, state.done


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
        Stamps between ``progress`` calls (sparse mode). On CPU each batch is solved in
        chunks of ``CPU_CHUNK_STAMPS``, one per core at a time; on an accelerator each batch
        is one call, padded to ``batch_size`` stamps.
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
    beta = _lipschitz(psfs, (ny, nx))
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

    if mode == "lowrank":
        spec = psf_spectra(psfs, (ny, nx), dtype=dtype)
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
    problem = dict(stamps=stamps, start=start, psfs=psfs, band_w=band_w, tau=tau, sigma=sigma_dual)
    settings = dict(rho=rho, tol=tol, max_iter=max_iter, n_scales=n_scales, n_reweights=n_reweights, dtype=dtype)
    out = _SparseOutputs(n, (ny, nx), dtype)
    chunk = chunk_stamps(batch_size)
    with ThreadPoolExecutor(max_workers=worker_threads()) as pool:
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            bounds = [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]
            for a, b, result in pool.map(lambda ab: (*ab, _solve_chunk(problem, settings, *ab, chunk)), bounds):
                out.store(a, b, result)
            if progress is not None:
                progress(hi, n)
    diag = pd.DataFrame({"stamp": np.arange(n), "iterations": out.iters, "cost": out.costs,
                         "converged": out.converged, "noise_sigma": sigma_noise, "primal_step": tau,
                         "dual_step": sigma_dual})
    return out.x, diag[_DIAG_COLUMNS]


class _SparseOutputs:
    """Per-stamp results, filled chunk by chunk."""

    def __init__(self, n: int, shape, dtype):
        self.x = np.empty((n,) + tuple(shape), dtype)
        self.iters = np.empty(n, np.int64)
        self.costs = np.empty(n, np.float64)
        self.converged = np.empty(n, bool)

    def store(self, lo: int, hi: int, result) -> None:
        x, k, cost, done = (np.asarray(r)[: hi - lo] for r in result)
        self.x[lo:hi], self.iters[lo:hi], self.costs[lo:hi], self.converged[lo:hi] = x, k, cost, done


def _solve_chunk(problem: dict, settings: dict, lo: int, hi: int, size: int):
    """Stamps [lo, hi) padded to ``size`` rows (repeats of the last), solved by one call."""
    dtype = settings["dtype"]
    take = lambda a: jnp.asarray(_pad_rows(a[lo:hi], size), dtype)  # noqa: E731
    psfs = _pad_rows(problem["psfs"][lo:hi], size)
    stamp_shape = problem["stamps"].shape[1:]
    fft_shape = tuple(batch_last.exact_size(n, s) for n, s in zip(stamp_shape, psfs.shape[1:]))
    axes = tuple(batch_last.dft_axis(n, m) for n, m in zip(stamp_shape, fft_shape))
    mult = batch_last.psf_multipliers(psfs, stamp_shape, axes)
    band_w = _pad_rows(problem["band_w"][lo:hi], size)
    weights = np.broadcast_to(band_w[:, :, None, None], band_w.shape + tuple(stamp_shape))
    return _solve_sparse_chunk(
        take(problem["stamps"]), take(problem["start"]), jnp.asarray(mult, dtype), jnp.asarray(weights, dtype),
        take(problem["tau"]), take(problem["sigma"]), settings["rho"], settings["tol"], settings["max_iter"],
        jnp.asarray(16, dtype), n_scales=settings["n_scales"], n_reweights=settings["n_reweights"],
        fft_shape=fft_shape)


def chunk_stamps(batch_size: int) -> int:
    """Stamps per compiled solve. On CPU a fixed chunk that keeps a solve's state in cache
    and gives the SIMD lanes whole vectors; elsewhere the batch, one launch per batch. A fixed
    size per backend means one compiled shape, so results do not depend on the split."""
    return CPU_CHUNK_STAMPS if jax.default_backend() == "cpu" else batch_size


def worker_threads() -> int:
    """Concurrent chunk solves: one per core on CPU (XLA runs a small chunk on about one
    core), one on an accelerator."""
    if jax.default_backend() != "cpu":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without affinity masks
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------
# I/O, metrics, simulation
