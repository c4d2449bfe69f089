import json

import numpy as np
import pandas as pd
from scipy.stats import norm

from skystack import logs
from skystack.io import write_parquet
from skystack.report import completeness, snr_histogram, snr_versus_parameter
from skystack.tracking import match_truth

log = logs.setup(snakemake.log[0], "search_report")
cfg = snakemake.params.search
combined = pd.read_parquet(snakemake.input.all_orbits)
det = pd.read_parquet(snakemake.input.detections)
listed = pd.read_parquet(snakemake.input.listed)
plan = json.loads(open(snakemake.input.plan).read())
snr_histogram(combined["snr"].to_numpy(), cfg["snr_threshold"], snakemake.output.histogram)

# Combined SNR along the listed grid around the reference object (when there is one).
grid = listed[listed["name"].str.startswith(plan["reference_name"] + " a")]
g = grid.merge(combined[["orbit_id", "snr"]], on="orbit_id", how="left").fillna({"snr": 0.0})
snr_versus_parameter(g["a_au"].to_numpy(), g["snr"].to_numpy(), plan["reference"]["a_au"], "semi-major axis (AU)", snakemake.output.grid)

recovered = pd.DataFrame(columns=["orbit_id", "name", "expected_combined_snr", "detected", "detection_orbit_id"])
if snakemake.input.truth:
    truth_orbits, injected, images = (pd.read_parquet(p) for p in snakemake.input.truth)
    # Injected positions are on the difference images the search used.
    inj = injected[injected["kind"] == "difference"].merge(images[["image_id", "path"]], on="path")
    candidates = pd.concat([pd.read_parquet(p) for p in snakemake.input.candidates], ignore_index=True)
    match_px = 2.0 * float(images["psf_sigma_px"].median()) * 1.1774
    det["truth_orbit_id"] = match_truth(det, inj[["orbit_id", "image_id", "x", "y"]], candidates, match_px)
    found = det[det["truth_orbit_id"] >= 0].groupby("truth_orbit_id")["orbit_id"].first()
    recovered = truth_orbits[["orbit_id", "name", "expected_combined_snr"]].copy()
    recovered["detected"] = recovered["orbit_id"].isin(found.index)
    recovered["detection_orbit_id"] = recovered["orbit_id"].map(found).fillna(-1).astype("int64")
    n_false = int((det["truth_orbit_id"] < 0).sum())
    # Pure noise: each orbit tried exceeds the threshold with the Gaussian tail probability
    # (an upper bound on the expectation: neighbouring orbits are not independent).
    expected_false = len(combined) * norm.sf(cfg["snr_threshold"])
    log.info("false detections: %d; Gaussian-tail expectation for %d orbits tried: %.2g (+3 sd: %.2g)",
             n_false, len(combined), expected_false, expected_false + 3 * np.sqrt(expected_false))
    log.info("recovered %d of %d injected objects; %d of %d with expected SNR >= 10; %d detections match no injected object",
             int(recovered["detected"].sum()), len(recovered),
             int(recovered.loc[recovered["expected_combined_snr"] >= 10, "detected"].sum()),
             int((recovered["expected_combined_snr"] >= 10).sum()), n_false)
completeness(recovered, snakemake.output.completeness)
write_parquet(recovered, snakemake.output.recovered)
