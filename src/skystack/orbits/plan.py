"""The orbit plan: which orbits a search tries, cut into chunks that any job can rebuild.

The plan lists its orbits in order: the listed ones (simulated truth, a grid, a user's file)
at positions 0..L-1, then the random ones at L..L+R-1. Chunk c holds positions [c S, (c+1) S);
a search job takes a range of ``chunks_per_job`` chunks and ``partitions_per_job`` image
partitions: as configured (``orbits.chunks_per_job``, one partition), or chosen from the work when
``search.intersections_per_job`` is set (``work_sized_shape``).

Orbit ids are the position, except that an orbit file's own ``orbit_id`` column is kept (so
detections, light curves and figures carry the user's ids), and random orbits then take the ids
after the largest listed one (``first_random_id``), so that no two orbits share an id. Each
random orbit is generated from (seed, its id) alone (``orbits.population``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .grid import grid_around
from .population import population
from .table import ELEMENT_COLUMNS, load_known_objects, load_orbits, validate_orbits

#: Random orbits when ``orbits.n_random`` is null (its default) and ``orbits.source`` is random.
DEFAULT_N_RANDOM = 2000


def n_random_of(orbit_cfg: dict) -> int:
    """``orbits.n_random``, or its default for the source when null: random orbits are added to a
    grid, a file or the truth only when asked for."""
    n = orbit_cfg.get("n_random")
    if n is None:
        return DEFAULT_N_RANDOM if orbit_cfg["source"] == "random" else 0
    return int(n)


def plan_orbits(orbit_cfg: dict, seed: int, known_path, truth_path=None, file_path=None, images_path=None,
                search_cfg: dict | None = None, log=None):
    """The listed orbits (simulated truth, grid, file, region trials) and the plan of chunks.

    ``images_path`` (the index) and ``search_cfg`` (``max_snr_loss``, ``max_trials``,
    ``smoothing_sigma_px``, ``images``) are needed for ``orbits.source: region``: the covering
    is built from the exposures the region reaches (``orbits.region``).

    Returns ``(listed, plan)``: ``listed`` is an orbit table with ``name`` and ``listed_as``
    ("truth", "grid", "file" or "region"), in plan order; ``plan`` a JSON-able dict (seed, preset,
    reference elements, counts, chunk size, chunks per job, number of chunks and of chunk
    ranges, the first random orbit id, and whether every id is its position).
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
    offset = 0
    for part in parts:  # truth and grid orbits: their position is their id
        part.insert(0, "orbit_id", np.arange(offset, offset + len(part), dtype=np.int64))
        offset += len(part)
    if source == "file":
        # The file's own orbit_id (rows without one are numbered after the truth's).
        user = load_orbits(file_path, number_from=offset)
        names = user["name"].astype(str) if "name" in user else ""
        parts.append(user[["orbit_id", *ELEMENT_COLUMNS]].assign(name=names, listed_as="file"))
    regions = []
    if source == "region":
        trials, regions = _region_trials(orbit_cfg, search_cfg or {}, images_path, known_path, seed, offset, log)
        parts.append(trials[["orbit_id", *ELEMENT_COLUMNS, "name"]].assign(listed_as="region"))
    # An empty listed table still has float64 elements: random rows concatenated to it in
    # orbits_for_ids keep their dtype (object columns otherwise).
    empty = pd.DataFrame({"orbit_id": pd.Series(dtype="int64"), **{c: pd.Series(dtype="float64") for c in ELEMENT_COLUMNS},
                          "name": pd.Series(dtype=object), "listed_as": pd.Series(dtype=object)})
    listed = pd.concat(parts, ignore_index=True) if parts else empty
    if len(listed):
        shared = listed["orbit_id"].duplicated(keep=False) & (listed["listed_as"] == "file")
        if shared.any():
            oid = int(listed.loc[shared, "orbit_id"].iloc[0])
            raise ValueError(f"{file_path}: orbit_id {oid} is also the id of a simulated (truth) orbit: with "
                             f"orbits.include_truth the {offset} truth orbits take ids 0..{offset - 1}; give the "
                             f"file's orbits other ids (or none, to number them after the truth), or set "
                             f"orbits.include_truth: false")
        listed = validate_orbits(listed, source=str(file_path or "listed orbits"))
    n_random = n_random_of(orbit_cfg)  # random orbits follow whatever is listed
    n_total = len(listed) + n_random
    size, per_job = int(orbit_cfg["chunk_size"]), int(orbit_cfg["chunks_per_job"])
    n_chunks = max(1, -(-n_total // size))
    first_random = max(len(listed), int(listed["orbit_id"].max()) + 1 if len(listed) else 0)
    plan = {
        "seed": int(seed), "preset": orbit_cfg["preset"], "reference": reference, "reference_name": ref_name,
        "focused_sigma": dict(orbit_cfg["focused_sigma"]), "n_listed": len(listed), "n_random": n_random,
        "n_total": n_total, "chunk_size": size, "chunks_per_job": per_job, "n_chunks": n_chunks,
        "n_chunk_ranges": -(-n_chunks // per_job), "first_random_id": first_random,
        "regions": regions,
        "ids_are_positions": bool(first_random == len(listed)
                                  and np.array_equal(listed["orbit_id"].to_numpy(), np.arange(len(listed)))),
        "partitions_per_job": 1,
    }
    shape = (search_cfg or {}).get("job_shape")
    if shape and shape.get("intersections_per_job") is not None:
        plan.update(_work_sized(plan, listed, shape, images_path, search_cfg, log))
    return listed, plan


# ----------------------------------------------------------------------------- job shape
#: Orbits of the plan whose intersections estimate the work of a work-sized plan.
SHAPE_SAMPLE_ORBITS = 256


def shape_sample_positions(n_total: int, n_sample: int = SHAPE_SAMPLE_ORBITS) -> np.ndarray:
    """Plan positions spread evenly over the whole plan (listed and random orbits alike)."""
    if n_total <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, n_total - 1, min(n_total, n_sample)).round().astype(np.int64))


def work_sized_shape(n_chunks: int, n_partitions: int, intersections_per_chunk_partition: float,
                     intersections_per_job: float, max_search_jobs: int) -> tuple[int, int]:
    """(chunks per job, partitions per job) of a plan cut by work, not one job per chunk.

    A chunk range is combined by one job over every partition, so it gets about
    ``intersections_per_job`` intersections in all; its search jobs then take as many
    partitions as keep each near the same work (one partition per job when a range's work on a
    single partition already reaches it). When that makes more than ``max_search_jobs`` search
    jobs (ranges x (partition groups + 1), and a list of caches per group), the jobs grow:
    partitions first, then chunks.
    """
    cell = max(float(intersections_per_chunk_partition), 1e-300)
    per_job = max(float(intersections_per_job), 1.0)
    chunks = int(min(max(per_job // (cell * n_partitions), 1), n_chunks))
    parts = int(min(max(per_job // (cell * chunks), 1), n_partitions))
    if _search_jobs(n_chunks, n_partitions, chunks, parts) > max_search_jobs:
        parts = n_partitions  # one search job per range before larger ranges
    if _search_jobs(n_chunks, n_partitions, chunks, parts) > max_search_jobs:
        most_ranges = max((max_search_jobs - 1) // 2, 1)  # each range: one search and one combine job
        chunks = -(-n_chunks // most_ranges)
    return chunks, parts


def _search_jobs(n_chunks: int, n_partitions: int, chunks_per_job: int, partitions_per_job: int) -> int:
    """search_shard, combine_chunk and cache_group jobs of a shape."""
    n_groups = -(-n_partitions // partitions_per_job)
    return -(-n_chunks // chunks_per_job) * (n_groups + 1) + n_groups


def _work_sized(plan: dict, listed: pd.DataFrame, shape: dict, images_path, search_cfg: dict, log) -> dict:
    """The plan's job shape from the intersections of a sample of its orbits with the survey's
    searched images (one more intersection per partition than the sample found, so that a
    sample that finds none still gives a finite, small estimate)."""
    from ..search.intersect import intersect
    from ..search.stage import searched_images

    if images_path is None:
        raise ValueError("search.intersections_per_job: the plan needs the survey's index (images.parquet)")
    n_part = int(shape["partitions"])
    images = searched_images(pd.read_parquet(images_path), search_cfg.get("images", "difference"),
                             where=str(images_path))
    positions = shape_sample_positions(plan["n_total"])
    orbits = orbits_for_ids(plan, listed, orbit_ids_at(plan, listed, positions))
    hits = intersect(orbits, images) if len(orbits) else pd.DataFrame({"image_id": []})
    n_hits = len(hits) + n_part
    per_orbit_partition = n_hits / max(len(positions), 1) / n_part
    per_cell = per_orbit_partition * plan["chunk_size"]
    others = int(shape["partitions"]) + int(shape.get("other_jobs", 0))
    budget = max(int(shape["max_jobs"]) - others, 2)
    chunks, parts = work_sized_shape(plan["n_chunks"], n_part, per_cell, float(shape["intersections_per_job"]),
                                     budget)
    if log is not None:
        log.info("work-sized plan: %d sample orbits, %d intersections on %d images (%.3g per orbit and "
                 "partition): %d chunks x %d partitions per search job, estimated %.3g intersections each",
                 len(positions), len(hits), len(images), per_orbit_partition, chunks, parts,
                 per_cell * chunks * parts)
    return {"chunks_per_job": chunks, "n_chunk_ranges": -(-plan["n_chunks"] // chunks), "partitions_per_job": parts,
            "estimated_intersections_per_orbit": per_orbit_partition * n_part}


def partition_groups(plan: dict, n_partitions: int) -> list[list[int]]:
    """The partitions each search job of a chunk range takes (``partitions_per_job`` of them)."""
    per_job = int(plan.get("partitions_per_job", 1))
    return [list(range(g, min(g + per_job, n_partitions))) for g in range(0, n_partitions, per_job)]


def _region_trials(orbit_cfg: dict, search_cfg: dict, images_path, known_path, seed: int, start_id: int, log):
    from ..search.stage import searched_images
    from .region import region_trials

    if images_path is None:
        raise ValueError("orbits.source 'region': the plan needs the survey's index (images.parquet)")
    images = searched_images(pd.read_parquet(images_path), search_cfg.get("images", "difference"),
                             where=str(images_path))
    return region_trials(orbit_cfg.get("regions") or [], images, known_path,
                         max_snr_loss=float(search_cfg.get("max_snr_loss", 0.2)),
                         max_trials=int(search_cfg.get("max_trials", 1_000_000)),
                         smoothing_sigma_px=float(search_cfg.get("smoothing_sigma_px", 0.0)),
                         min_exposures=int(search_cfg.get("min_images", 5)), start_id=start_id, seed=seed, log=log)


def _first_random_id(plan: dict) -> int:
    return int(plan.get("first_random_id", plan["n_listed"]))  # plans written before the key: n_listed


def orbit_ids_at(plan: dict, listed: pd.DataFrame, positions) -> np.ndarray:
    """The orbit ids at the given plan positions (positions outside the plan are dropped)."""
    pos = np.asarray(positions, dtype=np.int64)
    pos = pos[(pos >= 0) & (pos < plan["n_total"])]
    n_listed = plan["n_listed"]
    ids = pos + (_first_random_id(plan) - n_listed)
    at_listed = pos < n_listed
    ids[at_listed] = listed["orbit_id"].to_numpy(dtype=np.int64)[pos[at_listed]]
    return ids


def orbits_for_ids(plan: dict, listed: pd.DataFrame, ids) -> pd.DataFrame:
    """Rebuild the orbits with the given ids from the plan: the listed rows (in the order asked),
    then the random ones; ids of no orbit of the plan are dropped."""

    ids = np.asarray(ids, dtype=np.int64)
    is_listed = np.isin(ids, listed["orbit_id"].to_numpy(dtype=np.int64))
    first = _first_random_id(plan)
    random_ids = ids[~is_listed & (ids >= first) & (ids < first + plan["n_total"] - plan["n_listed"])]
    parts = [listed.set_index("orbit_id").loc[ids[is_listed]].reset_index()[["orbit_id"] + ELEMENT_COLUMNS]]
    if len(random_ids):
        parts.append(population(plan["preset"], random_ids, plan["seed"], plan["reference"], plan["focused_sigma"]))
    return pd.concat(parts, ignore_index=True)


def chunk_range_positions(plan: dict, chunk_range: int) -> np.ndarray:
    """Plan positions of one search job's chunk range."""
    size, per_job = plan["chunk_size"], plan["chunks_per_job"]
    start = chunk_range * per_job * size
    return np.arange(start, min(start + per_job * size, plan["n_total"]), dtype=np.int64)


def chunk_range_ids(plan: dict, chunk_range: int, listed: pd.DataFrame | None = None) -> np.ndarray:
    """Orbit ids of one search job's chunk range. ``listed`` (the plan's listed orbits) is needed
    when an orbit file brought its own ids; without it the positions are the ids."""
    positions = chunk_range_positions(plan, chunk_range)
    if listed is None:
        if not plan.get("ids_are_positions", True):
            raise ValueError("chunk_range_ids: the orbit file brought its own ids; pass the listed orbits")
        return positions
    return orbit_ids_at(plan, listed, positions)
