from pathlib import Path

from skystack import logs
from skystack.io import write_parquet
from skystack.survey import assign_partitions, index_images

log = logs.setup(snakemake.log[0], "index_survey")
if "images" in snakemake.input.keys():
    paths = sorted(str(p) for p in Path(snakemake.input.images).glob("*.fits*"))
else:
    paths = list(snakemake.input.files)
log.info("indexing %d files", len(paths))
images = index_images(paths, site=snakemake.params.site)
images["partition"] = assign_partitions(images, snakemake.params.partitions)
write_parquet(images, snakemake.output.images)
counts = images.groupby("partition").size().to_dict()
log.info("indexed %d image HDUs (%d difference) into %d partitions %s",
         len(images), int(images["is_difference"].sum()), snakemake.params.partitions, counts)
