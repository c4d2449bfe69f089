import pandas as pd

from skystack import logs
from skystack.catalog.stage import bright_star_mask, write_catalog
from skystack.io import write_parquet
from skystack.report import catalog_figure

log = logs.setup(snakemake.log[0], "merge_catalog")
parts = [pd.read_parquet(p) for p in snakemake.input.regions]
catalog = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
catalog = catalog.sort_values(["dec", "ra"], kind="stable").reset_index(drop=True)
catalog.insert(0, "source_id", range(len(catalog)))
write_catalog(catalog, snakemake.output.catalog, snakemake.output.fits)
stars = bright_star_mask(catalog, snakemake.params.search["star_mask_mag"])
write_parquet(stars, snakemake.output.stars)
catalog_figure(catalog, snakemake.output.figure)
log.info("catalog: %d sources from %d regions (%d stars with p_star >= 0.5, %d not converged); %d bright stars masked",
         len(catalog), len(parts), int((catalog["p_star"] >= 0.5).sum()), int((~catalog["converged"].astype(bool)).sum()), len(stars))
