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


def profile_components(x, geom, layout: Layout):
    """Unit-flux Gaussian components (amp, mean_px, cov_px2) of the source on one patch's image."""
    offset = x[layout.pos]
    if not layout.galaxy:
        return model.star_components(geom, offset)
    lf, u1, u2, ln_r = x[layout.shape]
    frac_dev = 1.0 / (1.0 + jnp.exp(-lf))
    return model.galaxy_components(geom, offset, frac_dev, shape_cov_from_u(u1, u2, jnp.exp(ln_r)))


def unit_profile(x, geom, layout: Layout, size_px: int):
    """Counts per nanomaggy on one patch (P, P) for the source's type and point parameters."""
    dx, dy = model.patch_grid(geom, size_px)
    amp, mean, cov = profile_components(x, geom, layout)
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


def _pixel_loglik_derivatives(profiles, moments, patches):
    """Per-pixel value and derivatives of the expected log likelihood in (s, F, V).

    Pixel p of image n contributes ``l(s_p, F_n, V_n)`` with mean model ``F s`` and model
    variance ``V s^2`` (``F``, ``V``: the flux mean and variance of the image's band). The
    sum over pixels is separable, so one reverse pass gives every pixel's gradient and three
    tangents of it (along s, F and V everywhere) every pixel's 3x3 Hessian.

    Returns the total, the gradient (3, N, P, P) and the Hessian (3, 3, N, P, P).
    """
    import jax

    bands = patches["band"]
    shape = profiles.shape
    per_image = lambda a: jnp.broadcast_to(a[:, None, None], shape)  # noqa: E731

    def total(z):
        s, f, v = z

        def one_image(s_n, f_n, v_n, p):
            return expected_pixel_loglik(p["data"], p["weight"], p["bg"], p["var"], p["gain"], p["poisson"],
                                         f_n * s_n, v_n * s_n * s_n, p["read_e2"], p["source_var_per_adu"])

        return jnp.sum(jax.vmap(one_image)(s, f, v, patches))

    z = jnp.stack([profiles, per_image(moments[0, bands]), per_image(moments[1, bands])])
    value, grad = jax.value_and_grad(total)(z)
    unit = jnp.eye(3, dtype=z.dtype)[:, :, None, None, None] * jnp.ones_like(z)[None]
    hess = jax.vmap(lambda u: jax.jvp(jax.grad(total), (z,), (u,))[1])(unit)
    return value, grad, hess


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

    profiles = jax.vmap(lambda p: unit_profile(x, p, layout, size_px))(patches)
    return _pixel_term(profiles, _flux_moments(x, layout), patches) + log_prior_terms(x, prior, layout)


def _flux_moments(x, layout: Layout):
    """Mean and variance (nmgy, nmgy^2) of every band's flux under q, stacked: (2, B)."""
    ln_mean, ln_var = band_log_moments(x, layout)
    flux_mean = jnp.exp(ln_mean + 0.5 * ln_var)
    return jnp.stack([flux_mean, jnp.expm1(ln_var) * flux_mean**2])


def _pixel_term(profiles, moments, patches):
    """The likelihood part of the ELBO given every patch's unit profile ``profiles`` (N, P, P)
    and the flux moments ``moments`` (2, B) of :func:`_flux_moments`.

    A sum over pixels, each depending on its own profile value: the Hessian in ``profiles``
    is diagonal.
    """
    import jax

    def one_image(g, p):
        mean, var = moments[0, p["band"]], moments[1, p["band"]]
        return expected_pixel_loglik(p["data"], p["weight"], p["bg"], p["var"], p["gain"], p["poisson"],
                                     mean * g, var * g * g, p["read_e2"], p["source_var_per_adu"])

    return jnp.sum(jax.vmap(one_image)(profiles, patches))


def _coefficient_function(x, geom, layout: Layout):
    """The components' log-density coefficients (K, 6) as a function of the point parameters."""
    pt = jnp.asarray(layout.point_index)

    def coefficients(t):
        return model.log_density_coefficients(*profile_components(x.at[pt].set(t), geom, layout))

    return coefficients


def _profile_and_jacobian(x, geom, layout: Layout, size_px: int):
    """One patch's unit profile (P*P,), its Jacobian in the point parameters (P*P, d_t), and the
    components' values (K, P*P, counts per nmgy) and the monomials (6, P*P) they were built on.

    Each component's pixel values are ``exp(c . m)`` with coefficients ``c(t)`` and monomials
    ``m`` of the pixel coordinates (``model.log_density_coefficients``), so the Jacobian is
    ``sum_k G_k (dc_k/dt . m)``: autodiff runs on the K x 6 coefficients, not on the pixels.
    """
    import jax

    coefficients = _coefficient_function(x, geom, layout)
    t = x[jnp.asarray(layout.point_index)]
    coef, d1 = coefficients(t), jax.jacfwd(coefficients)(t)            # (K, 6), (K, 6, d)
    mono = model.pixel_monomials(*model.patch_grid(geom, size_px)).reshape(6, -1)
    comp = geom["counts_per_nmgy"] * jnp.exp(coef @ mono)               # (K, P*P)
    k, _, d = d1.shape
    per_monomial = (comp.T @ d1.reshape(k, 6 * d)).reshape(-1, 6, d)    # (P*P, 6, d)
    return comp.sum(axis=0), jnp.einsum("pmi,mp->pi", per_monomial, mono), comp, mono, d1


