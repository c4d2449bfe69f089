from skystack.core import logs
from skystack.survey.stage import cache_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
cache_stage(snakemake.input.images, int(snakemake.wildcards.partition), snakemake.output.cache,
            tile_px=snakemake.params.tile_px, log=log)
