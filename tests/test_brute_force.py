"""The search's intersections are exactly brute force's: every orbit against every image, one
pair at a time (positions from the same propagation, pixels from astropy's WCS), no pruning."""
import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS

from skystack.population import population
from skystack.search import intersect, sky_positions
from skystack.tracking import ELEMENT_COLUMNS


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


def test_intersections_equal_brute_force(tiny_run):
    images = pd.read_parquet(tiny_run / "results" / "tiny" / "images.parquet")
    images = images[images["is_difference"]].reset_index(drop=True)
    reference = pd.read_parquet(tiny_run / "results" / "tiny" / "survey" / "orbits.parquet").iloc[0]
    orbits = population("focused", np.arange(250), seed=11, reference=reference[ELEMENT_COLUMNS].astype(float).to_dict(),
                        sigma={"a_frac": 3e-4, "mean_anomaly_deg": 0.03, "node_deg": 0.01, "inc_deg": 0.01})
    want, on_edge = _brute_force(orbits, images)
    got = intersect(orbits, images)
    assert len(want) > 300  # the focused family crosses many images
    key = ["orbit_id", "image_id"]
    merged = want.merge(got, on=key, how="outer", suffixes=("_brute", ""), indicator=True)
    disagree = merged[merged["_merge"] != "both"]
    # Only a pair within 1e-6 px of an image edge may fall either way.
    assert disagree.set_index(key).index.isin(on_edge.set_index(key).index).all(), disagree.head()
    both = merged[merged["_merge"] == "both"]
    assert np.abs(both["x"] - both["x_brute"]).max() < 1e-6
    assert np.abs(both["y"] - both["y_brute"]).max() < 1e-6
