import time

import numpy as np
import pandas as pd

from skystack import logs
from skystack.io import write_parquet
from skystack.stamps import deconvolve_shard, shard_bounds, write_stack

log = logs.setup(snakemake.log[0], "deconvolve_shard")
logs.log_device(log)
cfg = snakemake.params.deconvolve
shard, n_shards = int(snakemake.wildcards.shard), int(snakemake.params.n_shards)
stamps, psfs = np.load(snakemake.input.stamps), np.load(snakemake.input.psfs)
noise_sigma = pd.read_parquet(snakemake.input.meta)["noise_sigma"].to_numpy(float)
start, stop = shard_bounds(len(stamps), n_shards, shard)
if cfg["mode"] == "lowrank" and cfg["shards"] != 1:
    log.info("low-rank mode couples all stamps: one shard instead of deconvolve.shards = %d", cfg["shards"])
log.info("shard %d/%d: stamps %d..%d (%d), mode %s, %s", shard + 1, n_shards, start, stop - 1, stop - start,
         cfg["mode"], cfg["dtype"])
t0 = time.time()
x, diag = deconvolve_shard(stamps, psfs, noise_sigma, cfg, shard, n_shards,
                           progress=lambda done, n: log.info("%d/%d stamps, %.1f s", done, n, time.time() - t0))
log.info("%d converged; median %d iterations", int(diag["converged"].sum()),
         int(diag["iterations"].median()) if len(diag) else 0)
write_stack(x, snakemake.output.deconvolved)
write_parquet(diag, snakemake.output.diagnostics)
