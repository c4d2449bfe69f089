"""Space-variant PSF deconvolution: operators, solver behaviour, and agreement with ModOpt."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED_DATA, needs_shared
from scipy.ndimage import convolve1d
from scipy.signal import convolve2d, fftconvolve

from skystack.deconvolve import batch_last
from skystack.deconvolve.metrics import ellipticity, mad_sigma, nmse
from skystack.deconvolve.operators import (
    convolve,
    correlate,
    lipschitz_constants,
    psf_spectra,
    rotate_psfs,
    starlet_adjoint,
    starlet_norm_sq,
    starlet_transform,
)
from skystack.deconvolve.solvers import CPU_CHUNK_STAMPS, band_weights, deconvolve_stack, step_sizes
from skystack.deconvolve.stamps import load_stack, load_stamps_and_psfs
from skystack.sim.stacks import simulate_truth_stack

os.environ.setdefault("JAX_PLATFORMS", "cpu")


DATA = str(SHARED_DATA / "deconv")
STAMPS_NPY = os.path.join(DATA, "example_image_stack.npy")
PSFS_NPY = os.path.join(DATA, "example_psfs.npy")
needs_data = needs_shared("deconv/example_image_stack.npy", "deconv/example_psfs.npy")


@pytest.fixture(scope="module")
def sim():
    """20 simulated galaxies with 20 distinct PSFs: truth, observed, psfs, sigma."""
    return simulate_truth_stack(20, size=41, seed=3, noise_sigma=5e-4)


@pytest.fixture(scope="module")
def real():
    return load_stamps_and_psfs(STAMPS_NPY, PSFS_NPY)


# --------------------------------------------------------------------------- operators
def test_starlet_adjoint_dot_product():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 33, 29))
    y = rng.standard_normal((2, 4, 33, 29))
    lhs = float(jnp.vdot(starlet_transform(x, 5), y))
    rhs = float(jnp.vdot(x, starlet_adjoint(y)))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_starlet_sums_to_image_and_matches_filter_bank():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((41, 41))
    bands = np.asarray(starlet_transform(img, 4, coarse=True))
    assert bands.shape == (4, 41, 41)
    np.testing.assert_allclose(bands.sum(axis=0), img, atol=1e-12)
    # independent construction: a trous B3 smoothing with scipy, zero outside
    c = img
    for level in range(3):
        kern = np.zeros(4 * 2**level + 1)
        kern[:: 2**level] = np.array([1, 4, 6, 4, 1]) / 16
        smooth = convolve1d(convolve1d(c, kern, axis=0, mode="constant"), kern, axis=1, mode="constant")
        np.testing.assert_allclose(bands[level], c - smooth, atol=1e-12)
        c = smooth


def test_convolution_matches_scipy_and_adjoint():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 41, 41))
    r = rng.standard_normal((3, 41, 41))
    psfs = rng.random((3, 41, 41))
    spec = psf_spectra(psfs, (41, 41), dtype="float64")
    hx = np.asarray(convolve(jnp.asarray(x), spec))
    np.testing.assert_allclose(hx, fftconvolve(x, psfs, mode="same", axes=(-2, -1)), atol=1e-10)
    hr = np.asarray(correlate(jnp.asarray(r), spec))
    # the transpose is convolution with each PSF rotated on its own axes
    rot = np.stack([np.rot90(p, 2) for p in psfs])
    np.testing.assert_allclose(hr, fftconvolve(r, rot, mode="same", axes=(-2, -1)), atol=1e-10)
    assert np.vdot(hx, r) == pytest.approx(np.vdot(x, hr), rel=1e-12)


def test_psf_rotation_is_per_stamp():
    rng = np.random.default_rng(4)
    # distinct, asymmetric PSFs: whole-stack rotation would reverse and mix them up
    psfs = rng.random((4, 15, 15)) * np.linspace(0.2, 3, 4)[:, None, None]
    psfs[:, :5, :] *= 3
    rot = rotate_psfs(psfs)
    for i in range(4):
        np.testing.assert_array_equal(rot[i], psfs[i, ::-1, ::-1])
    assert not np.allclose(rot, np.rot90(psfs, 2))

    sigma = np.array([1.0, 2.0, 3.0, 4.0])
    w = band_weights(psfs, sigma)
    for i in range(4):
        # the same weights as a one-stamp stack, and as the definition on PSF i alone
        np.testing.assert_allclose(w[i], band_weights(psfs[i:i + 1], sigma[i:i + 1])[0], rtol=1e-12)
        canvas = np.pad(np.rot90(psfs[i], 2), 14)
        norms = np.sqrt((np.asarray(starlet_transform(canvas, 4)) ** 2).sum(axis=(-2, -1)))
        np.testing.assert_allclose(w[i], np.array([3, 3, 4]) * sigma[i] * norms, rtol=1e-10)
    wrong = band_weights(np.rot90(psfs, 2, axes=(0, 1)), sigma)
    assert not np.allclose(w, wrong)


def _stamps_last(a):
    return jnp.asarray(np.moveaxis(a, 0, -1))


def _stamps_first(a):
    return np.moveaxis(np.asarray(a), -1, 0)


@pytest.mark.parametrize("stamp, psf", [((41, 41), (41, 41)), ((33, 29), (7, 12)), ((15, 15), (41, 41)),
                                        ((10, 9), (4, 5)), ((1, 5), (1, 3))])
def test_chunk_convolution_matches_scipy(stamp, psf):
    """The solver's convolution (DFT matrices, stamps on the last axis) is the 'same'-size
    linear convolution, and its adjoint the correlation: odd and even sizes, PSFs larger than
    the stamp (whose far entries never touch it)."""
    rng = np.random.default_rng(5)
    x, r = rng.standard_normal((2, 4) + stamp)
    psfs = rng.random((4,) + psf)
    fft_shape = tuple(batch_last.exact_size(n, s) for n, s in zip(stamp, psf))
    op = batch_last.convolver(stamp, fft_shape, jnp.float64)
    mult = _stamps_last(batch_last.psf_multipliers(psfs, stamp, op.axes))
    hx = _stamps_first(batch_last.convolve(_stamps_last(x), mult, op))
    cy, cx = ((s - 1) // 2 for s in psf)
    ref = np.stack([convolve2d(a, p)[cy:cy + stamp[0], cx:cx + stamp[1]] for a, p in zip(x, psfs)])
    np.testing.assert_allclose(hx, ref, atol=1e-12 * np.abs(ref).max())
    hr = _stamps_first(batch_last.convolve(_stamps_last(r), mult, op, adjoint=True))
    assert np.vdot(hx, r) == pytest.approx(np.vdot(x, hr), rel=1e-12)


def test_chunk_starlet_matches_stamp_starlet():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 33, 29))
    u = rng.standard_normal((3, 3, 33, 29))
    norm = jnp.float64(16)
    bands = np.moveaxis(np.asarray(batch_last.starlet(_stamps_last(x), 3, norm)), -1, 0)
    np.testing.assert_allclose(bands, np.asarray(starlet_transform(x, 4)), atol=1e-13)
    adj = _stamps_first(batch_last.starlet_adjoint(jnp.asarray(np.moveaxis(u, 0, -1)), norm))
    np.testing.assert_allclose(adj, np.asarray(starlet_adjoint(u)), atol=1e-13)


def test_load_stack_errors(tmp_path):
    bad = tmp_path / "flat.npy"
    np.save(bad, np.zeros((41, 41)))
    with pytest.raises(ValueError, match="flat.npy"):
        load_stack(bad)
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.zeros((3, 41, 41)))
    np.save(b, np.zeros((2, 41, 41)))
    with pytest.raises(ValueError, match="b.npy"):
        load_stamps_and_psfs(a, b)
    from astropy.io import fits

    f = tmp_path / "cube.fits"
    fits.writeto(f, np.ones((2, 5, 5), np.float32))
    assert load_stack(f).shape == (2, 5, 5)


def test_ellipticity_of_sheared_gaussian():
    yy, xx = np.mgrid[:41, :41] - 20.0
    img = np.exp(-0.5 * ((xx / 4.0) ** 2 + (yy / 2.0) ** 2))
    e1, e2 = ellipticity(img[None])
    assert e1[0] == pytest.approx((16 - 4) / (16 + 4), abs=1e-3)
    assert e2[0] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- solver
def test_solver_on_simulated_galaxies(sim):
    truth, observed, psfs, sigma = sim
    x, diag = deconvolve_stack(observed, psfs, sigma, batch_size=32)
    assert x.dtype == np.float32 and x.shape == observed.shape
    assert list(diag.columns[:4]) == ["stamp", "iterations", "cost", "converged"]
    assert x.min() >= 0
    # the cost at the solution is well below the cost at X = observed
    w = band_weights(psfs, sigma)
    spec = psf_spectra(psfs, (41, 41), dtype="float64")

    def cost(xx, weights):
        hx = np.asarray(convolve(jnp.asarray(xx, jnp.float64), spec))
        phi = np.asarray(starlet_transform(jnp.asarray(xx, jnp.float64), 4))
        return 0.5 * ((observed - hx) ** 2).sum((1, 2)) + np.abs(weights[:, :, None, None] * phi).sum((1, 2, 3))

    ratio = cost(x, w) / cost(observed, w)
    # the noise floor (about 0.5 n_px sigma^2) is a large part of both costs
    assert np.all(ratio < 0.9) and np.median(ratio) < 0.7, ratio
    assert diag["converged"].mean() >= 0.9
    nmse_obs = np.median(nmse(observed, truth))
    nmse_dec = np.median(nmse(x, truth))
    assert nmse_dec < 0.6 * nmse_obs, (nmse_dec, nmse_obs)
    # shapes survive: deconvolved ellipticities are closer to the truth than observed ones
    e_true = np.stack(ellipticity(truth))
    err_dec = np.abs(np.stack(ellipticity(x)) - e_true).mean()
    err_obs = np.abs(np.stack(ellipticity(observed)) - e_true).mean()
    assert err_dec < err_obs


def test_cost_decreases_and_frozen_stamps(sim):
    truth, observed, psfs, sigma = sim
    costs = []
    for k in (5, 20, 80):
        _, diag = deconvolve_stack(observed[:8], psfs[:8], sigma[:8], tol=0, max_iter=k, n_reweights=0,
                                      batch_size=32)
        costs.append(diag["cost"].to_numpy())
        assert (diag["iterations"] == k).all()
    assert np.all(costs[1] < costs[0]) and np.all(costs[2] <= costs[1] * (1 + 1e-5))
    # a loose tolerance stops stamps early, each at its own iteration
    _, diag = deconvolve_stack(observed[:8], psfs[:8], sigma[:8], tol=1e-2, n_reweights=0, batch_size=32)
    assert diag["converged"].all() and diag["iterations"].max() < 300


def test_result_independent_of_chunk_and_order():
    """Bit for bit, a stamp's result does not depend on its place in the stack: more stamps
    than a chunk, a shuffled stack and splits that cut chunks differently all agree, with
    stamps stopping at their own iterations and a reweighting pass."""
    n = CPU_CHUNK_STAMPS + 8
    truth, observed, psfs, sigma = simulate_truth_stack(n, size=21, seed=8, noise_sigma=5e-4)
    kw = dict(max_iter=12, tol=1e-3, n_reweights=1)
    whole, diag = deconvolve_stack(observed, psfs, sigma, **kw)
    assert diag["iterations"].nunique() > 1  # the stopping rule acted per stamp
    order = np.random.default_rng(1).permutation(n)
    shuffled, diag_s = deconvolve_stack(observed[order], psfs[order], sigma[order], **kw)
    np.testing.assert_array_equal(shuffled, whole[order])
    np.testing.assert_array_equal(diag_s["cost"].to_numpy(), diag["cost"].to_numpy()[order])
    cuts = ((0, 3), (3, CPU_CHUNK_STAMPS + 2), (CPU_CHUNK_STAMPS + 2, n))
    parts = [deconvolve_stack(observed[a:b], psfs[a:b], sigma[a:b], batch_size=7, **kw) for a, b in cuts]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole)
    np.testing.assert_array_equal(np.concatenate([p[1]["iterations"] for p in parts]), diag["iterations"])


def test_float64_matches_float32(sim):
    truth, observed, psfs, sigma = sim
    kw = dict(tol=0, max_iter=40, n_reweights=0, batch_size=32)
    x32, _ = deconvolve_stack(observed[:4], psfs[:4], sigma[:4], **kw)
    x64, _ = deconvolve_stack(observed[:4], psfs[:4], sigma[:4], dtype="float64", **kw)
    assert x64.dtype == np.float64
    assert np.linalg.norm(x32 - x64) / np.linalg.norm(x64) < 1e-4


def test_lowrank_mode(sim):
    truth, observed, psfs, sigma = sim
    x, diag = deconvolve_stack(observed, psfs, sigma, mode="lowrank", max_iter=150)
    assert x.min() >= 0
    assert np.median(nmse(x, truth)) < np.median(nmse(observed, truth))
    assert diag["iterations"].nunique() == 1
    start = np.maximum(observed, 0)
    # it moves from its start (measured 0.57; returning the start would pass the lines above)
    assert np.linalg.norm(x - start) / np.linalg.norm(start) > 0.3


# ----------------------------------------------------------------- low rank, independently
def _gaussian(shape, cx, cy, sx, sy, theta=0.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
    return np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))


def _rank2_problem(n=6, size=15, k=7, noise=0.01, seed=0):
    """n stamps of a rank-2 stack, each blurred by its own elliptical Gaussian PSF, plus noise."""
    rng = np.random.default_rng(seed)
    psfs = np.stack([_gaussian((k, k), (k - 1) / 2, (k - 1) / 2, s, s * q, th) for s, q, th in
                     zip(np.linspace(0.8, 1.6, n), rng.uniform(0.7, 1.0, n), rng.uniform(0, np.pi, n))])
    psfs /= psfs.sum(axis=(1, 2), keepdims=True)
    c = (size - 1) / 2
    g1, g2 = _gaussian((size, size), c, c, 1.5, 1.5), _gaussian((size, size), c + 1, c - 1, 3.0, 1.5, 0.6)
    coef = rng.uniform(0.2, 1.0, (n, 2))
    truth = coef[:, :1, None] * g1 + coef[:, 1:, None] * g2
    observed = np.stack([convolve2d(t, p, mode="same") for t, p in zip(truth, psfs)])
    return observed + noise * rng.standard_normal(observed.shape), psfs


def _convolution_matrix(psf, shape):
    """The 'same'-size, zero-padded convolution by ``psf`` as a dense matrix (scipy, direct)."""
    eye = np.eye(shape[0] * shape[1]).reshape(-1, *shape)
    return np.stack([convolve2d(e, psf, mode="same").ravel() for e in eye], axis=1)


def _lowrank_objective(x, observed, hmats, lam):
    """1/2 sum_i ||y_i - H_i x_i||^2 + lam ||X||_* (X: one row per stamp)."""
    resid = observed.reshape(len(x), -1) - np.einsum("nij,nj->ni", hmats, x.reshape(len(x), -1))
    return 0.5 * np.sum(resid**2) + lam * np.linalg.svd(x.reshape(len(x), -1), compute_uv=False).sum()


def _lowrank_admm(observed, hmats, lam, rho=1.0, n_iter=4000):
    """The same problem by ADMM (scaled form), X split into a nuclear-norm copy and a
    positive copy: exact per-stamp solves with (H_i^T H_i + 2 rho I), singular-value soft
    thresholding, projection on X >= 0. Returns the positive copy and the largest gap
    between the copies."""
    n, p = len(observed), hmats.shape[-1]
    y = observed.reshape(n, p)
    inv = np.linalg.inv(np.einsum("nki,nkj->nij", hmats, hmats) + 2 * rho * np.eye(p))
    hty = np.einsum("nki,nk->ni", hmats, y)
    z1 = np.maximum(y, 0)
    z2, u1, u2 = z1.copy(), np.zeros_like(y), np.zeros_like(y)
    for _ in range(n_iter):
        x = np.einsum("nij,nj->ni", inv, hty + rho * (z1 - u1 + z2 - u2))
        u, s, vt = np.linalg.svd(x + u1, full_matrices=False)
        z1 = (u * np.maximum(s - lam / rho, 0)) @ vt
        z2 = np.maximum(x + u2, 0)
        u1 += x - z1
        u2 += x - z2
    gap = max(np.abs(x - z1).max(), np.abs(x - z2).max())
    return z2.reshape(observed.shape), gap


def test_lowrank_solves_its_problem():
    """The low-rank mode's answer is the minimiser of 1/2 ||Y - H X||^2 + lam ||X||_*, X >= 0,
    found independently by ADMM on dense convolution matrices (scipy), on a rank-2 stack of
    6 stamps (15 x 15 px) under 6 different PSFs.

    Measured (5000 iterations against ADMM's 4000, whose two copies agree to 1.8e-7):
    objectives agree to 4e-10 relative in float64, 7e-8 in float32; solutions to 5e-7 and
    5.4e-7 relative; both rank 2 (third singular value 4e-7 of the first, 8.2); the
    solution is 26% (relative norm) from the start, and its objective half the start's
    (0.507 against 1.065).
    """
    observed, psfs = _rank2_problem()
    lam = 0.05
    hmats = np.stack([_convolution_matrix(p, observed.shape[1:]) for p in psfs])
    ref, gap = _lowrank_admm(observed, hmats, lam)
    assert gap < 1e-6  # the copies agree: ADMM converged
    x, diag = deconvolve_stack(observed, psfs, 0.01, mode="lowrank", lowrank_lambda=lam, dtype="float64", tol=0,
                               max_iter=5000)
    assert x.min() >= 0 and (diag["iterations"] == 5000).all()
    f_x, f_ref = _lowrank_objective(x, observed, hmats, lam), _lowrank_objective(ref, observed, hmats, lam)
    start = np.maximum(observed, 0)
    f_start = _lowrank_objective(start, observed, hmats, lam)
    assert abs(f_x - f_ref) <= 1e-8 * f_ref, (f_x, f_ref)
    assert np.linalg.norm(x - ref) / np.linalg.norm(ref) < 1e-5
    assert diag["cost"].sum() == pytest.approx(f_x, rel=1e-10)  # its own cost is the objective
    # far from where it started, and the nuclear norm acts: rank 2 as the truth
    assert np.linalg.norm(x - start) / np.linalg.norm(start) > 0.2
    assert f_x < 0.6 * f_start
    sv = np.linalg.svd(x.reshape(len(x), -1), compute_uv=False)
    assert sv[2] < 1e-5 * sv[0] and sv[1] > 0.05 * sv[0]
    # float32 (the default) reaches the same answer; tol = 0 runs every iteration (a float32
    # cost repeats exactly long before convergence: the rule once stopped this solve at 240)
    x32, diag32 = deconvolve_stack(observed, psfs, 0.01, mode="lowrank", lowrank_lambda=lam, tol=0, max_iter=5000)
    assert (diag32["iterations"] == 5000).all() and not diag32["converged"].any()
    assert np.linalg.norm(x32 - ref) / np.linalg.norm(ref) < 1e-5
    assert abs(_lowrank_objective(x32.astype(np.float64), observed, hmats, lam) - f_ref) <= 1e-6 * f_ref


def test_lowrank_iterates_match_modopt():
    """Iterate by iterate, the low-rank mode is ModOpt's Condat with its LowRankMatrix proximity
    (nuclear norm), Positivity and GradBasic on scipy convolutions, for the same steps."""
    pytest.importorskip("modopt")
    from modopt.math.convolve import convolve_stack
    from modopt.opt.algorithms import Condat
    from modopt.opt.gradient import GradBasic
    from modopt.opt.linear import Identity
    from modopt.opt.proximity import LowRankMatrix, Positivity

    observed, psfs = _rank2_problem()
    lam, tau, sig, rho = 0.05, 1.0, 0.5, 0.8  # tau: PSFs sum to 1, so ||H||^2 <= 1 = beta
    for n_iter in (1, 60):
        grad = GradBasic(observed, lambda x: convolve_stack(x, psfs),
                         lambda x: convolve_stack(x, psfs, rot_kernel=True), verbose=False)
        algo = Condat(np.maximum(observed, 0), np.zeros_like(observed), grad, Positivity(), LowRankMatrix(lam),
                      linear=Identity(), cost=None, rho=rho, sigma=sig, tau=tau, auto_iterate=False,
                      progress=False, verbose=False)
        algo.iterate(max_iter=n_iter)
        ref = algo.x_final
        x, _ = deconvolve_stack(observed, psfs, 0.01, mode="lowrank", lowrank_lambda=lam, dtype="float64", tol=0,
                                max_iter=n_iter, primal_step=tau, dual_step=sig, rho=rho)
        assert np.linalg.norm(x - ref) / np.linalg.norm(ref) < 1e-10, n_iter


def test_bad_input_messages(sim):
    truth, observed, psfs, sigma = sim
    with pytest.raises(ValueError, match="PSF i must belong to stamp i"):
        deconvolve_stack(observed[:3], psfs[:2])
    with pytest.raises(ValueError, match="non-finite"):
        bad = observed[:2].copy()
        bad[0, 0, 0] = np.nan
        deconvolve_stack(bad, psfs[:2])


# --------------------------------------------------------------------------- real data
def _modopt_condat(observed, psfs, weights, tau, sigma, rho, n_iter, n_reweights):
    """The same problem through ModOpt, the stack as one array (its usual use for stamps)."""
    from modopt.math.convolve import convolve_stack
    from modopt.opt.algorithms import Condat
    from modopt.opt.gradient import GradBasic
    from modopt.opt.linear import LinearParent
    from modopt.opt.proximity import Positivity, SparseThreshold
    from modopt.opt.reweight import cwbReweight

    # the starlet re-implemented with scipy (zero outside the stamp at every scale)
    def smooth(c, level):
        kern = np.zeros(4 * 2**level + 1)
        kern[:: 2**level] = np.array([1, 4, 6, 4, 1]) / 16
        return convolve1d(convolve1d(c, kern, axis=-2, mode="constant"), kern, axis=-1, mode="constant")

    def op(x):
        bands, c = [], x
        for level in range(3):
            s = smooth(c, level)
            bands.append(c - s)
            c = s
        return np.stack(bands, axis=1)

    def adj_op(w):
        acc = w[:, 2] - smooth(w[:, 2], 2)
        for level in (1, 0):
            acc = w[:, level] + smooth(acc - w[:, level], level)
        return acc

    linear = LinearParent(op, adj_op)
    grad = GradBasic(observed, lambda x: convolve_stack(x, psfs), lambda x: convolve_stack(x, psfs, rot_kernel=True),
                     verbose=False)
    reweight = cwbReweight(weights)
    prox_dual = SparseThreshold(linear, reweight.weights)
    algo = Condat(np.maximum(observed, 0), np.zeros((len(observed), 3) + observed.shape[1:]), grad, Positivity(),
                  prox_dual, linear=linear, cost=None, reweight=reweight, rho=rho, sigma=sigma, tau=tau,
                  auto_iterate=False, progress=False, verbose=False)
    algo.iterate(max_iter=n_iter, n_rewightings=n_reweights)
    return algo.x_final


@needs_data
def test_matches_modopt_on_real_stamps(real):
    stamps, psfs = real
    obs, psf = stamps[:5].astype(np.float64), psfs[:5].astype(np.float64)
    sigma = mad_sigma(obs)
    w = band_weights(psf, sigma)
    weights = np.broadcast_to(w[:, :, None, None], (5, 3, 41, 41)).copy()
    spec = psf_spectra(psf, (41, 41), dtype="float64")
    tau_each, _ = step_sizes(np.asarray(lipschitz_constants(spec)), starlet_norm_sq((41, 41)) * 1.02)
    tau = float(tau_each.min())  # ModOpt takes one step for the stack
    n_iter, rho, sig = 60, 0.8, 0.5
    ref = _modopt_condat(obs, psf, weights, tau, sig, rho, n_iter, 1)
    kw = dict(tol=0, max_iter=n_iter, n_reweights=1, rho=rho, dual_step=sig, primal_step=tau, batch_size=32)
    x64, diag = deconvolve_stack(obs, psf, sigma, dtype="float64", **kw)
    assert (diag["iterations"] == 2 * n_iter).all()
    assert np.linalg.norm(x64 - ref) / np.linalg.norm(ref) < 1e-8
    x32, _ = deconvolve_stack(obs, psf, sigma, **kw)
    assert np.linalg.norm(x32 - ref) / np.linalg.norm(ref) < 1e-3
    assert np.median(nmse(x32, ref)) < 1e-5


@needs_data
def test_real_example_stack_converges(real):
    stamps, psfs = real
    assert stamps.shape == (100, 41, 41) and psfs.shape == (100, 41, 41)
    x, diag = deconvolve_stack(stamps, psfs, batch_size=128)
    assert x.min() >= 0 and np.all(np.isfinite(x))
    assert diag["converged"].mean() >= 0.8
    assert np.all(diag["noise_sigma"].between(1e-4, 1e-3))   # README: sigma about 3e-4
    # flux is kept to within a few percent where the galaxy is bright
    assert np.median(np.abs(x.sum((1, 2)) / stamps.sum((1, 2)) - 1)) < 0.1
