"""The joint matched-filter detection: completeness against sep at 1.5 sigma, false detections
on pure noise, partly covered images, and the candidate table's columns."""

import dataclasses

import numpy as np
import pytest
from scipy.spatial import cKDTree

from skystack.catalog.detect import (
    _background,
    candidate_columns,
    detect_sources,
    joint_matched_filter,
    matched_filter_peaks,
    matched_filter_search,
)
from skystack.catalog.score import completeness_by_mag, match_catalog
from skystack.sim.fields import simulate_field

MAG_EDGES = (17.5, 19.0, 20.0, 20.5, 21.0, 21.5, 22.0)


def _field(profile, n_sources, seed):
    """A field as benchmarks/catalog_accuracy.py simulates it (g, r, i x 2 epochs)."""
    spec = {"gaussian": {"psf_profile": "gaussian", "psf_sigma_px": (1.2, 1.7)},
            "moffat-b2.5": {"psf_profile": "moffat", "moffat_beta": 2.5, "psf_sigma_px": (1.1, 1.4),
                            "stamp_half_px": 30, "psf_image_half_px": 25}}[profile]
    return simulate_field(n_sources=n_sources, n_epochs=2, seed=seed, spacing_px=30, isolated=True,
                          r_mag_range=(17.5, 22.0), **spec)


def _unmatched(cands, truth, radius=2.0):
    used = np.zeros(len(cands), bool)
    m = match_catalog(cands, truth, radius)
    used[m[m >= 0]] = True
    return int((~used).sum())


@pytest.mark.parametrize("profile,n_sources,seed", [("moffat-b2.5", 64, 2026), ("gaussian", 100, 2026)])
def test_joint_detection_at_least_as_complete_as_sep_at_1p5_sigma(profile, n_sources, seed):
    images, truth = _field(profile, n_sources, seed)
    cands = detect_sources(images)
    sep_faint = detect_sources(images, thresh_sigma=1.5, matched_filter=False)   # heuristic_catalog at 1.5 sigma
    ours = completeness_by_mag(cands, truth, MAG_EDGES)
    ref = completeness_by_mag(sep_faint, truth, MAG_EDGES)
    for a, b in zip(ours, ref):
        if a["n_truth"] >= 5:
            assert a["completeness"] >= b["completeness"], (profile, a, b)
    # Everything to r = 21 is found (sep at 1.5 sigma misses most of [20.5, 21)), and a part beyond.
    by_bin = {a["mag_lo"]: a["completeness"] for a in ours}
    assert by_bin[20.0] == 1.0 and by_bin[20.5] >= 0.9 and by_bin[21.0] >= 0.75
    assert by_bin[21.5] > 0.0
    # Few false detections, none from the matched filter's new candidates.
    assert _unmatched(cands, truth) <= 2
    assert _unmatched(cands[cands["n_detections"] == 0], truth) == 0
    # The new candidates have point-source starting values and sensible fluxes.
    new = cands[cands["n_detections"] == 0]
    assert len(new) >= 5 and new["is_star"].all()
    m = match_catalog(new, truth, 2.0)
    t = truth[m >= 0]
    ratio = new["flux_r_nmgy"].to_numpy()[m[m >= 0]] / t["flux_r_nmgy"].to_numpy()
    assert 0.6 < np.median(ratio) < 1.4


def _noise_field(seed):
    """Sky noise only: one source at r = 30 on 6 images of about 624 x 624 px."""
    return simulate_field(n_sources=1, n_epochs=2, seed=seed, isolated=False, density_per_arcmin2=0.01,
                          r_mag_range=(30.0, 30.1))


def test_false_detections_on_pure_noise_below_stated_rate():
    n_false, beams = 0, 0.0
    for seed in (11, 12, 13):
        images, _ = _noise_field(seed)
        maps = joint_matched_filter(images)
        snr = maps.snr()[maps.n_images == len(images)]
        assert abs(np.mean(snr)) < 0.05 and abs(np.std(snr) - 1.0) < 0.05      # calibrated
        beams += np.count_nonzero(maps.n_images) / (np.pi / (4 * np.log(2)) * maps.fwhm_px ** 2)
        n_false += len(detect_sources(images))
        # A lower threshold finds noise peaks: the test can fail.
        assert len(matched_filter_peaks(maps, 3.5)) > 3
    assert beams > 8e4
    assert n_false / beams < 1e-4, (n_false, beams)          # below 1 per 10^4 beams (docstring)


def test_single_image_artefact_is_rejected():
    images, _ = _noise_field(14)
    ny, nx = images[0].shape
    y, x = np.mgrid[0:ny, 0:nx]
    hit = images[2].pixels + 3000.0 * np.exp(-0.5 * ((x - 300) ** 2 + (y - 310) ** 2) / 1.3 ** 2)
    images[2] = dataclasses.replace(images[2], pixels=hit.astype(np.float32), _psf_cache={})
    cands = detect_sources(images)
    ra, dec = images[2].wcs.all_pix2world([300.0], [310.0], 0)
    d = np.hypot((cands["ra"] - ra[0]) * np.cos(np.radians(dec[0])), cands["dec"] - dec[0]) * 3600
    assert not (d < 3).any()


