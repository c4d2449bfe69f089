from pathlib import Path

from skystack.core import logs
from skystack.survey.stage import index_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
if "images" in snakemake.input.keys():
    paths = sorted(str(p) for p in Path(snakemake.input.images).glob("*.fits*"))
else:
    paths = list(snakemake.input.files)
index_stage(paths, snakemake.output.images, snakemake.output.rejected, site=snakemake.params.site,
            on_bad_image=snakemake.params.on_bad_image, n_partitions=snakemake.params.partitions, log=log)
