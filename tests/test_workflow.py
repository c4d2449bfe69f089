"""The whole workflow on the tiny simulated survey: simulation, index, cache, search."""
import glob
import json

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from conftest import REPO, run_snakemake
from scipy.stats import norm

from skystack.core.config import load_config
from skystack.report.summary import summarize
from skystack.survey.cache import TileCache

RULES = ["simulate_survey", "index_survey", "plan_orbits", "build_tile_cache_0", "build_tile_cache_1",
         "search_shard_0_0", "combine_chunk_0", "merge_detections", "search_report"]


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run, tiny_run / "results" / "tiny"


def test_simulated_images_follow_the_header_convention(tiny):
    _, res = tiny
    files = sorted(glob.glob(str(res / "survey" / "images" / "*.fits.fz")))
    assert len(files) == 80  # 10 exposures x 4 quadrants x (science, difference)
    with fits.open(files[0]) as hdul:
        assert isinstance(hdul[1], fits.CompImageHDU) and hdul[1].compression_type == "RICE_1"
        hdr = hdul[1].header
        for key in ("DATE-OBS", "EXPTIME", "FILTER", "MAGZP", "GAIN", "SATURATE", "PSF_FWHM", "OBSGEO-L"):
            assert key in hdr, key
        assert hdr["FILTER"] in ("g", "r", "i") and WCS(hdr).has_celestial
        assert WCS(hdr).wcs.ctype[0] == "RA---TAN-SIP"
        assert {"MASK", "PSF"} <= {h.name for h in hdul}
        psf = hdul["PSF"].data
        assert psf.sum() == pytest.approx(1.0, abs=1e-3) and np.unravel_index(psf.argmax(), psf.shape) == (12, 12)


def test_index_matches_headers_and_partitions(tiny):
    workdir, res = tiny
    idx = pd.read_parquet(res / "images.parquet")
    assert len(idx) == 80 and idx["image_id"].tolist() == list(range(80))
    assert idx["partition"].value_counts().sort_index().tolist() == [40, 40]
    row = idx.iloc[7]
    with fits.open(workdir / row["path"]) as hdul:  # paths are relative to the run directory
        hdr = hdul[int(row["hdu"])].header
    mid = Time(hdr["DATE-OBS"], scale="utc") + hdr["EXPTIME"] / 2 / 86400
    assert row["mjd_mid_utc"] == pytest.approx(mid.mjd, abs=1e-8)
    assert row["jd_tdb_mid"] == pytest.approx(mid.tdb.jd1 + mid.tdb.jd2, abs=1e-8)
    # Measured on the PSF extension, so the pixel response (variance 1/12 px^2) is included.
    assert row["psf_sigma_px"] == pytest.approx(np.hypot(hdr["PSF_FWHM"] / 2.35482, np.sqrt(1 / 12)), rel=5e-3)
    # A science and a difference image of one exposure share time and pointing.
    pair = idx[idx["mjd_mid_utc"] == row["mjd_mid_utc"]]
    assert pair["is_difference"].sum() == len(pair) // 2


def test_cache_patches_equal_fits_pixels(tiny):
    workdir, res = tiny
    idx = pd.read_parquet(res / "images.parquet")
    rng = np.random.default_rng(5)
    for p in (0, 1):
        cache = TileCache.open(workdir / "cache" / "tiny" / f"partition_{p}.tiles")
        for _, row in idx[idx["partition"] == p].sample(3, random_state=p).iterrows():
            with fits.open(workdir / row["path"]) as hdul:
                data = hdul[int(row["hdu"])].data.astype(np.float32)
                mask = hdul["MASK"].data
            data[mask != 0] = np.nan
            x = rng.integers(5, row["naxis1"] - 5, 16)
            y = rng.integers(5, row["naxis2"] - 5, 16)
            got = cache.patches(np.full(16, row["image_id"]), x, y, 4)
            want = np.stack([data[j - 4:j + 5, i - 4:i + 5] for i, j in zip(x, y)])
            np.testing.assert_array_equal(got, want)


