"""Trust-region Newton's method with exact Hessians, written for ``jax.vmap``.

One problem is minimised by :func:`trust_region_newton`; batching many sources is a
``vmap`` of it (the batched ``while_loop`` runs until every member has stopped, members
that stopped keep their state). Each iteration takes one eigen-decomposition of the Hessian,
solves the trust-region subproblem exactly in that basis (More-Sorensen secular equation
by bisection, a fixed number of steps so the loop stays shape-static), and evaluates
value, gradient and Hessian at the trial point with forward-over-reverse autodiff.

Convergence: the Hessian is positive definite and the Newton decrement
``0.5 g^T H^{-1} g`` (the decrease a full Newton step would still bring) is at most
``tol``. Problems that hit ``max_iter`` or whose trust radius collapses are reported as not
converged; their last iterate is kept.
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

BISECTION_STEPS = 60


class TrustRegionResult(NamedTuple):
    x: jax.Array
    value: jax.Array
    grad: jax.Array
    hess: jax.Array
    iterations: jax.Array
    converged: jax.Array


class _State(NamedTuple):
    x: jax.Array
    f: jax.Array
    g: jax.Array
    h: jax.Array
    radius: jax.Array
    it: jax.Array
    converged: jax.Array
    stalled: jax.Array
    fresh: jax.Array


def value_grad_hess(fun: Callable, x, *args):
    """Value, gradient and exact Hessian of scalar ``fun(x, *args)`` (forward over reverse).

    A ``fun`` that knows a cheaper route to its exact derivatives carries it as the attribute
    ``value_grad_hess(x, *args)``, which is then used instead.
    """
    own = getattr(fun, "value_grad_hess", None)
    if own is not None:
        return own(x, *args)

    def grad_with_aux(z):
        f, g = jax.value_and_grad(fun)(z, *args)
        return g, (f, g)

    h, (f, g) = jax.jacfwd(grad_with_aux, has_aux=True)(x)
    return f, g, 0.5 * (h + h.T)


def _newton_decrement(g, w, v):
    gv = v.T @ g
    return 0.5 * jnp.sum(gv * gv / jnp.where(w > 0, w, jnp.inf))


def solve_subproblem(g, h, radius):
    """Minimise ``g.p + 0.5 p.H.p`` subject to ``|p| <= radius`` (exact, eigen-basis).

    Returns the step and the predicted decrease (positive).
    """
    w, v = jnp.linalg.eigh(h)
    gv = v.T @ g
    scale = jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)
    lam_min = jnp.maximum(0.0, -w[0]) + 1e-12 * scale

    def step_norm(lam):
        return jnp.sqrt(jnp.sum((gv / (w + lam)) ** 2))

    newton_ok = (w[0] > 1e-12 * scale) & (step_norm(0.0) <= radius)
    # Bisection in log(lambda) between lam_min and an upper bound where |p| <= radius.
    hi = lam_min + jnp.linalg.norm(g) / radius + scale

    def bisect(_, bounds):
        lo, up = bounds
        mid = jnp.sqrt(lo * up)
        too_long = step_norm(mid) > radius
        return jnp.where(too_long, mid, lo), jnp.where(too_long, up, mid)

    lo, up = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, (lam_min, hi))
    lam = jnp.where(newton_ok, 0.0, up)
    p = -v @ (gv / (w + lam))
    pred = -(g @ p + 0.5 * p @ h @ p)
    return p, pred


@partial(jax.jit, static_argnames=("fun", "max_iter"))
def trust_region_newton(fun: Callable, x0, args=(), *, tol=1e-6, max_iter: int = 50,
                        radius0=1.0, max_radius=10.0) -> TrustRegionResult:
    """Minimise ``fun(x, *args)`` from ``x0`` by trust-region Newton.

    Parameters
    ----------
    fun : scalar function of a 1-D parameter vector (static: hashable)
    x0 : (d,) starting point
    args : extra arguments of ``fun`` (a tuple of arrays/pytrees)
    tol : stop when ``0.5 g^T H^{-1} g <= tol`` with H positive definite (units of ``fun``)
    max_iter : iteration limit
    radius0, max_radius : initial and largest trust radius (units of x)

    Returns
    -------
    TrustRegionResult with the last iterate, its value, gradient, Hessian, the number of
    iterations taken and whether the tolerance was met.
    """
    def is_converged(g, h):
        w, v = jnp.linalg.eigh(h)
        return (w[0] > 0) & (_newton_decrement(g, w, v) <= tol)

    # The starting point is evaluated by the loop's first pass (``fresh``), so that the
    # objective's derivatives are compiled once, not twice.
    d = x0.shape[0]
    state = _State(x0, jnp.asarray(jnp.inf, x0.dtype), jnp.zeros_like(x0), jnp.eye(d, dtype=x0.dtype),
                   jnp.asarray(radius0, x0.dtype), jnp.asarray(0), jnp.asarray(False), jnp.asarray(False),
                   jnp.asarray(True))

    def cond(s):
        return s.fresh | ((~s.converged) & (~s.stalled) & (s.it < max_iter))

    def body(s):
        p, pred = solve_subproblem(s.g, s.h, s.radius)
        p = jnp.where(s.fresh, jnp.zeros_like(p), p)
        f1, g1, h1 = value_grad_hess(fun, s.x + p, *args)
        ok = jnp.isfinite(f1) & jnp.all(jnp.isfinite(g1)) & jnp.all(jnp.isfinite(h1))
        rho = jnp.where(ok & (pred > 0), (s.f - f1) / jnp.where(pred > 0, pred, 1.0), -1.0)
        pnorm = jnp.linalg.norm(p)
        radius = jnp.where(rho < 0.25, 0.25 * pnorm,
                           jnp.where((rho > 0.75) & (pnorm > 0.99 * s.radius),
                                     jnp.minimum(2.0 * s.radius, max_radius), s.radius))
        radius = jnp.where(s.fresh, s.radius, radius)
        accept = (rho > 1e-4) | s.fresh
        x = jnp.where(accept, s.x + p, s.x)
        f = jnp.where(accept, f1, s.f)
        g = jnp.where(accept, g1, s.g)
        h = jnp.where(accept, h1, s.h)
        # A step too small to change the value in floating point means we are at the
        # numerical optimum: accept it as converged if the Hessian agrees, else stall.
        tiny = (radius < 1e-12 * (1.0 + jnp.linalg.norm(x))) & ~s.fresh
        conv = is_converged(g, h) & jnp.isfinite(f)
        return _State(x, f, g, h, radius, s.it + jnp.where(s.fresh, 0, 1), conv, tiny & ~conv, jnp.asarray(False))

    s = jax.lax.while_loop(cond, body, state)
    return TrustRegionResult(s.x, s.f, s.g, s.h, s.it, s.converged)


def minimize_batch(fun: Callable, x0, args=(), *, tol=1e-6, max_iter: int = 50,
                   radius0=1.0, max_radius=10.0, vector_width: int = 1) -> TrustRegionResult:
    """:func:`trust_region_newton` over a leading batch axis of ``x0`` and ``args``.

    ``vector_width`` problems run side by side (``vmap``); groups of them run one after
    another (``lax.map``). A vmapped loop runs until its slowest member stops and keeps
    every member's Hessian intermediates alive at once, so on CPUs a width of 1-4 is
    fastest; accelerators want the whole batch at once.
    """
    return _batched(fun, max_iter, int(vector_width))(x0, args, tol, radius0, max_radius)


@lru_cache(maxsize=None)
def _batched(fun, max_iter, vector_width):
    def run(x0, args, tol, r0, rmax):
        def one(item):
            x, a = item
            return trust_region_newton(fun, x, a, tol=tol, max_iter=max_iter, radius0=r0, max_radius=rmax)
        return jax.lax.map(one, (x0, args), batch_size=vector_width if vector_width > 1 else None)

    return jax.jit(run)