def test_partly_covered_image_gives_no_edge_source():
    images, truth = _field("gaussian", 64, 2)
    im = images[1]                                       # r, first epoch
    ny, nx = im.shape
    x0, x1 = 40, 40 + round(0.2 * nx)               # a fifth of the image, across two 64-px meshes
    px = np.full(im.shape, np.nan, np.float32)
    px[:, x0:x1] = im.pixels[:, x0:x1]
    part = dataclasses.replace(im, pixels=px, _psf_cache={})
    sub, rms, mask = _background(part)
    inside = np.isfinite(px)
    noise = np.sqrt(im.sky_level / im.gain)
    assert abs(np.median(rms[inside]) / noise - 1) < 0.1
    assert abs(np.median(sub[inside & ~mask])) < 0.1 * noise
    for zero_fill in (False, True):
        image = part if not zero_fill else dataclasses.replace(part, pixels=np.nan_to_num(px, nan=0.0), _psf_cache={})
        cands = detect_sources([image])
        x, _ = image.wcs.all_world2pix(cands["ra"], cands["dec"], 0)
        assert ((x > x0 - 1) & (x < x1)).all()
        tx, ty = image.wcs.all_world2pix(truth["ra"], truth["dec"], 0)
        r_mag = 22.5 - 2.5 * np.log10(truth["flux_r_nmgy"].to_numpy())
        m = match_catalog(cands, truth, 1.5)
        # No candidate without a true source (the coverage edge is no source) ...
        assert _unmatched(cands, truth, 1.5) == 0
        # ... and the sources well inside the covered strip are found.
        well_inside = (tx > x0 + 4) & (tx < x1 - 5) & (ty > 4) & (ty < ny - 5) & (r_mag < 20.0)
        assert well_inside.sum() >= 3
        assert (m[well_inside] >= 0).all()


def test_candidate_columns_and_dtypes():
    images, _ = _field("gaussian", 16, 5)
    cands = detect_sources(images)
    cols = candidate_columns([im.band for im in images])
    assert list(cands.columns) == list(cols)
    assert {c: str(t) for c, t in cands.dtypes.items()} == cols
    sep_only = detect_sources(images, matched_filter=False)
    assert list(sep_only.columns) == list(cols) and (sep_only.dtypes == cands.dtypes).all()
    empty = detect_sources(images, thresh_sigma=1e6, mf_snr_threshold=1e6)
    assert len(empty) == 0 and list(empty.columns) == list(cols)
    assert {c: str(t) for c, t in empty.dtypes.items()} == cols


def test_saturated_star_gives_one_candidate():
    """A star saturated on every image (core and a bleed trail NaN): one candidate, not a ring
    of matched-filter peaks around the masked core."""
    images, _ = _field("gaussian", 64, 2026)
    ra0, dec0 = 150.0 + 15 / 3600 / np.cos(np.radians(2.0)), 2.0 + 15 / 3600   # between grid sources
    hit = []
    for im in images:
        (x0,), (y0,) = im.wcs.all_world2pix([ra0], [dec0], 0)
        y, x = np.mgrid[0:im.shape[0], 0:im.shape[1]]
        s, r2 = im.psf_sigma_px(), (x - x0) ** 2 + (y - y0) ** 2
        star = 3e6 * (0.9 * np.exp(-0.5 * r2 / s**2) / (2 * np.pi * s**2)
                      + 0.1 * np.exp(-0.5 * r2 / (4 * s) ** 2) / (2 * np.pi * (4 * s) ** 2))
        px = (im.pixels + star).astype(np.float32)
        sat = (px > 30000) | ((np.abs(x - x0) < 1.5) & (np.abs(y - y0) < 25))
        px[sat] = np.nan
        hit.append(dataclasses.replace(im, pixels=px, saturated=sat, _psf_cache={}))
    cands = detect_sources(hit)
    d = np.hypot((cands["ra"] - ra0) * np.cos(np.radians(dec0)), cands["dec"] - dec0) * 3600
    assert (d < 1.0).sum() == 1 and (d < 20).sum() == 1


def test_tiled_matched_filter_finds_the_same_peaks():
    """The matched filter run on 100-px tiles (as large unions are) finds the peaks of the
    single-grid run; peaks on tile borders are neither lost nor doubled."""
    images, _ = _field("gaussian", 64, 2026)
    whole, _, _ = matched_filter_search(images)
    tiled, _, _ = matched_filter_search(images, tile_px=100)
    assert len(whole) > 40
    assert list(tiled.columns) == list(whole.columns)
    for a, b in ((whole, tiled), (tiled, whole)):
        strong = a[a["snr"] > 6.0]
        d, _ = cKDTree(np.c_[b["ra"], b["dec"]] * 3600).query(np.c_[strong["ra"], strong["dec"]] * 3600)
        assert (d < 0.3).all()
    assert abs(len(tiled) - len(whole)) <= 2
