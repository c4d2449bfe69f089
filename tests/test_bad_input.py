"""Bad survey input gets a message naming the file, the HDU and the problem; skip records it."""
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from skystack.survey.headers import BadImageError
from skystack.survey.index import index_images, index_survey

SITE = {"lat_deg": 33.3563, "lon_deg": -116.8650, "height_m": 1712.0}
GOOD_CARDS = {"MJD-OBS": 59000.3, "EXPTIME": 30.0, "PSF_FWHM": 2.0, "FILTER": "r", "MAGZP": 26.0}


def header(cards=None, wcs=True):
    hdr = fits.Header()
    if wcs:
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [120.0, 10.0]
        w.wcs.crpix = [20, 20]
        w.wcs.cd = np.diag([-1 / 3600, 1 / 3600])
        hdr.update(w.to_header())
    for k, v in {**GOOD_CARDS, **(cards or {})}.items():
        if v is None:
            hdr.remove(k, ignore_missing=True)
        else:
            hdr[k] = v
    return hdr


def noise(seed=0):
    return np.random.default_rng(seed).normal(50, 5, (40, 40)).astype(np.float32)


def write(path, data=None, cards=None, wcs=True, compressed=False):
    data = noise() if data is None else data
    hdu = (fits.CompImageHDU(data, header=header(cards, wcs), compression_type="RICE_1", dither_seed=1)
           if compressed else fits.ImageHDU(data, header=header(cards, wcs)))
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    return str(path)


CASES = {
    "no_time": (dict(cards={"MJD-OBS": None}), r"\[HDU 1\]: no time keyword"),
    "bad_date": (dict(cards={"MJD-OBS": None, "DATE-OBS": "2021-13-45T99:00:00"}), r"\[HDU 1\]: unparseable time keyword"),
    "outside_de421": (dict(cards={"MJD-OBS": 10000.0}), r"\[HDU 1\]: time .* outside the DE421 ephemeris range"),
    "no_wcs": (dict(wcs=False), r"\[HDU 1\]: no celestial WCS"),
    "singular_wcs": (dict(cards={"CD1_1": 0.0, "CD2_2": 0.0, "PC1_1": 0.0, "PC2_2": 0.0, "CDELT1": 0.0, "CDELT2": 0.0}), r"\[HDU 1\]: (singular WCS|unreadable WCS)"),
    "non_celestial": (dict(cards={"CTYPE1": "LINEAR", "CTYPE2": "LINEAR"}), r"\[HDU 1\]: no celestial WCS"),
    "all_nan": (dict(data=np.full((40, 40), np.nan, np.float32)), r"\[HDU 1\]: every pixel is NaN"),
    "zero_exptime": (dict(cards={"EXPTIME": 0.0}), r"\[HDU 1\]: EXPTIME must be positive"),
    "zero_noise": (dict(data=np.full((40, 40), 7.0, np.float32)), r"\[HDU 1\]: noise estimate is 0.0"),
    "no_psf": (dict(cards={"PSF_FWHM": None}), r"\[HDU 1\]: no PSF"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_header_or_pixels(tmp_path, case):
    kwargs, message = CASES[case]
    path = write(tmp_path / f"{case}.fits", **kwargs)
    with pytest.raises(BadImageError, match=rf"{case}.fits {message}"):
        index_images([path], site=SITE)


def test_not_fits_truncated_and_empty(tmp_path):
    good = write(tmp_path / "good.fits")
    (tmp_path / "text.fits").write_text("SIMPLE? no, this is a text file\n" * 10)
    raw = open(good, "rb").read()
    (tmp_path / "trunc.fits").write_bytes(raw[: len(raw) // 2 + 100])
    fits.HDUList([fits.PrimaryHDU()]).writeto(tmp_path / "empty.fits")
    with pytest.raises(BadImageError, match=r"text.fits: not a readable FITS file"):
        index_images([str(tmp_path / "text.fits")], site=SITE)
    with pytest.raises(BadImageError, match=r"trunc.fits.*(unreadable|not a readable)"):
        index_images([str(tmp_path / "trunc.fits")], site=SITE)
    with pytest.raises(BadImageError, match=r"empty.fits: no 2-D image HDU"):
        index_images([str(tmp_path / "empty.fits")], site=SITE)
    # NAXIS = 1: a spectrum-like HDU is not an image; NAXIS absent (header only): no data at all.
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros(10, np.float32), header=header())]).writeto(tmp_path / "one_d.fits")
    with pytest.raises(BadImageError, match=r"one_d.fits: no 2-D image HDU"):
        index_images([str(tmp_path / "one_d.fits")], site=SITE)


def test_damaged_compressed_tile(tmp_path):
    good = write(tmp_path / "c.fits.fz", compressed=True)
    raw = bytearray(open(good, "rb").read())
    with fits.open(good) as h:
        info = h.fileinfo(1)
    # Overwrite the second half of the compressed data (the heap holding the tiles).
    start = info["datLoc"] + info["datSpan"] // 2
    raw[start:start + 400] = bytes(range(200)) * 2
    (tmp_path / "damaged.fits.fz").write_bytes(bytes(raw))
    with pytest.raises(BadImageError, match=r"damaged.fits.fz \[HDU 1\]: unreadable pixel data"):
        index_images([str(tmp_path / "damaged.fits.fz")], site=SITE)


def test_skip_records_reasons_and_duplicates(tmp_path):
    a = write(tmp_path / "a.fits")
    b = write(tmp_path / "b_copy.fits")  # the same pixels and header: a duplicate
    c = write(tmp_path / "c.fits", data=noise(1), cards={"MJD-OBS": None})
    d = write(tmp_path / "d.fits", data=noise(2), cards={"MJD-OBS": 59001.3})
    images, rejected = index_survey([a, b, c, d], site=SITE, on_bad_image="skip")
    assert images["path"].tolist() == [a, d]
    reasons = dict(zip(rejected["path"], rejected["reason"]))
    assert reasons[b] == f"duplicate of {a} [HDU 1]" and "no time keyword" in reasons[c]
    with pytest.raises(BadImageError, match=r"b_copy.fits \[HDU 1\]: the same image given twice"):
        index_images([a, b], site=SITE)
