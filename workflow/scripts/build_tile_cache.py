import pandas as pd

from skystack import logs
from skystack.cache import write_tile_cache
from skystack.survey import aux_of, read_pixels

log = logs.setup(snakemake.log[0], "build_tile_cache")
partition = int(snakemake.wildcards.partition)
images = pd.read_parquet(snakemake.input.images)
mine = images[images["partition"] == partition]
log.info("partition %d: %d images, %d px tiles", partition, len(mine), snakemake.params.tile_px)


def pixels():
    for k, (_, row) in enumerate(mine.iterrows(), 1):
        yield int(row["image_id"]), read_pixels(row["path"], int(row["hdu"]), aux_of(row), row["saturate"])
        if k % 100 == 0:
            log.info("cached %d/%d images", k, len(mine))


write_tile_cache(snakemake.output.cache, pixels(), tile=snakemake.params.tile_px)
log.info("wrote %s", snakemake.output.cache)
