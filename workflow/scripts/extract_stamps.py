import pandas as pd

from skystack import logs
from skystack.io import write_parquet
from skystack.stamps import cut_stamps, external_stacks, galaxies_for, write_stack

log = logs.setup(snakemake.log[0], "extract_stamps")
cfg = snakemake.params.deconvolve
if cfg["source"] == "stacks":
    stamps, psfs, meta = external_stacks(snakemake.input.stamps, snakemake.input.psfs, cfg["max_stamps"])
    log.info("%d stamps of %s px and their PSFs (normalised to sum 1) from %s and %s", len(stamps),
             stamps.shape[1:], snakemake.input.stamps, snakemake.input.psfs)
else:
    galaxies = galaxies_for(cfg["source"], pd.read_parquet(snakemake.input.galaxies))
    index = pd.read_parquet(snakemake.input.images)
    log.info("%d galaxies (%s); cutting up to %d stamps of %d px from %s-band science images", len(galaxies),
             cfg["source"], cfg["max_stamps"], cfg["stamp_px"], cfg["band"])
    stamps, psfs, meta = cut_stamps(galaxies, index, cfg["band"], cfg["stamp_px"], cfg["max_stamps"],
                                    progress=log.info)
    log.info("%d clean stamps from %d images; PSF: the image's at its centre (PSF extension, else Gaussian)",
             len(stamps), meta["image_id"].nunique())
write_stack(stamps, snakemake.output.stamps)
write_stack(psfs, snakemake.output.psfs)
write_parquet(meta, snakemake.output.meta)
