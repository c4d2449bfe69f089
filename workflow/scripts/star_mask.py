from skystack.core import logs
from skystack.search.stage import star_mask_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
star_mask_stage(snakemake.input.catalog, snakemake.output.stars, mag_limit=snakemake.params.star_mask_mag, log=log)
