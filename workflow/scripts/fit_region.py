from skystack.core import logs
from skystack.catalog.stage import fit_region_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
logs.log_device(log)
p = snakemake.params
fit_region_stage(snakemake.input.regions, snakemake.input.images, int(snakemake.wildcards.region),
                 snakemake.output.catalog, margin_arcsec=p.margin_arcsec, patch_px=p.patch_px, tol=p.tol,
                 max_iter=p.max_iter, max_images=p.max_images, log=log,
                 threads=snakemake.threads, detect_residuals=p.detect_residuals)
