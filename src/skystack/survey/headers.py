"""Header conventions: what each keyword of a survey image means.

Generic header convention (one image per image HDU, plain or tile-compressed); the
``generic`` entry of ``survey/conventions.yaml`` says the same as data, and the other
entries there (DECam, Mosaic3, 90Prime, SDSS, Pan-STARRS1, HSC, imSim, ZTF, and the
refused kinds: TESS, Kepler, JWST, HST, PANOPTES, resampled stamps) say how real
instruments differ from it:

- the header of an extension is read with its primary's cards added (``INHERIT = T``, or
  an empty primary as in every NOIRLab Community Pipeline file; otherwise only the time,
  site, band and identity keywords); extension cards win, and WCS keywords never inherit;
- celestial WCS that astropy reads (TAN, TAN-SIP, TPV);
- time: ``MJD-AVG``/``DATE-AVG`` (mid-exposure) if present, else ``MJD-OBS``/``DATE-OBS``
  (start) plus ``EXPTIME``/2; ``TIMESYS`` UTC (default; 'UTC approximate' too), TAI or TT;
  a date-only ``DATE-OBS`` takes its time of day from ``TIME-OBS``/``UT``;
- site: ``OBSGEO-X/Y/Z`` (m) or ``OBSGEO-L/B/H`` (deg, deg, m), or any spelling of
  ``survey.sites.SITE_KEYWORDS``, checked against the site table where the instrument's
  site is known; else the known site; else the site given in config;
- ``FILTER`` (normalised: ``conventions.normalise_band``), ``MAGZP``/``MAGZERO``/
  ``PHOTZP``/``FLUXMAG0``, ``GAIN``, ``SATURATE``;
- PSF: ``PSF_FWHM`` (px) or ``SEEING`` (arcsec FWHM), or an extension ``PSF`` holding a
  centred pixelized PSF;
- optional extensions ``VARIANCE``, ``INVVAR``/``WEIGHT``, and ``MASK`` (non-zero = bad;
  LSST masks: the bad planes of their ``MP_*`` keywords), named by ``EXTNAME`` or
  ``EXTTYPE``, which belong to the image HDU before them; separate weight-map and mask
  files found by the instrument's naming rule (``_ooi_`` -> ``_oow_``/``_ood_``);
- optional ``EXPID`` (exposure), ``CCDID``/``QID`` (detector), ``IMAGETYP`` (``difference``
  marks a difference image).

A file is also taken as a difference image when its name carries a pipeline's difference
product marker (``DIFFERENCE_NAME_MARKERS``: ZTF's ``scimrefdiffimg``, the LSST Science
Pipelines' ``differenceExp``/``diffexp``), since those products do not always set IMAGETYP.

ZTF's keywords (``OBSMJD``, ``SEEING``, ``CCDID``, ``QID``, ``RCID``, ...) are its entry in
the table; ZTF's quadrant (readout channel) id is ``RCID = 4 (CCDID - 1) + QID - 1``, 0 to 63.
"""
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

AUX_EXTNAMES = ("PSF", "VARIANCE", "INVVAR", "WEIGHT", "MASK")


def problem_kind(problem: str) -> str:
    """A short label of a problem for counting ('no PSF', 'no celestial WCS', ...)."""
    text = str(problem).strip()
    if text.startswith("duplicate of"):
        return "duplicate"
    if "outside the DE421 ephemeris range" in text:
        return "time outside DE421"
    return re.split(r"[:(;,]", text, maxsplit=1)[0].strip() or text


class BadImageError(ValueError):
    """An image that cannot be used, with the file, HDU and problem in its message."""

    def __init__(self, path, hdu, problem: str, kind: str | None = None):
        self.path, self.hdu, self.problem = str(path), hdu, problem
        self.kind = kind or problem_kind(problem)
        where = f"{path}" if hdu is None else f"{path} [HDU {hdu}]"
        super().__init__(f"{where}: {problem}")


@dataclass
class ImageHDURef:
    """Where an image and its auxiliary extensions live in a file."""

    path: str
    hdu: int
    aux: dict  # EXTNAME -> HDU number


def _hdu_role(hdu) -> str:
    """EXTNAME, else EXTTYPE (the LSST Science Pipelines' name for IMAGE/MASK/VARIANCE)."""
    return str(hdu.header.get("EXTNAME", "") or hdu.header.get("EXTTYPE", "")).strip().upper()


def _no_image_reason(hdul) -> str:
    """Why a file has no 2-D image HDU, as specifically as its HDUs tell."""
    for i, hdu in enumerate(hdul):
        if isinstance(hdu, (fits.ImageHDU, fits.CompImageHDU)) and int(hdu.header.get("NAXIS", 0) or 0) == 0:
            name = _hdu_role(hdu) or f"HDU {i}"
            return f"no 2-D image HDU: header only, no pixel data ({name} has NAXIS = 0)"
    if all(int(h.header.get("NAXIS", 0) or 0) == 0 for h in hdul):
        return "no 2-D image HDU: header only, no pixel data or table in any HDU"
    columns = set()
    for hdu in hdul:
        if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
            columns.update(c.lower() for c in hdu.columns.names)
    if not columns:
        return "no 2-D image HDU"
    if "psf_mask" in columns:
        what = "a PSFEx PSF model"
    elif "ccdzpt" in columns or "image_filename" in columns:
        what = "a survey-ccds table"
    elif "gridvals" in columns:
        what = "a sky model"
    elif {"ra", "dec"} <= columns or {"ra", "dec"} <= {c.rstrip("_") for c in columns}:
        what = "a catalog"
    else:
        what = "a table file"
    return f"no 2-D image HDU: tables only ({what}, not an image)"


