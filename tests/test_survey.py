"""The image index reads the generic header convention (and ZTF's) into correct values."""

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from conftest import SHARED_DATA, needs_shared

from skystack.core.io import IMAGES
from skystack.survey.headers import BadImageError
from skystack.survey.index import index_images
from skystack.survey.partitions import assign_partitions
from skystack.survey.pixels import psf_sigma_from_image, read_pixels

SHARED = SHARED_DATA
PALOMAR = {"lat_deg": 33.3563, "lon_deg": -116.8650, "height_m": 1712.0}


def make_wcs(ra=150.0, dec=20.0, nx=80, ny=60, scale_arcsec=1.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    w.wcs.cd = np.diag([-scale_arcsec / 3600, scale_arcsec / 3600])
    return w


def write(path, data, cards, extra=()):
    hdr = make_wcs(nx=data.shape[1], ny=data.shape[0]).to_header()
    for k, v in cards.items():
        hdr[k] = v
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=hdr), *extra]).writeto(path)
    return str(path)


@pytest.fixture
def noise_image():
    rng = np.random.default_rng(0)
    return (100.0 + 7.0 * rng.normal(size=(60, 80))).astype(np.float32)


def test_generic_convention(tmp_path, noise_image):
    p = write(tmp_path / "a.fits", noise_image, {
        "DATE-OBS": "2021-05-03T04:05:06.5", "EXPTIME": 30.0, "TIMESYS": "TAI", "FILTER": "r",
        "OBSGEO-L": PALOMAR["lon_deg"], "OBSGEO-B": PALOMAR["lat_deg"], "OBSGEO-H": PALOMAR["height_m"],
        "MAGZP": 26.1, "GAIN": 5.0, "SATURATE": 50000.0, "PSF_FWHM": 2.5})
    row = index_images([p]).iloc[0]
    assert set(c.name for c in IMAGES) <= set(row.index)
    mid = Time("2021-05-03T04:05:06.5", scale="tai") + 15.0 / 86400
    assert row["mjd_mid_utc"] == pytest.approx(mid.utc.mjd, abs=1e-9)
    tdb = mid.tdb
    assert row["jd_tdb_mid"] == pytest.approx(tdb.jd1 + tdb.jd2, abs=2e-9)
    assert row["psf_sigma_px"] == pytest.approx(2.5 / 2.35482, rel=1e-5)
    assert row["noise_sigma"] == pytest.approx(7.0, rel=0.05)
    assert row["sky_level"] == pytest.approx(100.0, abs=0.5)
    assert (row["band"], row["magzp"], row["gain"], row["saturate"]) == ("r", 26.1, 5.0, 50000.0)
    assert row["site_lat_deg"] == PALOMAR["lat_deg"] and row["naxis1"] == 80 and row["naxis2"] == 60
    assert row["ra_center_deg"] == pytest.approx(150.0, abs=1e-3)


def test_obsgeo_xyz_seeing_and_mjd_avg(tmp_path, noise_image):
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    loc = EarthLocation.from_geodetic(PALOMAR["lon_deg"] * u.deg, PALOMAR["lat_deg"] * u.deg, PALOMAR["height_m"] * u.m)
    p = write(tmp_path / "b.fits", noise_image, {
        "MJD-AVG": 59000.25, "MJD-OBS": 58000.0, "EXPTIME": 30.0, "SEEING": 2.0,
        "OBSGEO-X": loc.x.to_value(u.m), "OBSGEO-Y": loc.y.to_value(u.m), "OBSGEO-Z": loc.z.to_value(u.m)})
    row = index_images([p]).iloc[0]
    assert row["mjd_mid_utc"] == pytest.approx(59000.25, abs=1e-9)  # MJD-AVG wins over MJD-OBS
    assert row["site_lat_deg"] == pytest.approx(PALOMAR["lat_deg"], abs=1e-7)
    assert row["site_height_m"] == pytest.approx(PALOMAR["height_m"], abs=1e-3)
    assert row["psf_sigma_px"] == pytest.approx(2.0 / 2.35482, rel=1e-4)  # 1 arcsec pixels


