"""B2: end-to-end search throughput on a survey with pixels.

Builds (or reuses) the simulated survey of a config up to its tile caches and orbit plan with
Snakemake in ``--workdir``, then runs the search itself in this process, timed: for every
orbit chunk of the plan, each partition's intersections, patch gathers from its tile cache
and matched filter (``tracking.search_partials``), then the chunk's combination with sigma-G
clipping (``tracking.combine_partials``). The orbits are the workflow's own (the plan).

    python -m benchmarks.end_to_end [--config config/experiments/demo.yaml] [--workdir benchmarks/out/end_to_end]
                                    [--max-orbits N] [--repeat 3]

Prints JSON: orbits per second and intersections per second over the whole search, the
seconds per step, the detections above the config's SNR threshold, and the device.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from skystack.core.config import load_config
from skystack.core.runtime import configure, device_summary
from skystack.orbits.plan import orbit_ids_at, orbits_for_ids
from skystack.search.combine import combine_partials
from skystack.search.intersect import prepare_images
from skystack.search.shard import search_partials
from skystack.survey.cache import TileCache

REPO = Path(__file__).resolve().parents[1]


def build_inputs(config_path: Path, workdir: Path, cores: int) -> dict:
    """Run the workflow up to the images, tile caches and orbit plan (a no-op when done)."""
    cfg = load_config(config_path)
    res = Path(cfg["results_dir"]) / cfg["experiment"]
    cache_dir = Path(cfg["cache_dir"]) / cfg["experiment"]
    targets = [res / "images.parquet", res / "search" / "plan.json",
               *(cache_dir / f"partition_{p}.tiles" for p in range(cfg["partitions"]))]
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = [str(snakemake), "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir), "--cores", str(cores),
           "--profile", str(REPO / "profiles" / "default"), *map(str, targets), "--quiet", "rules",
           "--configfile", str(config_path.resolve())]  # --quiet and --configfile take every word after them
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return {"cfg": cfg, "results": workdir / res, "cache": workdir / cache_dir, "build_s": time.perf_counter() - t}


def load_search(config: Path, workdir: Path, cores: int = 2) -> dict:
    """The demo's search inputs: config, plan, listed orbits, and per partition its searched
    images, opened tile cache and prepared WCS (built with Snakemake on first use)."""
    workdir.mkdir(parents=True, exist_ok=True)
    built = build_inputs(config, workdir.resolve(), cores)
    cfg, res = built["cfg"], built["results"]
    search_cfg = cfg["search"]
    plan = json.loads((res / "search" / "plan.json").read_text())
    listed = pd.read_parquet(res / "search" / "orbits_listed.parquet")
    images = pd.read_parquet(res / "images.parquet")
    images["path"] = [str(workdir / p) if not Path(p).is_absolute() else p for p in images["path"]]
    images = images[images["is_difference"] == (search_cfg["images"] == "difference")]
    prepare_s, shards = 0.0, []
    for p in range(cfg["partitions"]):
        mine = images[images["partition"] == p]
        t = time.perf_counter()
        prepared = prepare_images(mine) if len(mine) else None
        prepare_s += time.perf_counter() - t
        shards.append((mine, TileCache.open(built["cache"] / f"partition_{p}.tiles"), prepared))
    return {"cfg": cfg, "plan": plan, "listed": listed, "images": images, "shards": shards,
            "prepare_s": prepare_s, "build_s": built["build_s"]}


def chunk_orbits(plan: dict, listed: pd.DataFrame, start: int, stop: int) -> pd.DataFrame:
    """The orbits at plan positions [start, stop)."""
    return orbits_for_ids(plan, listed, orbit_ids_at(plan, listed, np.arange(start, stop)))


def best_of_passes(search_all, repeat: int):
    """A warm-up pass (compiles every shape), then ``repeat`` timed passes of
    ``search_all(timings)``: (warm-up seconds, each pass's seconds, the best pass's step timings
    and result)."""
    t = time.perf_counter()
    search_all({})
    first = time.perf_counter() - t
    passes = []
    for _ in range(max(1, repeat)):
        timings = {}
        t = time.perf_counter()
        out = search_all(timings)
        passes.append((time.perf_counter() - t, timings, out))
    _, timings, out = min(passes, key=lambda p: p[0])
    return first, [round(p[0], 4) for p in passes], timings, out


def main(argv=None) -> dict:
    configure()  # float64 positions, the compilation cache
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "config" / "experiments" / "demo.yaml")
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "end_to_end")
    ap.add_argument("--cores", type=int, default=2, help="for building the survey")
    ap.add_argument("--max-orbits", type=int, default=0, help="search only the first N orbits of the plan (0: all)")
    ap.add_argument("--repeat", type=int, default=1, help="timed passes after the warm-up (the best is reported)")
    args = ap.parse_args(argv)
    loaded = load_search(args.config, args.workdir, args.cores)
    cfg, plan, listed, images, shards = (loaded[k] for k in ("cfg", "plan", "listed", "images", "shards"))
    search_cfg = cfg["search"]
    n_orbits = plan["n_total"] if args.max_orbits <= 0 else min(args.max_orbits, plan["n_total"])
    size = plan["chunk_size"]

    def search_all(timings):
        found, n_hits = [], 0
        for start in range(0, n_orbits, size):
            orbits = chunk_orbits(plan, listed, start, min(start + size, n_orbits))
            partials = pd.concat([search_partials(orbits, mine, cache, prepared=prepared, timings=timings,
                                                  smoothing_sigma_px=search_cfg["smoothing_sigma_px"],
                                                  max_batch_bytes=search_cfg["max_batch_mb"] << 20)
                                  for mine, cache, prepared in shards], ignore_index=True)
            t = time.perf_counter()
            combined = combine_partials(partials, n_sigma_g=search_cfg["sigma_g_clip"])
            timings["combine"] = timings.get("combine", 0.0) + time.perf_counter() - t
            n_hits += len(partials)
            found.append(combined[combined["snr"] >= search_cfg["snr_threshold"]])
        return pd.concat(found, ignore_index=True), n_hits

    first, pass_seconds, timings, (above, n_hits) = best_of_passes(search_all, args.repeat)
    seconds = min(pass_seconds)
    result = {
        "benchmark": "end_to_end",
        "device": device_summary(),
        "config": str(args.config),
        "n_images": len(images),
        "partitions": cfg["partitions"],
        "n_orbits": n_orbits,
        "chunk_size": size,
        "intersections": n_hits,
        "orbits_above_threshold": len(above),
        "seconds": seconds,
        "orbits_per_s": n_orbits / seconds,
        "intersections_per_s": n_hits / seconds,
        "pass_seconds": pass_seconds,
        "step_seconds": {**{k: round(v, 4) for k, v in timings.items()}, "prepare images (once)": loaded["prepare_s"]},
        "first_pass_s": first,
        "build_survey_s": loaded["build_s"],
        "load_average": list(os.getloadavg()),
    }
    result["summary"] = (f"{result['orbits_per_s']:.4g} orbits/s, {result['intersections_per_s']:.3g} intersections/s "
                         f"({n_orbits} orbits x {len(images)} images, {result['device']})")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
