from pathlib import Path

from skystack import logs
from skystack.io import write_parquet
from skystack.survey import assign_partitions, index_survey

log = logs.setup(snakemake.log[0], "index_survey")
if "images" in snakemake.input.keys():
    paths = sorted(str(p) for p in Path(snakemake.input.images).glob("*.fits*"))
else:
    paths = list(snakemake.input.files)
log.info("indexing %d files (on_bad_image=%s)", len(paths), snakemake.params.on_bad_image)
images, rejected = index_survey(paths, site=snakemake.params.site, on_bad_image=snakemake.params.on_bad_image, progress=log.info)
images["partition"] = assign_partitions(images, snakemake.params.partitions)
write_parquet(rejected, snakemake.output.rejected)
write_parquet(images, snakemake.output.images)
for _, r in rejected.iterrows():
    log.warning("left out %s [HDU %d]: %s", r["path"], r["hdu"], r["reason"])
counts = images.groupby("partition").size().to_dict()
log.info("indexed %d image HDUs (%d difference) into %d partitions %s; %d left out",
         len(images), int(images["is_difference"].sum()), snakemake.params.partitions, counts, len(rejected))
