"""Random orbit populations whose every orbit depends on (seed, orbit_id) alone.

Orbit ``j`` takes its uniform draws from a Philox counter stream at position ``j``, so any
shard can rebuild any orbit, and the orbits do not change with chunk size or job count.

Presets (J2000 ecliptic elements):

- ``kbo``: a 30-60 AU, e 0-0.25, inclination Rayleigh-distributed (scale 6 deg);
- ``centaur``: a 5-30 AU, e 0-0.5, inclination Rayleigh (scale 10 deg);
- ``focused``: a narrow Gaussian family around reference elements (e.g. a planet-nine
  candidate or a known object), widths given per element.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

ELEMENTS = ["a_au", "e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg", "epoch_jd_tdb"]
DRAWS_PER_ORBIT = 8  # uint64 values per orbit: two Philox counter steps
J2000_JD_TDB = 2451545.0
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


def population(preset: str, orbit_ids, seed: int, reference: dict | None = None, sigma: dict | None = None) -> pd.DataFrame:
    """Orbits of a preset population for the given ids (columns orbit_id + ELEMENTS)."""
    ids = np.asarray(orbit_ids, dtype=np.int64)
    u = uniforms_for_ids(seed, ids)
    if preset == "kbo":
        el = dict(a_au=30 + 30 * u[:, 0], e=0.25 * u[:, 1], inc_deg=np.minimum(_rayleigh(u[:, 2], 6.0), 60.0))
    elif preset == "centaur":
        el = dict(a_au=5 + 25 * u[:, 0], e=0.5 * u[:, 1], inc_deg=np.minimum(_rayleigh(u[:, 2], 10.0), 60.0))
    elif preset == "focused":
        if reference is None:
            raise ValueError("focused population needs reference elements")
        s = {"a_frac": 1e-4, "mean_anomaly_deg": 0.01, "node_deg": 0.004, "inc_deg": 0.004, **(sigma or {})}
        z = _normal(u[:, :4])
        return pd.DataFrame({
            "orbit_id": ids,
            "a_au": reference["a_au"] * (1 + s["a_frac"] * z[:, 0]),
            "e": np.full(len(ids), reference["e"]),
            "inc_deg": reference["inc_deg"] + s["inc_deg"] * z[:, 3],
            "node_deg": (reference["node_deg"] + s["node_deg"] * z[:, 2]) % 360,
            "argperi_deg": np.full(len(ids), reference["argperi_deg"]),
            "mean_anomaly_deg": (reference["mean_anomaly_deg"] + s["mean_anomaly_deg"] * z[:, 1]) % 360,
            "epoch_jd_tdb": np.full(len(ids), reference["epoch_jd_tdb"]),
        })
    else:
        raise ValueError(f"unknown orbit preset {preset!r} (one of {', '.join(PRESETS)})")
    return pd.DataFrame({
        "orbit_id": ids, **el,
        "node_deg": 360 * u[:, 3], "argperi_deg": 360 * u[:, 4], "mean_anomaly_deg": 360 * u[:, 5],
        "epoch_jd_tdb": np.full(len(ids), J2000_JD_TDB),
    })
