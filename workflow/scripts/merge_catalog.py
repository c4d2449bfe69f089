from skystack.catalog.stage import merge_catalog_stage
from skystack.core import logs

log = logs.setup(snakemake.log[0], snakemake.rule)
o = snakemake.output
merge_catalog_stage(snakemake.input.regions, o.catalog, o.fits, o.figure, log=log)
