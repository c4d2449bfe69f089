"""The evidence lower bound of one source given its pixel patches, for stars and galaxies.

Variational family (per source, conditional on its type ``a``):

* reference-band flux ``f_ref`` lognormal: ``ln f_ref ~ N(mu_ref, sd_ref^2)``, nanomaggies;
* colours ``c_k = ln(f_{k+1} / f_k)`` of adjacent bands sorted by wavelength (positive =
  redder; ``c_gr = ln(f_r / f_g) = 0.921 (g - r)``), independent Gaussians;
* position offset (arcsec east, north) and galaxy shape as point estimates.

The type posterior ``q(a)`` is Bernoulli; with brightness conditional on type (as in
Celeste) the optimal ``q(a)`` is proportional to ``p(a) exp(ELBO_a)``, so stars and galaxies
are fitted separately and combined afterwards (see ``fit.py``).

Likelihood per pixel: Poisson in electrons (``gain * ADU``) with rate
``gain * (background + model)`` when the image still holds its sky; Gaussian with the
pixel variance when it is sky-subtracted. The expectation of ``ln(rate)`` under ``q`` uses
the second-order (delta-method) expansion ``ln E[l] - Var[l] / (2 E[l]^2)``.

Parameter vectors (unconstrained):
``[east_arcsec, north_arcsec, mu_ref, colour means (B-1), ln sd_ref, ln sd_colours (B-1)]``
and, for galaxies, ``[logit frac_dev, u1, u2, ln radius_arcsec]`` where the shape vector
``u`` has ``|u| = -ln(axis_ratio)`` and direction ``2 * angle`` (smooth at round shapes).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from . import model

LN_2PI = float(np.log(2.0 * np.pi))


@dataclass(frozen=True)
class Layout:
    """Positions of the parameters in a source's vector, for ``n_bands`` and a type."""

    n_bands: int
    ref_band: int
    galaxy: bool

    @property
    def n_colors(self) -> int:
        return self.n_bands - 1

    @property
    def pos(self) -> slice:
        return slice(0, 2)

    @property
    def mu_ref(self) -> int:
        return 2

    @property
    def colors(self) -> slice:
        return slice(3, 3 + self.n_colors)

    @property
    def ln_sd_ref(self) -> int:
        return 3 + self.n_colors

    @property
    def ln_sd_colors(self) -> slice:
        return slice(4 + self.n_colors, 4 + 2 * self.n_colors)

    @property
    def shape(self) -> slice:
        s = 4 + 2 * self.n_colors
        return slice(s, s + 4) if self.galaxy else slice(s, s)

    @property
    def size(self) -> int:
        return 4 + 2 * self.n_colors + (4 if self.galaxy else 0)

    @cached_property
    def mean_index(self) -> np.ndarray:
        """Indices of the parameters with a Laplace (linear-response) covariance."""
        return np.r_[0, 1, self.mu_ref, np.arange(self.n_colors) + 3,
                     np.arange(self.shape.start, self.shape.stop)].astype(int)

    @cached_property
    def point_index(self) -> np.ndarray:
        """Indices of the point-estimated parameters (position, shape)."""
        return np.r_[0, 1, np.arange(self.shape.start, self.shape.stop)].astype(int)

    @cached_property
    def band_signs(self) -> np.ndarray:
        """(B, B-1) matrix S with ``ln f_b = mu_ref + S[b] @ colours``."""
        s = np.zeros((self.n_bands, max(self.n_colors, 0)))
        for b in range(self.n_bands):
            if b > self.ref_band:
                s[b, self.ref_band:b] = 1.0
            elif b < self.ref_band:
                s[b, b:self.ref_band] = -1.0
        return s

    def __hash__(self):
        return hash((self.n_bands, self.ref_band, self.galaxy))


def shape_from_u(u1, u2):
    """Axis ratio and major-axis angle (rad, east towards north) of a shape vector."""
    return jnp.exp(-jnp.hypot(u1, u2)), 0.5 * jnp.arctan2(u2, u1)


