"""A grid of orbits around one reference orbit (the one grid: the plan and the tests use it)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .table import ELEMENT_COLUMNS, validate_orbits


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
