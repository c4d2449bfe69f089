"""Detection agrees with SExtractor on a real image and finds simulated sources."""

import numpy as np
from astropy.io import fits
from conftest import SHARED_DATA, needs_shared
from scipy.spatial import cKDTree

from skystack.catalog.data import ImageData
from skystack.catalog.detect import detect_sources, extract_image
from skystack.catalog.heuristic import heuristic_catalog
from skystack.catalog.score import match_catalog, score_catalog
from skystack.sim.fields import simulate_field

SEP_DIR = SHARED_DATA / "sep-image"


@needs_shared("sep-image/image.fits")
def test_extraction_matches_sextractor_catalog():
    data = fits.getdata(SEP_DIR / "image.fits").astype(np.float32)
    ref = np.loadtxt(SEP_DIR / "image.cat", comments="#")
    ref_xy = ref[:, 1:3] - 1.0                 # FITS 1-based -> 0-based
    img = ImageData(pixels=data, band="r", magzp=25.0, psf=1.5)
    det = extract_image(img, thresh_sigma=1.5, minarea=5, global_rms=True)
    assert abs(len(det) - len(ref)) <= 0.1 * len(ref)
    dist, idx = cKDTree(det[["x", "y"]].to_numpy()).query(ref_xy, distance_upper_bound=2.0)
    matched = np.isfinite(dist)
    assert matched.mean() > 0.9
    assert np.median(dist[matched]) < 0.1
    assert np.mean(dist[matched] < 0.5) > 0.9
    # Kron fluxes agree with FLUX_AUTO for most well-measured objects.
    auto = ref[matched, 15]
    good = auto > 0
    ratio = det["flux_auto"].to_numpy()[idx[matched]][good] / auto[good]
    assert np.median(np.abs(ratio - 1)) < 0.05


def test_detect_sources_merges_epochs_and_bands():
    images, truth = simulate_field(n_sources=64, n_epochs=2, seed=2, spacing_px=26, r_mag_range=(17.5, 20.5))
    cands = detect_sources(images)
    m = match_catalog(cands, truth, 1.5)
    assert np.mean(m >= 0) > 0.95
    assert len(cands) <= len(truth) * 1.05       # merged: one candidate per source
    matched = cands.iloc[m[m >= 0]]
    t = truth[m >= 0]
    r_mag = 22.5 - 2.5 * np.log10(t["flux_r_nmgy"].to_numpy())
    assert (matched["n_detections"].to_numpy()[r_mag < 19.0] == 6).mean() > 0.9
    rel = np.abs(matched["flux_r_nmgy"].to_numpy() / t["flux_r_nmgy"].to_numpy() - 1)
    assert np.median(rel) < 0.15
    d = np.hypot((matched["ra"].to_numpy() - t["ra"].to_numpy()) * np.cos(np.radians(2.0)),
                 matched["dec"].to_numpy() - t["dec"].to_numpy()) * 3600
    assert np.median(d) < 0.3
    # Bright stars look point-like, large galaxies extended.
    stars = t["is_star"].to_numpy() & (r_mag < 19.5)
    big = ~t["is_star"].to_numpy() & (t["gal_radius_arcsec"].to_numpy() > 1.3) & (r_mag < 19.5)
    assert matched["is_star"].to_numpy()[stars].mean() > 0.8
    assert (~matched["is_star"].to_numpy()[big]).mean() > 0.8
    heur = heuristic_catalog(images)
    s = score_catalog(heur, truth)
    assert s["n_matched"] >= 0.95 * len(truth) and s["mag_r"] < 0.2
