"""The orbit table: its columns, validation, and reading it from files (orbit lists, known objects).

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
84381.448 arcsec); propagation (``astrometry.kepler``) is two-body around the Sun with the Gaussian
gravitational constant and returns ICRS (equatorial) positions.
Other columns (a ``name``, say) are carried along untouched.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ELEMENT_COLUMNS = ["a_au", "e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg", "epoch_jd_tdb"]
ORBIT_COLUMNS = ["orbit_id", *ELEMENT_COLUMNS]
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


def load_orbits(path, number_from: int = 0) -> pd.DataFrame:
    """Read an orbit table from CSV or parquet and validate it.

    Parameters
    ----------
    path : str or Path
        ``.csv`` or ``.parquet`` file with ELEMENT_COLUMNS (and ``orbit_id``, integers >= 0,
        which are kept; without it the rows are numbered from ``number_from``).

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
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: orbit file is empty (no header line, no orbit)") from None
    except (OSError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: cannot read orbit file ({err})") from err
    if df.empty:
        raise ValueError(f"{path}: orbit file has no orbit rows (columns: {', '.join(map(str, df.columns))})")
    if "orbit_id" not in df.columns:
        df.insert(0, "orbit_id", np.arange(number_from, number_from + len(df), dtype=np.int64))
    out = validate_orbits(df, source=str(path))
    if (out["orbit_id"] < 0).any():
        row = int(np.flatnonzero(out["orbit_id"].to_numpy() < 0)[0])
        raise ValueError(f"{path}: row {row}: orbit_id {int(out['orbit_id'].iloc[row])} is negative (ids are "
                         "integers >= 0)")
    return out


def load_known_objects(path) -> pd.DataFrame:
    """Read a known-objects CSV (``name`` plus ELEMENT_COLUMNS, like
    ``resources/known_objects.csv``); rows get ``orbit_id`` 0, 1, ... in file order.

    Returns
    -------
    DataFrame
        Validated orbit table with the ``name`` column (and any other columns).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, comment="#")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: known-objects file is empty (no header line, no object)") from None
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
