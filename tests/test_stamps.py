"""Stamp extraction: which image, centring, sky, PSF; checks on external stacks."""
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from skystack.deconvolve.stage import external_stacks, merge_shards, shard_bounds
from skystack.deconvolve.stamps import (
    META_COLUMNS,
    centred_psf,
    cut_stamps,
    galaxies_from_catalog,
    galaxies_from_truth,
    place_galaxies,
)
from skystack.survey.index import index_images

SITE = {"lat_deg": 33.3563, "lon_deg": -116.8650, "height_m": 1712.0}
NX, NY = 161, 141
SKY_ADU, NOISE_ADU = 100.0, 1.0
STAMP_PX = 41
# Galaxies (x, y in 0-based pixels): on a pixel centre, off by 0.3 px in x, on a NaN pixel,
# and too near the edge for a whole stamp.
CENTRED, OFFSET, ON_NAN, AT_EDGE = (50.0, 47.0), (110.3, 70.0), (50.0, 105.0), (5.0, 60.0)


def _wcs(crpix=((NX + 1) / 2, (NY + 1) / 2)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = list(crpix)
    w.wcs.cd = np.diag([-1 / 3600, 1 / 3600])
    return w


def _gaussian(shape, x0, y0, sigma_x, sigma_y, flux):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    g = np.exp(-0.5 * (((xx - x0) / sigma_x) ** 2 + ((yy - y0) / sigma_y) ** 2))
    return flux * g / (2 * np.pi * sigma_x * sigma_y)


def _write_image(path, psf=True, psf_scale=7.0):
    """Sky + noise + elliptical Gaussian galaxies, TAN WCS, a PSF extension that sums to psf_scale."""
    rng = np.random.default_rng(3)
    data = SKY_ADU + rng.normal(0, NOISE_ADU, (NY, NX))
    for x, y in (CENTRED, OFFSET, ON_NAN, AT_EDGE):
        data += _gaussian((NY, NX), x, y, 2.5, 1.8, 5000.0)
    data[int(ON_NAN[1]) + 3, int(ON_NAN[0]) - 2] = np.nan
    hdr = _wcs().to_header()
    hdr.update({"MJD-OBS": 59000.3, "EXPTIME": 30.0, "PSF_FWHM": 3.0, "FILTER": "r", "MAGZP": 26.0,
                "IMAGETYP": "science", "OBSGEO-B": SITE["lat_deg"], "OBSGEO-L": SITE["lon_deg"],
                "OBSGEO-H": SITE["height_m"]})
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(data.astype(np.float32), header=hdr)]
    if psf:
        hdus.append(fits.ImageHDU(psf_scale * _gaussian((25, 25), 12, 12, 1.4, 1.4, 1.0).astype(np.float32),
                                  name="PSF"))
    fits.HDUList(hdus).writeto(path)
    return str(path)


def _radec(*xy):
    ra, dec = _wcs().all_pix2world(np.array(xy, float), 0).T
    return pd.DataFrame({"ra": ra, "dec": dec})


def _centroid(stamp):
    img = np.clip(stamp, 0, None)
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    return (img * xx).sum() / img.sum(), (img * yy).sum() / img.sum()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return index_images([_write_image(tmp_path_factory.mktemp("img") / "sci.fits")], site=SITE)


