import pandas as pd

from skystack import logs
from skystack.catalog.stage import plan_regions, write_json
from skystack.io import write_parquet

log = logs.setup(snakemake.log[0], "plan_regions")
cfg = snakemake.params.catalog
regions, plan = plan_regions(pd.read_parquet(snakemake.input.candidates), cfg["max_sources_per_region"])
write_parquet(regions, snakemake.output.regions)
write_json(plan, snakemake.output.plan)
log.info("%d candidates in %d regions (sources per region %s)", len(regions), plan["n_regions"], plan["sources_per_region"])
