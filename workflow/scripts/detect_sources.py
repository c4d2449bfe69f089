from skystack.core import logs
from skystack.catalog.stage import detect_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
p = snakemake.params
detect_stage(snakemake.input.images, snakemake.output.candidates, source=p.source,
             candidates_path=snakemake.input.get("candidates"), thresh_sigma=p.detect_thresh_sigma,
             match_radius_arcsec=p.match_radius_arcsec, log=log)
