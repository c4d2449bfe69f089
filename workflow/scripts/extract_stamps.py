from skystack.core import logs
from skystack.deconvolve.stage import extract_stage

log = logs.setup(snakemake.log[0], snakemake.rule)
i, o = snakemake.input, snakemake.output
extract_stage(o.stamps, o.psfs, o.meta, cfg=snakemake.params.deconvolve, galaxies_path=i.get("galaxies"),
              images_path=i.get("images"), stamps_path=i.get("stamps"), psfs_path=i.get("psfs"), log=log)
