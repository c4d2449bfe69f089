from skystack.core import logs
from skystack.catalog.stage import plan_regions_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
plan_regions_stage(snakemake.input.candidates, snakemake.output.regions, snakemake.output.plan,
                   max_sources_per_region=snakemake.params.max_sources_per_region, log=log)
