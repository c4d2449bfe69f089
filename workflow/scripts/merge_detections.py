from skystack.core import logs
from skystack.search.stage import merge_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
i, o = snakemake.input, snakemake.output
merge_stage(i.combined, i.images, i.listed, i.plan, i.caches, detections_out=o.detections, ecsv_out=o.ecsv,
            light_curves_out=o.light_curves, all_orbits_out=o.all_orbits, plots_dir=o.plots,
            snr_threshold=snakemake.params.snr_threshold, min_images=snakemake.params.min_images, log=log,
            stars_path=i.stars[0] if i.stars else None, smoothing_sigma_px=snakemake.params.smoothing_sigma_px,
            sigma_g_clip=snakemake.params.sigma_g_clip, star_mask_radius_arcsec=snakemake.params.star_mask_radius_arcsec,
            refined_snr_threshold=snakemake.params.refined_snr_threshold,
            max_noise_detections=snakemake.params.max_noise_detections)
