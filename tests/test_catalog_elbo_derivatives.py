"""The ELBO's closed-form derivatives (what the fits use) agree with autodiff of the ELBO itself.

The patches mix what real images bring: a Moffat PSF fitted as a 4-Gaussian mixture and a
Gaussian PSF padded with zero-weight components, Poisson images with read noise next to
sky-subtracted ones with per-pixel variance, masked pixels, three bands and a sheared,
rotated pixel grid.
"""
import functools

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skystack.catalog import elbo as E
from skystack.catalog.priors import type_prior_arrays
from skystack.catalog.psf import fit_psf_image, gaussian_psf

SIZE_PX = 13
BANDS = ["g", "r", "i"]


def _patches(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    moffat = galsim.Moffat(beta=2.5, fwhm=3.0).drawImage(nx=31, ny=31, scale=1.0).array
    psfs = [fit_psf_image(moffat, n_components=4), gaussian_psf(1.3).padded(4)]
    rows = []
    for n in range(6):
        psf = psfs[n % 2]
        poisson = n % 3 != 2
        angle = rng.uniform(0, np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        jac = rot @ np.diag([-1.0, 1.0]) @ np.array([[1 / 0.4, 0.1], [0.0, 1 / 0.45]])
        model = 40.0 * np.exp(-0.5 * np.sum((np.indices((SIZE_PX, SIZE_PX)) - SIZE_PX // 2) ** 2, axis=0) / 4.0)
        bg = np.full((SIZE_PX, SIZE_PX), 120.0 if poisson else 3.0)
        var = np.full((SIZE_PX, SIZE_PX), 25.0) * rng.uniform(0.8, 1.2, (SIZE_PX, SIZE_PX))
        data = rng.poisson(bg + model).astype(float) if poisson else bg + model + rng.normal(0, 5, bg.shape)
        weight = np.ones((SIZE_PX, SIZE_PX))
        weight[rng.integers(0, SIZE_PX, 6), rng.integers(0, SIZE_PX, 6)] = 0.0
        rows.append({
            "origin": np.array([-(SIZE_PX // 2) + rng.uniform(-0.5, 0.5), -(SIZE_PX // 2) + rng.uniform(-0.5, 0.5)]),
            "jac": jac, "psf_amp": psf.amp, "psf_mean": psf.mean_px, "psf_cov": psf.cov_px2,
            "counts_per_nmgy": np.asarray(rng.uniform(80, 120)), "band": np.asarray(n % 3),
            "data": data, "weight": weight, "bg": bg, "var": var, "gain": np.asarray(1.7 if poisson else 1.0),
            "poisson": np.asarray(poisson), "read_e2": np.asarray(30.0 if poisson else 0.0),
            "source_var_per_adu": np.asarray(0.0 if poisson else 0.5),
        })
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


# Module-level and taking the patches as arguments: the second seed reuses the compilations.
@functools.partial(jax.jit, static_argnums=3)
def _closed_form(z, patches, prior, layout):
    return E.elbo_value_grad_hess(z, patches, prior, layout, SIZE_PX)


@functools.partial(jax.jit, static_argnums=3)
def _autodiff(z, patches, prior, layout):
    def fun(w):
        return E.elbo(w, patches, prior, layout, SIZE_PX)

    return fun(z), jax.grad(fun)(z), jax.hessian(fun)(z)


@pytest.mark.parametrize("galaxy", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_derivatives_match_autodiff(galaxy, seed):
    patches = _patches(seed)
    layout = E.Layout(len(BANDS), 1, galaxy)
    prior = {k: jnp.asarray(v) for k, v in type_prior_arrays(None, BANDS, "galaxy" if galaxy else "star").items()}
    rng = np.random.default_rng(10 + seed)
    x = np.zeros(layout.size)
    x[layout.pos] = rng.normal(0, 0.3, 2)
    x[layout.mu_ref] = np.log(2.0)
    x[layout.colors] = rng.normal(0, 0.3, layout.n_colors)
    x[layout.ln_sd_ref] = np.log(0.1)
    x[layout.ln_sd_colors] = np.log(0.2)
    if galaxy:
        x[layout.shape] = [0.3, 0.4, -0.2, np.log(0.8)]
    x = jnp.asarray(x)

    value, grad, hess = _closed_form(x, patches, prior, layout)
    v_auto, g_auto, h_auto = _autodiff(x, patches, prior, layout)
    assert abs(float(value) - float(v_auto)) < 1e-9 * abs(float(v_auto))
    np.testing.assert_allclose(grad, g_auto, rtol=0, atol=1e-9 * float(jnp.max(jnp.abs(g_auto))))
    np.testing.assert_allclose(hess, h_auto, rtol=0, atol=1e-9 * float(jnp.max(jnp.abs(h_auto))))
    # The galaxy's shape rows are not trivially zero (the comparison tests something).
    if galaxy:
        assert float(jnp.min(jnp.abs(jnp.diag(h_auto)[layout.shape]))) > 1e-3
