"""Where a body on a Kepler orbit is seen from an observatory: light time and apparent directions.

Observer = Earth's centre (DE421) + the observatory's GCRS offset, at mid-exposure TDB.
Light time is iterated from the geometric distance: the body is seen where it was at
``t - tau`` with ``tau = |r_body(t - tau) - r_obs(t)| / c``, its position being its
heliocentric Kepler position plus the Sun's barycentric position at ``t - tau``. Kepler's
equation is solved once, at ``t``; the step back by ``tau`` is a third-order two-body
Taylor step (``kepler.earlier_position_au``, error < 1e-11 AU) and the Sun's a second-order
one from DE421 (< 500 m over the 6-day light time from 1000 AU). Directions are astrometric
ICRS (no aberration, no light deflection), as in star catalogs, which is what a WCS fitted
to catalog stars maps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..orbits.table import validate_orbits
from . import ephemeris
from .kepler import OrbitArrays, earlier_position_au, heliocentric_state, orbit_arrays

LIGHT_TIME_ITERATIONS = 2  # from the geometric distance; the direction error after 2 is < 1e-14 rad


def _apparent_directions(pos_au, vel_au_per_day, observer_au, sun_pos_au, sun_vel_au, sun_acc_au):
    """Astrometric ICRS unit vectors and light times (days) from a body's heliocentric state
    at the observation time; all arguments broadcast together over their leading axes.

    The body's position at the emission time ``t - tau`` follows from a third-order two-body
    Taylor step (see ``kepler.earlier_position_au``), the Sun's from its own Taylor terms.
    """
    rel = pos_au + sun_pos_au - observer_au
    tau = _norm3(rel) / ephemeris.C_AU_PER_DAY
    for _ in range(LIGHT_TIME_ITERATIONS):
        dt = tau[..., None]
        sun = sun_pos_au - dt * sun_vel_au + 0.5 * dt * dt * sun_acc_au
        rel = earlier_position_au(pos_au, vel_au_per_day, tau) + sun - observer_au
        tau = _norm3(rel) / ephemeris.C_AU_PER_DAY
    return rel / _norm3(rel)[..., None], tau


def _directions(orb: OrbitArrays, jd_tdb, observer_au, sun_taylor_au):
    """Astrometric ICRS unit vectors from observers to bodies, every orbit at every time.

    Parameters
    ----------
    orb : OrbitArrays
        n orbits.
    jd_tdb : (m,)
        Observation times (TDB JD).
    observer_au : (m, 3)
        Barycentric observer positions.
    sun_taylor_au : (m, 3, 3)
        The Sun's barycentric position, velocity, acceleration at ``jd_tdb``.

    Returns
    -------
    (m, n, 3) unit vectors and (m, n) light times in days.
    """
    pos, vel = heliocentric_state(orb, jd_tdb[:, None])
    sun = (sun_taylor_au[:, None, k, :] for k in range(3))
    return _apparent_directions(pos, vel, observer_au[:, None, :], *sun)


_directions_jit = jax.jit(_directions)


def _paired_directions(orb: OrbitArrays, jd_tdb, observer_au, sun_taylor_au):
    """As ``_directions`` for c (orbit, time) pairs: orbit fields, times, observers and Sun
    terms all have leading axis c. Returns (c, 3) unit vectors and (c,) light times."""
    pos, vel = heliocentric_state(orb, jd_tdb)
    sun = (sun_taylor_au[:, k, :] for k in range(3))
    return _apparent_directions(pos, vel, observer_au, *sun)


def _norm3(v):
    # Written out: a reduction over a length-3 axis fuses poorly on some backends.
    return jnp.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + v[..., 2] * v[..., 2])


def _site_arrays(site, n):
    if site is None:
        return None
    return tuple(np.broadcast_to(np.asarray(site[k], dtype=np.float64), (n,)) for k in ("lat_deg", "lon_deg", "height_m"))


def observer_states(jd_tdb, site=None):
    """Barycentric observer positions (AU, (m, 3)) and the Sun's Taylor terms ((m, 3, 3)).

    ``site`` is a mapping with ``lat_deg``, ``lon_deg``, ``height_m`` (scalars or arrays
    of length m), or None for the Earth's centre.
    """
    jd = np.atleast_1d(np.asarray(jd_tdb, dtype=np.float64))
    obs = ephemeris.earth_barycentric_au(jd)
    if site is not None:
        obs = obs + ephemeris.observatory_gcrs_au(jd, *_site_arrays(site, len(jd)))
    return obs, ephemeris.sun_barycentric_taylor_au(jd)


def sky_positions(orbits: pd.DataFrame, jd_tdb, site=None):
    """Astrometric ICRS positions of orbits at times, as seen from a site.

    Parameters
    ----------
    orbits : DataFrame
        Orbit table (``skystack.orbits.table``), n rows.
    jd_tdb : float or array (m,)
        TDB Julian dates.
    site : mapping, optional
        ``lat_deg``, ``lon_deg`` (geodetic, east), ``height_m`` (WGS84); None = geocentre.

    Returns
    -------
    ra_deg, dec_deg : ndarray (n, m)
        RA in [0, 360) and Dec, degrees.
    """
    orb = orbit_arrays(validate_orbits(orbits, source="sky_positions orbits"))
    jd = np.atleast_1d(np.asarray(jd_tdb, dtype=np.float64))
    obs, sun = observer_states(jd, site)
    d, _ = _directions_jit(orb, jnp.asarray(jd), jnp.asarray(obs), jnp.asarray(sun))
    d = np.asarray(d)
    ra = np.degrees(np.arctan2(d[..., 1], d[..., 0])) % 360.0
    dec = np.degrees(np.arctan2(d[..., 2], np.hypot(d[..., 0], d[..., 1])))
    return ra.T, dec.T
