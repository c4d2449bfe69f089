"""The deconvolution stage in the workflow: real Euclid-like stamps, any number of shards."""
import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.io import fits

from conftest import REPO, SHARED_DATA, TINY, run_snakemake
from skystack.deconvolve import deconvolve_stack, load_stamps_and_psfs
from skystack.stamps import centred_psf, check_external_stacks, cut_stamps, shard_bounds

STAMPS = SHARED_DATA / "deconv" / "example_image_stack.npy"
PSFS = SHARED_DATA / "deconv" / "example_psfs.npy"
N = 20
TARGET = "results/euclid_stamps/deconvolved/deconvolved.fits"


def _run(tmp_path, shards):
    tmp_path.mkdir()
    overlay = tmp_path / "shards.yaml"
    overlay.write_text(yaml.safe_dump({"deconvolve": {"shards": shards, "max_stamps": N, "max_iter": 150}}))
    run_snakemake(tmp_path, TARGET, configfile=[REPO / "config" / "experiments" / "euclid_stamps.yaml", overlay])
    with fits.open(tmp_path / TARGET) as hdul:
        cube = hdul[0].data.copy()
    return cube, pd.read_parquet(tmp_path / "results" / "euclid_stamps" / "deconvolved" / "diagnostics.parquet")


def test_shards_give_the_same_answer_as_one_solve(tmp_path):
    one, diag = _run(tmp_path / "one", 1)
    three, diag3 = _run(tmp_path / "three", 3)
    np.testing.assert_array_equal(one, three)
    pd.testing.assert_frame_equal(diag, diag3)
    stamps, psfs = load_stamps_and_psfs(STAMPS, PSFS)
    direct, _ = deconvolve_stack(stamps[:N].astype(np.float32), psfs[:N].astype(np.float32), max_iter=150)
    np.testing.assert_array_equal(one, direct)
    assert one.shape == (N, 41, 41) and (one >= 0).all()
    assert {"iterations", "cost", "converged", "e1", "e2", "e1_observed", "e2_observed"} <= set(diag.columns)
    assert np.isfinite(diag[["cost", "e1", "e2"]].to_numpy()).all() and diag["iterations"].min() >= 1


def test_stamps_cut_from_survey_images(tiny_run):
    """Truth galaxies of the tiny survey: centred stamps, sky removed, unit PSFs."""
    res = tiny_run / "results" / "tiny"
    stamps = np.load(res / "deconvolve" / "stamps.npy")
    psfs = np.load(res / "deconvolve" / "psfs.npy")
    meta = pd.read_parquet(res / "deconvolve" / "stamps.parquet")
    assert stamps.shape == psfs.shape == (12, 41, 41) and len(meta) == 12
    np.testing.assert_allclose(psfs.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # Sky removed: the stamp borders average to about zero (in units of the noise).
    border = np.concatenate([stamps[:, :4].reshape(12, -1), stamps[:, -4:].reshape(12, -1)], axis=1)
    assert np.all(np.abs(np.median(border, axis=1)) < 0.5 * meta["noise_sigma"].to_numpy())
    # The galaxy is at the centre: the light-weighted centroid of the inner region is within 1 px.
    inner = np.clip(stamps[:, 15:26, 15:26], 0, None)
    yy, xx = np.mgrid[15:26, 15:26]
    cx = (inner * xx).sum(axis=(1, 2)) / inner.sum(axis=(1, 2))
    cy = (inner * yy).sum(axis=(1, 2)) / inner.sum(axis=(1, 2))
    assert np.median(np.hypot(cx - 20, cy - 20)) < 1.0
    with fits.open(res / "deconvolved" / "deconvolved.fits") as hdul:
        assert hdul[0].data.shape == (12, 41, 41) and hdul["PSF"].data.shape == (12, 41, 41)


def test_bad_external_stacks_are_named(tmp_path):
    stamps, psfs = load_stamps_and_psfs(STAMPS, PSFS)
    bad = stamps[:3].copy()
    bad[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"stamps.npy: stamps \[1\] hold NaN"):
        check_external_stacks(bad, psfs[:3], "stamps.npy", "psfs.npy")
    with pytest.raises(ValueError, match=r"psfs.npy: PSFs \[0, 1, 2\] are not finite with a positive sum"):
        check_external_stacks(stamps[:3], np.zeros_like(psfs[:3]), "stamps.npy", "psfs.npy")
    np.save(tmp_path / "flat.npy", stamps[0])
    with pytest.raises(ValueError, match=r"flat.npy: expected a \(n, ny, nx\) stack"):
        load_stamps_and_psfs(tmp_path / "flat.npy", PSFS)


def test_psf_centring_and_shards():
    psf = np.zeros((25, 25))
    psf[12, 12], psf[12, 13] = 3.0, 1.0
    out = centred_psf(psf, 41)
    assert out.shape == (41, 41) and out[20, 20] == 0.75 and out[20, 21] == 0.25
    bounds = [shard_bounds(10, 3, k) for k in range(3)]
    assert bounds == [(0, 3), (3, 6), (6, 10)]
