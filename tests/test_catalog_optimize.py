"""Trust-region Newton converges on known problems and flags the ones it cannot finish."""
import jax.numpy as jnp
import numpy as np

from skystack.catalog.optimize import (
    minimize_batch,
    solve_subproblem,
    trust_region_newton,
)


def rosenbrock(x):
    return 100.0 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2


def test_rosenbrock_converges_to_minimum():
    res = trust_region_newton(rosenbrock, jnp.array([-1.2, 1.0]), tol=1e-14, max_iter=100)
    assert bool(res.converged)
    np.testing.assert_allclose(np.asarray(res.x), [1.0, 1.0], atol=1e-6)
    assert float(res.value) < 1e-12
    assert np.max(np.abs(np.asarray(res.grad))) < 1e-5
    assert 5 <= int(res.iterations) < 60


def quadratic(x, a, b):
    return 0.5 * x @ a @ x - b @ x


def test_batched_quadratics_reach_exact_solution():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 4, 4))
    a = np.einsum("nij,nkj->nik", m, m) + 0.5 * np.eye(4)
    b = rng.normal(size=(5, 4))
    res = minimize_batch(quadratic, jnp.zeros((5, 4)), (jnp.asarray(a), jnp.asarray(b)), tol=1e-14,
                         max_iter=50, radius0=100.0, max_radius=1e3)
    expected = np.linalg.solve(a, b[..., None])[..., 0]
    np.testing.assert_allclose(np.asarray(res.x), expected, rtol=1e-8, atol=1e-10)
    assert np.all(np.asarray(res.converged))
    # With a large trust region the exact Newton step solves a quadratic in one step.
    assert np.all(np.asarray(res.iterations) == 1)


def test_iteration_limit_is_flagged_not_converged():
    res = trust_region_newton(rosenbrock, jnp.array([-1.2, 1.0]), tol=1e-14, max_iter=3)
    assert not bool(res.converged)
    assert int(res.iterations) == 3


def test_subproblem_step_respects_radius_and_negative_curvature():
    g = jnp.array([1.0, 0.5])
    h = jnp.array([[-2.0, 0.0], [0.0, 1.0]])       # indefinite: Newton's step would be wrong
    p, pred = solve_subproblem(g, h, 0.7)
    assert abs(float(jnp.linalg.norm(p)) - 0.7) < 1e-6
    assert float(pred) > 0
    assert float(g @ p + 0.5 * p @ h @ p) == -float(pred)
