from skystack.core import logs
from skystack.deconvolve.stage import shard_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
logs.log_device(log)
i, o = snakemake.input, snakemake.output
shard_stage(i.stamps, i.psfs, i.meta, int(snakemake.wildcards.shard), int(snakemake.params.n_shards),
            o.deconvolved, o.diagnostics, cfg=snakemake.params.deconvolve, log=log)