def _cosh_sinhc_sq(s):
    """cosh(sqrt(s)) and sinh(sqrt(s))/sqrt(s), smooth at s = 0 (for autodiff)."""
    small = s < 1e-6
    s_safe = jnp.where(small, 1.0, s)
    x = jnp.sqrt(s_safe)
    cosh = jnp.where(small, 1.0 + s / 2.0 + s * s / 24.0, jnp.cosh(x))
    sinhc = jnp.where(small, 1.0 + s / 6.0 + s * s / 120.0, jnp.sinh(x) / x)
    return cosh, sinhc


def shape_cov_from_u(u1, u2, radius_arcsec):
    """Unit-component covariance (arcsec^2): ``radius^2 * expm([[u1, u2], [u2, -u1]])``.

    Its eigenvalues are ``radius^2 / q`` and ``radius^2 q`` with ``q = exp(-|u|)``, so
    ``radius`` is the circularised half-light radius.
    """
    cosh, sinhc = _cosh_sinhc_sq(u1 * u1 + u2 * u2)
    m = jnp.array([[cosh + sinhc * u1, sinhc * u2], [sinhc * u2, cosh - sinhc * u1]])
    return radius_arcsec**2 * m


def band_log_moments(x, layout: Layout):
    """Mean and variance of ``ln f_b`` (nmgy) for every band under q."""
    signs = jnp.asarray(layout.band_signs)
    mean = x[layout.mu_ref] + signs @ x[layout.colors]
    var = jnp.exp(2.0 * x[layout.ln_sd_ref]) + (signs**2) @ jnp.exp(2.0 * x[layout.ln_sd_colors])
    return mean, var


def unit_profile(x, geom, layout: Layout, size_px: int):
    """Counts per nanomaggy on one patch (P, P) for the source's type and point parameters."""
    dx, dy = model.patch_grid(geom, size_px)
    offset = x[layout.pos]
    if layout.galaxy:
        lf, u1, u2, ln_r = x[layout.shape]
        jac = geom["jac"]
        shape_px = jac @ shape_cov_from_u(u1, u2, jnp.exp(ln_r)) @ jac.T
        frac_dev = 1.0 / (1.0 + jnp.exp(-lf))
        prof_amp = jnp.concatenate([(1.0 - frac_dev) * model.EXP_AMP, frac_dev * model.DEV_AMP])
        prof_var = jnp.asarray(np.concatenate([model.EXP_VAR, model.DEV_VAR]))
        shift = jac @ offset
        k = geom["psf_amp"].shape[0]
        amp = (prof_amp[:, None] * geom["psf_amp"][None, :]).reshape(-1)
        mean = jnp.broadcast_to(geom["psf_mean"][None] + shift, (prof_var.size, k, 2)).reshape(-1, 2)
        cov = (prof_var[:, None, None, None] * shape_px[None, None] + geom["psf_cov"][None]).reshape(-1, 2, 2)
    else:
        amp, mean, cov = model.star_components(geom, offset)
    return geom["counts_per_nmgy"] * model.gaussian_mixture_on_grid(amp, mean, cov, dx, dy)