def test_stamps_are_centred_sky_subtracted_with_a_unit_psf(index):
    galaxies = _radec(CENTRED, OFFSET, ON_NAN, AT_EDGE)
    stamps, psfs, meta = cut_stamps(galaxies, index, "r", STAMP_PX, max_stamps=10)
    # the NaN stamp and the edge galaxy are left out; the others keep their order
    assert stamps.shape == psfs.shape == (2, STAMP_PX, STAMP_PX) and stamps.dtype == np.float32
    assert list(meta.columns) == META_COLUMNS and meta["stamp"].tolist() == [0, 1]
    np.testing.assert_allclose(meta[["x", "y"]].to_numpy(), [CENTRED, OFFSET], atol=1e-6)
    np.testing.assert_allclose(meta[["ra", "dec"]].to_numpy(), galaxies[["ra", "dec"]].to_numpy()[:2])
    assert (meta["image_id"] == index["image_id"].iloc[0]).all()
    c = STAMP_PX // 2
    cx, cy = _centroid(stamps[0])
    assert abs(cx - c) < 0.1 and abs(cy - c) < 0.1
    cx, cy = _centroid(stamps[1])  # cut on the nearest pixel: the 0.3 px offset stays
    assert abs(cx - (c + 0.3)) < 0.1 and abs(cy - c) < 0.1
    border = np.concatenate([stamps[:, :3].reshape(2, -1), stamps[:, -3:].reshape(2, -1)], axis=1)
    assert np.all(np.abs(np.median(border, axis=1)) < 0.2 * NOISE_ADU)
    # the PSF extension, centred and normalised (it sums to 7 in the file)
    np.testing.assert_allclose(psfs.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    assert np.unravel_index(np.argmax(psfs[0]), psfs[0].shape) == (c, c)
    expected = _gaussian((25, 25), 12, 12, 1.4, 1.4, 1.0)
    np.testing.assert_allclose(psfs[0][c - 12:c + 13, c - 12:c + 13], expected / expected.sum(), rtol=1e-5)
    # max_stamps keeps the first galaxies in order
    one, _, meta1 = cut_stamps(galaxies, index, "r", STAMP_PX, max_stamps=1)
    np.testing.assert_array_equal(one[0], stamps[0])
    assert len(meta1) == 1
    # other bands and difference images give nothing
    assert len(cut_stamps(galaxies, index, "g", STAMP_PX, 10)[2]) == 0
    assert len(cut_stamps(galaxies, index.assign(is_difference=True), "r", STAMP_PX, 10)[2]) == 0
    with pytest.raises(ValueError, match="stamp_px must be odd"):
        cut_stamps(galaxies, index, "r", 40, 10)


def test_gaussian_psf_without_extension_and_bad_extension(tmp_path):
    idx = index_images([_write_image(tmp_path / "nopsf.fits", psf=False)], site=SITE)
    _, psfs, _ = cut_stamps(_radec(CENTRED), idx, "r", STAMP_PX, 5)
    np.testing.assert_allclose(psfs.sum(), 1.0, rtol=1e-6)
    yy, xx = np.mgrid[:STAMP_PX, :STAMP_PX] - STAMP_PX // 2
    sigma_px = np.sqrt((psfs[0] * xx**2).sum())
    assert sigma_px == pytest.approx(idx["psf_sigma_px"].iloc[0], rel=1e-3)
    # the index refuses such a PSF; a file replaced after indexing still gets a clear message
    idx = index_images([_write_image(tmp_path / "psf.fits")], site=SITE)
    idx["path"] = _write_image(tmp_path / "zeropsf.fits", psf_scale=0.0)
    with pytest.raises(ValueError, match=r"zeropsf.fits \[HDU 2\]: PSF image has no positive flux"):
        cut_stamps(_radec(CENTRED), idx, "r", STAMP_PX, 5)


def test_image_choice_farthest_from_edge_then_lowest_id():
    base = _wcs().to_header_string()
    shifted = _wcs(crpix=((NX + 1) / 2, (NY + 1) / 2 + 20)).to_header_string()  # sources 20 px higher
    index = pd.DataFrame({"image_id": [4, 2, 7], "wcs_header": [shifted, base, base], "naxis1": NX, "naxis2": NY})
    # (50, 47) in ids 2 and 7, margin 47 px; (50, 67) in id 4, margin 50 px
    placed = place_galaxies(_radec(CENTRED), index, STAMP_PX // 2)
    assert placed["image_id"].tolist() == [4]
    assert placed[["x", "y"]].to_numpy()[0] == pytest.approx([50.0, 67.0])
    # the field centre: margin 70 px in ids 2 and 7 (a tie: the lower id), 50 px in id 4
    placed = place_galaxies(_radec(((NX - 1) / 2, (NY - 1) / 2)), index, STAMP_PX // 2)
    assert placed["image_id"].tolist() == [2]
    far = pd.DataFrame({"ra": [330.0], "dec": [-2.0]})  # the far side of the sky: never placed
    assert len(place_galaxies(far, index, STAMP_PX // 2)) == 0


def test_galaxy_lists_brightest_first():
    truth = pd.DataFrame({"source_id": [1, 2, 3], "ra_deg": [1.0, 2.0, 3.0], "dec_deg": [0.0, 0.1, 0.2],
                          "is_star": [False, True, False], "flux_r_nmgy": [1.0, 9.0, 5.0]})
    assert galaxies_from_truth(truth)["ra"].tolist() == [3.0, 1.0]
    catalog = pd.DataFrame({"ra": [1.0, 2.0, 3.0], "dec": [0.0, 0.1, 0.2], "p_star": [0.1, 0.9, 0.49],
                            "flux_r_nmgy": [1.0, 9.0, 5.0]})
    assert galaxies_from_catalog(catalog)["ra"].tolist() == [3.0, 1.0]


def _save(path, array):
    if str(path).endswith(".npy"):
        np.save(path, array)
    else:
        fits.PrimaryHDU(array).writeto(path)
    return path


def test_external_stacks_checked_and_named(tmp_path):
    rng = np.random.default_rng(0)
    stamps = rng.normal(0, 1, (5, 21, 21))
    psfs = np.broadcast_to(_gaussian((11, 11), 5, 5, 1.5, 1.5, 3.0), (5, 11, 11)).copy()
    good_s, good_p = _save(tmp_path / "s.npy", stamps), _save(tmp_path / "p.fits", psfs)
    s, p, meta = external_stacks(good_s, good_p, max_stamps=3)
    assert s.shape == (3, 21, 21) and p.shape == (3, 11, 11) and s.dtype == p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    assert meta["stamp"].tolist() == [0, 1, 2] and (meta["image_id"] == -1).all() and meta["ra"].isna().all()

    nan = stamps.copy()
    nan[2, 4, 4] = np.nan
    zero = psfs.copy()
    zero[1] = 0.0
    cases = [
        (_save(tmp_path / "flat.npy", stamps[0]), good_p, r"flat.npy: expected a \(n, ny, nx\) stack"),
        (good_s, _save(tmp_path / "three.npy", psfs[:3]), r"s.npy holds 5 stamps but .*three.npy holds 3 PSFs"),
        (_save(tmp_path / "nan.npy", nan), good_p, r"nan.npy: stamps \[2\] hold NaN"),
        (good_s, _save(tmp_path / "zero.fits", zero), r"zero.fits: PSFs \[1\] are not finite with a positive sum"),
        (good_s, _save(tmp_path / "even.npy", np.ones((5, 10, 10))), r"even.npy: PSFs must have odd sides"),
        (_save(tmp_path / "empty.npy", np.zeros((0, 21, 21))), _save(tmp_path / "p0.npy", np.zeros((0, 11, 11))),
         r"empty.npy: the stack holds no stamps"),
        (_save(tmp_path / "s.txt", stamps), good_p, r"s.txt: unknown stack format"),
    ]
    for stamp_path, psf_path, message in cases:
        with pytest.raises(ValueError, match=message):
            external_stacks(stamp_path, psf_path, max_stamps=10)


def test_psf_centring_shard_bounds_and_merge_checks():
    psf = np.zeros((25, 25))
    psf[12, 12], psf[12, 13] = 3.0, 1.0
    out = centred_psf(psf, 41)
    assert out.shape == (41, 41) and out[20, 20] == 0.75 and out[20, 21] == 0.25
    big = np.zeros((61, 61))
    big[30, 30] = 1.0
    assert centred_psf(big, 41)[20, 20] == 1.0
    for n in (0, 1, 7, 20, 100):
        for n_shards in (1, 2, 3, 8):
            bounds = [shard_bounds(n, n_shards, k) for k in range(n_shards)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    with pytest.raises(ValueError, match="shard 3 is not one of 0..2"):
        shard_bounds(10, 3, 3)
    stamps = np.zeros((4, 9, 9))
    meta = pd.DataFrame({c: np.zeros(4) for c in META_COLUMNS}).assign(stamp=np.arange(4))
    diag = pd.DataFrame({"stamp": [0, 1], "iterations": 1, "cost": 0.0})
    with pytest.raises(ValueError, match="the shards hold"):
        merge_shards(stamps, stamps, meta, [np.zeros((2, 9, 9))], [diag])
