from pathlib import Path

from skystack.core import logs
from skystack.survey.stage import index_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
if "images" in snakemake.input.keys():
    paths = sorted(str(p) for p in Path(snakemake.input.images).glob("*.fits*"))
else:
    paths = list(snakemake.input.files)
params = snakemake.params
index_stage(paths, snakemake.output.images, snakemake.output.rejected, site=params.site,
            on_bad_image=params.on_bad_image, n_partitions=params.partitions, log=log,
            sites=params.sites, conventions=params.conventions, ccd_tables=params.ccd_tables,
            refused=params.refused)
