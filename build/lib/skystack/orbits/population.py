"""Random orbit populations whose every orbit depends on (seed, orbit_id) alone.

Orbit ``j`` takes its uniform draws from a Philox counter stream at position ``j``, so any
shard can rebuild any orbit, and the orbits do not change with chunk size or job count.

Presets (J2000 ecliptic elements):

- ``kbo``: a 30-60 AU, e 0-0.25, inclination Rayleigh-distributed (scale 6 deg);
- ``centaur``: a 5-30 AU, e 0-0.5, inclination Rayleigh (scale 10 deg);
- ``focused``: a narrow Gaussian family around reference elements (e.g. a planet-nine
  candidate or a known object), widths given per element (eccentricity reflected into
  [0, 1), inclination into [0, 180] deg).

This is skystack's one orbit generator: the workflow's plan, the simulator's family, the
tests and the benchmarks all draw from it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.units import J2000_JD_TDB
from .table import ELEMENT_COLUMNS, validate_orbits

DRAWS_PER_ORBIT = 8  # uint64 values per orbit: two Philox counter steps
PRESETS = ("kbo", "centaur", "focused")


def uniforms_for_ids(seed: int, orbit_ids) -> np.ndarray:
    """(n, 8) uniforms in [0, 1) for the given orbit ids, independent of how they are grouped."""
    ids = np.asarray(orbit_ids, dtype=np.int64)
    out = np.empty((len(ids), DRAWS_PER_ORBIT))
    if len(ids) == 0:
        return out
    # Contiguous runs share one stream position, which keeps this fast for whole chunks.
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    for run in np.split(np.arange(len(ids)), breaks):
        bitgen = np.random.Philox(key=np.uint64(seed))
        bitgen.advance(int(ids[run[0]]) * DRAWS_PER_ORBIT // 4)
        raw = bitgen.random_raw(len(run) * DRAWS_PER_ORBIT).reshape(len(run), DRAWS_PER_ORBIT)
        out[run] = (raw >> np.uint64(11)) * (1.0 / 2**53)
    return out


def _normal(u: np.ndarray) -> np.ndarray:
    from scipy.special import ndtri

    return ndtri(np.clip(u, 1e-16, 1 - 1e-16))


def _rayleigh(u: np.ndarray, scale: float) -> np.ndarray:
    return scale * np.sqrt(-2.0 * np.log1p(-u))


FOCUSED_WIDTHS = ("a_frac", "e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg")
DEFAULT_FOCUSED_SIGMA = {"a_frac": 1e-4, "e": 0.0, "inc_deg": 0.004, "node_deg": 0.004, "argperi_deg": 0.0,
                         "mean_anomaly_deg": 0.01}


def _reflect_unit(e: np.ndarray) -> np.ndarray:
    """Eccentricities reflected into [0, 1) rather than clipped, so none pile up at a limit."""
    e = np.abs(e)
    return np.clip(np.where(e >= 1.0, 2.0 - e, e), 0.0, 1.0 - 1e-9)


def population(preset: str, orbit_ids, seed: int, reference: dict | None = None, sigma: dict | None = None) -> pd.DataFrame:
    """Orbits of a preset population for the given ids (an orbit table, ``orbits.table``).

    Parameters
    ----------
    preset : {"kbo", "centaur", "focused"}
        See the module docstring.
    orbit_ids : array of int
        Which orbits; orbit j depends on (seed, j) alone.
    seed : int
        Population seed (the Philox key).
    reference : mapping, optional
        For ``focused``: the central elements (ELEMENT_COLUMNS).
    sigma : mapping, optional
        For ``focused``: Gaussian widths per element (``FOCUSED_WIDTHS``; ``a_frac`` is
        relative), defaults ``DEFAULT_FOCUSED_SIGMA``.
    """
    ids = np.asarray(orbit_ids, dtype=np.int64)
    u = uniforms_for_ids(seed, ids)
    if preset == "kbo":
        el = dict(a_au=30 + 30 * u[:, 0], e=0.25 * u[:, 1], inc_deg=np.minimum(_rayleigh(u[:, 2], 6.0), 60.0))
    elif preset == "centaur":
        el = dict(a_au=5 + 25 * u[:, 0], e=0.5 * u[:, 1], inc_deg=np.minimum(_rayleigh(u[:, 2], 10.0), 60.0))
    elif preset == "focused":
        if reference is None:
            raise ValueError("focused population needs reference elements")
        unknown = sorted(set(sigma or {}) - set(FOCUSED_WIDTHS))
        if unknown:
            raise ValueError(f"focused population: unknown width(s) {unknown} (choose from {', '.join(FOCUSED_WIDTHS)})")
        s = {**DEFAULT_FOCUSED_SIGMA, **(sigma or {})}
        ref = {k: float(reference[k]) for k in ELEMENT_COLUMNS}
        z = _normal(u[:, :6])
        inc = ref["inc_deg"] + s["inc_deg"] * z[:, 3]
        out = pd.DataFrame({
            "orbit_id": ids,
            "a_au": ref["a_au"] * (1 + s["a_frac"] * z[:, 0]),
            "e": _reflect_unit(ref["e"] + s["e"] * z[:, 4]) if s["e"] > 0 else np.full(len(ids), ref["e"]),
            "inc_deg": 180.0 - np.abs(180.0 - np.abs(inc) % 360.0),  # reflected into [0, 180]
            "node_deg": (ref["node_deg"] + s["node_deg"] * z[:, 2]) % 360,
            "argperi_deg": (ref["argperi_deg"] + s["argperi_deg"] * z[:, 5]) % 360,
            "mean_anomaly_deg": (ref["mean_anomaly_deg"] + s["mean_anomaly_deg"] * z[:, 1]) % 360,
            "epoch_jd_tdb": np.full(len(ids), ref["epoch_jd_tdb"]),
        })
        return validate_orbits(out, source=f"focused population (seed {seed})")
    else:
        raise ValueError(f"unknown orbit preset {preset!r} (one of {', '.join(PRESETS)})")
    return validate_orbits(pd.DataFrame({
        "orbit_id": ids, **el,
        "node_deg": 360 * u[:, 3], "argperi_deg": 360 * u[:, 4], "mean_anomaly_deg": 360 * u[:, 5],
        "epoch_jd_tdb": np.full(len(ids), J2000_JD_TDB),
    }), source=f"{preset} population (seed {seed})")
