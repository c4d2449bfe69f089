"""Straightforward per-pair references for orbit positions on images, built on skyfield and
astropy alone (nothing of skystack's propagation or WCS code): what the fast intersection
search is checked and timed against.

skyfield brings its own DE421 reader, Earth rotation, Kepler propagation and light-time
iteration for the topocentric astrometric direction; astropy's ``all_world2pix`` the pixel.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

GM_SUN_AU3_D2 = 0.01720209895**2  # the Gaussian constant: the same Sun as skystack.astrometry.kepler


class SkyfieldSky:
    """Astrometric ICRS directions of Kepler orbits from observatories, one pair at a time."""

    def __init__(self):
        from skyfield.api import load, load_file
        from skyfield.data import iers
        from skyfield_data import get_skyfield_data_path

        data = get_skyfield_data_path()
        self.planets = load_file(os.path.join(data, "de421.bsp"))
        self.ts = load.timescale(builtin=True)
        # Polar motion from the shipped IERS file, as astropy applies it (~10 m otherwise).
        with open(os.path.join(data, "finals2000A.all"), "rb") as f:
            iers.install_polar_motion_table(self.ts, iers.parse_x_y_dut1_from_finals_all(f))
        self._observers = {}

    def orbit(self, row):
        """A skyfield body for one orbit-table row (J2000 ecliptic elements)."""
        from skyfield.constants import AU_KM, DAY_S
        from skyfield.data.spice import inertial_frames
        from skyfield.keplerlib import _KeplerOrbit

        a, e = row.a_au, row.e
        orbit = _KeplerOrbit._from_mean_anomaly(a * (1 - e * e), e, row.inc_deg, row.node_deg, row.argperi_deg,
                                                row.mean_anomaly_deg, self.ts.tdb_jd(row.epoch_jd_tdb),
                                                GM_SUN_AU3_D2 * AU_KM**3 / DAY_S**2, 10, str(row.orbit_id))
        orbit._rotation = inertial_frames["ECLIPJ2000"].T
        return self.planets["sun"] + orbit

    def observer_at(self, jd_tdb: float, site: dict | None):
        """The observatory (or the Earth's centre) at a TDB time, cached per (time, site)."""
        from skyfield.api import wgs84

        key = (float(jd_tdb), None if site is None else tuple(float(site[k]) for k in ("lat_deg", "lon_deg", "height_m")))
        if key not in self._observers:
            earth = self.planets["earth"]
            where = earth if site is None else earth + wgs84.latlon(site["lat_deg"], site["lon_deg"],
                                                                     elevation_m=site["height_m"])
            self._observers[key] = where.at(self.ts.tdb_jd(jd_tdb))
        return self._observers[key]

    def radec_deg(self, body, jd_tdb: float, site: dict | None):
        ra, dec, _ = self.observer_at(jd_tdb, site).observe(body).radec()
        return ra._degrees, dec.degrees


def skyfield_radec(orbits: pd.DataFrame, jd_tdb, site: dict | None):
    """Astrometric ICRS RA, Dec (deg) of each orbit at its own time, seen from ``site``
    (a mapping with lat_deg, lon_deg, height_m; None = the Earth's centre)."""
    sky = SkyfieldSky()
    out = [sky.radec_deg(sky.orbit(row), jd, site) for row, jd in zip(orbits.itertuples(), jd_tdb)]
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def pair_by_pair(orbits: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Every orbit on every image, one pair at a time: skyfield's direction, astropy's pixel.

    Returns orbit_id, image_id, x, y (0-based) for the pairs in bounds
    (``-0.5 <= x < naxis1 - 0.5``, same for y).
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    sky = SkyfieldSky()
    bodies = [(row.orbit_id, sky.orbit(row)) for row in orbits.itertuples()]
    rows = []
    for im in images.itertuples():
        w = WCS(fits.Header.fromstring(im.wcs_header))
        site = {"lat_deg": im.site_lat_deg, "lon_deg": im.site_lon_deg, "height_m": im.site_height_m}
        ra0, dec0 = np.radians(w.wcs.crval)
        for orbit_id, body in bodies:
            ra, dec = sky.radec_deg(body, im.jd_tdb_mid, site)
            r, d = np.radians(ra), np.radians(dec)
            if np.sin(d) * np.sin(dec0) + np.cos(d) * np.cos(dec0) * np.cos(r - ra0) <= 0:
                continue  # behind the tangent plane: the projection is undefined there
            x, y = (float(v) for v in w.all_world2pix(ra, dec, 0, tolerance=1e-12, maxiter=100, quiet=True))
            if -0.5 <= x < im.naxis1 - 0.5 and -0.5 <= y < im.naxis2 - 0.5:
                rows.append((orbit_id, im.image_id, x, y))
    return pd.DataFrame(rows, columns=["orbit_id", "image_id", "x", "y"])
