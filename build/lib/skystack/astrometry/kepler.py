"""Two-body Kepler propagation around the Sun in JAX (float64).

Elements are heliocentric osculating J2000 ecliptic elements (``orbits.table``); positions
come back in ICRS (equatorial) AU, velocities in AU per day, times are TDB Julian dates.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..core.units import GAUSS_K, GM_SUN_AU3_D2, OBLIQUITY_J2000_ARCSEC
from ..orbits.table import validate_orbits

KEPLER_MAX_ITERATIONS = 30  # Newton steps from Danby's start; e <= 0.9999 needs at most ~12


KEPLER_TOLERANCE_RAD = 1e-12


class OrbitArrays(NamedTuple):
    """Per-orbit constants for propagation (leading axis = orbit), float64.

    Attributes
    ----------
    a_au, e : (n,)
    mean_motion_rad_per_day : (n,)
        ``GAUSS_K / a^1.5``.
    mean_anomaly_rad : (n,)
        At the epoch.
    epoch_jd_tdb : (n,)
    p_hat, q_hat : (n, 3)
        ICRS unit vectors towards perihelion and 90 deg ahead in the orbital plane.
    """

    a_au: jnp.ndarray
    e: jnp.ndarray
    mean_motion_rad_per_day: jnp.ndarray
    mean_anomaly_rad: jnp.ndarray
    epoch_jd_tdb: jnp.ndarray
    p_hat: jnp.ndarray
    q_hat: jnp.ndarray


def ecliptic_to_icrs_matrix() -> np.ndarray:
    """Rotation taking J2000 ecliptic vectors to ICRS (equatorial) ones."""
    eps = np.radians(OBLIQUITY_J2000_ARCSEC / 3600.0)
    c, s = np.cos(eps), np.sin(eps)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def orbit_arrays(orbits: pd.DataFrame) -> OrbitArrays:
    """Propagation constants (numpy) for a validated orbit table."""
    a = orbits["a_au"].to_numpy(np.float64)
    e = orbits["e"].to_numpy(np.float64)
    i, node, w = (np.radians(orbits[c].to_numpy(np.float64)) for c in ("inc_deg", "node_deg", "argperi_deg"))
    ci, si, cn, sn, cw, sw = np.cos(i), np.sin(i), np.cos(node), np.sin(node), np.cos(w), np.sin(w)
    p_ecl = np.stack([cw * cn - sw * sn * ci, cw * sn + sw * cn * ci, sw * si], axis=-1)
    q_ecl = np.stack([-sw * cn - cw * sn * ci, -sw * sn + cw * cn * ci, cw * si], axis=-1)
    rot = ecliptic_to_icrs_matrix()
    return OrbitArrays(a, e, GAUSS_K / a**1.5, np.radians(orbits["mean_anomaly_deg"].to_numpy(np.float64)),
                       orbits["epoch_jd_tdb"].to_numpy(np.float64), p_ecl @ rot.T, q_ecl @ rot.T)


def _wrap_pi(angle_rad):
    return angle_rad - 2.0 * jnp.pi * jnp.round(angle_rad / (2.0 * jnp.pi))


def _solve_kepler(mean_anomaly_rad, e, max_iter: int = KEPLER_MAX_ITERATIONS):
    m = _wrap_pi(mean_anomaly_rad)
    e = jnp.broadcast_to(e, m.shape)

    def step(state):
        ecc, _, k = state
        delta = (ecc - e * jnp.sin(ecc) - m) / (1.0 - e * jnp.cos(ecc))
        return ecc - delta, jnp.max(jnp.abs(delta), initial=0.0), k + 1

    def going(state):
        _, last_step, k = state
        # Newton converges quadratically: after a step below 1e-12 rad the error left is
        # of order its square, i.e. at rounding level.
        return (last_step > KEPLER_TOLERANCE_RAD) & (k < max_iter)

    # Danby's starting value converges for every e < 1 (a few steps for e < 0.5).
    start = m + 0.85 * e * jnp.sign(jnp.sin(m))
    ecc, _, _ = jax.lax.while_loop(going, step, (start, jnp.asarray(jnp.inf, m.dtype), 0))
    return ecc


def _state_from_anomaly(orb: OrbitArrays, ecc_anomaly):
    """Heliocentric ICRS position (AU) and velocity (AU/day), each ``ecc_anomaly.shape + (3,)``."""
    cos_e, sin_e = jnp.cos(ecc_anomaly), jnp.sin(ecc_anomaly)
    b = jnp.sqrt(1.0 - orb.e * orb.e)
    x = orb.a_au * (cos_e - orb.e)
    y = orb.a_au * b * sin_e
    e_dot = orb.mean_motion_rad_per_day / (1.0 - orb.e * cos_e)  # dE/dt
    vx = -orb.a_au * sin_e * e_dot
    vy = orb.a_au * b * cos_e * e_dot
    pos = x[..., None] * orb.p_hat + y[..., None] * orb.q_hat
    vel = vx[..., None] * orb.p_hat + vy[..., None] * orb.q_hat
    return pos, vel


def _mean_anomaly(orb: OrbitArrays, jd_tdb):
    return orb.mean_anomaly_rad + orb.mean_motion_rad_per_day * (jd_tdb - orb.epoch_jd_tdb)


def heliocentric_state(orb: OrbitArrays, jd_tdb):
    """Heliocentric ICRS position (AU) and velocity (AU/day) of orbits at times.

    Parameters
    ----------
    orb : OrbitArrays
        n orbits.
    jd_tdb : array broadcastable to (..., n)
        TDB Julian dates, e.g. shape (m, 1) for every orbit at each of m times.

    Returns
    -------
    pos_au, vel_au_per_day : arrays (..., n, 3)
    """
    ecc = _solve_kepler(_mean_anomaly(orb, jd_tdb), orb.e)
    return _state_from_anomaly(orb, ecc)


def earlier_position_au(pos_au, vel_au_per_day, dt_day):
    """Two-body position ``dt_day`` before the state (pos, vel): Taylor series to third order.

    Meant for light times. The neglected fourth-order term is ~dt^4 GM v^2 / r^5 / 24:
    below 1e-11 AU for a body at 0.1 AU from the Sun seen from 1 AU, and far smaller for
    distant bodies (at 1000 AU, 6 days of light time, ~1e-20 AU).

    Parameters
    ----------
    pos_au, vel_au_per_day : arrays (..., 3)
        Heliocentric state.
    dt_day : array (...)
        Time step back, days.
    """
    def dot(a, b):  # written out: fuses better than a reduction over the length-3 axis
        return (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2])[..., None]

    r2 = dot(pos_au, pos_au)
    r = jnp.sqrt(r2)
    inv_r3 = 1.0 / (r2 * r)
    rv = dot(pos_au, vel_au_per_day)
    acc = -GM_SUN_AU3_D2 * pos_au * inv_r3
    jerk = -GM_SUN_AU3_D2 * (vel_au_per_day * inv_r3 - 3.0 * rv * pos_au * inv_r3 / r2)
    dt = dt_day[..., None]
    return pos_au - dt * vel_au_per_day + 0.5 * dt * dt * acc - (dt * dt * dt / 6.0) * jerk


def heliocentric_au(orb: OrbitArrays, jd_tdb):
    """Heliocentric ICRS positions (AU), shape (..., n, 3); see ``heliocentric_state``."""
    return heliocentric_state(orb, jd_tdb)[0]


@jax.jit
def _propagate(orb: OrbitArrays, jd_tdb):
    return heliocentric_au(orb, jd_tdb[:, None])


def propagate(orbits, jd_tdb) -> np.ndarray:
    """Heliocentric ICRS positions of every orbit at every time.

    Parameters
    ----------
    orbits : DataFrame or OrbitArrays
        n orbits (a DataFrame is validated first).
    jd_tdb : float or array (m,)
        TDB Julian dates.

    Returns
    -------
    ndarray (m, n, 3)
        Positions in AU.
    """
    orb = orbit_arrays(validate_orbits(orbits, "propagate")) if isinstance(orbits, pd.DataFrame) else orbits
    return np.asarray(_propagate(orb, jnp.atleast_1d(jnp.asarray(jd_tdb, dtype=jnp.float64))))


solve_kepler = jax.jit(_solve_kepler, static_argnames="max_iter")
solve_kepler.__doc__ = """Eccentric anomaly E (rad) with E - e sin E = M (Newton, float64).

Iterates the whole array until the largest Newton step is below 1e-12 rad (quadratic
convergence then leaves an error at rounding level).

Parameters
----------
mean_anomaly_rad : array
    Mean anomaly M (any value; reduced to [-pi, pi]).
e : array
    Eccentricity, 0 <= e < 1 (broadcast with M).
max_iter : int
    Upper bound on the Newton steps (static); 30 is ample for e <= 0.9999.

Returns
-------
array
    E in about [-pi, pi].
"""