def _monomial_product_index() -> np.ndarray:
    """Where the product of monomials m and l of ``model.pixel_monomials`` sits among the
    degree <= 4 monomials ``x^i y^(k-i)`` listed by degree k, then decreasing i."""
    powers = [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]            # (x, y) powers
    listed = [(i, k - i) for k in range(5) for i in range(k, -1, -1)]
    return np.array([[listed.index((a[0] + b[0], a[1] + b[1])) for b in powers] for a in powers])


_PRODUCT_INDEX = _monomial_product_index()


def _weighted_profile_curvature(x, geom, layout: Layout, comp, mono, d1, w):
    """``sum_p w_p d2 s_p / dt2`` on one patch (d_t, d_t).

    With ``ln G_k = c_k . m``: ``sum_k sum_p w G_k (d2c_k . m + (d1_k . m)(d1_k . m)^T)``, i.e.
    the Hessian of ``sum_k c_k . W_k`` (``W_k`` the w-weighted monomial sums, held fixed)
    plus ``d1_k^T W2_k d1_k`` with the weighted sums of monomial products ``W2_k``.
    """
    import jax

    weighted = comp * w[None, :]                                        # (K, P*P)
    moment1 = weighted @ mono.T                                         # (K, 6)
    # Products of two monomials are the 15 monomials of degree <= 4: sum those, then spread.
    px, py = mono[1], mono[2]
    quartic = jnp.stack([px**i * py**(k - i) for k in range(5) for i in range(k, -1, -1)])  # (15, P*P)
    moment2 = (weighted @ quartic.T)[:, _PRODUCT_INDEX]                 # (K, 6, 6)
    coefficients = _coefficient_function(x, geom, layout)
    curvature = jax.hessian(lambda t: jnp.sum(coefficients(t) * moment1))(x[jnp.asarray(layout.point_index)])
    return curvature + jnp.einsum("kmi,kml,klj->ij", d1, moment2, d1)


def elbo_value_grad_hess(x, patches, prior, layout: Layout, size_px: int):
    """Value, gradient and exact Hessian of :func:`elbo` in x, by the chain rule.

    The profiles ``s`` depend only on the point parameters ``t = x[point_index]``, the pixel
    term ``D(s, q)`` on x only through the flux moments ``q(x)`` (2 per band), and D is a sum
    over pixels. So, with ``w = dD/ds``, ``c = d2D/ds2`` (diagonal), ``J = ds/dt``,
    ``M = d2D/ds dq`` and ``Q = dq/dx``:

    * ``d2/dt2 = sum w d2s/dt2 + J^T c J``, ``d2/dt dx = J^T M Q``,
      ``d2/dx2 |s = Q^T (d2D/dq2) Q + sum_j (dD/dq_j) d2q_j/dx2``.

    Autodiff runs on the per-pixel arithmetic with 2B tangents, on the components'
    coefficients and on q(x); the pixel grids see closed forms only (``_profile_and_jacobian``,
    ``_weighted_profile_curvature``). Agrees with autodiff of :func:`elbo` to rounding.
    """
    import jax

    pt = jnp.asarray(layout.point_index)
    n_img = patches["data"].shape[0]
    s, jac, comp, mono, d1 = jax.vmap(lambda p: _profile_and_jacobian(x, p, layout, size_px))(patches)
    s = s.reshape(n_img, size_px, size_px)
    q = _flux_moments(x, layout)
    value, d1_pix, d2_pix = _pixel_loglik_derivatives(s, q, patches)
    w, diag = d1_pix[0], d2_pix[0, 0]
    # Pixels reach q through their image's band: sum them per image, then per band.
    onehot = (patches["band"][:, None] == jnp.arange(q.shape[1])[None]).astype(q.dtype)   # (N, B)
    grad_q = jnp.stack([onehot.T @ d1_pix[j].sum(axis=(1, 2)) for j in (1, 2)])           # (2, B)
    per_image_hess = d2_pix[1:, 1:].sum(axis=(3, 4))                                        # (2, 2, N)
    hess_q = jnp.einsum("ijn,nb,nc->ibjc", per_image_hess, onehot, onehot).reshape(q.size, q.size)
    dq = jax.jacfwd(_flux_moments)(x, layout).reshape(2, -1, x.size)                         # (2, B, d)
    dq_image = jnp.einsum("nb,jbd->jnd", onehot, dq)                                         # (2, N, d)
    mixed = jnp.einsum("jnyx,jnd->nyxd", d2_pix[0, 1:], dq_image).reshape(-1, x.size)        # (N P P, d)
    dq = dq.reshape(q.size, -1)
    q_curvature = jax.hessian(lambda z: jnp.sum(_flux_moments(z, layout) * grad_q))(x)
    w = w.reshape(n_img, -1)
    second = jnp.sum(jax.vmap(lambda p, c, m, d, ww: _weighted_profile_curvature(x, p, layout, c, m, d, ww))(
        patches, comp, mono, d1, w), axis=0)
    jac = jac.reshape(-1, pt.size)                                          # (N P P, d_t)
    t_block = second + jac.T @ (diag.reshape(-1, 1) * jac)
    cross = jac.T @ mixed                                                   # (d_t, d); zero t columns
    grad = (grad_q.reshape(-1) @ dq).at[pt].add(jac.T @ w.reshape(-1))
    hess = dq.T @ hess_q @ dq + q_curvature
    hess = hess.at[pt].add(cross).at[:, pt].add(cross.T)
    hess = hess.at[pt[:, None], pt[None, :]].add(t_block)
    value = value + log_prior_terms(x, prior, layout)
    grad = grad + jax.grad(log_prior_terms)(x, prior, layout)
    hess = hess + jax.hessian(log_prior_terms)(x, prior, layout)
    return value, grad, 0.5 * (hess + hess.T)
