"""The whole workflow on real survey images (../shared/data/real): tile caches, the catalog,
the deconvolution and the orbit search, run end to end from a temporary directory.

Two experiments of config/experiments run here: ``decam_testcase3`` (8 DECam epochs of one
41x51 px patch, legacypipe's testcase3) and ``bok_mosaic_mzlsbass3`` (Bok 90Prime and Mayall
Mosaic3 epochs of one patch). Each takes about a minute on 2 cores.

The catalog is compared with what legacypipe's own test expects of testcase3 (the shared
data's README, "Expected results stated by legacypipe's own tests"): a point source at
(244.77828, 12.07250) and a DEV/SER galaxy at (244.77973, 12.07234). The galaxy is found
and typed a galaxy. The point source (per-image SNR about 10, 5 arcsec from a galaxy 40 times
brighter) is not in the candidates: sep's CLEAN step (SExtractor's default) merges it into the
galaxy's isophote on every epoch, and in the joint matched-filter map it is a shoulder of the
galaxy's response, not a peak of its own. The search of the fit's residuals finds it, typed a
star, and nothing else: the catalog holds the two sources legacypipe's test expects.
"""
import glob
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.io import fits
from conftest import REPO, SHARED_DATA, needs_shared, run_snakemake

from skystack.survey.cache import TileCache
from skystack.survey.pixels import aux_of, read_pixels

pytestmark = pytest.mark.workflow

TESTCASE3 = "real/decam/legacypipe-testcase3"
MZLSBASS3 = "real/mosaic3-90prime/legacypipe-mzlsbass3"
needs_real = needs_shared(f"{TESTCASE3}/survey-ccds-1.fits.gz", f"{MZLSBASS3}/survey-ccds-1.fits.gz")

# legacypipe's py/test/runbrick_test.py, testcase3 (tolerance 1e-5 deg there).
TESTCASE3_GALAXY = (244.77973, 12.07234)
TESTCASE3_POINT_SOURCE = (244.77828, 12.07250)


def _configs(tmp_path, experiment):
    """The experiment file, plus an overlay with absolute paths when the shared data is not
    ``../shared/data`` beside the clone (SKYSTACK_SHARED_DATA), since the experiment's
    relative paths are taken from the repository."""
    path = REPO / "config" / "experiments" / f"{experiment}.yaml"
    if SHARED_DATA.resolve() == (REPO.parent / "shared" / "data").resolve():
        return [path]
    survey = yaml.safe_load(path.read_text())["survey"]
    moved = {k: [str(SHARED_DATA / p.split("shared/data/", 1)[1]) for p in survey[k]] for k in ("paths", "ccd_tables")}
    overlay = tmp_path / f"{experiment}_shared.yaml"
    overlay.write_text(yaml.safe_dump({"survey": moved}))
    return [path, overlay]


def _run(tmp_path_factory, experiment):
    workdir = tmp_path_factory.mktemp(experiment)
    run_snakemake(workdir, "all", configfile=_configs(workdir, experiment), timeout=600)
    return workdir, workdir / "results" / experiment, workdir / "cache" / experiment


@pytest.fixture(scope="module")
def testcase3(tmp_path_factory):
    return _run(tmp_path_factory, "decam_testcase3")


@pytest.fixture(scope="module")
def mzlsbass3(tmp_path_factory):
    return _run(tmp_path_factory, "bok_mosaic_mzlsbass3")


def _sep_arcsec(ra, dec, ra0, dec0):
    return np.hypot((np.asarray(ra) - ra0) * math.cos(math.radians(dec0)), np.asarray(dec) - dec0) * 3600.0


def _check_indexed_and_cached(res, cache_dir, pattern, n_expected):
    files = sorted(glob.glob(str(SHARED_DATA / pattern)))
    assert len(files) == n_expected
    images = pd.read_parquet(res / "images.parquet")
    assert sorted(images["path"].map(os.path.realpath)) == sorted(map(os.path.realpath, files))
    assert len(pd.read_parquet(res / "rejected_images.parquet")) == 0
    assert np.isfinite(images["magzp"]).all()                     # zero points from survey.ccd_tables
    assert images["aux_files"].str.contains("MASK=").all() and images["aux_files"].str.contains("WEIGHT=").all()
    cache = TileCache.open(cache_dir / "partition_0.tiles")
    assert sorted(cache.image_ids.tolist()) == sorted(images["image_id"].tolist())
    for _, row in images.iterrows():                              # the cache holds the masked pixels
        want = read_pixels(row["path"], int(row["hdu"]), aux_of(row), float(row["saturate"]))
        np.testing.assert_array_equal(cache.image(int(row["image_id"])), want)
    return images


