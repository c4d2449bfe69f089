"""Gaussian-mixture PSFs and galaxy profiles reproduce GalSim's rendering."""
import galsim
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq

from skystack.catalog import elbo as E
from skystack.catalog import model
from skystack.catalog.psf import fit_psf_image, gaussian_psf, mixture_image


def test_psf_mixture_fit_reproduces_gaussian_psf():
    sigma_px = 2.0
    img = galsim.Gaussian(sigma=sigma_px).drawImage(nx=25, ny=25, scale=1.0).array
    mix = fit_psf_image(img, n_components=2)
    assert abs(mix.amp.sum() - 1.0) < 1e-12
    rendered = mixture_image(mix, img.shape, (12.0, 12.0))
    norm = img / img.sum()
    assert np.max(np.abs(rendered - norm)) < 0.005 * norm.max()
    # Second moment: the Gaussian's plus the pixel box's 1/12.
    assert abs(mix.second_moment_px2() - (sigma_px**2 + 1 / 12)) < 0.02
    np.testing.assert_allclose(mix.amp @ mix.mean_px, 0.0, atol=1e-3)


def test_gaussian_psf_matches_pixelised_gaussian():
    img = galsim.Gaussian(sigma=1.5).drawImage(nx=21, ny=21, scale=1.0).array
    rendered = mixture_image(gaussian_psf(1.5), img.shape, (10.0, 10.0))
    assert np.max(np.abs(rendered - img)) < 0.01 * img.max()


@pytest.mark.parametrize("amp,var,tol", [(model.EXP_AMP_FULL, model.EXP_VAR_FULL, 2e-3),
                                         (model.DEV_AMP_FULL, model.DEV_VAR_FULL, 2e-3),
                                         (model.EXP_AMP, model.EXP_VAR, 5e-3), (model.DEV_AMP, model.DEV_VAR, 5e-3)])
def test_profile_mixtures_have_unit_half_light_radius(amp, var, tol):
    r50 = brentq(lambda r: np.sum(amp * (1 - np.exp(-r * r / (2 * var)))) - 0.5, 0.01, 10)
    assert abs(r50 - 1.0) < tol
    assert abs(amp.sum() - 1.0) < 1e-12


def _geom(psf_sigma_px, jac):
    mix = gaussian_psf(psf_sigma_px)
    return {"origin": jnp.array([-12.0, -12.0]), "jac": jnp.asarray(jac), "psf_amp": jnp.asarray(mix.amp),
            "psf_mean": jnp.asarray(mix.mean_px), "psf_cov": jnp.asarray(mix.cov_px2),
            "counts_per_nmgy": jnp.asarray(1.0)}


@pytest.mark.parametrize("frac_dev,q,angle_deg,radius", [(0.0, 0.5, 30.0, 1.5), (1.0, 0.8, 120.0, 1.2),
                                                         (0.4, 0.6, 75.0, 2.0)])
def test_galaxy_model_matches_galsim(frac_dev, q, angle_deg, radius):
    scale = 0.9                                     # arcsec/px, north up, east left
    jac = np.array([[-1 / scale, 0.0], [0.0, 1 / scale]])
    psf_sigma_px = 1.4
    gal = galsim.Add([galsim.DeVaucouleurs(half_light_radius=radius, flux=frac_dev),
                      galsim.Exponential(half_light_radius=radius, flux=1 - frac_dev)])
    gal = gal.shear(q=q, beta=angle_deg * galsim.degrees)
    obj = galsim.Convolve(gal, galsim.Gaussian(sigma=psf_sigma_px * scale))
    wcs = galsim.JacobianWCS(-scale, 0.0, 0.0, scale)
    ref = obj.drawImage(nx=25, ny=25, wcs=wcs).array
    lay = E.Layout(1, 0, True)
    x = np.zeros(lay.size)
    a = np.radians(angle_deg)
    x[lay.shape] = [np.log(max(frac_dev, 1e-9) / max(1 - frac_dev, 1e-9)), -np.log(q) * np.cos(2 * a),
                    -np.log(q) * np.sin(2 * a), np.log(radius)]
    img = np.asarray(E.unit_profile(jnp.asarray(x), _geom(psf_sigma_px, jac), lay, 25))
    assert np.max(np.abs(img - ref)) < 0.03 * ref.max()
    assert abs(img.sum() - ref.sum()) < 0.02


def test_star_model_is_shifted_psf():
    jac = np.eye(2)
    lay = E.Layout(1, 0, False)
    x = np.zeros(lay.size)
    x[:2] = [0.3, -0.2]
    img = np.asarray(E.unit_profile(jnp.asarray(x), _geom(1.5, jac), lay, 25))
    y, xx = np.mgrid[0:25, 0:25] - 12.0
    cx, cy = (img * xx).sum() / img.sum(), (img * y).sum() / img.sum()
    assert abs(cx - 0.3) < 1e-3 and abs(cy + 0.2) < 1e-3
    assert abs(img.sum() - 1.0) < 1e-3


def test_shape_vector_gives_axis_ratio_and_angle():
    q, a = 0.4, np.radians(35.0)
    u = -np.log(q) * np.array([np.cos(2 * a), np.sin(2 * a)])
    cov = np.asarray(E.shape_cov_from_u(u[0], u[1], 2.0))
    w, v = np.linalg.eigh(cov)
    assert abs(np.sqrt(w[0] / w[1]) - q) < 1e-12
    assert abs(np.sqrt(w[0] * w[1]) - 4.0) < 1e-12
    major = v[:, 1] * np.sign(v[0, 1])
    assert abs(np.degrees(np.arctan2(major[1], major[0])) - 35.0) < 1e-9
    # Round shapes are smooth (no angle singularity): finite covariance at u = 0.
    np.testing.assert_allclose(np.asarray(E.shape_cov_from_u(0.0, 0.0, 1.0)), np.eye(2))
