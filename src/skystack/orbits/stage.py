"""The orbit-plan stage: the listed orbits and the plan of chunks, as files."""
from __future__ import annotations

import json
import logging

from ..core.io import atomic_path, write_parquet
from .plan import plan_orbits


def plan_stage(orbit_cfg: dict, seed: int, known_path, listed_out, plan_out, *, truth_path=None, file_path=None,
               images_path=None, search_cfg: dict | None = None, log: logging.Logger) -> dict:
    """``plan_orbits``: orbits_listed.parquet and plan.json."""
    listed, plan = plan_orbits(orbit_cfg, seed, known_path, truth_path=truth_path, file_path=file_path,
                               images_path=images_path, search_cfg=search_cfg, log=log)
    write_parquet(listed, listed_out)
    with atomic_path(plan_out) as tmp:
        tmp.write_text(json.dumps(plan, indent=1))
    log.info("%d listed + %d random orbits (%s), %d chunks of %d in %d chunk ranges, %d partition(s) per search job",
             plan["n_listed"], plan["n_random"], plan["preset"], plan["n_chunks"], plan["chunk_size"],
             plan["n_chunk_ranges"], plan.get("partitions_per_job", 1))
    return plan