def test_injected_objects_recovered(tiny):
    """The search is not told the injected orbits: it covers a region around the family and
    refines what it finds. Every injected object is found, nothing else, and each refined
    track follows the object's injected positions."""
    _, res = tiny
    listed = pd.read_parquet(res / "search" / "orbits_listed.parquet")
    truth = pd.read_parquet(res / "survey" / "orbits.parquet")
    assert set(listed["listed_as"]) == {"region"} and set(listed["name"]) == {"chiron-family"}
    rec = pd.read_parquet(res / "report" / "recovered.parquet")
    assert len(rec) == 3 and rec["detected"].all()
    det = pd.read_parquet(res / "detections.parquet")
    # No false detections: with the ~24,000 trial orbits, the Gaussian-tail expectation above
    # SNR 7 (plus 3 sd) is far below one.
    n_tried = len(pd.read_parquet(res / "search" / "all_orbits.parquet"))
    expected = n_tried * norm.sf(7.0)
    assert expected + 3 * np.sqrt(expected) < 1
    assert set(det["orbit_id"]) == set(rec["detection_orbit_id"])
    assert (det["name"] == "chiron-family").all() and det["refined"].all()
    assert (det["snr"] >= 7.0).all() and (det["n_images"] >= 5).all()
    assert (det["snr"] >= det["snr_trial"]).all()
    lc = pd.read_csv(res / "light_curves.ecsv", comment="#", sep=" ")
    assert set(lc["orbit_id"]) == set(det["orbit_id"])
    # The refined tracks against the injected positions (1 arcsec pixels, per-image SNR 3 to 4.5).
    images = pd.read_parquet(res / "images.parquet")
    injected = pd.read_parquet(res / "survey" / "injected.parquet")
    injected = injected[injected["kind"] == "difference"].merge(images[["image_id", "path"]], on="path")
    rms_px, z = [], []
    for _, r in rec.iterrows():
        d = det[det["orbit_id"] == r["detection_orbit_id"]].iloc[0]
        on = lc[lc["orbit_id"] == d["orbit_id"]].merge(injected[injected["orbit_id"] == r["orbit_id"]],
                                                       on="image_id", suffixes=("", "_true"))
        assert len(on) >= 5
        rms_px.append(float(np.sqrt(np.mean((on["x"] - on["x_true"]) ** 2 + (on["y"] - on["y_true"]) ** 2))))
        t = truth[truth["orbit_id"] == r["orbit_id"]].iloc[0]
        z += [(d[k] - t[k]) / d[f"sigma_{k}"] for k in ("a_au", "e", "inc_deg", "node_deg")]
    # 0.17, 0.29 and 0.75 px found (README).
    assert np.median(rms_px) < 0.4 and max(rms_px) < 0.9, rms_px
    # The uncertainties from the curvature at the peak: the truth within 2.5 sd (2.2 found) of
    # every refined a, e, i and node.
    assert np.all(np.abs(z) < 2.5), z


def test_logs_benchmarks_and_summary(tiny):
    workdir, res = tiny
    for rule in RULES:
        text = (workdir / "logs" / "tiny" / f"{rule}.log").read_text()
        assert "started" in text, rule
        assert (workdir / "benchmarks" / "out" / "tiny" / f"{rule}.tsv").exists(), rule
    assert "device: JAX" in (workdir / "logs" / "tiny" / "search_shard_0_0.log").read_text()
    plan = json.loads((res / "search" / "plan.json").read_text())
    assert plan["n_chunk_ranges"] == 2
    lines = summarize(load_config(REPO / "config" / "experiments" / "tiny.yaml"), workdir)
    assert "80 images (40 difference) from 10 exposures, 2 partitions" in lines[1]
    assert "injected objects recovered: 3 of 3" in "\n".join(lines)


def test_rerun_has_nothing_to_do(tiny):
    workdir, _ = tiny
    proc = run_snakemake(workdir, "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_catalog_matches_the_simulated_sky(tiny):
    _, res = tiny
    cat = pd.read_parquet(res / "catalog.parquet")
    fits_cat = fits.getdata(res / "catalog.fits", "CATALOG")
    assert len(fits_cat) == len(cat) >= 5
    np.testing.assert_allclose(fits_cat["ra"], cat["ra"])
    truth = pd.read_parquet(res / "survey" / "sources.parquet")
    cosd = np.cos(np.radians(cat["dec"].to_numpy()))[:, None]
    d_arcsec = 3600 * np.hypot((cat["ra"].to_numpy()[:, None] - truth["ra_deg"].to_numpy()[None]) * cosd,
                               cat["dec"].to_numpy()[:, None] - truth["dec_deg"].to_numpy()[None])
    nearest = d_arcsec.argmin(axis=1)
    assert np.median(d_arcsec.min(axis=1)) < 0.5
    # Magnitudes of the entries that are a true source (within 0.5 arcsec); a blend's entry
    # several arcsec from any single source has no true magnitude to compare with.
    matched = d_arcsec.min(axis=1) < 0.5
    true_mag = 22.5 - 2.5 * np.log10(truth["flux_r_nmgy"].to_numpy()[nearest])
    assert matched.sum() >= 5
    assert np.median(np.abs(cat["mag_r"].to_numpy() - true_mag)[matched]) < 0.2
    assert cat["converged"].all() and (cat["region"] >= 0).all()
    assert {"ra_sd", "dec_sd", "p_star", "flux_r_sd_nmgy", "color_gr", "gal_radius_arcsec"} <= set(cat.columns)
