from skystack.core import logs
from skystack.search.stage import shard_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
logs.log_device(log)
p = snakemake.params
shard_stage(snakemake.input.images, list(p.caches), snakemake.input.listed, snakemake.input.plan,
            int(snakemake.wildcards.chunk), list(p.partitions), snakemake.output.partials,
            image_kind=p.images, smoothing_sigma_px=p.smoothing_sigma_px, max_batch_mb=p.max_batch_mb,
            staging_dir=p.staging_dir, without_zero_point=p.without_zero_point, reduce=p.reduce,
            stars_path=snakemake.input.stars[0] if snakemake.input.stars else None,
            star_mask_radius_arcsec=p.star_mask_radius_arcsec, log=log)
