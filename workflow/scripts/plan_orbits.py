from skystack.core import logs
from skystack.orbits.stage import plan_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
plan_stage(snakemake.params.orbits, snakemake.params.seed, snakemake.input.known_objects, snakemake.output.listed,
           snakemake.output.plan, truth_path=snakemake.input.get("truth"),
           file_path=snakemake.input.get("orbit_file"), images_path=snakemake.input.get("images"),
           search_cfg=snakemake.params.search, log=log)
