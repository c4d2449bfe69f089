"""The orbit plan: which orbits a search tries, cut into chunks that any job can rebuild.

Listed orbits (simulated truth, a grid, a user's file) take ids 0..L-1; random orbits
follow with ids L..L+R-1, each generated from (seed, id) alone (``orbits.population``).
Chunk c holds ids [c S, (c+1) S); a search job takes a range of ``chunks_per_job`` chunks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .grid import grid_around
from .population import population
from .table import ELEMENT_COLUMNS, load_known_objects, load_orbits, validate_orbits


def plan_orbits(orbit_cfg: dict, seed: int, known_path, truth_path=None, file_path=None):
    """The listed orbits (simulated truth, grid, file) and the plan of chunks.

    Returns ``(listed, plan)``: ``listed`` is an orbit table with ``name`` and ``listed_as``
    ("truth", "grid" or "file"); ``plan`` a JSON-able dict (seed, preset, reference
    elements, counts, chunk size, chunks per job, number of chunks and of chunk ranges).
    """

    known = load_known_objects(known_path).set_index("name")
    ref_name = orbit_cfg["reference"]
    if ref_name not in known.index:
        raise ValueError(f"orbits.reference: {ref_name!r} is not in {known_path} (have {', '.join(known.index)})")
    reference = known.loc[ref_name, ELEMENT_COLUMNS].astype(float).to_dict()
    parts = []
    source = orbit_cfg["source"]
    if truth_path is not None and (source == "truth" or orbit_cfg["include_truth"]):
        truth = pd.read_parquet(truth_path)
        parts.append(truth[ELEMENT_COLUMNS].assign(name=truth["name"].astype(str), listed_as="truth"))
    if source == "grid":
        g = orbit_cfg["grid"]
        frac = np.linspace(g["a_frac_min"], g["a_frac_max"], g["n"])
        grid = grid_around(reference, frac, name=ref_name)
        parts.append(grid[ELEMENT_COLUMNS + ["name"]].assign(listed_as="grid"))
    if source == "file":
        user = load_orbits(file_path)
        parts.append(user[ELEMENT_COLUMNS].assign(name=user["name"].astype(str) if "name" in user else "", listed_as="file"))
    # An empty listed table still has float64 elements: random rows concatenated to it in
    # orbits_for_ids keep their dtype (object columns otherwise).
    empty = pd.DataFrame({**{c: pd.Series(dtype="float64") for c in ELEMENT_COLUMNS},
                          "name": pd.Series(dtype=object), "listed_as": pd.Series(dtype=object)})
    listed = pd.concat(parts, ignore_index=True) if parts else empty
    listed.insert(0, "orbit_id", np.arange(len(listed), dtype=np.int64))
    if len(listed):
        validate_orbits(listed, source=str(file_path or "listed orbits"))
    n_random = int(orbit_cfg["n_random"])  # random orbits follow whatever is listed
    n_total = len(listed) + n_random
    size, per_job = int(orbit_cfg["chunk_size"]), int(orbit_cfg["chunks_per_job"])
    n_chunks = max(1, -(-n_total // size))
    plan = {
        "seed": int(seed), "preset": orbit_cfg["preset"], "reference": reference, "reference_name": ref_name,
        "focused_sigma": dict(orbit_cfg["focused_sigma"]), "n_listed": len(listed), "n_random": n_random,
        "n_total": n_total, "chunk_size": size, "chunks_per_job": per_job, "n_chunks": n_chunks,
        "n_chunk_ranges": -(-n_chunks // per_job),
    }
    return listed, plan


def orbits_for_ids(plan: dict, listed: pd.DataFrame, ids) -> pd.DataFrame:
    """Rebuild the orbits with the given ids from the plan (listed rows, then random ones)."""

    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < plan["n_total"])]
    listed_ids = ids[ids < plan["n_listed"]]
    random_ids = ids[ids >= plan["n_listed"]]
    parts = [listed.set_index("orbit_id").loc[listed_ids].reset_index()[["orbit_id"] + ELEMENT_COLUMNS]]
    if len(random_ids):
        parts.append(population(plan["preset"], random_ids, plan["seed"], plan["reference"], plan["focused_sigma"]))
    return pd.concat(parts, ignore_index=True)


def chunk_range_ids(plan: dict, chunk_range: int) -> np.ndarray:
    """Orbit ids of one search job's chunk range."""
    size, per_job = plan["chunk_size"], plan["chunks_per_job"]
    start = chunk_range * per_job * size
    return np.arange(start, min(start + per_job * size, plan["n_total"]), dtype=np.int64)
