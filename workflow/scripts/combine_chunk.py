from skystack.core import logs
from skystack.search.stage import combine_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
p, i = snakemake.params, snakemake.input
# Per-orbit sums (no clipping): the detections' orbits are searched again for their per-image rows.
research = None
if p.research is not None:
    r = p.research
    research = dict(images_path=i.images, cache_paths=list(r["caches"]), listed_path=i.listed, plan_path=i.plan,
                    image_kind=r["images"], smoothing_sigma_px=r["smoothing_sigma_px"],
                    max_batch_mb=r["max_batch_mb"], without_zero_point=r["without_zero_point"])
combine_stage(list(i.partials), i.images, i.stars[0] if i.stars else None,
              snakemake.output.combined, snakemake.output.candidates, sigma_g_clip=p.sigma_g_clip,
              snr_threshold=p.snr_threshold, min_images=p.min_images,
              star_mask_radius_arcsec=p.star_mask_radius_arcsec, research=research, log=log)
