import numpy as np
import pandas as pd

from skystack import logs
from skystack.io import write_parquet
from skystack.report import deconvolution_figure
from skystack.stamps import merge_shards, write_cube

log = logs.setup(snakemake.log[0], "merge_deconvolved")
cfg = snakemake.params.deconvolve
stamps, psfs = np.load(snakemake.input.stamps), np.load(snakemake.input.psfs)
meta = pd.read_parquet(snakemake.input.meta)
x, diag = merge_shards(stamps, psfs, meta, [np.load(p) for p in snakemake.input.deconvolved],
                       [pd.read_parquet(p) for p in snakemake.input.diagnostics])
write_cube(x, psfs, snakemake.output.cube, cfg["mode"])
write_parquet(diag, snakemake.output.diagnostics)
deconvolution_figure(stamps, psfs, x, diag, snakemake.output.figure)
log.info("%d stamps from %d shards; %d converged; median cost %.4g, median reduced chi2 %.3g", len(x),
         len(snakemake.input.deconvolved), int(diag["converged"].sum()),
         float(diag["cost"].median()) if len(diag) else np.nan,
         float(diag["reduced_chi2"].median()) if len(diag) else np.nan)