def list_image_hdus(path) -> list[ImageHDURef]:
    """The image HDUs of a FITS file, each with its auxiliary extensions."""
    try:
        hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except Exception as err:  # astropy raises several types for non-FITS / truncated files
        raise BadImageError(path, None, f"not a readable FITS file ({err})") from err
    refs: list[ImageHDURef] = []
    with hdul:
        for i, hdu in enumerate(hdul):
            role = _hdu_role(hdu)
            is_image = isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))
            naxis = hdu.header.get("ZNAXIS", hdu.header.get("NAXIS", 0))
            if not is_image or naxis != 2:
                continue
            if role in AUX_EXTNAMES:
                if refs:
                    refs[-1].aux[role] = i
                continue
            refs.append(ImageHDURef(str(path), i, {}))
        if not refs:
            raise BadImageError(path, None, _no_image_reason(hdul))
    return refs


#: Numeric WCS cards: reference value/pixel, increments, rotation, CD/PC matrix (also the
#: old PC001001 form), projection parameters and SIP coefficients.
WCS_NUMBER_CARD = re.compile(r"^(?:(?:CRVAL|CRPIX|CDELT|CROTA)\d+[A-Z]?|(?:CD|PC|PV)\d+_\d+[A-Z]?|(?:PC|CD)\d{6}"
                             r"|(?:A|B|AP|BP)_\d+_\d+)$")
#: wcslib's words for a card it could not parse and dropped (it then uses a default: CRVAL 0,
#: PC 1, CDELT 1 deg, silently wrong positions).
WCSLIB_DROPPED = re.compile(r"value was expected|a record was expected|invalid keyvalue|invalid record|invalid PROJPn")


def bad_wcs_cards(hdr) -> list[str]:
    """The numeric WCS cards of a header whose value is unparseable, not a number, or not
    finite, each as its card text (``CRVAL1 = NAN``)."""
    bad = []
    for card in hdr.cards:
        if not WCS_NUMBER_CARD.match(card.keyword):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # astropy's VerifyWarning for the same card
                value = card.value
        except fits.VerifyError:
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            text = repr(value.strip()) if isinstance(value, str) else repr(value)
            bad.append(" ".join(card.image.split("/")[0].split()) if value is None else f"{card.keyword} = {text}")
    return bad


def celestial_wcs(hdr, path, hdu) -> WCS:
    """The celestial WCS of a header, or a BadImageError saying what is wrong."""
    bad = bad_wcs_cards(hdr)
    if bad:
        raise BadImageError(path, hdu, f"unusable WCS card(s) {'; '.join(bad)} (not a finite number)",
                            kind="unusable WCS card")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FITSFixedWarning)
        try:
            wcs = WCS(hdr, naxis=2, relax=True)
        except Exception as err:
            raise BadImageError(path, hdu, f"unreadable WCS ({err})") from err
    dropped = [" ".join(str(w.message).split()) for w in caught
               if issubclass(w.category, FITSFixedWarning) and WCSLIB_DROPPED.search(str(w.message))]
    for w in caught:  # only astropy.wcs's own notes are judged here; pass the others on
        if not issubclass(w.category, FITSFixedWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if dropped:
        raise BadImageError(path, hdu, f"unusable WCS card(s): astropy.wcs dropped {'; '.join(dropped)}",
                            kind="unusable WCS card")
    if not wcs.has_celestial or wcs.wcs.ctype[0] == "":
        raise BadImageError(path, hdu, "no celestial WCS (CTYPE1/2 RA---TAN/DEC--TAN or similar)")
    cd = wcs.pixel_scale_matrix
    if not np.all(np.isfinite(cd)) or abs(np.linalg.det(cd)) < 1e-20:
        raise BadImageError(path, hdu, "singular WCS (CD/PC matrix has zero determinant)")
    return wcs


def pixel_scale_arcsec(wcs: WCS) -> float:
    """Mean pixel scale in arcsec per pixel."""
    return float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)


#: File-name markers of difference-image products: ZTF (IPAC) ``*_scimrefdiffimg.fits.fz``,
#: LSST Science Pipelines ``deepDiff_differenceExp`` / ``diffexp`` datasets.
DIFFERENCE_NAME_MARKERS = ("scimrefdiffimg", "differenceexp", "diffexp")


def is_difference_image(hdr, path) -> bool:
    """True for a difference image: ``IMAGETYP`` starting with "diff", or a file name with one
    of ``DIFFERENCE_NAME_MARKERS``. The header wins: ``IMAGETYP = 'science'`` is a science
    image whatever the file is called (an observation type such as 'object' says nothing
    either way, so the name decides)."""
    image_type = str(hdr.get("IMAGETYP", "")).strip().lower()
    if image_type.startswith("diff"):
        return True
    if image_type in ("science", "sci"):
        return False
    name = Path(path).name.lower()
    return any(marker in name for marker in DIFFERENCE_NAME_MARKERS)


def _integer(hdr, key):
    """A header value as an int, or None when absent or not an integer (a name such as LSST's
    CCDID = 'R22_S00_C00' is no detector number)."""
    value = hdr.get(key)
    try:
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        return None


def detector_id(hdr, hdu: int) -> int:
    """Detector number within the exposure: ZTF's quadrant id (``RCID``, or
    ``4 (CCDID - 1) + QID - 1`` from the 1-based CCD and quadrant numbers), a plain
    ``CCDID`` where there are no quadrants, else the HDU number."""
    rcid, ccdid, qid = (_integer(hdr, k) for k in ("RCID", "CCDID", "QID"))
    if rcid is not None:
        return rcid
    if ccdid is not None and qid is not None:
        return 4 * (ccdid - 1) + qid - 1
    if ccdid is not None:
        return ccdid
    return int(hdu)
