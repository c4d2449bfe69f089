"""Positions of the Earth, the Sun and an observatory, offline.

Barycentric positions come from the JPL DE421 kernel shipped inside the ``skyfield-data``
package, read with ``jplephem`` (nothing is downloaded). The observatory's offset from the
geocentre comes from astropy (``EarthLocation.get_gcrs_posvel``) with the IERS tables of
``astropy-iers-data`` and automatic IERS downloads switched off.

All positions are ICRS (the DE421 frame), in AU; velocities in AU per day; times are TDB
Julian dates.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import numpy as np

from ..core.units import AU_KM, C_AU_PER_DAY, DE421_JD_TDB

# NAIF ids of the DE421 segments used here.
_SSB, _EMB, _SUN, _EARTH = 0, 3, 10, 399


def de421_path() -> Path:
    """Path of the DE421 kernel inside the installed ``skyfield-data`` package."""
    import skyfield_data

    path = Path(skyfield_data.__file__).resolve().parent / "data" / "de421.bsp"
    if not path.exists():
        raise FileNotFoundError(f"{path}: DE421 kernel missing from the skyfield-data package (reinstall skyfield-data)")
    return path


@functools.lru_cache(maxsize=1)
def _kernel():
    from jplephem.spk import SPK

    return SPK.open(str(de421_path()))


def _check_range(jd_tdb: np.ndarray) -> None:
    bad = ~((jd_tdb >= DE421_JD_TDB[0]) & (jd_tdb <= DE421_JD_TDB[1]))
    if bad.any():
        first = float(jd_tdb[bad][0])
        raise ValueError(f"{de421_path().name}: JD {first} TDB ({int(bad.sum())} time(s)) is outside the DE421 range "
                         f"{DE421_JD_TDB[0]} to {DE421_JD_TDB[1]}")


def _segment_posvel(center: int, target: int, jd_tdb: np.ndarray):
    pos_km, vel_km_d = _kernel()[center, target].compute_and_differentiate(jd_tdb)
    return np.moveaxis(pos_km, 0, -1) / AU_KM, np.moveaxis(vel_km_d, 0, -1) / AU_KM


def _as_times(jd_tdb) -> np.ndarray:
    jd = np.atleast_1d(np.asarray(jd_tdb, dtype=np.float64))
    _check_range(jd)
    return jd


def earth_barycentric_posvel_au(jd_tdb):
    """Barycentric position and velocity of the Earth's centre (DE421).

    Parameters
    ----------
    jd_tdb : float or array (n,)
        TDB Julian dates.

    Returns
    -------
    pos_au : ndarray (n, 3)
        ICRS position, AU.
    vel_au_per_day : ndarray (n, 3)
        ICRS velocity, AU/day.
    """
    jd = _as_times(jd_tdb)
    p_emb, v_emb = _segment_posvel(_SSB, _EMB, jd)
    p_e, v_e = _segment_posvel(_EMB, _EARTH, jd)
    return p_emb + p_e, v_emb + v_e


def sun_barycentric_posvel_au(jd_tdb):
    """Barycentric position (AU) and velocity (AU/day) of the Sun, ICRS, shape (n, 3) each."""
    return _segment_posvel(_SSB, _SUN, _as_times(jd_tdb))


def earth_barycentric_au(jd_tdb) -> np.ndarray:
    """Barycentric ICRS position of the Earth's centre, AU, shape (n, 3)."""
    return earth_barycentric_posvel_au(jd_tdb)[0]


def sun_barycentric_au(jd_tdb) -> np.ndarray:
    """Barycentric ICRS position of the Sun, AU, shape (n, 3)."""
    return sun_barycentric_posvel_au(jd_tdb)[0]


def sun_barycentric_taylor_au(jd_tdb, step_day: float = 0.5) -> np.ndarray:
    """The Sun's barycentric position, velocity and acceleration at ``jd_tdb``.

    Used to move the Sun back by the light time (days at most) inside device code, where
    the kernel cannot be read: over 6 days (the light time from 1000 AU) the neglected
    terms stay below 500 m, i.e. 3e-12 rad (1e-6 arcsec) as seen from that distance, and
    they shrink as the cube of the light time for nearer bodies.

    Returns
    -------
    ndarray (n, 3, 3)
        ``[..., 0, :]`` position (AU), ``[..., 1, :]`` velocity (AU/day),
        ``[..., 2, :]`` acceleration (AU/day^2, central difference of the velocity).
    """
    jd = _as_times(jd_tdb)
    pos, vel = sun_barycentric_posvel_au(jd)
    lo = np.maximum(jd - step_day, DE421_JD_TDB[0])
    hi = np.minimum(jd + step_day, DE421_JD_TDB[1])
    acc = (sun_barycentric_posvel_au(hi)[1] - sun_barycentric_posvel_au(lo)[1]) / (hi - lo)[:, None]
    return np.stack([pos, vel, acc], axis=-2)


@contextlib.contextmanager
def iers_offline():
    """Config context: no IERS download; beyond the bundled tables, warn instead of failing.

    Far from the tables UT1 is predicted to about a second, i.e. the observatory is placed
    to a few hundred metres, which moves a body at 5 AU by less than 1e-4 arcsec.
    """
    from astropy.utils import iers

    with contextlib.ExitStack() as stack:
        for name, value in (("auto_download", False), ("auto_max_age", None), ("iers_degraded_accuracy", "warn")):
            stack.enter_context(iers.conf.set_temp(name, value))
        _use_cached_earth_orientation()
        yield


