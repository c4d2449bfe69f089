import time

import numpy as np
import pandas as pd

from skystack import logs
from skystack.deconvolve import deconvolve_stack
from skystack.io import atomic_path, write_parquet
from skystack.stamps import shard_bounds

log = logs.setup(snakemake.log[0], "deconvolve_shard")
logs.log_device(log)
cfg = snakemake.params.deconvolve
shard, n_shards = int(snakemake.wildcards.shard), int(snakemake.params.n_shards)
stamps, psfs = np.load(snakemake.input.stamps), np.load(snakemake.input.psfs)
meta = pd.read_parquet(snakemake.input.meta)
start, stop = shard_bounds(len(stamps), n_shards, shard)
if cfg["mode"] == "lowrank":
    log.info("low-rank mode couples all stamps: one shard holds them all")
noise = meta["noise_sigma"].to_numpy(float)[start:stop]
noise = None if np.isnan(noise).any() else noise  # external stacks: from each stamp's MAD
log.info("shard %d/%d: stamps %d..%d (%d), mode %s, %s", shard + 1, n_shards, start, stop - 1, stop - start,
         cfg["mode"], cfg["dtype"])
t0 = time.time()
if stop > start:
    x, diag = deconvolve_stack(stamps[start:stop], psfs[start:stop], noise, n_scales=cfg["n_scales"],
                               kappa=tuple(cfg["kappa"]), n_reweights=cfg["n_reweights"], tol=cfg["tol"],
                               max_iter=cfg["max_iter"], mode=cfg["mode"], dtype=cfg["dtype"])
    diag["stamp"] = diag["stamp"].to_numpy() + start
else:
    x, diag = np.zeros((0,) + stamps.shape[1:], np.float32), pd.DataFrame({"stamp": pd.Series(dtype="int64")})
log.info("deconvolved %d stamps in %.1f s; %d converged, median %d iterations", len(x), time.time() - t0,
         int(diag["converged"].sum()) if len(diag) else 0, int(diag["iterations"].median()) if len(diag) else 0)
with atomic_path(snakemake.output.deconvolved) as tmp:
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(x))
write_parquet(diag, snakemake.output.diagnostics)
