import numpy as np
import pandas as pd

from skystack import logs
from skystack.deconvolve import load_stamps_and_psfs
from skystack.io import atomic_path, write_parquet
from skystack.stamps import META_COLUMNS, check_external_stacks, cut_stamps, galaxies_from_catalog, galaxies_from_truth

log = logs.setup(snakemake.log[0], "extract_stamps")
cfg = snakemake.params.deconvolve
if cfg["source"] == "stacks":
    stamps, psfs = load_stamps_and_psfs(snakemake.input.stamps, snakemake.input.psfs)
    check_external_stacks(stamps, psfs, snakemake.input.stamps, snakemake.input.psfs)
    stamps, psfs = stamps[: cfg["max_stamps"]].astype(np.float32), psfs[: cfg["max_stamps"]].astype(np.float32)
    meta = pd.DataFrame({c: np.full(len(stamps), np.nan) for c in META_COLUMNS})
    meta["stamp"] = np.arange(len(stamps))
    meta["image_id"] = -1
    meta = meta.astype({"stamp": "int64", "image_id": "int64"})
    log.info("%d stamps of %s px and their PSFs from %s", len(stamps), stamps.shape[1:], snakemake.input.stamps)
else:
    table = pd.read_parquet(snakemake.input.galaxies)
    galaxies = galaxies_from_catalog(table) if cfg["source"] == "catalog" else galaxies_from_truth(table)
    stamps, psfs, meta = cut_stamps(galaxies, pd.read_parquet(snakemake.input.images), cfg["band"], cfg["stamp_px"],
                                    cfg["max_stamps"])
    log.info("%d galaxies (%s), %d clean %d px stamps cut from %d %s-band science images", len(galaxies), cfg["source"],
             len(stamps), cfg["stamp_px"], meta["image_id"].nunique(), cfg["band"])
for path, array in ((snakemake.output.stamps, stamps), (snakemake.output.psfs, psfs)):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
write_parquet(meta, snakemake.output.meta)
