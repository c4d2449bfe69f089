"""Header conventions against ZTF's documented keywords and product names.

ZTF (IPAC) science images carry CCDID (1..16), QID (1..4) and RCID, the readout-channel
(quadrant) id, documented as RCID = 4 (CCDID - 1) + QID - 1, 0..63 (ZTF Science Data
System Explanatory Supplement). The expected values below are the RCIDs a real header
carries for those CCDID/QID pairs, written out, not computed with the library's formula.
"""
import pytest
from astropy.io import fits

from skystack.survey.headers import detector_id, is_difference_image

#: (CCDID, QID, RCID) as ZTF headers carry them: the last quadrant of the last CCD, the
#: first quadrant of the first CCD, and CCD 5 quadrant 2.
ZTF_QUADRANTS = [(16, 4, 63), (1, 1, 0), (5, 2, 17), (1, 4, 3), (2, 1, 4), (9, 3, 34)]


def ztf_header(ccdid, qid, rcid=None):
    hdr = fits.Header()
    hdr["TELESCOP"] = "P48"
    hdr["OBSMJD"] = 58849.25
    hdr["CCDID"] = ccdid
    hdr["QID"] = qid
    if rcid is not None:
        hdr["RCID"] = rcid
    return hdr


@pytest.mark.parametrize("ccdid, qid, rcid", ZTF_QUADRANTS)
def test_detector_id_is_ztf_rcid_from_rcid_keyword(ccdid, qid, rcid):
    assert detector_id(ztf_header(ccdid, qid, rcid), hdu=1) == rcid


@pytest.mark.parametrize("ccdid, qid, rcid", ZTF_QUADRANTS)
def test_detector_id_is_ztf_rcid_from_ccdid_and_qid_alone(ccdid, qid, rcid):
    hdr = ztf_header(ccdid, qid)
    assert "RCID" not in hdr
    assert detector_id(hdr, hdu=1) == rcid


def test_detector_ids_of_all_ztf_quadrants_are_0_to_63_once():
    """64 quadrants, 64 distinct ids, in CCD-major order (CCD 1 q1..q4 = 0..3, ...)."""
    ids = [detector_id(ztf_header(c, q), hdu=0) for c in range(1, 17) for q in range(1, 5)]
    assert ids == list(range(64))


def test_detector_id_without_quadrants():
    """A plain CCDID (no QID) is the detector; with neither, the HDU number."""
    hdr = fits.Header()
    hdr["CCDID"] = 7
    assert detector_id(hdr, hdu=3) == 7
    assert detector_id(fits.Header(), hdu=3) == 3


@pytest.mark.parametrize("imagetyp, name, expected", [
    ("difference", "image.fits", True),
    ("DIFFERENCE", "image.fits", True),
    ("science", "image.fits", False),
    (None, "ztf_20200101123456_000123_zr_c05_o_q2_scimrefdiffimg.fits.fz", True),
    (None, "ztf_20200101123456_000123_zr_c05_o_q2_sciimg.fits", False),
    (None, "different_field.fits", False),  # "diff..." in a name is not a difference product
    (None, "deepDiff_differenceExp_HSC_I_1228_29.fits", True),
    (None, "calexp_HSC_I_1228_29.fits", False),
    ("science", "ztf_20200101123456_000123_zr_c05_o_q2_scimrefdiffimg.fits.fz", False),  # the header wins
    ("object", "ztf_20200101123456_000123_zr_c05_o_q2_scimrefdiffimg.fits.fz", True),  # says nothing: the name
])
def test_is_difference_image(imagetyp, name, expected):
    hdr = fits.Header()
    if imagetyp is not None:
        hdr["IMAGETYP"] = imagetyp
    assert is_difference_image(hdr, f"/data/survey/{name}") is expected


def test_directory_name_does_not_make_a_difference_image():
    """Only the file's own name counts: a science image in a 'diffexp' folder is not one."""
    assert is_difference_image(fits.Header(), "/data/diffexp_runs/ztf_20200101123456_000123_zr_c05_o_q2_sciimg.fits") is False
