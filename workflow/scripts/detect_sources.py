import pandas as pd

from skystack import logs
from skystack.catalog import detect_sources
from skystack.catalog.stage import candidates_on_images, load_image, read_candidates, science_images
from skystack.io import write_parquet

log = logs.setup(snakemake.log[0], "detect_sources")
cfg = snakemake.params.catalog
if cfg["source"] == "file":
    candidates = read_candidates(snakemake.input.candidates)
    candidates = candidates_on_images(candidates, pd.read_parquet(snakemake.input.images),
                                      snakemake.input.candidates, warn=log.warning)
    log.info("%d candidates from %s", len(candidates), snakemake.input.candidates)
else:
    rows = science_images(pd.read_parquet(snakemake.input.images))
    images = []
    for k, (_, row) in enumerate(rows.iterrows(), 1):
        images.append(load_image(row))
        if k % max(1, len(rows) // 10) == 0 or k == len(rows):
            log.info("loaded %d/%d science images", k, len(rows))
    candidates = detect_sources(images, thresh_sigma=cfg["detect_thresh_sigma"],
                                match_radius_arcsec=cfg["match_radius_arcsec"])
    log.info("%d candidates (%d likely stars) from %d science images in bands %s", len(candidates),
             int(candidates["is_star"].sum()) if len(candidates) else 0, len(images), sorted(rows["band"].unique()))
write_parquet(candidates, snakemake.output.candidates)
