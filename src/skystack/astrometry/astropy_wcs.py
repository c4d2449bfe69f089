"""astropy WCS helpers: header text to WCS, world to pixel near an image, pixel scale."""
from __future__ import annotations

import warnings

import numpy as np


def wcs_from_header_text(text: str):
    """The astropy WCS of a header stored as text by the image index (80-character cards back
    to back, or one per line). The index wrote it from a WCS astropy had already checked and
    fixed, so the fixes it would announce again (OBSGEO-L/B/H derived from OBSGEO-X/Y/Z, once
    per image and job) are not repeated in the logs."""
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    header = fits.Header.fromstring(text, sep="\n" if "\n" in text else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def astropy_world2pix_near(wcs, ra_deg, dec_deg, shape_yx, margin_px: float = 50.0):
    """astropy ``all_world2pix`` for the points near an image, NaN for the others.

    The SIP inverse is solved iteratively and diverges for points far off the image; the
    plain tangent-plane position (no distortion) decides which points are near enough,
    with a margin that covers any realistic distortion.
    """
    ra = np.atleast_1d(np.asarray(ra_deg, float))
    dec = np.atleast_1d(np.asarray(dec_deg, float))
    ny, nx = shape_yx
    with np.errstate(invalid="ignore"):
        tx, ty = wcs.wcs_world2pix(ra, dec, 0)
    pad = margin_px + 0.1 * max(nx, ny)
    near = np.isfinite(tx) & np.isfinite(ty) & (tx > -pad) & (tx < nx - 1 + pad) & (ty > -pad) & (ty < ny - 1 + pad)
    x = np.full(ra.shape, np.nan)
    y = np.full(ra.shape, np.nan)
    if near.any():
        x[near], y[near] = wcs.all_world2pix(ra[near], dec[near], 0, quiet=True)
    return x, y
