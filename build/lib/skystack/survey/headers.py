"""Header conventions: what each keyword of a survey image means.

Header convention (one image per image HDU, plain or tile-compressed):

- celestial WCS that astropy reads (TAN, TAN-SIP);
- time: ``MJD-AVG``/``DATE-AVG`` (mid-exposure) if present, else ``MJD-OBS``/``DATE-OBS``
  (start) plus ``EXPTIME``/2; ``TIMESYS`` UTC (default), TAI or TT;
- site: ``OBSGEO-X/Y/Z`` (m) or ``OBSGEO-L/B/H`` (deg, deg, m), else the site given in config;
- ``FILTER``, ``MAGZP``, ``GAIN``, ``SATURATE``;
- PSF: ``PSF_FWHM`` (px) or ``SEEING`` (arcsec FWHM), or an extension ``PSF`` holding a
  centred pixelized PSF;
- optional extensions ``VARIANCE`` or ``INVVAR``, and ``MASK`` (non-zero = bad), which
  belong to the image HDU before them;
- optional ``EXPID`` (exposure), ``CCDID``/``QID`` (detector), ``IMAGETYP`` (``difference``
  marks a difference image).

A file is also taken as a difference image when its name carries a pipeline's difference
product marker (``DIFFERENCE_NAME_MARKERS``: ZTF's ``scimrefdiffimg``, the LSST Science
Pipelines' ``differenceExp``/``diffexp``), since those products do not always set IMAGETYP.

A ZTF adapter maps ZTF's own keywords (``OBSMJD``, ``SEEING``, ``CCDID``, ``QID``, ``RCID``,
...) onto the same fields; ZTF's quadrant (readout channel) id is
``RCID = 4 (CCDID - 1) + QID - 1``, 0 to 63.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

AUX_EXTNAMES = ("PSF", "VARIANCE", "INVVAR", "MASK")


class BadImageError(ValueError):
    """An image that cannot be used, with the file, HDU and problem in its message."""

    def __init__(self, path, hdu, problem: str):
        self.path, self.hdu, self.problem = str(path), hdu, problem
        where = f"{path}" if hdu is None else f"{path} [HDU {hdu}]"
        super().__init__(f"{where}: {problem}")


@dataclass
class ImageHDURef:
    """Where an image and its auxiliary extensions live in a file."""

    path: str
    hdu: int
    aux: dict  # EXTNAME -> HDU number


def list_image_hdus(path) -> list[ImageHDURef]:
    """The image HDUs of a FITS file, each with its auxiliary extensions."""
    try:
        hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except Exception as err:  # astropy raises several types for non-FITS / truncated files
        raise BadImageError(path, None, f"not a readable FITS file ({err})") from err
    refs: list[ImageHDURef] = []
    with hdul:
        for i, hdu in enumerate(hdul):
            extname = str(hdu.header.get("EXTNAME", "")).upper()
            is_image = isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))
            naxis = hdu.header.get("ZNAXIS", hdu.header.get("NAXIS", 0))
            if not is_image or naxis != 2:
                continue
            if extname in AUX_EXTNAMES:
                if refs:
                    refs[-1].aux[extname] = i
                continue
            refs.append(ImageHDURef(str(path), i, {}))
    if not refs:
        raise BadImageError(path, None, "no 2-D image HDU")
    return refs


def _site_from_header(hdr) -> dict | None:
    if all(k in hdr for k in ("OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z")):
        import astropy.units as u
        from astropy.coordinates import EarthLocation

        loc = EarthLocation.from_geocentric(hdr["OBSGEO-X"], hdr["OBSGEO-Y"], hdr["OBSGEO-Z"], unit=u.m)
        geo = loc.to_geodetic("WGS84")
        return {"lat_deg": float(geo.lat.deg), "lon_deg": float(geo.lon.deg), "height_m": float(geo.height.to_value(u.m))}
    if all(k in hdr for k in ("OBSGEO-L", "OBSGEO-B", "OBSGEO-H")):
        return {"lat_deg": float(hdr["OBSGEO-B"]), "lon_deg": float(hdr["OBSGEO-L"]), "height_m": float(hdr["OBSGEO-H"])}
    return None


def _is_ztf(hdr) -> bool:
    return "OBSMJD" in hdr or str(hdr.get("TELESCOP", "")).upper().startswith("P48")


def _mid_time(hdr, path, hdu, location=None):
    """Mid-exposure astropy Time from the header (generic convention, then ZTF)."""
    from functools import partial

    from astropy.time import Time as _Time

    Time = partial(_Time, location=location)

    scale = str(hdr.get("TIMESYS", "UTC")).strip().lower()
    if scale not in ("utc", "tai", "tt"):
        raise BadImageError(path, hdu, f"unsupported TIMESYS {hdr.get('TIMESYS')!r} (UTC, TAI or TT)")
    exptime = float(hdr.get("EXPTIME", 0.0) or 0.0)
    try:
        if "MJD-AVG" in hdr:
            return Time(float(hdr["MJD-AVG"]), format="mjd", scale=scale)
        if "DATE-AVG" in hdr:
            return Time(str(hdr["DATE-AVG"]), format="isot", scale=scale)
        if "MJD-OBS" in hdr:
            start = Time(float(hdr["MJD-OBS"]), format="mjd", scale=scale)
        elif "DATE-OBS" in hdr:
            start = Time(str(hdr["DATE-OBS"]), format="isot", scale=scale)
        elif "OBSMJD" in hdr:  # ZTF: start of exposure, UTC
            start = Time(float(hdr["OBSMJD"]), format="mjd", scale="utc")
        else:
            raise BadImageError(path, hdu, "no time keyword (MJD-AVG, DATE-AVG, MJD-OBS, DATE-OBS or OBSMJD)")
    except BadImageError:
        raise
    except Exception as err:
        raise BadImageError(path, hdu, f"unparseable time keyword ({err})") from err
    from astropy import units as u

    return start + (exptime / 2.0) * u.s


def _band(hdr) -> str:
    band = str(hdr.get("FILTER", hdr.get("FILTERID", "unknown"))).strip()
    if band.upper().startswith("ZTF_"):
        band = band[4:]
    return band


def celestial_wcs(hdr, path, hdu) -> WCS:
    """The celestial WCS of a header, or a BadImageError saying what is wrong."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(hdr, naxis=2, relax=True)
        except Exception as err:
            raise BadImageError(path, hdu, f"unreadable WCS ({err})") from err
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
    of ``DIFFERENCE_NAME_MARKERS``."""
    if str(hdr.get("IMAGETYP", "")).strip().lower().startswith("diff"):
        return True
    name = Path(path).name.lower()
    return any(marker in name for marker in DIFFERENCE_NAME_MARKERS)


def detector_id(hdr, hdu: int) -> int:
    """Detector number within the exposure: ZTF's quadrant id (``RCID``, or
    ``4 (CCDID - 1) + QID - 1`` from the 1-based CCD and quadrant numbers), a plain
    ``CCDID`` where there are no quadrants, else the HDU number."""
    if "RCID" in hdr:
        return int(hdr["RCID"])
    if "CCDID" in hdr and "QID" in hdr:
        return 4 * (int(hdr["CCDID"]) - 1) + int(hdr["QID"]) - 1
    if "CCDID" in hdr:
        return int(hdr["CCDID"])
    return int(hdu)
