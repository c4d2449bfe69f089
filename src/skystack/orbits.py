"""The orbit table: validation, sources (random, grids, files, known objects) and Kepler
propagation in JAX.

An orbit table is a DataFrame with one row per orbit:

=====================  =======  ====  =================================================
column                 dtype    unit  meaning
=====================  =======  ====  =================================================
``orbit_id``           int64          unique id
``a_au``               float64  AU    semi-major axis (> 0)
``e``                  float64        eccentricity (0 <= e < 1: bound orbits only)
``inc_deg``            float64  deg   inclination to the J2000 ecliptic (0 to 180)
``node_deg``           float64  deg   longitude of the ascending node
``argperi_deg``        float64  deg   argument of perihelion
``mean_anomaly_deg``   float64  deg   mean anomaly at the epoch
``epoch_jd_tdb``       float64  d     epoch of the elements, TDB Julian date
=====================  =======  ====  =================================================

Elements are heliocentric osculating elements in the J2000 ecliptic frame (obliquity
84381.448 arcsec); propagation is two-body around the Sun with the Gaussian gravitational
constant (``GM_SUN_AU3_D2 = 0.01720209895**2``) and returns ICRS (equatorial) positions.
Other columns (a ``name``, say) are carried along untouched.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ._jax import jax, jnp

GAUSS_K = 0.01720209895  # Gaussian gravitational constant, rad/day at a = 1 AU
GM_SUN_AU3_D2 = GAUSS_K**2
OBLIQUITY_J2000_ARCSEC = 84381.448
ELEMENT_COLUMNS = ["a_au", "e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg", "epoch_jd_tdb"]
ORBIT_COLUMNS = ["orbit_id", *ELEMENT_COLUMNS]
J2000_JD_TDB = 2451545.0
PRESETS = ("kbo", "centaur", "focused")
KEPLER_MAX_ITERATIONS = 30  # Newton steps from Danby's start; e <= 0.9999 needs at most ~12
KEPLER_TOLERANCE_RAD = 1e-12


# ----------------------------------------------------------------------------- validation
def validate_orbits(df: pd.DataFrame, source: str = "orbits") -> pd.DataFrame:
    """Check an orbit table and return it with canonical dtypes.

    Parameters
    ----------
    df : DataFrame
        Orbit table (see the module docstring).
    source : str
        Where the table came from (a path, "random kbo", ...), named in error messages.

    Returns
    -------
    DataFrame
        A copy with ``orbit_id`` int64 and the elements float64, extra columns kept.

    Raises
    ------
    ValueError
        Naming ``source``, the offending row's ``orbit_id`` and the problem: missing
        columns, duplicate ids, non-finite values, ``a <= 0``, ``e < 0`` or ``e >= 1``,
        inclination outside 0-180 deg.
    """
    missing = [c for c in ORBIT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing orbit column(s) {', '.join(missing)} (need {', '.join(ORBIT_COLUMNS)})")
    out = df.copy()
    ids = pd.to_numeric(out["orbit_id"], errors="coerce")
    if ids.isna().any() or (ids != np.round(ids)).any():
        row = int(np.flatnonzero(ids.isna().to_numpy() | (ids != np.round(ids)).to_numpy())[0])
        raise ValueError(f"{source}: row {row}: orbit_id {df['orbit_id'].iloc[row]!r} is not an integer")
    out["orbit_id"] = ids.astype(np.int64)
    dup = out["orbit_id"].duplicated(keep=False)
    if dup.any():
        ids_dup = out.loc[dup, "orbit_id"].unique()
        raise ValueError(f"{source}: orbit_id {ids_dup[0]}: duplicate id ({len(ids_dup)} id(s) repeated)")
    for col in ELEMENT_COLUMNS:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(np.float64)
    checks = [
        (~np.isfinite(out[ELEMENT_COLUMNS].to_numpy()).all(axis=1), None),
        (out["a_au"].to_numpy() <= 0, "a_au = {a_au} must be > 0"),
        (out["e"].to_numpy() < 0, "e = {e} must be >= 0"),
        (out["e"].to_numpy() >= 1, "e = {e} must be < 1 (only bound orbits are propagated)"),
        ((out["inc_deg"].to_numpy() < 0) | (out["inc_deg"].to_numpy() > 180), "inc_deg = {inc_deg} must be in [0, 180]"),
    ]
    for bad, message in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = out.iloc[i]
            if message is None:
                cols = [c for c in ELEMENT_COLUMNS if not np.isfinite(row[c])]
                message = "non-finite " + ", ".join(f"{c} = {row[c]}" for c in cols)
            else:
                message = message.format(**row[ELEMENT_COLUMNS].to_dict())
            more = f" ({int(bad.sum()) - 1} more row(s) like it)" if bad.sum() > 1 else ""
            raise ValueError(f"{source}: orbit_id {int(row['orbit_id'])}: {message}{more}")
    return out


# ----------------------------------------------------------------------------- sources
def _rayleigh_deg(rng: np.random.Generator, scale_deg: float, n: int, cap_deg: float = 60.0) -> np.ndarray:
    return np.minimum(rng.rayleigh(scale_deg, n), cap_deg)


def _reflect_unit(e: np.ndarray) -> np.ndarray:
    e = np.abs(e)
    return np.clip(np.where(e >= 1.0, 2.0 - e, e), 0.0, 1.0 - 1e-9)


def random_orbits(preset: str, n: int, seed: int, chunk: int = 0, *, reference: dict | None = None,
                  sigma: dict | None = None, epoch_jd_tdb: float = J2000_JD_TDB) -> pd.DataFrame:
    """Chunk ``chunk`` of a random orbit population: ids ``[chunk n, (chunk + 1) n)``.

    Every chunk is drawn from ``np.random.SeedSequence([seed, chunk])`` alone, so any job
    rebuilds its own chunk without generating the others (the chunk size is part of the
    population's definition: keep ``n`` fixed for a given seed).

    Parameters
    ----------
    preset : {"kbo", "centaur", "focused"}
        ``kbo``: a 30-60 AU uniform, e 0-0.25, inclination Rayleigh (scale 6 deg, cap 60);
        ``centaur``: a 5-30 AU, e 0-0.5, inclination Rayleigh (scale 10 deg, cap 60);
        ``focused``: Gaussian around ``reference`` elements with per-element standard
        deviations ``sigma`` (keys: ``a_frac`` (relative), ``e``, ``inc_deg``, ``node_deg``,
        ``argperi_deg``, ``mean_anomaly_deg``; missing keys mean 0).
        Angles not set by the preset are uniform in [0, 360).
    n : int
        Orbits per chunk.
    seed : int
        Population seed.
    chunk : int
        Chunk number.
    reference, sigma : dict, optional
        For ``focused`` only (``reference`` holds the ELEMENT_COLUMNS, e.g. a row of
        ``load_known_objects``).
    epoch_jd_tdb : float
        Epoch of the kbo/centaur elements (TDB JD).

    Returns
    -------
    DataFrame
        Orbit table (ORBIT_COLUMNS).
    """
    if preset not in PRESETS:
        raise ValueError(f"random_orbits: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if n < 0 or chunk < 0:
        raise ValueError(f"random_orbits: n ({n}) and chunk ({chunk}) must be >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(chunk)]))
    ids = np.arange(chunk * n, (chunk + 1) * n, dtype=np.int64)
    if preset in ("kbo", "centaur"):
        a_lo, a_hi, e_hi, inc_scale = (30.0, 60.0, 0.25, 6.0) if preset == "kbo" else (5.0, 30.0, 0.5, 10.0)
        el = dict(a_au=rng.uniform(a_lo, a_hi, n), e=rng.uniform(0.0, e_hi, n), inc_deg=_rayleigh_deg(rng, inc_scale, n),
                  node_deg=rng.uniform(0, 360, n), argperi_deg=rng.uniform(0, 360, n),
                  mean_anomaly_deg=rng.uniform(0, 360, n), epoch_jd_tdb=np.full(n, float(epoch_jd_tdb)))
    else:
        if reference is None:
            raise ValueError("random_orbits: preset 'focused' needs reference elements")
        sigma = dict(sigma or {})
        unknown = set(sigma) - {"a_frac", "e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg"}
        if unknown:
            raise ValueError(f"random_orbits: unknown focused width(s) {sorted(unknown)}")
        ref = {k: float(reference[k]) for k in ELEMENT_COLUMNS}
        z = rng.standard_normal((6, n))
        el = dict(
            a_au=ref["a_au"] * (1.0 + sigma.get("a_frac", 0.0) * z[0]),
            # Reflect at the physical limits rather than clip, so no value piles up there.
            e=_reflect_unit(ref["e"] + sigma.get("e", 0.0) * z[1]),
            inc_deg=180.0 - np.abs(180.0 - np.abs(ref["inc_deg"] + sigma.get("inc_deg", 0.0) * z[2]) % 360.0),
            node_deg=(ref["node_deg"] + sigma.get("node_deg", 0.0) * z[3]) % 360.0,
            argperi_deg=(ref["argperi_deg"] + sigma.get("argperi_deg", 0.0) * z[4]) % 360.0,
            mean_anomaly_deg=(ref["mean_anomaly_deg"] + sigma.get("mean_anomaly_deg", 0.0) * z[5]) % 360.0,
            epoch_jd_tdb=np.full(n, ref["epoch_jd_tdb"]),
        )
    df = pd.DataFrame({"orbit_id": ids, **el})
    return validate_orbits(df, source=f"random {preset} orbits (seed {seed}, chunk {chunk})")


def grid_around(elements, a_frac_values, *, start_id: int = 0, name: str | None = None, **offsets) -> pd.DataFrame:
    """A grid of orbits around one reference orbit.

    Parameters
    ----------
    elements : mapping or Series
        Reference elements (ELEMENT_COLUMNS), e.g. a row of ``load_known_objects``.
    a_frac_values : array
        Relative semi-major axis changes: ``a = a_ref (1 + a_frac)``.
    start_id : int
        ``orbit_id`` of the first grid point (ids are consecutive).
    name : str, optional
        Prefix of a ``name`` column describing each point (defaults to ``elements["name"]``).
    **offsets : array
        Additive offsets for other elements, e.g. ``mean_anomaly_deg=[-0.1, 0, 0.1]``; the
        grid is the outer product of all value lists (``a_frac`` varies slowest).

    Returns
    -------
    DataFrame
        Orbit table with a ``name`` column.
    """
    bad = set(offsets) - set(ELEMENT_COLUMNS[1:-1])
    if bad:
        raise ValueError(f"grid_around: cannot offset {sorted(bad)} (choose from {', '.join(ELEMENT_COLUMNS[1:-1])})")
    ref = {k: float(elements[k]) for k in ELEMENT_COLUMNS}
    label = name if name is not None else str(elements.get("name", "orbit")) if hasattr(elements, "get") else "orbit"
    axes = [np.atleast_1d(np.asarray(a_frac_values, dtype=np.float64))]
    axes += [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in offsets.values()]
    mesh = [m.ravel() for m in np.meshgrid(*axes, indexing="ij")]
    n = len(mesh[0])
    el = {k: np.full(n, v) for k, v in ref.items()}
    el["a_au"] = ref["a_au"] * (1.0 + mesh[0])
    labels = [f"{label} a{f:+.6f}" for f in mesh[0]]
    for key, values in zip(offsets, mesh[1:]):
        el[key] = el[key] + values
        labels = [f"{s} {key}{v:+g}" for s, v in zip(labels, values)]
    for key in ("node_deg", "argperi_deg", "mean_anomaly_deg"):
        el[key] = el[key] % 360.0
    df = pd.DataFrame({"orbit_id": np.arange(start_id, start_id + n, dtype=np.int64), **el, "name": labels})
    return validate_orbits(df, source=f"grid around {label}")


def load_orbits(path) -> pd.DataFrame:
    """Read an orbit table from CSV or parquet and validate it.

    Parameters
    ----------
    path : str or Path
        ``.csv`` or ``.parquet`` file with ELEMENT_COLUMNS (and ``orbit_id``; without it the
        rows are numbered from 0).

    Returns
    -------
    DataFrame
        Validated orbit table (extra columns kept).
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".txt", ".gz"):
            df = pd.read_csv(path, comment="#")
        else:
            raise ValueError(f"{path}: unknown orbit file type {path.suffix!r} (use .csv or .parquet)")
    except (OSError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: cannot read orbit file ({err})") from err
    if "orbit_id" not in df.columns:
        df.insert(0, "orbit_id", np.arange(len(df), dtype=np.int64))
    return validate_orbits(df, source=str(path))


def load_known_objects(path) -> pd.DataFrame:
    """Read a known-objects CSV (``name`` plus ELEMENT_COLUMNS, like
    ``data/orbits/known_objects.csv``); rows get ``orbit_id`` 0, 1, ... in file order.

    Returns
    -------
    DataFrame
        Validated orbit table with the ``name`` column (and any other columns).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, comment="#")
    except (OSError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: cannot read known objects ({err})") from err
    if "name" not in df.columns:
        raise ValueError(f"{path}: missing column 'name'")
    names = df["name"].astype(str)
    if names.duplicated().any():
        raise ValueError(f"{path}: duplicate object name {names[names.duplicated()].iloc[0]!r}")
    if "orbit_id" not in df.columns:
        df.insert(0, "orbit_id", np.arange(len(df), dtype=np.int64))
    return validate_orbits(df, source=str(path))


# ----------------------------------------------------------------------------- propagation
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


__all__ = [
    "GAUSS_K", "GM_SUN_AU3_D2", "OBLIQUITY_J2000_ARCSEC", "ELEMENT_COLUMNS", "ORBIT_COLUMNS", "PRESETS",
    "validate_orbits", "random_orbits", "grid_around", "load_orbits", "load_known_objects", "OrbitArrays",
    "orbit_arrays", "ecliptic_to_icrs_matrix", "solve_kepler", "heliocentric_state", "heliocentric_au",
    "earlier_position_au", "propagate",
]