def _check_search(res, images):
    listed = pd.read_parquet(res / "search" / "orbits_listed.parquet")
    partials = pd.concat([pd.read_parquet(p) for p in sorted((res / "search" / "partials").glob("*.parquet"))])
    all_orbits = pd.read_parquet(res / "search" / "all_orbits.parquet")
    assert set(all_orbits["orbit_id"]) == set(listed["orbit_id"])
    # Each orbit crosses one or two images, fewer than search.min_images: no detection.
    assert (all_orbits["n_images"] + all_orbits["n_rejected"] <= 2).all()
    assert len(pd.read_parquet(res / "detections.parquet")) == 0
    by_id = images.set_index("image_id")
    stem = {Path(p).name.split(".")[0]: i for i, p in zip(images["image_id"], images["path"])}
    for _, orbit in listed.iterrows():
        mine = partials[partials["orbit_id"] == orbit["orbit_id"]]
        assert len(mine) >= 1, orbit["name"]                      # every listed orbit crosses the patch
        # ... and at the epoch it was built for, it crosses the centre of that image.
        target = stem[orbit["name"].split("-through-")[1]]
        hit = mine[mine["image_id"] == target]
        assert len(hit) == 1, orbit["name"]
        row = by_id.loc[target]
        assert abs(hit["x"].iloc[0] - (row["naxis1"] - 1) / 2) < 0.01
        assert abs(hit["y"].iloc[0] - (row["naxis2"] - 1) / 2) < 0.01
    assert np.isfinite(partials[["psi", "phi"]].to_numpy()).all() and (partials["phi"] >= 0).all()


@needs_real
def test_decam_testcase3_whole_workflow(testcase3):
    workdir, res, cache_dir = testcase3
    images = _check_indexed_and_cached(res, cache_dir, f"{TESTCASE3}/images/decam/CP/V4.8.2a/*/*_ooi_*.fits", 8)
    assert set(images["band"]) == {"g", "r", "z"}

    cat = pd.read_parquet(res / "catalog.parquet")
    d = _sep_arcsec(cat["ra"], cat["dec"], *TESTCASE3_GALAXY)
    galaxy = cat.iloc[int(np.argmin(d))]
    assert d.min() < 0.5
    assert galaxy["p_star"] < 0.5 and bool(galaxy["converged"]) and galaxy["n_images"] == 8
    assert 0 < galaxy["flux_r_sd_nmgy"] < 0.05 * galaxy["flux_r_nmgy"]
    # The point source, from the residuals (module docstring); no piece of the galaxy besides it.
    d = _sep_arcsec(cat["ra"], cat["dec"], *TESTCASE3_POINT_SOURCE)
    star = cat.iloc[int(np.argmin(d))]
    assert len(cat) == 2 and d.min() < 0.3 and bool(star["found_in_residuals"])
    assert star["p_star"] > 0.5 and star["n_images"] == 8 and star["flux_r_nmgy"] > 3 * star["flux_r_sd_nmgy"]

    # The galaxy is deconvolved, from one r-band image.
    diag = pd.read_parquet(res / "deconvolved" / "diagnostics.parquet")
    with fits.open(res / "deconvolved" / "deconvolved.fits") as cube:
        assert cube[0].data.shape == (len(diag), 25, 25) and cube["PSF"].data.shape == (len(diag), 25, 25)
    assert len(diag) == 1 and _sep_arcsec(diag["ra"], diag["dec"], *TESTCASE3_GALAXY).min() < 0.5
    assert images.set_index("image_id").loc[int(diag["image_id"].iloc[0]), "band"] == "r"
    assert np.isfinite(diag[["reduced_chi2", "cost"]].to_numpy()).all()

    _check_search(res, images)


@needs_real
def test_bok_mosaic_mzlsbass3_whole_workflow(mzlsbass3):
    workdir, res, cache_dir = mzlsbass3
    images = _check_indexed_and_cached(res, cache_dir, f"{MZLSBASS3}/images/*/*/*_ooi_*.fits", 8)
    assert set(images["convention"]) == {"90prime-cp", "mosaic3"}

    cat = pd.read_parquet(res / "catalog.parquet")
    assert len(cat) >= 1 and cat["converged"].all() and (cat["n_images"] == len(images)).all()
    assert np.isfinite(cat[["flux_g_nmgy", "flux_r_nmgy", "flux_z_nmgy"]].to_numpy()).all()

    # No galaxy in the catalog: the deconvolution finishes with an empty cube.
    n_galaxies = int((cat["p_star"] < 0.5).sum())
    diag = pd.read_parquet(res / "deconvolved" / "diagnostics.parquet")
    assert len(diag) <= n_galaxies and (res / "deconvolved" / "deconvolved.fits").exists()

    _check_search(res, images)
