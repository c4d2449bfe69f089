from skystack.core import logs
from skystack.search.stage import combine_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
p = snakemake.params
combine_stage(snakemake.input.partials, snakemake.input.images, snakemake.input.stars[0] if snakemake.input.stars else None,
              snakemake.output.combined, snakemake.output.candidates, sigma_g_clip=p.sigma_g_clip,
              snr_threshold=p.snr_threshold, min_images=p.min_images,
              star_mask_radius_arcsec=p.star_mask_radius_arcsec, log=log)
