from skystack.core import logs
from skystack.deconvolve.stage import merge_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
i, o = snakemake.input, snakemake.output
merge_stage(i.stamps, i.psfs, i.meta, i.deconvolved, i.diagnostics, o.cube, o.diagnostics, o.figure,
            mode=snakemake.params.mode, log=log)
