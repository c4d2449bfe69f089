"""The search on external FITS files (survey.source: files) with a grid of orbits around Chiron."""
import numpy as np
import pandas as pd
import yaml
from conftest import TINY, run_snakemake


def test_grid_around_chiron_on_external_files_peaks_at_truth(tmp_path):
    """Simulate Chiron alone (no family to confuse the grid), then search the files as a user's."""
    sim = tmp_path / "sim.yaml"
    sim.write_text(yaml.safe_dump({"experiment": "chironsim", "survey": {"simulate": {
        "preset": "tiny", "n_family": 0, "per_image_snr": [4.0, 4.0]}}}))
    run_snakemake(tmp_path, "results/chironsim/survey/orbits.parquet", configfile=[TINY, sim])
    images = tmp_path / "results" / "chironsim" / "survey" / "images"
    config = tmp_path / "external.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "external",
        "survey": {"source": "files", "paths": [str(images / "*_diff.fits.fz"), str(images / "*_sci.fits.fz")]},
        "partitions": 1,
        "catalog": {"enabled": False},
        "deconvolve": {"enabled": False},
        "orbits": {"source": "grid", "reference": "2060 Chiron", "n_random": 0, "include_truth": False,
                   "grid": {"a_frac_min": -4e-5, "a_frac_max": 4e-5, "n": 21}, "chunk_size": 32},
    }))
    run_snakemake(tmp_path, configfile=[TINY, config])
    res = tmp_path / "results" / "external"
    assert len(pd.read_parquet(res / "images.parquet")) == 80
    listed = pd.read_parquet(res / "search" / "orbits_listed.parquet")
    snr = listed.merge(pd.read_parquet(res / "search" / "all_orbits.parquet"), on="orbit_id", how="left")["snr"].fillna(0)
    # The combined SNR peaks at the true semi-major axis (grid point 10 of 21) and falls off.
    assert abs(int(np.argmax(snr.to_numpy())) - 10) <= 1, snr.round(1).tolist()
    assert snr.max() >= 7.0 and snr.iloc[[0, -1]].max() < 0.5 * snr.max()
    det = pd.read_parquet(res / "detections.parquet")
    assert len(det) == 1 and det["name"].iloc[0].startswith("2060 Chiron a")
    assert (res / "report" / "snr_grid.png").stat().st_size > 10_000
