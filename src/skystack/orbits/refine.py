"""Refine a trial orbit: climb a differentiable combined-SNR function of the six elements.

A covering (``orbits.covering``) guarantees a trial orbit within ``max_snr_loss`` of every
orbit of its region; the detection's own orbit is then found by maximising the combined SNR
over the elements, starting from the best trial.

Method: damped Newton (Levenberg-Marquardt) on the SNR itself. The Kepler solver in the
direction model iterates in a ``lax.while_loop``, which JAX differentiates forward but not in
reverse, so the gradient and the Hessian come from forward mode (``jax.jacfwd`` and
``jax.jacfwd(jax.jacfwd(.))``: 6 and 36 tangents, cheap for six parameters); reverse-mode
optimisers (``jax.scipy.optimize.minimize``) cannot be used on such functions. A step solves
``(-H + mu diag|H|) step = g`` (Marquardt's scaling: invariant to the elements' units, which
span nine decades here) and is kept when the SNR rises; mu shrinks after a kept step and grows
after a refused one. At the peak the uncertainty follows from the curvature: for a matched
filter the log-likelihood ratio is SNR^2 / 2, so the Fisher information is
``-(SNR H + g g^T)`` (g = 0 at the peak) and the covariance its inverse; directions along which
the track does not change (the SNR is flat) get a large variance, as they should.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .table import ELEMENT_COLUMNS

REGION_ELEMENTS = ELEMENT_COLUMNS[:6]


class RefineResult(NamedTuple):
    """What ``refine_orbit`` returns.

    Attributes
    ----------
    elements : dict
        Refined ELEMENT_COLUMNS (the epoch of the start, angles as found, not wrapped).
    covariance : (6, 6)
        Of the six elements (AU, 1, deg, deg, deg, deg), from the curvature at the peak.
    sigma : (6,)
        Square roots of the covariance's diagonal.
    snr_before, snr_after : float
    fisher : (6, 6)
        The curvature of the log-likelihood at the peak (the covariance's inverse where finite).
    steps : int
        Newton steps kept.
    converged : bool
        The last step changed the SNR by less than ``tol`` (relative) and the gradient's
        Newton decrement is below ``tol``.
    """

    elements: dict
    covariance: np.ndarray
    sigma: np.ndarray
    snr_before: float
    snr_after: float
    steps: int
    converged: bool
    fisher: np.ndarray | None = None


@functools.lru_cache(maxsize=32)
def _compiled(snr_fn: Callable):
    """The jitted value, gradient and Hessian of ``snr_fn`` (x, *args): data passed as arguments
    share one compilation across detections (closed-over arrays would be compiled in)."""
    return (jax.jit(snr_fn), jax.jit(jax.jacfwd(snr_fn, argnums=0)),
            jax.jit(jax.jacfwd(jax.jacfwd(snr_fn, argnums=0), argnums=0)))


def refine_orbit(elements0, snr_fn: Callable, *, args: tuple = (), max_steps: int = 50, tol: float = 1e-10,
                 mu0: float = 1e-3) -> RefineResult:
    """Maximise ``snr_fn`` over the six elements from ``elements0``.

    Parameters
    ----------
    elements0 : mapping, Series or array (6,)
        Starting elements (``REGION_ELEMENTS``; a mapping may carry ``epoch_jd_tdb``, kept).
    snr_fn : callable
        JAX-traceable ``f(x, *args) -> scalar`` of the elements x (6,) in the schema's units
        (forward differentiable: ``jax.jacfwd`` is used).
    args : tuple
        Data arguments of ``snr_fn`` (arrays, pytrees): a module-level ``snr_fn`` is compiled
        once for all calls with arguments of the same shapes.
    max_steps : int
        Most Newton steps tried (kept or refused).
    tol : float
        Relative SNR change and Newton decrement below which it stops.
    mu0 : float
        Initial Marquardt damping.

    Returns
    -------
    RefineResult
    """
    if hasattr(elements0, "keys"):
        x = np.array([float(elements0[k]) for k in REGION_ELEMENTS])
        epoch = float(elements0["epoch_jd_tdb"]) if "epoch_jd_tdb" in elements0 else None
    else:
        x = np.asarray(elements0, np.float64).reshape(6)
        epoch = None
    f0, grad0, hess0 = _compiled(snr_fn)

    def f(v):
        return f0(v, *args)

    def grad(v):
        return grad0(v, *args)

    def hess(v):
        return hess0(v, *args)

    value = float(f(jnp.asarray(x)))
    before = value
    mu, kept, converged = mu0, 0, False
    g = np.asarray(grad(jnp.asarray(x)))
    h = np.asarray(hess(jnp.asarray(x)))
    for _ in range(max_steps):
        if not (np.isfinite(h).all() and np.isfinite(g).all()):
            break  # no curvature to step on (e.g. a track crossing an image's edge): not converged
        a = -0.5 * (h + h.T)
        d = np.maximum(np.abs(np.diag(a)), 1e-300)
        try:
            step = np.linalg.solve(a + mu * np.diag(d), g)
        except np.linalg.LinAlgError:
            mu *= 10.0
            continue
        x_new = x + step
        v_new = float(f(jnp.asarray(x_new)))
        if np.isfinite(v_new) and v_new > value:
            gain = (v_new - value) / max(abs(value), 1e-300)
            x, value = x_new, v_new
            kept += 1
            mu = max(mu / 10.0, 1e-12)
            g = np.asarray(grad(jnp.asarray(x)))
            h = np.asarray(hess(jnp.asarray(x)))
            decrement = _newton_decrement(h, g, value)
            if gain < tol and decrement < tol:
                converged = True
                break
        else:
            mu *= 10.0
            if mu > 1e12:
                converged = _newton_decrement(h, g, value) < math.sqrt(tol)
                break
    fisher = -value * 0.5 * (h + h.T) - np.outer(g, g)
    cov = _pinv_psd(fisher)
    out = {k: float(v) for k, v in zip(REGION_ELEMENTS, x)}
    if epoch is not None:
        out["epoch_jd_tdb"] = epoch
    return RefineResult(out, cov, np.sqrt(np.maximum(np.diag(cov), 0.0)), before, value, kept, converged, fisher)


def _newton_decrement(h, g, value) -> float:
    """g^T (-H)^-1 g / value: the relative SNR gain a full Newton step would still bring."""
    a = -0.5 * (h + h.T)
    if not (np.isfinite(a).all() and np.isfinite(g).all()):
        return math.inf  # LAPACK would only complain about the NaNs
    try:
        lam = float(g @ np.linalg.lstsq(a, g, rcond=1e-14)[0])
    except np.linalg.LinAlgError:
        return math.inf
    return abs(lam) / max(abs(value), 1e-300)


def _pinv_psd(a: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric matrix through its eigen-decomposition (non-positive eigenvalues,
    flat directions, get an infinite variance)."""
    if not np.isfinite(a).all():
        return np.full_like(a, np.inf)
    lam, vec = np.linalg.eigh(0.5 * (a + a.T))
    inv = np.where(lam > lam.max() * 1e-15, 1.0 / np.where(lam > 0, lam, 1.0), np.inf)
    with np.errstate(invalid="ignore"):
        cov = (vec * inv) @ vec.T
    return cov


def synthetic_snr_fn(true_elements, jd_tdb, site, psf_sigma_arcsec, peak_snr: float = 10.0):
    """A noiseless combined-SNR function of the elements for a known true orbit:
    ``peak_snr * mean_i exp(-|p_i(x) - p_i(true)|^2 / (4 sigma_i^2))`` with p_i the predicted
    tangent-plane positions (``covering``'s track model: the search's, light time iterated) on
    the exposures and a Gaussian PSF of width sigma_i.

    Returns
    -------
    snr_fn : callable (6,) -> scalar (JAX)
    positions : callable (6,) -> (N, 2) arcsec, the track of x on the true track's tangent planes
    """
    from .covering import _device, _elements_array, _track, track_geometry

    jd = np.atleast_1d(np.asarray(jd_tdb, np.float64))
    sigma = jnp.asarray(np.broadcast_to(np.asarray(psf_sigma_arcsec, np.float64), jd.shape))
    geom = _device(track_geometry(true_elements, jd, site))
    epoch = float(true_elements["epoch_jd_tdb"])
    x_true = jnp.asarray(_elements_array(true_elements))

    def positions(x):
        return _track(jnp.asarray(x)[None, :], epoch, geom)[0]

    p_true = positions(x_true)

    def snr_fn(x):
        d = positions(x) - p_true
        return peak_snr * jnp.mean(jnp.exp(-jnp.sum(d * d, axis=-1) / (4.0 * sigma * sigma)))

    return snr_fn, positions
