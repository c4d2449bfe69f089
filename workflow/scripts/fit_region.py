import time

import pandas as pd

from skystack import logs
from skystack.catalog import fit_region
from skystack.catalog.stage import images_overlapping, load_image, region_inputs, science_images
from skystack.io import write_parquet

log = logs.setup(snakemake.log[0], "fit_region")
logs.log_device(log)
cfg = snakemake.params.catalog
region = int(snakemake.wildcards.region)
sources, neighbours = region_inputs(pd.read_parquet(snakemake.input.regions), region, cfg["margin_arcsec"])
rows = images_overlapping(science_images(pd.read_parquet(snakemake.input.images)),
                          sources["ra"], sources["dec"], cfg["margin_arcsec"] + cfg["patch_px"])
log.info("region %d: %d sources, %d fixed neighbours, %d overlapping science images (all epochs and bands)",
         region, len(sources), len(neighbours), len(rows))
images = [load_image(row) for _, row in rows.iterrows()]
t0 = time.time()
catalog = fit_region(sources, neighbours, images, tol=cfg["tol"], max_iter=cfg["max_iter"],
                     patch_px=cfg["patch_px"], max_images=cfg["max_images"], region=region,
                     progress=log.info)
n_bad = int((~catalog["converged"].astype(bool)).sum())
log.info("fitted %d sources in %.1f s (%.1f sources/s); %d not converged (flagged, kept)",
         len(catalog), time.time() - t0, len(catalog) / max(time.time() - t0, 1e-9), n_bad)
write_parquet(catalog, snakemake.output.catalog)