def test_ztf_adapter(tmp_path, noise_image):
    p = write(tmp_path / "ztf_20200101_000500_zr_c05_o_q2_sciimg.fits", noise_image, {
        "OBSMJD": 58849.25, "EXPTIME": 30.0, "FILTER": "ZTF_r", "MAGZP": 26.3, "SEEING": 2.2, "CCDID": 5, "QID": 2})
    row = index_images([p]).iloc[0]
    assert row["band"] == "r" and row["ccd_id"] == 17  # ZTF RCID = 4 (CCDID - 1) + QID - 1 = 4 (5 - 1) + 2 - 1
    assert row["mjd_mid_utc"] == pytest.approx(58849.25 + 15 / 86400, abs=1e-9)
    assert row["site_lat_deg"] == pytest.approx(33.3563)


def test_psf_mask_and_variance_extensions(tmp_path, noise_image):
    yy, xx = np.indices((25, 25))
    psf = np.exp(-((xx - 12) ** 2 + (yy - 12) ** 2) / (2 * 1.7**2)).astype(np.float32)
    mask = np.zeros(noise_image.shape, np.int16)
    mask[:, 10] = 1
    var = np.full(noise_image.shape, 9.0, np.float32)
    p = write(tmp_path / "c.fits", noise_image, {"MJD-OBS": 59000.0, "EXPTIME": 10.0},
              [fits.ImageHDU(psf, name="PSF"), fits.ImageHDU(mask, name="MASK"), fits.ImageHDU(var, name="VARIANCE")])
    df = index_images([p], site=PALOMAR)
    row = df.iloc[0]
    assert len(df) == 1  # auxiliary extensions are not images
    assert row["psf_sigma_px"] == pytest.approx(1.7, rel=1e-3)
    assert row["noise_sigma"] == pytest.approx(3.0, rel=1e-6)
    assert row["aux_hdus"] == "MASK=3,PSF=2,VARIANCE=4"
    pix = read_pixels(p, 1, {"MASK": 3})
    assert np.isnan(pix[:, 10]).all() and np.isfinite(pix[:, 11]).all()


def test_psf_sigma_from_moments():
    yy, xx = np.indices((41, 41))
    psf = np.exp(-((xx - 20.3) ** 2 + (yy - 19.6) ** 2) / (2 * 2.2**2))
    assert psf_sigma_from_image(psf) == pytest.approx(2.2, rel=1e-4)


@needs_shared("sep-image/image.fits")
def test_real_image_without_wcs_is_refused():
    path = SHARED / "sep-image" / "image.fits"
    with pytest.raises(BadImageError, match=r"image.fits \[HDU 0\]: no celestial WCS"):
        index_images([str(path)], site=PALOMAR)


def test_no_site_is_an_error(tmp_path, noise_image):
    p = write(tmp_path / "d.fits", noise_image, {"MJD-OBS": 59000.0, "PSF_FWHM": 2.0})
    with pytest.raises(BadImageError, match=r"d.fits \[HDU 1\]: no site"):
        index_images([p])


def test_partitions_balanced_coherent_deterministic():
    rng = np.random.default_rng(3)
    # Four sky clumps of 25 images each.
    centres = np.array([[10, 0], [100, 30], [200, -40], [300, 60]], float)
    ra = np.repeat(centres[:, 0], 25) + rng.normal(0, 0.2, 100)
    dec = np.repeat(centres[:, 1], 25) + rng.normal(0, 0.2, 100)
    df = pd.DataFrame({"image_id": np.arange(100), "exposure_id": np.arange(100), "ra_center_deg": ra, "dec_center_deg": dec})
    part = assign_partitions(df, 4)
    assert np.bincount(part).tolist() == [25, 25, 25, 25]
    assert all(len(set(part[k * 25:(k + 1) * 25])) == 1 for k in range(4))  # clumps stay whole
    shuffled = df.sample(frac=1, random_state=1)
    again = assign_partitions(shuffled, 4)
    assert (pd.Series(again, index=shuffled.index).sort_index().to_numpy() == part).all()
    sizes = np.bincount(assign_partitions(df, 7))
    assert sizes.max() - sizes.min() <= 1
