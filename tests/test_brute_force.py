"""The search's intersections are exactly brute force's: every orbit against every image
(positions from the same propagation, pixels from astropy's WCS), no pruning; on the tiny
simulated survey and on a ZTF-like mosaic survey with KBOs, centaurs and inner orbits."""
import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS
from test_cull import mixed_orbits, mosaic_survey

from skystack.astrometry.directions import sky_positions
from skystack.orbits.population import population
from skystack.orbits.table import ELEMENT_COLUMNS
from skystack.search.intersect import intersect


def _brute_force(orbits, images):
    rows = []
    site = {"lat_deg": images["site_lat_deg"].iloc[0], "lon_deg": images["site_lon_deg"].iloc[0],
            "height_m": images["site_height_m"].iloc[0]}
    ra, dec = sky_positions(orbits, images["jd_tdb_mid"].to_numpy(), site)
    for j, (_, im) in enumerate(images.iterrows()):
        w = WCS(fits.Header.fromstring(im["wcs_header"]))
        for i, oid in enumerate(orbits["orbit_id"]):
            x, y = w.all_world2pix(ra[i, j], dec[i, j], 0, tolerance=1e-12, maxiter=100, quiet=True)
            rows.append((oid, im["image_id"], float(x), float(y), im["naxis1"], im["naxis2"]))
    pairs = pd.DataFrame(rows, columns=["orbit_id", "image_id", "x", "y", "nx", "ny"])
    inside = (pairs["x"] >= -0.5) & (pairs["x"] < pairs["nx"] - 0.5) & (pairs["y"] >= -0.5) & (pairs["y"] < pairs["ny"] - 0.5)
    edge = np.minimum.reduce([(pairs["x"] + 0.5).abs(), (pairs["x"] - pairs["nx"] + 0.5).abs(),
                              (pairs["y"] + 0.5).abs(), (pairs["y"] - pairs["ny"] + 0.5).abs()]) < 1e-6
    return pairs[inside], pairs[edge]


def assert_equal_to_brute_force(want, on_edge, got):
    """Same (orbit, image) pairs, except pairs within 1e-6 px of an image edge, which may fall
    either way; positions within 1e-6 px."""
    key = ["orbit_id", "image_id"]
    merged = want.merge(got, on=key, how="outer", suffixes=("_brute", ""), indicator=True)
    disagree = merged[merged["_merge"] != "both"]
    assert disagree.set_index(key).index.isin(on_edge.set_index(key).index).all(), disagree.head()
    both = merged[merged["_merge"] == "both"]
    assert np.abs(both["x"] - both["x_brute"]).max() < 1e-6
    assert np.abs(both["y"] - both["y_brute"]).max() < 1e-6


def test_intersections_equal_brute_force(tiny_run):
    images = pd.read_parquet(tiny_run / "results" / "tiny" / "images.parquet")
    images = images[images["is_difference"]].reset_index(drop=True)
    reference = pd.read_parquet(tiny_run / "results" / "tiny" / "survey" / "orbits.parquet").iloc[0]
    orbits = population("focused", np.arange(250), seed=11, reference=reference[ELEMENT_COLUMNS].astype(float).to_dict(),
                        sigma={"a_frac": 3e-4, "mean_anomaly_deg": 0.03, "node_deg": 0.01, "inc_deg": 0.01})
    want, on_edge = _brute_force(orbits, images)
    assert len(want) > 300  # the focused family crosses many images
    assert_equal_to_brute_force(want, on_edge, intersect(orbits, images))


def _brute_force_mosaic(orbits: pd.DataFrame, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every orbit at every image: the plain gnomonic pixel for all pairs (no pruning), then
    astropy's SIP inversion for pairs within 50 px of the image (SIP moves points < 3 px)."""
    exposures = images.groupby("exposure_id").first()
    site = {k: exposures[f"site_{k}"].to_numpy() for k in ("lat_deg", "lon_deg", "height_m")}
    ra, dec = sky_positions(orbits, exposures["jd_tdb_mid"].to_numpy(), site)
    column = {eid: j for j, eid in enumerate(exposures.index)}
    found, edge = [], []
    for _, im in images.iterrows():
        w = WCS(fits.Header.fromstring(im["wcs_header"]))
        j = column[im["exposure_id"]]
        x0, y0 = w.wcs_world2pix(ra[:, j], dec[:, j], 0)
        near = np.flatnonzero((x0 > -50) & (x0 < im["naxis1"] + 50) & (y0 > -50) & (y0 < im["naxis2"] + 50))
        if len(near) == 0:
            continue
        x, y = w.all_world2pix(ra[near, j], dec[near, j], 0, tolerance=1e-12, maxiter=100, quiet=True)
        nx, ny = im["naxis1"], im["naxis2"]
        inside = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        margin = np.minimum.reduce([np.abs(x + 0.5), np.abs(x - nx + 0.5), np.abs(y + 0.5), np.abs(y - ny + 0.5)])
        pairs = pd.DataFrame({"orbit_id": orbits["orbit_id"].to_numpy()[near], "image_id": im["image_id"], "x": x, "y": y})
        found.append(pairs[inside])
        edge.append(pairs[margin < 1e-6])
    return pd.concat(found, ignore_index=True), pd.concat(edge, ignore_index=True)


def test_mosaic_survey_equals_brute_force():
    survey = mosaic_survey()
    orbits = mixed_orbits(20000, 2000, seed=5)
    want, on_edge = _brute_force_mosaic(orbits, survey)
    assert len(want) > 2000
    # A small budget: several cull batches and exact chunks.
    assert_equal_to_brute_force(want, on_edge, intersect(orbits, survey, max_batch_bytes=32 << 20))
