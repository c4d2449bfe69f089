"""The index on real processed survey images (shared/data/real), and the header readers
it is built on (site keywords, band names, INHERIT) on synthetic headers.

The expected values are read here independently of skystack: times with astropy.time from
the raw keywords, WCS centres with astropy.wcs from each image's own header, zero points
from the survey-ccds tables with astropy.table, and observatory coordinates from the
published sources written below (not from skystack.survey.sites).
"""
import glob
import logging
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from conftest import SHARED_DATA, needs_shared

from skystack.survey import conventions as cv
from skystack.survey.headers import BadImageError
from skystack.survey.index import (
    NoUsableImageError,
    index_images,
    index_survey,
    read_header,
)
from skystack.survey.pixels import aux_of, read_pixels
from skystack.survey.sites import SiteError, parse_angle, resolve_site

REAL = SHARED_DATA / "real"
needs_real = needs_shared("real/MANIFEST.csv", "real/decam/legacypipe-testcase3", "real/mosaic3-90prime",
                          "real/sdss", "real/panstarrs1", "real/hsc")

# Published observatory coordinates (geodetic lat, east lon in deg), written out here.
PUBLISHED = {
    # Victor M. Blanco 4 m, CTIO: 30 10 10.78 S, 70 48 23.49 W (CTIO/NOIRLab Blanco page).
    "decam": (-(30 + 10 / 60 + 10.78 / 3600), -(70 + 48 / 60 + 23.49 / 3600)),
    # Mayall 4 m, Kitt Peak: 31 57.8 N, 111 36.0 W (NOIRLab KPNO Mayall page).
    "mosaic3": (31 + 57.8 / 60, -(111 + 36.0 / 60)),
    # Bok 2.3 m, Kitt Peak: 31 57 46 N, 111 36 01 W (Steward Observatory Bok page).
    "90prime": (31 + 57 / 60 + 46 / 3600, -(111 + 36 / 60 + 1 / 3600)),
    "90prime-cp": (31 + 57 / 60 + 46 / 3600, -(111 + 36 / 60 + 1 / 3600)),
    # SDSS 2.5 m, Apache Point: 32 46 49.30 N, 105 49 13.50 W (Gunn et al. 2006, AJ 131, 2332).
    "sdss": (32 + 46 / 60 + 49.30 / 3600, -(105 + 49 / 60 + 13.50 / 3600)),
    # Pan-STARRS1, Haleakala: 20 42 26 N, 156 15 21 W (MPC F51; PS1 project pages).
    "panstarrs1": (20 + 42 / 60 + 26 / 3600, -(156 + 15 / 60 + 21 / 3600)),
    # Subaru, Mauna Kea: 19 49 31.8 N, 155 28 33.7 W (NAOJ Subaru Telescope).
    "hsc": (19 + 49 / 60 + 31.8 / 3600, -(155 + 28 / 60 + 33.7 / 3600)),
}
BAND_OF_FILTER = {"bokr": "r", "zd": "z"}
PSFEX_N11 = ("decam/legacypipe-testcase3/calib/psfex-single/decam/CP/V4.8.2a/CP20150328/c4d_150329_083320_ooi_r_ls9/"
             "c4d_150329_083320_ooi_r_ls9-N11-psfex.fits")


def km_between(lat1, lon1, lat2, lon2):
    """Great-circle distance on a 6371 km sphere (enough at the km level)."""
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    c = math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(dl)
    return 6371.0 * math.acos(min(1.0, max(-1.0, c)))


def manifest():
    return pd.read_csv(REAL / "MANIFEST.csv")


def ccd_tables():
    return sorted(glob.glob(str(REAL / "*" / "*" / "survey-ccds-1*")))


