"""Space-variant PSF deconvolution: operators, solver behaviour, and agreement with ModOpt."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy.ndimage import convolve1d
from scipy.signal import fftconvolve

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
from skystack.deconvolve.solvers import band_weights, deconvolve_stack, step_sizes
from skystack.deconvolve.stamps import load_stack, load_stamps_and_psfs
from skystack.sim.stacks import simulate_truth_stack

os.environ.setdefault("JAX_PLATFORMS", "cpu")


DATA = str(SHARED_DATA / "deconv")
STAMPS_NPY = os.path.join(DATA, "example_image_stack.npy")
PSFS_NPY = os.path.join(DATA, "example_psfs.npy")
needs_data = pytest.mark.skipif(not os.path.exists(STAMPS_NPY), reason="example deconvolution data absent")


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
