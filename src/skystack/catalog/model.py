"""Light profiles of stars and galaxies as Gaussian mixtures, rendered on pixel patches.

Everything a source needs to be drawn in one image is its *geometry*: the pixel position of
its initial sky position, the local Jacobian from sky offsets (arcsec, east and north) to
pixels, and the image's PSF as a Gaussian mixture at that position. With a Gaussian-mixture
galaxy profile and a Gaussian-mixture PSF the convolution is analytic: every pair of
components gives one Gaussian whose covariance is the sum of the two.

Conventions
-----------
* Sky offsets ``(east_arcsec, north_arcsec)``; ``jac_px_per_arcsec[i, j] = d pixel_i / d sky_j``
  with pixel index 0 = x (fastest axis), 1 = y, sky index 0 = east, 1 = north.
* Galaxy shape: circularised half-light radius ``radius_arcsec`` (geometric mean of the
  half-light semi-axes, as an area-preserving shear keeps it), axis ratio ``q`` (minor/major),
  position angle ``angle_rad`` of the major axis measured from east towards north.
* Profiles are normalised to unit total flux, so a source of ``flux_counts`` has that many
  counts (ADU) summed over all pixels.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Gaussian-mixture approximations of the untruncated exponential (Sersic n=1) and
# de Vaucouleurs (n=4) profiles with unit half-light radius: amplitudes sum to one,
# variances in units of the half-light radius squared. They are least-squares refits of
# the published Hogg & Lang (2013) mixtures to the untruncated profiles (the published
# ones describe truncated profiles whose half-light radii are 0.99 and 0.92 in these
# units); enclosed flux agrees to better than 1e-3 (exp) and 6e-3 (dev) at all radii.
EXP_AMP = np.array([0.00522357, 0.03755891, 0.14762665, 0.34036771, 0.36796756, 0.10125559])
EXP_VAR = np.array([0.01180739, 0.06335476, 0.21177529, 0.57529734, 1.38928709, 3.18600512])
DEV_AMP = np.array([0.019952, 0.05310051, 0.10728382, 0.16795468, 0.20963126, 0.20712407,
                    0.15771592, 0.07723774])
DEV_VAR = np.array([6.77015326e-04, 6.16469016e-03, 3.41810885e-02, 1.54901819e-01,
                    6.37168852e-01, 2.54750427e+00, 1.08533042e+01, 6.82743797e+01])
EXP_AMP_FULL = EXP_AMP / EXP_AMP.sum()
DEV_AMP_FULL = DEV_AMP / DEV_AMP.sum()
EXP_VAR_FULL, DEV_VAR_FULL = EXP_VAR, DEV_VAR


def merge_narrow_components(amp, var, n_merge: int):
    """Replace the ``n_merge`` narrowest components by one with their total weight and mean
    variance (second moment kept). After convolution with any seeing-limited PSF these
    components are indistinguishable, and every component costs a full pass over the pixels.
    """
    a, v = amp[:n_merge], var[:n_merge]
    return np.r_[a.sum(), amp[n_merge:]], np.r_[(a * v).sum() / a.sum(), var[n_merge:]]


# What the model renders: 5 + 6 components (variances below 0.07 re^2 merged).
EXP_AMP, EXP_VAR = merge_narrow_components(EXP_AMP_FULL, EXP_VAR_FULL, 2)
DEV_AMP, DEV_VAR = merge_narrow_components(DEV_AMP_FULL, DEV_VAR_FULL, 3)

# A pixel integrates the light over a unit box; for a smooth profile that is a Gaussian
# of this variance (px^2) added to every component.
PIXEL_BOX_VAR_PX2 = 1.0 / 12.0


def rotation(angle_rad):
    """2x2 rotation matrix (counter-clockwise from the first axis)."""
    c, s = jnp.cos(angle_rad), jnp.sin(angle_rad)
    return jnp.array([[c, -s], [s, c]])


def shape_cov_arcsec2(radius_arcsec, axis_ratio, angle_rad):
    """Covariance (arcsec^2, east/north) of a unit-variance component of the profile.

    The profile's component ``k`` has covariance ``var_k * shape_cov``. An area-preserving
    shear keeps the geometric mean of the axes at ``radius_arcsec``.
    """
    rot = rotation(angle_rad)
    diag = jnp.array([1.0 / axis_ratio, axis_ratio]) * radius_arcsec**2
    return (rot * diag) @ rot.T


def gaussian_mixture_on_grid(amp, mean_px, cov_px2, dx_px, dy_px):
    """Sum of 2-D Gaussians evaluated at pixel centres.

    Parameters
    ----------
    amp : (K,) total flux of each component
    mean_px : (K, 2) centres (x, y) in the same frame as the grid
    cov_px2 : (K, 2, 2) covariances
    dx_px, dy_px : (P,) and (P,) pixel-centre coordinates along x and y

    Returns
    -------
    (P, P) array indexed [y, x], flux per pixel.
    """
    a, b, c = cov_px2[:, 0, 0], cov_px2[:, 0, 1], cov_px2[:, 1, 1]
    det = a * c - b * b
    # Fold the inverse covariance and the normalisation into per-component coefficients on
    # the (K, P) axes, so that only an add, a multiply-add and the exponential run on the
    # full (K, P, P) grid.
    ex = dx_px[None, :] - mean_px[:, 0, None]          # (K, P) along x
    ey = dy_px[None, :] - mean_px[:, 1, None]          # (K, P) along y
    # Zero-weight (padding) components must give zero with finite derivatives of every
    # order, hence the log of a placeholder where the weight is zero.
    positive = amp > 0
    log_amp = jnp.where(positive, jnp.log(jnp.where(positive, amp, 1.0)), -700.0)
    log_norm = log_amp - jnp.log(2.0 * jnp.pi * jnp.sqrt(det))
    qx = (-0.5 * c / det)[:, None] * ex * ex + log_norm[:, None]
    qy = (-0.5 * a / det)[:, None] * ey * ey
    bx = (b / det)[:, None] * ex
    expo = qx[:, None, :] + qy[:, :, None] + bx[:, None, :] * ey[:, :, None]
    return jnp.sum(jnp.exp(expo), axis=0)


def log_density_coefficients(amp, mean_px, cov_px2):
    """Each component's log density as a quadratic in pixel coordinates: (K, 6) coefficients.

    ``ln(amp N(x, y; mean, cov)) = c . (1, x, y, x^2, x y, y^2)``. Written this way the
    derivatives of a component's pixel values with respect to anything its parameters depend
    on are those of its six coefficients times the monomials (``pixel_monomials``).
    """
    a, b, c = cov_px2[:, 0, 0], cov_px2[:, 0, 1], cov_px2[:, 1, 1]
    det = a * c - b * b
    pxx, pxy, pyy = c / det, -b / det, a / det          # precision matrix
    mx, my = mean_px[:, 0], mean_px[:, 1]
    positive = amp > 0
    log_amp = jnp.where(positive, jnp.log(jnp.where(positive, amp, 1.0)), -700.0)
    const = (log_amp - jnp.log(2.0 * jnp.pi * jnp.sqrt(det))
             - 0.5 * (pxx * mx * mx + 2.0 * pxy * mx * my + pyy * my * my))
    return jnp.stack([const, pxx * mx + pxy * my, pxy * mx + pyy * my, -0.5 * pxx, -pxy, -0.5 * pyy], axis=-1)


def pixel_monomials(dx_px, dy_px):
    """(6, P, P) monomials (1, x, y, x^2, x y, y^2) at the pixel centres of a patch, indexed [y, x]."""
    x = jnp.broadcast_to(dx_px[None, :], (dy_px.size, dx_px.size))
    y = jnp.broadcast_to(dy_px[:, None], (dy_px.size, dx_px.size))
    return jnp.stack([jnp.ones_like(x), x, y, x * x, x * y, y * y])


def star_components(geom, offset_arcsec):
    """Unit-flux components of a point source: the PSF mixture moved to the source.

    ``geom`` holds ``jac`` (2, 2), ``psf_amp`` (K,), ``psf_mean`` (K, 2), ``psf_cov`` (K, 2, 2).
    Returns (amp, mean_px, cov_px2) relative to the initial pixel position.
    """
    shift = geom["jac"] @ offset_arcsec
    return geom["psf_amp"], geom["psf_mean"] + shift, geom["psf_cov"]


def galaxy_components(geom, offset_arcsec, frac_dev, shape_cov):
    """Unit-flux components of a galaxy (exp + dev mixture) convolved with the PSF mixture.

    ``shape_cov`` is the covariance of a unit-variance profile component (arcsec^2,
    east/north), e.g. :func:`shape_cov_arcsec2` or ``elbo.shape_cov_from_u``.
    """
    jac = geom["jac"]
    shape_px = jac @ shape_cov @ jac.T
    prof_amp = jnp.concatenate([(1.0 - frac_dev) * EXP_AMP, frac_dev * DEV_AMP])
    prof_var = jnp.concatenate([jnp.asarray(EXP_VAR), jnp.asarray(DEV_VAR)])
    shift = jac @ offset_arcsec
    amp = (prof_amp[:, None] * geom["psf_amp"][None, :]).reshape(-1)
    mean = jnp.broadcast_to(geom["psf_mean"][None] + shift, (prof_var.size,) + geom["psf_mean"].shape).reshape(-1, 2)
    cov = (prof_var[:, None, None, None] * shape_px[None, None] + geom["psf_cov"][None]).reshape(-1, 2, 2)
    return amp, mean, cov


def patch_grid(geom, size_px: int):
    """Pixel-centre coordinates of a patch relative to the source's initial pixel position."""
    steps = jnp.arange(size_px, dtype=geom["origin"].dtype)
    return geom["origin"][0] + steps, geom["origin"][1] + steps
