import pandas as pd

from skystack import logs
from skystack.io import write_parquet
from skystack.tracking import combine_partials, star_mask_hits

log = logs.setup(snakemake.log[0], "combine_chunk")
cfg = snakemake.params.search
partials = pd.concat([pd.read_parquet(p) for p in snakemake.input.partials], ignore_index=True)
images = pd.read_parquet(snakemake.input.images)
stars = None
if snakemake.input.stars:
    stars = pd.read_parquet(snakemake.input.stars[0])
masked = star_mask_hits(partials, images, stars, cfg["star_mask_radius_arcsec"])
combined = combine_partials(partials, n_sigma_g=cfg["sigma_g_clip"], masked=masked)
hit = combined[(combined["snr"] >= cfg["snr_threshold"]) & (combined["n_images"] >= cfg["min_images"])]
write_parquet(combined, snakemake.output.combined)
write_parquet(partials[partials["orbit_id"].isin(hit["orbit_id"])], snakemake.output.candidates)
log.info("%d orbits with intersections, %d masked intersections, %d above SNR %.1f",
         len(combined), int(masked.sum()), len(hit), cfg["snr_threshold"])
