import numpy as np
import pandas as pd

from skystack import logs
from skystack.deconvolve import ellipticity
from skystack.io import write_parquet
from skystack.report import deconvolution_figure
from skystack.stamps import write_cube

log = logs.setup(snakemake.log[0], "merge_deconvolved")
stamps, psfs = np.load(snakemake.input.stamps), np.load(snakemake.input.psfs)
meta = pd.read_parquet(snakemake.input.meta)
x = np.concatenate([np.load(p) for p in snakemake.input.deconvolved])
diag = pd.concat([pd.read_parquet(p) for p in snakemake.input.diagnostics if len(pd.read_parquet(p))] or
                 [pd.DataFrame({"stamp": pd.Series(dtype="int64")})], ignore_index=True)
diag = meta.merge(diag, on="stamp", how="left", suffixes=("", "_solver"))
if len(x):
    diag["e1_observed"], diag["e2_observed"] = ellipticity(stamps)
    diag["e1"], diag["e2"] = ellipticity(x)
write_cube(x, psfs, snakemake.output.cube)
write_parquet(diag, snakemake.output.diagnostics)
deconvolution_figure(stamps, psfs, x, diag, snakemake.output.figure)
log.info("%d stamps deconvolved; %d converged; median cost %.4g", len(x),
         int(diag["converged"].sum()) if len(diag) else 0, float(diag["cost"].median()) if len(diag) else float("nan"))
