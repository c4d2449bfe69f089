from skystack.core import logs
from skystack.search.stage import report_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
i, o = snakemake.input, snakemake.output
report_stage(i.all_orbits, i.detections, i.listed, i.plan, list(i.truth), i.light_curves,
             histogram_out=o.histogram, completeness_out=o.completeness, grid_out=o.grid,
             recovered_out=o.recovered, snr_threshold=snakemake.params.snr_threshold, log=log,
             summary_out=o.summary, images_path=i.images, rejected_path=i.rejected,
             catalog_path=i.catalog[0] if i.catalog else None, experiment=snakemake.config["experiment"])
