"""Physical constants, photometric conventions and the sites skystack knows, in one place.

Every other module takes these from here; none defines its own copy.
"""
from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------- photometry
#: AB magnitude of one nanomaggy: m = 22.5 - 2.5 log10(flux_nmgy).
NMGY_ZERO_MAG = 22.5
#: ln(10) / 2.5: d(ln flux) per magnitude.
MAG_TO_LN = 0.4 * np.log(10.0)
#: FWHM of a Gaussian per unit sigma.
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: sigma of a Gaussian = 0.7413 x its interquartile range.
SIGMA_G_PER_IQR = 0.7413
#: sigma of a Gaussian = 1.4826 x its median absolute deviation.
MAD_TO_SIGMA = 1.4826


def counts_per_nmgy(magzp):
    """ADU per nanomaggy for AB zero points ``magzp`` (1 where the zero point is not finite).

    Returns a float for a scalar, an array for an array.
    """
    zp = np.asarray(magzp, dtype=np.float64)
    out = np.where(np.isfinite(zp), 10.0 ** (-0.4 * (NMGY_ZERO_MAG - zp)), 1.0)
    return float(out) if out.ndim == 0 else out


def nmgy_to_mag(flux_nmgy):
    """AB magnitude of a flux in nanomaggies (NaN for flux <= 0)."""
    f = np.asarray(flux_nmgy, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, NMGY_ZERO_MAG - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)


# ----------------------------------------------------------------------------- dynamics, time
AU_KM = 149597870.700  # IAU 2012 astronomical unit
C_AU_PER_DAY = 299792.458 * 86400.0 / AU_KM  # speed of light
GAUSS_K = 0.01720209895  # Gaussian gravitational constant, rad/day at a = 1 AU
GM_SUN_AU3_D2 = GAUSS_K**2
OBLIQUITY_J2000_ARCSEC = 84381.448
J2000_JD_TDB = 2451545.0
#: The DE421 kernel's coverage, TDB Julian dates (1899-07-29 to 2053-10-09).
DE421_JD_TDB = (2414864.5, 2471184.5)

# ----------------------------------------------------------------------------- sites
#: Palomar Observatory, Samuel Oschin 48-inch (ZTF's P48): geodetic WGS84.
PALOMAR = {"lat_deg": 33.3563, "lon_deg": -116.8650, "height_m": 1712.0}