def expected_pixel_loglik(data, weight, bg, var, gain, poisson, mean_model, var_model, read_e2=0.0,
                          source_var_per_adu=0.0):
    """Sum over a patch of E_q[ln p(pixel)] (delta method for the Poisson log-rate).

    ``data``, ``bg``, ``mean_model`` in ADU, ``var`` and ``var_model`` in ADU^2. Poisson
    images add the read noise (``read_e2``, electrons^2) to counts and rate alike, the usual
    shifted-Poisson approximation; Gaussian images add the sources' own shot noise,
    ``source_var_per_adu`` (1/gain, or 0 where ``var`` already holds it) per ADU of
    ``bg + mean_model`` (``bg`` is then other sources only).
    """
    # Poisson in electrons.
    x_e = jnp.maximum(gain * data + read_e2, 0.0)
    rate = gain * (bg + mean_model) + read_e2
    rate = jnp.maximum(rate, 1e-6)
    rate_var = gain * gain * var_model
    ll_p = x_e * (jnp.log(rate) - rate_var / (2.0 * rate * rate)) - rate - gammaln(x_e + 1.0)
    # Gaussian with a known variance (plus the model's shot noise at its mean).
    resid = data - bg - mean_model
    total_var = var + source_var_per_adu * jnp.maximum(bg + mean_model, 0.0)
    ll_g = -0.5 * (resid * resid + var_model) / total_var - 0.5 * (jnp.log(total_var) + LN_2PI)
    ll = jnp.where(poisson, ll_p, ll_g)
    return jnp.sum(jnp.where(weight > 0, weight * ll, 0.0))


def _normal_logpdf(x, mean, sd):
    return -0.5 * ((x - mean) / sd) ** 2 - jnp.log(sd) - 0.5 * LN_2PI


def _kl_normal(mean_q, sd_q, mean_p, sd_p):
    return jnp.log(sd_p / sd_q) + (sd_q**2 + (mean_q - mean_p) ** 2) / (2.0 * sd_p**2) - 0.5


def log_prior_terms(x, prior, layout: Layout):
    """Prior contributions to the ELBO: -KL for flux and colours, log density for the rest.

    ``prior`` is a dict of arrays for this type (see ``priors.type_prior_arrays``).
    """
    out = jnp.sum(_normal_logpdf(x[layout.pos], 0.0, prior["pos_sd_arcsec"]))
    out -= _kl_normal(x[layout.mu_ref], jnp.exp(x[layout.ln_sd_ref]), prior["ln_flux_mean"], prior["ln_flux_sd"])
    if layout.n_colors:
        out -= jnp.sum(_kl_normal(x[layout.colors], jnp.exp(x[layout.ln_sd_colors]),
                                  prior["color_mean"], prior["color_sd"]))
    if layout.galaxy:
        lf, u1, u2, ln_r = x[layout.shape]
        out += _normal_logpdf(lf, prior["logit_frac_dev_mean"], prior["logit_frac_dev_sd"])
        out += _normal_logpdf(u1, 0.0, prior["shape_u_sd"]) + _normal_logpdf(u2, 0.0, prior["shape_u_sd"])
        out += _normal_logpdf(ln_r, prior["ln_radius_mean"], prior["ln_radius_sd"])
    return out


def elbo(x, patches, prior, layout: Layout, size_px: int):
    """ELBO of one source of a given type over all its patches (nats).

    ``patches`` is a dict of arrays with a leading image axis N: geometry (``origin``,
    ``jac``, ``psf_amp``, ``psf_mean``, ``psf_cov``, ``counts_per_nmgy``), ``band`` (int),
    pixels ``data``, ``weight``, ``bg`` (sky plus other sources, ADU), ``var`` (ADU^2),
    ``gain``, ``poisson`` (bool), ``read_e2`` and ``source_var_per_adu`` (see
    :func:`expected_pixel_loglik`).
    """
    import jax

    ln_mean, ln_var = band_log_moments(x, layout)
    flux_mean = jnp.exp(ln_mean + 0.5 * ln_var)
    flux_var = jnp.expm1(ln_var) * flux_mean**2

    def one_image(p):
        g = unit_profile(x, p, layout, size_px)
        b = p["band"]
        return expected_pixel_loglik(p["data"], p["weight"], p["bg"], p["var"], p["gain"], p["poisson"],
                                     flux_mean[b] * g, flux_var[b] * g * g, p["read_e2"], p["source_var_per_adu"])

    ll = jnp.sum(jax.vmap(one_image)(patches))
    return ll + log_prior_terms(x, prior, layout)
