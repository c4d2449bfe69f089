import json
from pathlib import Path

import numpy as np
import pandas as pd

from skystack import logs
from skystack.cache import TileCache
from skystack.io import write_ecsv, write_parquet
from skystack.report import detection_figure
from skystack.tracking import coadd_stamp, light_curves, merge_duplicates, orbits_for_ids

log = logs.setup(snakemake.log[0], "merge_detections")
cfg = snakemake.params.search
plan = json.loads(open(snakemake.input.plan).read())
listed = pd.read_parquet(snakemake.input.listed)
images = pd.read_parquet(snakemake.input.images)
combined = pd.concat([pd.read_parquet(p) for p in snakemake.input.combined], ignore_index=True)
candidates = pd.concat([pd.read_parquet(p.replace(".parquet", "_candidates.parquet")) for p in snakemake.input.combined], ignore_index=True)
write_parquet(combined, snakemake.output.all_orbits)

hits = combined[(combined["snr"] >= cfg["snr_threshold"]) & (combined["n_images"] >= cfg["min_images"])]
match_px = 2.0 * float(images["psf_sigma_px"].median()) * 1.1774  # within the PSF FWHM
merged = merge_duplicates(hits, candidates, match_px, snr_threshold=cfg["snr_threshold"])
elements = orbits_for_ids(plan, listed, merged["orbit_id"].to_numpy())
det = merged.merge(elements, on="orbit_id")
names = listed.set_index("orbit_id")["name"] if "name" in listed else pd.Series(dtype=str)
det["name"] = det["orbit_id"].map(names).fillna("")
det = det.sort_values(["snr", "orbit_id"], ascending=[False, True]).reset_index(drop=True)
lc = light_curves(candidates[candidates["orbit_id"].isin(det["orbit_id"])], images)
write_parquet(det, snakemake.output.detections)
write_ecsv(det, snakemake.output.ecsv)
write_ecsv(lc, snakemake.output.light_curves)

plots = Path(snakemake.output.plots)
plots.mkdir(parents=True, exist_ok=True)
caches = {p: TileCache.open(c) for p, c in enumerate(snakemake.input.caches)}
for _, d in det.iterrows():
    pos = candidates[candidates["orbit_id"] == d["orbit_id"]]
    stamp = coadd_stamp(pos, images, caches)
    title = f"orbit {d['orbit_id']} {d['name']}  a={d['a_au']:.4f} AU  SNR={d['snr']:.1f}  n={d['n_images']}"
    detection_figure(stamp, lc[lc["orbit_id"] == d["orbit_id"]], title, plots / f"orbit_{d['orbit_id']}.png")
log.info("%d orbits tried, %d above SNR %.1f, %d detections after merging duplicates",
         len(combined), len(hits), cfg["snr_threshold"], len(det))