@pytest.fixture(scope="module")
def real_index():
    files = sorted(p for p in glob.glob(str(REAL / "**" / "*"), recursive=True) if ".fit" in Path(p).name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, rejected = index_survey(files, on_bad_image="skip", ccd_tables=ccd_tables())
    images = images.assign(rel=images["path"].str.replace(str(REAL) + "/", "", regex=False))
    rejected = rejected.assign(rel=rejected["path"].str.replace(str(REAL) + "/", "", regex=False))
    return files, images, rejected


def _headers(path, hdu):
    with fits.open(path) as h:
        prim, own = h[0].header.copy(), h[hdu].header.copy()
    return prim, own


def _start_and_exptime(path, hdu):
    """Shutter-open time and exposure time from the raw keywords, with astropy alone."""
    prim, own = _headers(path, hdu)
    hdr = {**dict(prim), **dict(own)}
    exptime = float(hdr["EXPTIME"])
    scale = {"UTC approximate": "utc"}.get(str(hdr.get("TIMESYS", "UTC")).strip(), str(hdr.get("TIMESYS", "UTC")).strip().lower())
    if "TAIHMS" in hdr:  # SDSS: TAI date + TAI time of day
        return Time(f"{hdr['DATE-OBS'].strip()}T{hdr['TAIHMS'].strip()}", scale="tai"), exptime
    if "MJD-OBS" in hdr:
        return Time(float(hdr["MJD-OBS"]), format="mjd", scale=scale), exptime
    return Time(hdr["DATE-OBS"], scale=scale), exptime


# ----------------------------------------------------------------------------- real images
@needs_real
def test_every_science_image_is_indexed_or_refused_with_a_reason(real_index):
    files, images, rejected = real_index
    images_in_manifest = manifest().query("kind == 'image'")["path"].tolist()
    indexed = set(images["rel"])
    refused = dict(zip(rejected["rel"], rejected["reason"]))
    for rel in images_in_manifest:
        assert rel in indexed or rel in refused, rel
    # Every real science image of DECam, Mosaic3, 90Prime and SDSS is indexed.
    for rel in images_in_manifest:
        if rel.startswith(("decam/legacypipe", "decam/tractor", "decam/asteroid", "mosaic3-90prime", "sdss")):
            assert rel in indexed, (rel, refused.get(rel))
    assert set(images["convention"]) >= {"decam", "mosaic3", "90prime-cp", "90prime", "sdss"}
    # Weight maps, masks and variance maps are attached, never indexed.
    for marker in ("_oow_", "_ood_", ".wht.fits", "-invvar-", "_var.fits"):
        assert not images["rel"].str.contains(marker, regex=False).any(), marker
    assert len(files) == len(set(images["path"])) + len(set(rejected["path"])) + sum(
        len(a.split(",")) for a in images["aux_files"] if a)


@needs_real
def test_mid_exposure_time_inside_the_exposure(real_index):
    _, images, _ = real_index
    errors = []
    for _, row in images.iterrows():
        start, exptime = _start_and_exptime(row["path"], row["hdu"])
        mid = Time(row["mjd_mid_utc"], format="mjd", scale="utc")
        assert start.utc.mjd < mid.mjd < (start + exptime / 86400.0).utc.mjd, row["rel"]
        errors.append(abs((mid - (start + exptime / 2 / 86400.0)).sec))
        tdb = mid.tdb
        assert row["jd_tdb_mid"] == pytest.approx(tdb.jd1 + tdb.jd2, abs=1e-7)  # topocentric TDB-TT < 2 ms
    assert max(errors) < 1e-3, max(errors)


@needs_real
def test_wcs_centre_matches_astropy(real_index):
    _, images, _ = real_index
    worst = 0.0
    for _, row in images.iterrows():
        with warnings.catch_warnings(), fits.open(row["path"]) as h:
            warnings.simplefilter("ignore")
            w = WCS(h[row["hdu"]].header, naxis=2, relax=True)
        ra, dec = w.all_pix2world([[(row["naxis1"] - 1) / 2, (row["naxis2"] - 1) / 2]], 0)[0]
        d = np.hypot((ra - row["ra_center_deg"]) * np.cos(np.radians(dec)), dec - row["dec_center_deg"]) * 3600
        worst = max(worst, d)
        assert d < 0.05, (row["rel"], d)
    # testcase3's two legacypipe sources fall inside every testcase3 image.
    tc3 = images[images["rel"].str.contains("testcase3/images")]
    assert len(tc3) == 8
    for _, row in tc3.iterrows():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = WCS(fits.Header.fromstring(row["wcs_header"]), relax=True)
        for ra, dec in ((244.77828, 12.07250), (244.77973, 12.07234)):
            x, y = w.all_world2pix([[ra, dec]], 0)[0]
            assert -0.5 < x < row["naxis1"] - 0.5 and -0.5 < y < row["naxis2"] - 0.5


@needs_real
def test_site_is_the_published_observatory(real_index):
    _, images, _ = real_index
    for _, row in images.iterrows():
        lat, lon = PUBLISHED[row["convention"]]
        assert km_between(row["site_lat_deg"], row["site_lon_deg"], lat, lon) < 1.0, row["rel"]
    decam = images[images["convention"] == "decam"]
    assert (decam["site_lon_deg"] < -70).all()  # OBS-LONG = 70.81489 "east" is west in fact


@needs_real
def test_band_zero_point_gain_and_noise(real_index):
    _, images, _ = real_index
    man = manifest().set_index("path")
    ccd = pd.concat([Table.read(p, hdu=1).to_pandas() for p in ccd_tables()], ignore_index=True)
    ccd["name"] = [Path((f.decode() if isinstance(f, bytes) else str(f)).strip()).name for f in ccd["image_filename"]]
    ccd = ccd.set_index("name")
    for _, row in images.iterrows():
        expected_band = str(man.loc[row["rel"], "band"])
        assert row["band"] == BAND_OF_FILTER.get(expected_band, expected_band), row["rel"]
        prim, own = _headers(row["path"], row["hdu"])
        name = Path(row["path"]).name
        if row["convention"] == "decam" and name in ccd.index:  # V4.8.2a: per-second ccdzpt
            expected = float(ccd.loc[name, "ccdzpt"]) + 2.5 * np.log10(float(prim["EXPTIME"]))
        elif row["convention"] == "decam" and "MAGZERO" in prim:
            expected = float(prim["MAGZERO"])
        elif row["convention"] == "decam":
            expected = np.nan  # DR9 cutouts outside the CCD tables: no zero point anywhere
        elif row["convention"] == "sdss":
            expected = 22.5  # frame pixels are nanomaggies
        else:  # Mosaic3 / 90Prime: survey-ccds ccdzpt for their pixel units
            expected = float(ccd.loc[name, "ccdzpt"])
        np.testing.assert_allclose(row["magzp"], expected, atol=1e-6, err_msg=row["rel"])
        if row["convention"] == "decam":
            gain = float(own["GAIN"]) if "GAIN" in own else (float(own.get("GAINA", prim.get("GAINA")))
                                                              + float(own.get("GAINB", prim.get("GAINB")))) / 2
            assert row["gain"] == pytest.approx(gain)
        elif row["convention"] == "mosaic3":
            assert row["gain"] == pytest.approx(float(own["GAIN"]) * float(prim["EXPTIME"]))  # counts/s pixels
        elif row["convention"] == "sdss":
            assert row["gain"] == pytest.approx(4.71 / float(prim["NMGY"]))  # psField gain[r] e-/count
        assert row["psf_sigma_px"] > 0.5 and row["noise_sigma"] > 0


@needs_real
def test_weight_maps_and_masks_are_attached(real_index):
    _, images, _ = real_index
    cp = images[images["rel"].str.contains("_ooi_|_oki_") & ~images["rel"].str.contains("asteroid")]
    assert len(cp) == 8 + 6 + 3 + 1 + 1 + 8 + 2  # testcase3/6/9/8, old CP, mzlsbass3, mzlsbass Mosaic3
    for _, row in cp.iterrows():
        aux = aux_of(row)
        stem = Path(row["path"]).name
        for kind, marker in (("WEIGHT", "_oow_"), ("MASK", "_ood_")):
            other, hdu = aux[kind]
            assert Path(other).parent == Path(row["path"]).parent
            assert Path(other).name == stem.replace("_ooi_", marker).replace("_oki_", marker)
            assert hdu == row["hdu"]
        # The weight map gives the noise: sqrt(median(1 / invvar)) over good pixels.
        with fits.open(aux["WEIGHT"][0]) as w:
            inv = np.asarray(w[aux["WEIGHT"][1]].data, float)
        assert row["noise_sigma"] == pytest.approx(np.sqrt(np.median(1 / inv[inv > 0])), rel=0.02)
    tractor = images[images["rel"].str.contains("image-sub")].iloc[0]
    assert tractor["aux_files"].startswith("WEIGHT=") and "invvar-sub" in tractor["aux_files"]
    deep2 = images[images["rel"].str.contains("deep2g_ra352_1-ccd1")].iloc[0]
    assert deep2["aux_files"].endswith("deep2g_ra352_1-ccd1.wht.fits[1]") and deep2["psf_source"] == "psfex"


@needs_real
def test_read_pixels_applies_the_attached_mask(tmp_path):
    src = REAL / "decam/legacypipe-testcase3/images/decam/CP/V4.8.2a/CP20150328"
    for f in src.glob("c4d_150329_083320_oo?_r_ls9.N11.fits"):
        shutil.copy(f, tmp_path / f.name)
    mask_path = tmp_path / "c4d_150329_083320_ood_r_ls9.N11.fits"
    with fits.open(mask_path, mode="update") as h:
        h[1].data[10, 5] = 4  # a CP data-quality bit
        h[1].data[20, :] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = index_images([str(tmp_path / "c4d_150329_083320_ooi_r_ls9.N11.fits")]).iloc[0]
    assert row["mask_bits"] == -1 and "MASK=" in row["aux_files"]
    pix = read_pixels(row["path"], int(row["hdu"]), aux_of(row), row["saturate"])
    assert np.isnan(pix[10, 5]) and np.isnan(pix[20]).all()
    assert np.isfinite(pix[11, 5]) and np.isfinite(pix[19]).all()


@needs_real
@pytest.mark.parametrize("rel, reason", [
    ("tess/asteroid_test.fits", r"not a survey image: TESS target-pixel file"),
    ("tess/tess25155310-s01-first-cadences.fits.gz", r"not a survey image: TESS target-pixel file"),
    ("tess/sfft_diff4check_tess-s0002-1-1.fits.fz", r"not a survey image: TESS .* no ground site"),
    ("kepler/test-tpf-kplr-tabby-first-cadence.fits", r"not a survey image: Kepler target-pixel file"),
    ("hst-acs/j8bt06nyq_sip_flt.fits", r"header only, no pixel data \(SCI has NAXIS = 0\)"),
    ("jwst-nircam/jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp.fits", r"resampled \(i2d\) mosaic"),
    ("panoptes/unsolved.fits", r"Bayer colour-filter mosaic .* no WCS"),
    ("hsc/HSC-0908120-056-small.fits", r"FILTER = '_unknown_'.*unset filter.*no site.*EXPTIME must be positive.*Unix epoch"),
    ("hsc/example-calexp.fits.gz", r"every pixel is NaN, masked or saturated \(0 not finite, 32 bad"),
    ("decam/sfft-resampled-i/DEC-OBS04b.mini.fits", r"resampled \(SWarp\) image: DATE-OBS .* reference frame"),
    ("lsst-imsim/obs_test/raw_v1_fg.fits.gz", r"raw frame: DATASEC .* overscan"),
    (PSFEX_N11, r"tables only \(a PSFEx PSF model"),
    ("decam/legacypipe-testcase3/survey-ccds-1.fits.gz", r"tables only \(a survey-ccds table"),
    ("decam/legacypipe-testcase3/gaia/chunk-04759.fits", r"tables only \(a catalog"),
    ("sdss/run1000-camcol1-field100/fpM-001000-r1-0100.fit", r"tables only"),
])
def test_refused_files_have_specific_reasons(real_index, rel, reason):
    _, images, rejected = real_index
    assert rel not in set(images["rel"])
    reasons = rejected.loc[rejected["rel"] == rel, "reason"].tolist()
    assert reasons and all(__import__("re").search(reason, r) for r in reasons), reasons


@needs_real
def test_ps1_and_hsc_headers_read_right():
    """Pan-STARRS1 and HSC: every header quantity right (their PSF is another matter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps1 = read_header(REAL / "panstarrs1/H1413+117_10x10arcsec_55377.34051_z_sci.fits")
        hsc = read_header(REAL / "hsc/example-calexp.fits.gz")
    assert ps1["convention"] == "panstarrs1" and ps1["band"] == "z"
    assert ps1["mjd_mid_utc"] == pytest.approx(55377.3405080746 + 15 / 86400, abs=1e-8)
    assert km_between(ps1["site"]["lat_deg"], ps1["site"]["lon_deg"], *PUBLISHED["panstarrs1"]) < 1.0
    assert "west_hours" in ps1["how"]["site"]  # FPA.LONGITUDE 10.417 h west
    assert ps1["magzp"] == pytest.approx(24.31745 + 2.5 * np.log10(30.0)) and ps1["gain"] == pytest.approx(1.040175)
    assert hsc["convention"] == "hsc" and hsc["band"] == "i" and hsc["problems"] == []
    start = Time("2013-11-02T05:18:27.893", scale="utc")  # DATE-OBS + UT, EXPTIME 30
    assert hsc["mjd_mid_utc"] == pytest.approx((start + 15 / 86400).mjd, abs=0.05 / 86400)
    assert km_between(hsc["site"]["lat_deg"], hsc["site"]["lon_deg"], *PUBLISHED["hsc"]) < 1.0
    assert hsc["magzp"] == pytest.approx(2.5 * np.log10(1722367118085.0))
    assert hsc["gain"] == pytest.approx(3.58634006977081)


@needs_real
def test_skip_writes_rejected_before_failing(tmp_path):
    from skystack.survey.stage import index_stage

    paths = [str(REAL / p) for p in ("tess/asteroid_test.fits", "kepler/test-tpf-kplr-tabby-first-cadence.fits",
                                     "panoptes/unsolved.fits", "hst-acs/j8bt06nyq_sip_flt.fits",
                                     "decam/legacypipe-testcase3/survey-ccds-1.fits.gz")]
    out = tmp_path / "rejected_images.parquet"
    with warnings.catch_warnings(), pytest.raises(NoUsableImageError) as err:
        warnings.simplefilter("ignore")
        index_stage(paths, tmp_path / "images.parquet", out, site=None, on_bad_image="skip", n_partitions=1,
                    log=logging.getLogger("test"))
    assert str(err.value).startswith("no usable image among 5 file(s): ")
    assert "2 no 2-D image HDU" in str(err.value) and "1 not a survey image (panoptes)" in str(err.value)
    rejected = pd.read_parquet(out)
    assert sorted(rejected["path"]) == sorted(paths) and rejected["reason"].str.len().min() > 20
    assert not (tmp_path / "images.parquet").exists()


# ----------------------------------------------------------------------------- site keywords
def _hdr(cards):
    h = fits.Header()
    for k, v in cards.items():
        h[k] = v
    return h


BLANCO = ("ctio-blanco", {"lat_deg": -30.16966, "lon_deg": -70.80653, "height_m": 2207.0})


@pytest.mark.parametrize("text, degrees, how", [
    ("31:57:48.0", 31.963333, "unsigned"), ("111:36.0", 111.6, "unsigned"), ("-30:09:57.8", -30.166056, "signed"),
    ("+19 49 32", 19.825556, "signed"), ("70:48:53.6 W", -70.814889, "hemisphere"), ("30:10:10.78S", -30.169661, "hemisphere"),
    ("19.825556", 19.825556, "unsigned"), (70.81489, 70.81489, "number"), (-155.476667, -155.476667, "number"),
])
def test_parse_angle(text, degrees, how):
    value, kind = parse_angle(text)
    assert value == pytest.approx(degrees, abs=2e-6) and kind == how


@pytest.mark.parametrize("cards", [
    {"OBS-LAT": -30.16606, "OBS-LONG": -70.81489, "OBS-ELEV": 2215.0},
    {"LAT-OBS": -30.16606, "LONG-OBS": -70.81489, "ALT-OBS": 2215.0},
    {"SITELAT": "-30:09:57.8", "SITELONG": "-70:48:53.6", "SITEALT": 2215.0},
    {"LATITUDE": "-30:09:57.8", "LONGITUD": "70:48:53.6 W"},
    {"OBSGEO-B": -30.16606, "OBSGEO-L": -70.81489, "OBSGEO-H": 2215.0},
])
def test_every_site_spelling_reads_the_same_place(cards):
    site, how = resolve_site(_hdr(cards))
    assert km_between(site["lat_deg"], site["lon_deg"], -30.16606, -70.81489) < 0.01, how


def test_obsgeo_xyz_and_a_spacecraft():
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    loc = EarthLocation.from_geodetic(-70.81489 * u.deg, -30.16606 * u.deg, 2215 * u.m)
    site, _ = resolve_site(_hdr({"OBSGEO-X": loc.x.value, "OBSGEO-Y": loc.y.value, "OBSGEO-Z": loc.z.value}))
    assert site["lon_deg"] == pytest.approx(-70.81489, abs=1e-7) and site["height_m"] == pytest.approx(2215, abs=1e-3)
    with pytest.raises(SiteError, match="spacecraft position"):  # JWST writes its own position in OBSGEO-*
        resolve_site(_hdr({"OBSGEO-X": 3.18e8, "OBSGEO-Y": 1.0e8, "OBSGEO-Z": 5.0e7}))


def test_decam_east_longitude_trap():
    """DECam says OBS-LONG = 70.81489 / east longitude; CTIO is 70.8 deg west."""
    hdr = _hdr({"OBS-LAT": -30.16606, "OBS-LONG": 70.81489, "OBS-ELEV": 2215.0})
    hdr.comments["OBS-LONG"] = "[deg] Observatory east longitude"
    site, how = resolve_site(hdr, BLANCO, ["east", "west"])
    assert site["lon_deg"] == pytest.approx(-70.80653) and "west" in how
    with pytest.raises(SiteError, match=r"OBS-LAT = -30.16606, OBS-LONG = 70.81489 is \d+ km from ctio-blanco"):
        resolve_site(hdr, BLANCO, ["east"])  # a convention that allows east only refuses it
    far = _hdr({"OBS-LAT": -29.26, "OBS-LONG": 70.81489})  # La Silla's latitude: 100 km off
    with pytest.raises(SiteError, match=r"OBS-LAT = -29.26.* km from ctio-blanco .*\(east, west\)"):
        resolve_site(far, BLANCO, ["east", "west"])
    # Without a known site the comment is all there is: east, as it says.
    assert resolve_site(hdr)[0]["lon_deg"] == pytest.approx(70.81489)


def test_unsigned_sexagesimal_and_hours():
    kp = _hdr({"OBS-LAT": "31:57.8", "OBS-LONG": "111:36.0", "OBS-ELEV": 2120})
    mayall = ("kpno-mayall", {"lat_deg": 31.963333, "lon_deg": -111.6, "height_m": 2120.0})
    assert resolve_site(kp, mayall, ["west", "east"])[0]["lon_deg"] == pytest.approx(-111.6)
    with pytest.raises(SiteError, match="unsigned sexagesimal longitude"):
        resolve_site(kp)  # no known site: east or west cannot be told
    bok = _hdr({"SITELAT": "31:58.8", "SITELONG": "111:36.0"})
    bok.comments["SITELONG"] = "Longitude (degrees W)"
    assert resolve_site(bok)[0]["lon_deg"] == pytest.approx(-111.6)  # the comment says west
    ps1 = _hdr({"FPA.LATITUDE": 20.7070994446013, "FPA.LONGITUDE": 10.4170602777931, "FPA.ELEVATION": 3048.0})
    haleakala = ("haleakala-ps1", {"lat_deg": 20.7071, "lon_deg": -156.25589, "height_m": 3048.0})
    site, how = resolve_site(ps1, haleakala, ["west_hours", "east_hours", "west", "east"])
    assert "west_hours" in how and site["lon_deg"] == pytest.approx(-156.25589)


def test_config_sites_and_conventions(tmp_path):
    rng = np.random.default_rng(1)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval, w.wcs.crpix, w.wcs.cd = [10.0, -20.0], [20, 20], np.diag([-1 / 3600, 1 / 3600])
    hdr = w.to_header()
    hdr.update({"INSTRUME": "MyCam", "DATE-OBS": "2020-01-02", "UTSHUT": "03:04:05", "EXPTIME": 60.0,
                "FILT": "Halpha", "FWHM_PIX": 3.0, "PHOT_ZP": 25.5, "OBS-LAT": -31.0, "OBS-LONG": "20:48:38"})
    path = tmp_path / "mycam.fits"
    fits.HDUList([fits.PrimaryHDU(rng.normal(100, 5, (40, 40)).astype(np.float32), header=hdr)]).writeto(path)
    conv = [{"name": "mycam", "match": [{"INSTRUME": "MyCam"}], "time_of_day": ["UTSHUT"], "band_keys": ["FILT"],
             "band_map": {"halpha": "ha"}, "band_required": True, "zeropoint": [{"key": "PHOT_ZP", "kind": "mag"}],
             "psf": [{"key": "FWHM_PIX", "unit": "px"}], "site": "my-site", "lon_conventions": ["east"]}]
    sites = {"my-site": {"lat_deg": -31.0, "lon_deg": 20.8106, "height_m": 1800.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = index_images([str(path)], sites=sites, conventions=conv).iloc[0]
    assert (row["convention"], row["band"], row["magzp"]) == ("mycam", "ha", 25.5)
    assert row["mjd_mid_utc"] == pytest.approx(Time("2020-01-02T03:04:35").mjd, abs=1e-9)
    assert row["site_lon_deg"] == pytest.approx(20.8106) and row["psf_sigma_px"] == pytest.approx(3.0 / 2.35482, rel=1e-4)
    with pytest.raises(BadImageError, match=r"unsigned sexagesimal longitude.*; DATE-OBS = '2020-01-02' is a date "
                                            r"without a time of day"):
        index_images([str(path)], sites=sites)  # the generic reading: no UTSHUT, no known site
    with pytest.raises(ValueError, match="unknown field"):
        index_images([str(path)], conventions=[{"name": "x", "zero_point": []}])
    with pytest.raises(ValueError, match="survey.site 'nowhere'"):
        index_images([str(path)], site="nowhere")


def test_config_site_by_mpc_code(tmp_path):
    hdr = WCS(naxis=2).to_header()
    hdr.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CDELT1": -3e-4, "CDELT2": 3e-4, "MJD-OBS": 59000.1,
                "EXPTIME": 30.0, "FILTER": "r", "PSF_FWHM": 2.0})
    path = tmp_path / "a.fits"
    fits.HDUList([fits.PrimaryHDU(np.random.default_rng(2).normal(50, 3, (30, 30)).astype(np.float32), header=hdr)]).writeto(path)
    row = index_images([str(path)], site="W84").iloc[0]
    assert row["site_lat_deg"] == pytest.approx(-30.16966, abs=1e-4) and "W84" in row["provenance"]


# ----------------------------------------------------------------------------- bands, INHERIT
@pytest.mark.parametrize("value, band", [
    ("r DECam SDSS c0002 6415.0 1480.0", "r"), ("g DECam SDSS c0001 4720.0 1520.0", "g"), ("bokr", "r"),
    ("zd DECam k1038", "z"), ("zd", "z"), ("ZTF_r", "r"), ("ZTF_g", "g"), ("z.00000", "z"), ("HSC-i", "i"),
    ("Y", "y"), ("i", "i"), ("  r  ", "r"), ("VR DECam c0007 6300.0 2600.0", "vr"),
])
def test_band_normaliser(value, band):
    assert cv.normalise_band(value) == band


@pytest.mark.parametrize("value, reason", [
    ("RGGB", "Bayer colour-filter mosaic"), ("_unknown_", "unset filter"), ("F200W", "not a band skystack knows"),
    ("", "empty"), ("OPEN", "no filter"),
])
def test_band_normaliser_refuses(value, reason):
    with pytest.raises(ValueError, match=reason):
        cv.normalise_band(value)
    assert cv.normalise_band("F200W", {"f200w": "F200W"}) == "F200W"  # a config band_map adds it


def test_inherit_merges_primary_cards_extension_wins():
    prim = fits.PrimaryHDU()
    prim.header.update({"DATE-OBS": "2015-03-29T08:31:18.9", "FILTER": "g", "OBS-LAT": -30.16606, "BUNIT": "counts/s",
                        "CTYPE1": "DEC--TAN", "CRVAL1": 352.0})  # a bogus primary WCS, as in 90Prime pre-CP
    ext = fits.ImageHDU(np.zeros((4, 4), np.float32))
    ext.header.update({"INHERIT": True, "FILTER": "r", "BUNIT": "ADU", "CTYPE1": "RA---TPV"})
    other = fits.ImageHDU(np.zeros((4, 4), np.float32))
    other.header["GAIN"] = 2.0
    hdul = fits.HDUList([prim, ext])
    merged = cv.merged_header(hdul, 1)
    assert merged["DATE-OBS"] == "2015-03-29T08:31:18.9" and merged["OBS-LAT"] == -30.16606
    assert merged["FILTER"] == "r" and merged["BUNIT"] == "ADU" and merged["CTYPE1"] == "RA---TPV"
    assert "CRVAL1" not in merged  # WCS keywords never inherit
    # No INHERIT and a primary with data: time/site/band keywords only.
    prim2 = fits.PrimaryHDU(np.zeros((2, 2), np.float32))
    prim2.header.update({"DATE-OBS": "2015-01-01T00:00:00", "FOO": 1})
    merged2 = cv.merged_header(fits.HDUList([prim2, other]), 1)
    assert merged2["DATE-OBS"] == "2015-01-01T00:00:00" and "FOO" not in merged2 and merged2["GAIN"] == 2.0
