"""Metadata-only surveys of a mosaic camera: image index rows without pixels.

A ZTF-like camera by default: 8 x 8 CCD quadrants of 3072 x 3080 px at 1.01 arcsec/px
sharing one tangent point (TAN-SIP, a cubic radial distortion of about 2 px at the mosaic
corner), exposures pointed along the ecliptic at random times, observed from Palomar.
Used where intersections alone are measured or checked (the throughput benchmark, the
equality with brute force); the rows carry what ``skystack.search.intersect`` needs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from astropy.wcs import WCS, Sip

from ..core.units import OBLIQUITY_J2000_ARCSEC, PALOMAR

QUADRANT_PX = (3072, 3080)
MOSAIC = (8, 8)
SCALE_ARCSEC = 1.01
FIRST_JD_TDB = 2458119.5  # 2018-01-01


def ecliptic_to_radec_deg(lon_deg, lat_deg):
    """J2000 ecliptic longitude/latitude to ICRS RA/Dec (degrees)."""
    eps = np.radians(OBLIQUITY_J2000_ARCSEC / 3600.0)
    lon, lat = np.radians(lon_deg), np.radians(lat_deg)
    x = np.cos(lat) * np.cos(lon)
    y = np.cos(lat) * np.sin(lon) * np.cos(eps) - np.sin(lat) * np.sin(eps)
    z = np.cos(lat) * np.sin(lon) * np.sin(eps) + np.sin(lat) * np.cos(eps)
    return np.degrees(np.arctan2(y, x)) % 360.0, np.degrees(np.arcsin(z))


def quadrant_header(ra_deg: float, dec_deg: float, qx: int, qy: int, sip: bool = True) -> str:
    """WCS header of quadrant (qx, qy) of a mosaic whose centre points at (ra, dec)."""
    nx, ny = QUADRANT_PX
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    # FITS CRPIX (1-based) of the mosaic centre in this quadrant's pixel frame.
    w.wcs.crpix = [MOSAIC[0] * nx / 2 - qx * nx + 0.5, MOSAIC[1] * ny / 2 - qy * ny + 0.5]
    w.wcs.cd = SCALE_ARCSEC / 3600.0 * np.array([[-1.0, 0.0], [0.0, 1.0]])
    if sip:
        k = 2.0 / (0.5 * np.hypot(MOSAIC[0] * nx, MOSAIC[1] * ny)) ** 3
        a, b = np.zeros((4, 4)), np.zeros((4, 4))
        a[3, 0] = a[1, 2] = k
        b[0, 3] = b[2, 1] = k
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w.to_header_string(relax=True)


def mosaic_images(jd_tdb, ra_deg, dec_deg, sip: bool = True) -> pd.DataFrame:
    """Index rows of every quadrant of exposures pointed at (ra, dec) at TDB times ``jd_tdb``.

    Returns
    -------
    DataFrame with image_id, exposure_id, jd_tdb_mid, wcs_header, naxis1, naxis2 and the
    site columns; image ids run quadrant by quadrant within each exposure.
    """
    rows = []
    for e, (jd, ra, dec) in enumerate(zip(jd_tdb, ra_deg, dec_deg)):
        for qy in range(MOSAIC[1]):
            for qx in range(MOSAIC[0]):
                rows.append(dict(image_id=len(rows), exposure_id=e, jd_tdb_mid=float(jd),
                                 wcs_header=quadrant_header(float(ra), float(dec), qx, qy, sip),
                                 naxis1=QUADRANT_PX[0], naxis2=QUADRANT_PX[1], site_lat_deg=PALOMAR["lat_deg"],
                                 site_lon_deg=PALOMAR["lon_deg"], site_height_m=PALOMAR["height_m"]))
    return pd.DataFrame(rows)


def ecliptic_survey(n_exposures: int, years: float, seed: int, sip: bool = True) -> pd.DataFrame:
    """Exposures at uniform random times over ``years``, pointed at uniform ecliptic
    longitudes and latitudes drawn from N(0, 3 deg)."""
    rng = np.random.default_rng(seed)
    jd = FIRST_JD_TDB + rng.uniform(0, 365.25 * years, n_exposures)
    ra, dec = ecliptic_to_radec_deg(rng.uniform(0, 360, n_exposures), rng.normal(0, 3, n_exposures))
    return mosaic_images(jd, ra, dec, sip)