def _iers_cache_dir() -> Path | None:
    """$SKYSTACK_IERS_CACHE, else ~/.cache/skystack/iers; "off": parse the table every time."""
    import os

    value = os.environ.get("SKYSTACK_IERS_CACHE", str(Path.home() / ".cache" / "skystack" / "iers"))
    return None if value.lower() == "off" else Path(value)


@functools.lru_cache(maxsize=1)
def _use_cached_earth_orientation() -> None:
    """Give astropy its IERS table from a pickled copy: parsing ``finals2000A.all`` takes about
    a second in every process that places an observatory (each search job, the plan, the
    refinement); unpickling takes 10 ms. The copy is keyed by the file's path, size and time and
    by astropy's version, so a new table or astropy parses anew; any failure parses as before."""
    import hashlib
    import os
    import pickle

    import astropy
    from astropy.utils import iers

    cache_dir = _iers_cache_dir()
    source = Path(iers.IERS_A_FILE)
    if cache_dir is None or not source.exists():
        return
    st = source.stat()
    key = hashlib.sha1(f"{source}|{st.st_size}|{st.st_mtime_ns}|{astropy.__version__}".encode()).hexdigest()[:16]
    path = cache_dir / f"earth_orientation-{key}.pickle"
    try:
        with open(path, "rb") as fh:
            table = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        table = iers.earth_orientation_table.get()  # parsed by astropy, under the offline settings
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL))
            os.replace(tmp, path)
        except OSError:
            return
    iers.earth_orientation_table.set(table)


def observatory_gcrs_posvel_au(jd_tdb, lat_deg, lon_deg, height_m):
    """Geocentric (GCRS) position and velocity of an observatory.

    Parameters
    ----------
    jd_tdb : float or array (n,)
        TDB Julian dates.
    lat_deg, lon_deg : float or array broadcastable to (n,)
        Geodetic latitude and east longitude (WGS84), degrees.
    height_m : float or array broadcastable to (n,)
        Height above the WGS84 ellipsoid, metres.

    Returns
    -------
    pos_au, vel_au_per_day : ndarray (n, 3)
        Offset from the geocentre (AU) and its velocity (AU/day), GCRS axes (= ICRS axes).
    """
    import astropy.units as u
    from astropy.coordinates import EarthLocation
    from astropy.time import Time

    jd = _as_times(jd_tdb)
    jd, lat, lon, h = np.broadcast_arrays(jd, *(np.asarray(v, dtype=np.float64) for v in (lat_deg, lon_deg, height_m)))
    with iers_offline(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dubious year.*")
        # Split the Julian date so the conversion to UT1 keeps microseconds.
        day = np.floor(jd)
        t = Time(day, jd - day, format="jd", scale="tdb")
        loc = EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, h * u.m)
        pos, vel = loc.get_gcrs_posvel(t)
    pos_au = pos.xyz.to_value(u.km).T / AU_KM
    vel_au_d = vel.xyz.to_value(u.km / u.s).T * 86400.0 / AU_KM
    return pos_au.reshape(-1, 3), vel_au_d.reshape(-1, 3)


def observatory_gcrs_au(jd_tdb, lat_deg, lon_deg, height_m) -> np.ndarray:
    """Geocentric (GCRS) offset of an observatory, AU, shape (n, 3). See ``observatory_gcrs_posvel_au``."""
    return observatory_gcrs_posvel_au(jd_tdb, lat_deg, lon_deg, height_m)[0]


def observer_barycentric_au(jd_tdb, lat_deg, lon_deg, height_m) -> np.ndarray:
    """Barycentric ICRS position of an observatory: Earth's centre plus its GCRS offset.

    Parameters
    ----------
    jd_tdb : float or array (n,)
        TDB Julian dates.
    lat_deg, lon_deg, height_m : float or array broadcastable to (n,)
        Geodetic latitude, east longitude (degrees) and height (metres), WGS84.

    Returns
    -------
    ndarray (n, 3)
        Position in AU.
    """
    jd = _as_times(jd_tdb)
    return earth_barycentric_au(jd) + observatory_gcrs_au(jd, lat_deg, lon_deg, height_m)


def utc_mjd_to_tdb_jd(mjd_utc, lat_deg=None, lon_deg=None, height_m=None) -> np.ndarray:
    """Convert UTC modified Julian dates to TDB Julian dates.

    Parameters
    ----------
    mjd_utc : float or array
        UTC MJD.
    lat_deg, lon_deg, height_m : float, optional
        Observatory (geodetic, WGS84): adds TDB's topocentric term (microseconds).

    Returns
    -------
    ndarray
        TDB Julian dates (float64, ~40 microsecond resolution).
    """
    import astropy.units as u
    from astropy.coordinates import EarthLocation
    from astropy.time import Time

    mjd = np.asarray(mjd_utc, dtype=np.float64)
    loc = None
    if lat_deg is not None:
        loc = EarthLocation.from_geodetic(lon_deg * u.deg, lat_deg * u.deg, (height_m or 0.0) * u.m)
    with iers_offline(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dubious year.*")
        day = np.floor(mjd)
        tdb = Time(day, mjd - day, format="mjd", scale="utc", location=loc).tdb
    return np.asarray(tdb.jd1 + tdb.jd2, dtype=np.float64)


__all__ = [
    "AU_KM", "C_AU_PER_DAY", "DE421_JD_TDB", "de421_path", "earth_barycentric_au", "earth_barycentric_posvel_au",
    "sun_barycentric_au", "sun_barycentric_posvel_au", "sun_barycentric_taylor_au", "observatory_gcrs_au",
    "observatory_gcrs_posvel_au", "observer_barycentric_au", "utc_mjd_to_tdb_jd",
]
