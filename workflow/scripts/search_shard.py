import json
import time

import pandas as pd

from skystack import logs
from skystack.cache import TileCache
from skystack.io import write_parquet
from skystack.search import prepare_images
from skystack.tracking import chunk_range_ids, orbits_for_ids, search_partials, stage_cache

log = logs.setup(snakemake.log[0], "search_shard")
logs.log_device(log)
chunk_range, partition = int(snakemake.wildcards.chunk), int(snakemake.wildcards.partition)
cfg = snakemake.params.search
plan = json.loads(open(snakemake.input.plan).read())
listed = pd.read_parquet(snakemake.input.listed)
images = pd.read_parquet(snakemake.input.images)
images = images[(images["partition"] == partition) & (images["is_difference"] == (cfg["images"] == "difference"))]
cache_path = stage_cache(snakemake.input.cache, cfg["staging_dir"])
if cache_path != snakemake.input.cache:
    log.info("tile cache staged to %s (once for all chunks of this job)", cache_path)
cache = TileCache.open(cache_path)
ids = chunk_range_ids(plan, chunk_range)
log.info("chunk range %d (orbits %d..%d) x partition %d (%d images)", chunk_range, ids[:1].sum(), ids[-1:].sum(), partition, len(images))
parts, size = [], plan["chunk_size"]
t0 = time.time()
prepared = prepare_images(images) if len(images) else None  # headers parsed once for every chunk
steps = {}
for k, start in enumerate(range(0, len(ids), size), 1):
    orbits = orbits_for_ids(plan, listed, ids[start:start + size])
    parts.append(search_partials(orbits, images, cache, smoothing_sigma_px=cfg["smoothing_sigma_px"],
                                 max_batch_bytes=cfg["max_batch_mb"] << 20, prepared=prepared, timings=steps))
    log.info("chunk %d/%d: %d orbits, %d intersections, %.1f s", k, -(-len(ids) // size), len(orbits), len(parts[-1]), time.time() - t0)
partials = pd.concat(parts, ignore_index=True)
write_parquet(partials, snakemake.output.partials)
log.info("wrote %d intersections; seconds per step: %s", len(partials),
         ", ".join(f"{k} {v:.2f}" for k, v in steps.items()) or "none")
