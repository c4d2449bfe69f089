"""The image index: one row per usable image HDU, bad images refused or recorded with a reason.

Which keyword means what is data: the instrument conventions of ``survey/conventions.yaml``
(read by ``survey.conventions``), the site table of ``survey.sites``, and the config's
``survey.conventions`` / ``survey.sites`` / ``survey.ccd_tables``. Weight maps and masks
that are separate files are attached to their image (``aux_files``) and never indexed
as images themselves.

Zero points: a ``survey.ccd_tables`` row (legacypipe survey-ccds) wins over the header;
an image with neither is indexed with ``magzp`` NaN (logged): stages that need photometry
refuse it there (the catalog and the search treat a NaN zero point as 1 count per
nanomaggy), while time and site stay required here because the search needs them.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from ..astrometry.ephemeris import iers_offline
from ..core.units import DE421_JD_TDB, FWHM_PER_SIGMA
from . import conventions as cv
from .headers import (
    AUX_EXTNAMES,
    BadImageError,
    ImageHDURef,
    celestial_wcs,
    detector_id,
    is_difference_image,
    list_image_hdus,
    pixel_scale_arcsec,
    problem_kind,
)
from .pixels import bad_from_aux, clipped_stats, format_aux_files, psf_sigma_from_image
from .psf import estimate_psf
from .sites import SiteError, lookup_site, plain, resolve_site, site_table

log = logging.getLogger(__name__)


def expand_paths(patterns) -> list[str]:
    """Expand globs into a sorted, de-duplicated list of paths; error when one matches nothing.
    The paths may include links that lead nowhere (glob lists them): ``survey_files`` sorts
    those out."""
    out = []
    for pattern in patterns:
        hits = sorted(glob.glob(os.path.expandvars(os.path.expanduser(pattern))))
        if not hits:
            raise FileNotFoundError(f"survey path pattern matches no file: {pattern}")
        out.extend(hits)
    return sorted(dict.fromkeys(out))


def path_problem(path) -> str | None:
    """Why a path that a survey glob matched cannot be read as a file, or None: a dangling
    symbolic link, a symbolic link loop, a directory, or a file that cannot be read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        target = os.readlink(path) if os.path.islink(path) else None
        if target is not None:
            return f"dangling symbolic link (to {target}, which does not exist)"
        return "no such file (removed since the glob matched it)"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (following its links leads back to it)"
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a FITS file"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def survey_files(patterns) -> tuple[list[str], list[tuple[str, str]]]:
    """``survey.paths`` resolved: (the files, [(path, problem), ...] for the matched paths that
    are no readable file, by ``path_problem``)."""
    files, refused = [], []
    for path in expand_paths(patterns):
        problem = path_problem(path)
        if problem:
            refused.append((path, problem))
        else:
            files.append(path)
    return files, refused


# ----------------------------------------------------------------------------- context
@dataclass
class IndexContext:
    """What the index reads headers with: conventions, sites, CCD tables, default site."""

    conventions: list = field(default_factory=cv.load_conventions)
    sites: dict = field(default_factory=site_table)
    ccd_tables: cv.CcdTables = field(default_factory=cv.CcdTables)
    default_site: dict | None = None
    default_site_how: str = ""


def make_context(site=None, sites=None, conventions=None, ccd_tables=None) -> IndexContext:
    """The index context from the config's ``survey.site`` (a dict, or a site name / MPC
    code of the site table), ``survey.sites``, ``survey.conventions`` and ``survey.ccd_tables``."""
    table = site_table(sites)
    default, how = None, ""
    if isinstance(site, str):
        found = lookup_site(site, table)
        if found is None:
            raise ValueError(f"survey.site {site!r} is neither a site of the table ({', '.join(table)}), "
                             "a name it lists, nor an MPC code it knows; add it under survey.sites")
        default, how = plain(found[1]), f"config survey.site {site!r} ({found[0]})"
    elif site is not None:
        default, how = plain(site), "config survey.site"
    convs = cv.load_conventions(conventions)
    for conv in convs:
        if conv.get("site") and lookup_site(conv["site"], table) is None:
            raise ValueError(f"convention {conv['name']!r}: site {conv['site']!r} is not in the site table")
    return IndexContext(conventions=convs, sites=table, ccd_tables=cv.CcdTables(ccd_tables or []),
                        default_site=default, default_site_how=how)


# ----------------------------------------------------------------------------- header values
def _known_site(hdr, conv, ctx):
    if conv.get("site"):
        return lookup_site(conv["site"], ctx.sites)
    for key in ("OBSERVAT", "TELESCOP", "INSTRUME"):
        value = hdr.get(key)
        if value:
            found = lookup_site(value, ctx.sites)
            if found:
                return found
    return None


def header_values(hdr, path, hdu, conv, ctx: IndexContext, wcs_hdr=None) -> tuple[dict, list[str]]:
    """Time, site, band, exposure time and WCS of an image header, and its problems.

    Returns (values, problems): every problem is worded for a rejection reason; the values
    of a quantity with a problem are absent.
    """
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    problems: list[str] = []
    out: dict = {"convention": conv["name"], "how": {}}
    try:
        out["wcs"] = celestial_wcs(hdr if wcs_hdr is None else wcs_hdr, path, hdu)
    except BadImageError as err:
        problems.append(err.problem)
    try:
        out["band"], out["how"]["band"] = cv.read_band(hdr, conv)
    except cv.ConventionError as err:
        problems.append(str(err))
    site = None
    try:
        site, how = resolve_site(hdr, _known_site(hdr, conv, ctx), conv.get("lon_conventions") or None,
                                 float(conv.get("site_tolerance_km") or 5.0))
    except SiteError as err:
        problems.append(str(err))
    else:
        if site is None and ctx.default_site is not None:
            site, how = dict(ctx.default_site), ctx.default_site_how
        if site is None:
            problems.append("no site: the header has no site keywords (OBSGEO-X/Y/Z, OBSGEO-L/B/H, OBS-LAT/OBS-LONG, "
                            "LAT-OBS/LONG-OBS, SITELAT/SITELONG, ...), the instrument is not in the site table, "
                            "and config gives no survey.site")
        else:
            out["site"], out["how"]["site"] = site, how
    location = None
    if site is not None:
        location = EarthLocation.from_geodetic(site["lon_deg"] * u.deg, site["lat_deg"] * u.deg, site["height_m"] * u.m)
    try:
        exptime, exp_key = cv.exposure_time(hdr, conv)
    except cv.ConventionError as err:
        problems.append(f"exposure time: {err}")
        exptime, exp_key = None, ""
    if exptime is not None and not exptime > 0:
        problems.append(f"{exp_key} must be positive, got {hdr[exp_key]!r}")
    out["exptime"] = exptime
    try:
        time, how = cv.mid_exposure_time(hdr, conv, location)
    except cv.ConventionError as err:
        if not any(str(err) in p for p in problems):  # an unreadable EXPTIME is reported once
            problems.append(str(err))
    else:
        jd_tdb = float(time.tdb.jd1 + time.tdb.jd2)
        if not DE421_JD_TDB[0] <= jd_tdb <= DE421_JD_TDB[1]:
            problems.append(f"time {time.utc.isot} UTC is outside the DE421 ephemeris range (1899-07-29 to 2053-10-09)")
        else:
            out["time"], out["jd_tdb"], out["how"]["time"] = time, jd_tdb, how
    return out, problems


def read_header(path, hdu: int | None = None, *, site=None, sites=None, conventions=None, ccd_tables=None) -> dict:
    """What the index reads from one image header, without its pixels.

    Returns a dict: convention, band, mjd_mid_utc, jd_tdb_mid, site (lat/lon/height),
    exptime_s, magzp, gain, psf_fwhm_px (None without a PSF keyword), how (the keyword
    or rule behind each), problems (the reasons it would be refused for, if any) and wcs.
    ``hdu`` defaults to the file's first image HDU.
    """
    ctx = make_context(site, sites, conventions, ccd_tables)
    if hdu is None:
        hdu = list_image_hdus(path)[0].hdu
    with fits.open(path, memmap=False) as hdul:
        hdr = cv.merged_header(hdul, hdu)
        own = hdul[hdu].header.copy()
    conv = cv.find_convention(hdr, path, ctx.conventions)
    vals, problems = header_values(hdr, path, hdu, conv, ctx, own)
    reason = cv.refusal(conv, hdr)
    if reason:
        problems.insert(0, reason)
    try:
        zp, zp_how, gain, gain_how = _calibration(hdr, path, hdu, conv, ctx, vals.get("exptime"))
    except cv.ConventionError as err:
        problems.append(str(err))
        zp, zp_how, gain, gain_how = float("nan"), "", float("nan"), ""
    psf = cv.psf_fwhm_px(hdr, conv, pixel_scale_arcsec(vals["wcs"])) if "wcs" in vals else None
    return {"convention": conv["name"], "band": vals.get("band"),
            "mjd_mid_utc": float(vals["time"].utc.mjd) if "time" in vals else None,
            "jd_tdb_mid": vals.get("jd_tdb"), "site": vals.get("site"), "exptime_s": vals.get("exptime"),
            "magzp": zp, "gain": gain, "psf_fwhm_px": None if psf is None else psf[0],
            "how": {**vals["how"], "magzp": zp_how, "gain": gain_how, "psf": "" if psf is None else psf[1]},
            "problems": problems, "wcs": vals.get("wcs")}


def _zeropoint(hdr, path, hdu, conv, ctx, exptime):
    if ctx.ccd_tables:
        row = ctx.ccd_tables.lookup(path, hdu, str(hdr.get("EXTNAME", "") or ""))
        if row is not None:
            zp, how = cv.ccd_table_zeropoint(row, hdr, conv, exptime)
            if np.isfinite(zp):
                return zp, how
    return cv.read_zeropoint(hdr, conv, exptime)


def _calibration(hdr, path, hdu, conv, ctx, exptime):
    """(magzp, how, gain, how); a ConventionError for a keyword that is not a number."""
    magzp, zp_how = _zeropoint(hdr, path, hdu, conv, ctx, exptime)
    gain, gain_how = cv.read_gain(hdr, conv, exptime)
    return magzp, zp_how, gain, gain_how


def _saturation_level(hdr, path, hdu, per_s: bool, exptime) -> tuple[float, str]:
    """(saturation level in pixel units, inf when there is no SATURATE; provenance note)."""
    try:
        saturate = cv.header_number(hdr, "SATURATE")
    except cv.ConventionError as err:
        raise BadImageError(path, hdu, f"saturation level: {err}") from None
    if saturate is None:
        return np.inf, ""
    if per_s and np.isfinite(saturate) and exptime:
        return saturate / exptime, " (SATURATE / EXPTIME)"
    return saturate, ""


def _check_saturation(path, hdu, data, saturate, sat_note) -> None:
    """Refuse an image whose SATURATE marks most finite pixels saturated: a wrong level (the
    pixels left would give a biased sky and noise), as an all-bad image is refused."""
    finite = np.isfinite(data)
    n_sat = int((finite & (data >= saturate)).sum())
    if n_sat > 0.5 * finite.sum():
        raise BadImageError(path, hdu, f"saturation level: SATURATE = {saturate:g}{sat_note} marks {n_sat} of "
                            f"{int(finite.sum())} finite pixels saturated (more than half; median pixel "
                            f"{float(np.median(data[finite])):g}): fix or remove SATURATE",
                            kind="SATURATE masks most pixels")


def _warn_mostly_masked(path, hdu, aux_bad, aux) -> None:
    """Warn (not refuse: a half-vignetted detector is still usable) when the mask/weight marks
    most pixels bad, which may also be a wrong mask_bits."""
    if aux_bad is not None and aux_bad.sum() > 0.5 * aux_bad.size:
        kinds = ", ".join(k for k in aux if k in ("MASK", "WEIGHT", "INVVAR", "VARIANCE"))
        log.warning("%s [HDU %s]: the %s marks %d of %d pixels bad (more than half)", path, hdu, kinds,
                    int(aux_bad.sum()), aux_bad.size)


# ----------------------------------------------------------------------------- pixels
def _raw_frame_reason(hdr, nx, ny) -> str | None:
    """A raw frame: BIASSEC present and DATASEC covering only part of the array."""
    import re

    bias, datasec = str(hdr.get("BIASSEC", "") or "").strip(), str(hdr.get("DATASEC", "") or "").strip()
    m = re.match(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$", datasec)
    if not bias or not m:
        return None
    x1, x2, y1, y2 = map(int, m.groups())
    if abs(x2 - x1) + 1 < nx or abs(y2 - y1) + 1 < ny:
        return (f"raw frame: DATASEC {datasec} covers part of the {nx}x{ny} array and BIASSEC {bias} is an overscan "
                "(not bias-subtracted, not trimmed): index processed images")
    return None


def _aux_file_hdu(aux_path, extname, hdu) -> int:
    with fits.open(aux_path, memmap=False) as hdul:
        images = [i for i, h in enumerate(hdul)
                  if isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))
                  and h.header.get("ZNAXIS", h.header.get("NAXIS", 0)) == 2]
        if extname:
            named = [i for i in images if str(hdul[i].header.get("EXTNAME", "")).strip().upper() == extname.upper()]
            if named:
                return named[0]
        if hdu in images:
            return hdu
        if images:
            return images[0]
    raise ValueError(f"{aux_path} has no 2-D image HDU")


def _describe_hdu(ref: ImageHDURef, ctx, siblings: dict | None = None) -> dict:
    """One index row, or a BadImageError with the reason."""
    path, hdu = ref.path, ref.hdu
    with fits.open(path, memmap=False) as hdul:
        own = hdul[hdu].header
        hdr = cv.merged_header(hdul, hdu)
        conv = cv.find_convention(hdr, path, ctx.conventions)
        reason = cv.refusal(conv, hdr)
        if reason:
            raise BadImageError(path, hdu, reason, kind=f"not a survey image ({conv['name']})")
        if "NAXIS1" not in own or "NAXIS2" not in own:
            raise BadImageError(path, hdu, "missing NAXIS1/NAXIS2")
        nx, ny = int(own["NAXIS1"]), int(own["NAXIS2"])
        raw = _raw_frame_reason(hdr, nx, ny)
        if raw:
            raise BadImageError(path, hdu, raw)
        # Auxiliary data: extensions of this file, then the convention's sibling files.
        aux = {k: v for k, v in ref.aux.items() if k != "PSF"}
        aux_files = {}
        extname = str(own.get("EXTNAME", "") or "")
        for kind, aux_path in (siblings if siblings is not None else cv.sibling_aux_files(path, conv)).items():
            if kind in aux or (kind in ("WEIGHT", "INVVAR", "VARIANCE") and {"WEIGHT", "INVVAR", "VARIANCE"} & set(aux)):
                continue
            try:
                aux_files[kind] = (aux_path, _aux_file_hdu(aux_path, extname, hdu))
            except Exception as err:
                raise BadImageError(path, hdu, f"unreadable {kind.lower()} file {aux_path} ({err})") from err
        aux.update(aux_files)
        bits = -1
        if "MASK" in aux:
            if isinstance(aux["MASK"], tuple):
                with fits.open(aux["MASK"][0], memmap=False) as mh:
                    bits = cv.mask_bits(mh[aux["MASK"][1]].header, conv)
            else:
                bits = cv.mask_bits(hdul[aux["MASK"]].header, conv)
            if bits != -1:
                aux["MASK_BITS"] = bits
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", AstropyUserWarning)  # e.g. a damaged compressed tile
                warnings.filterwarnings("ignore", message=".*BLANK.*")  # BLANK in a float image: harmless
                data = np.asarray(hdul[hdu].data, dtype=np.float32)
                if data.shape != (ny, nx) and data.shape != (own.get("ZNAXIS2"), own.get("ZNAXIS1")):
                    raise BadImageError(path, hdu, f"pixel data shape {data.shape} does not match NAXIS1/NAXIS2")
                try:
                    aux_bad = bad_from_aux(hdul, aux, data.shape)
                except ValueError as err:
                    where = format_aux_files(aux_files) or ", ".join(
                        f"{k} extension HDU {v}" for k, v in aux.items() if k != "MASK_BITS" and not isinstance(v, tuple))
                    raise BadImageError(path, hdu, f"auxiliary data: {err} ({where})") from err
                variance = None
                for kind in ("VARIANCE", "INVVAR", "WEIGHT"):
                    if kind not in aux:
                        continue
                    where = aux[kind]
                    if isinstance(where, tuple):
                        with fits.open(where[0], memmap=False) as ah:
                            values = np.asarray(ah[where[1]].data, dtype=np.float64)
                    else:
                        values = np.asarray(hdul[where].data, dtype=np.float64)
                    if kind == "VARIANCE":
                        variance = values
                    else:
                        with np.errstate(divide="ignore"):
                            variance = 1.0 / values
                    break
                psf_image = np.asarray(hdul[ref.aux["PSF"]].data) if "PSF" in ref.aux else None
        except BadImageError:
            raise
        except Exception as err:
            raise BadImageError(path, hdu, f"unreadable pixel data, truncated or damaged ({err})") from err
        hdr = hdr.copy()
        own = own.copy()
    vals, problems = header_values(hdr, path, hdu, conv, ctx, own)
    if problems:
        raise BadImageError(path, hdu, "; ".join(problems), kind=problem_kind(problems[0]))
    wcs, site, time, jd_tdb, exptime = vals["wcs"], vals["site"], vals["time"], vals["jd_tdb"], vals["exptime"]
    try:
        magzp, zp_how, gain, gain_how = _calibration(hdr, path, hdu, conv, ctx, exptime)
    except cv.ConventionError as err:
        raise BadImageError(path, hdu, str(err)) from None
    per_s = cv.per_second_pixels(hdr, conv)
    saturate, sat_note = _saturation_level(hdr, path, hdu, per_s, exptime)
    _check_saturation(path, hdu, data, saturate, sat_note)
    bad = ~np.isfinite(data) | (data >= saturate)
    if aux_bad is not None:
        bad |= aux_bad
    if bad.all():
        n_aux = int(aux_bad.sum()) if aux_bad is not None else 0
        raise BadImageError(path, hdu, f"every pixel is NaN, masked or saturated ({int((~np.isfinite(data)).sum())} "
                            f"not finite, {n_aux} bad in the mask/weight "
                            f"{'(bits ' + hex(bits) + ') ' if bits not in (-1, 0) else ''}of {data.size}, "
                            f"{int((data >= saturate).sum())} saturated)")
    _warn_mostly_masked(path, hdu, aux_bad, aux)
    good = np.where(bad, np.nan, data)
    sky_level, noise_sigma = clipped_stats(good)
    if variance is not None:
        finite = variance[np.isfinite(variance) & (variance > 0) & ~bad]
        if finite.size:
            noise_sigma = float(np.sqrt(np.median(finite)))
    psf_source, n_psf_stars, psf_how = "keyword", 0, ""
    pixscale = pixel_scale_arcsec(wcs)
    fwhm = cv.psf_fwhm_px(hdr, conv, pixscale)
    try:
        calib = cv.calib_table_values(path, hdr, conv, vals["band"])
    except Exception as err:
        raise BadImageError(path, hdu, f"unreadable calibration table of the {conv['name']} convention ({err})") from err
    if psf_image is not None:
        psf_sigma_px, psf_source, psf_how = psf_sigma_from_image(psf_image), "extension", "PSF extension"
    elif fwhm is not None:
        psf_sigma_px, psf_how = fwhm[0] / FWHM_PER_SIGMA, fwhm[1]
    elif "psf_fwhm_arcsec" in calib:
        psf_sigma_px = calib["psf_fwhm_arcsec"] / pixscale / FWHM_PER_SIGMA
        psf_how = f"{Path(calib['file']).name} (arcsec FWHM)"
    else:
        keys = ", ".join(r["key"] for r in conv.get("psf") or []) or "none in this convention"
        psfex = cv.psfex_path(path, conv)
        try:
            res = estimate_psf(path, hdu, good, bad, wcs, psfex_path=psfex)
        except ValueError as err:
            tried = f", PSFEx model {psfex}" if psfex else ""
            raise BadImageError(path, hdu, f"no PSF: no usable PSF keyword ({keys}){tried}, and estimate_psf failed "
                                f"({err})") from err
        psf_sigma_px = float(res["psf_sigma_px"])
        psf_source, n_psf_stars = str(res.get("psf_source", "stars")), int(res.get("n_psf_stars", 0) or 0)
        psf_how = f"estimate_psf ({psf_source}{': ' + Path(psfex).name if psfex and psf_source == 'psfex' else ''})"
    if not (np.isfinite(noise_sigma) and noise_sigma > 0):
        raise BadImageError(path, hdu, f"noise estimate is {noise_sigma} (must be positive): constant image or bad variance map")
    if not (np.isfinite(psf_sigma_px) and psf_sigma_px > 0):
        raise BadImageError(path, hdu, f"PSF width is {psf_sigma_px} px (must be positive)")
    if gain_how.startswith("none") and "gain" in calib:
        gain, gain_how = calib["gain"], calib["gain_how"]
    corners = wcs.all_pix2world(np.array([[0, 0], [nx - 1, 0], [nx - 1, ny - 1], [0, ny - 1]], float), 0)
    centre = wcs.all_pix2world(np.array([[(nx - 1) / 2, (ny - 1) / 2]]), 0)[0]
    is_diff = is_difference_image(hdr, path)
    ccd = cv.first_int(hdr, conv.get("ccd"))
    how = vals["how"]
    provenance = "; ".join([
        f"time={how['time']}", f"site={how['site']}", f"band={how.get('band') or 'none (unknown)'}",
        f"magzp={zp_how or 'none (NaN: stages needing photometry refuse it)'}", f"gain={gain_how}",
        f"psf={psf_how}", *([f"saturate=SATURATE{sat_note}"] if sat_note else []),
        *([f"pixels per second (pixel_unit {conv.get('pixel_unit')}, BUNIT {hdr.get('BUNIT')!r})"] if per_s else [])])
    rec = {
        "path": str(path),
        "hdu": hdu,
        "_expid": cv.first_int(hdr, conv.get("expid")),
        "_conv": conv["name"],
        "ccd_id": ccd if ccd is not None else detector_id(hdr, hdu),
        "band": vals["band"],
        "mjd_mid_utc": float(time.utc.mjd),
        "jd_tdb_mid": jd_tdb,
        "exptime_s": float(exptime) if exptime is not None else float("nan"),
        "naxis1": nx,
        "naxis2": ny,
        "wcs_header": wcs.to_header_string(relax=True),
        "site_lat_deg": float(site["lat_deg"]),
        "site_lon_deg": float(site["lon_deg"]),
        "site_height_m": float(site["height_m"]),
        "psf_sigma_px": float(psf_sigma_px),
        "noise_sigma": noise_sigma,
        "sky_level": sky_level,
        "magzp": float(magzp),
        "gain": float(gain),
        "saturate": saturate,
        "is_difference": bool(is_diff),
        "has_psf_image": psf_image is not None,
        "ra_center_deg": float(centre[0]),
        "dec_center_deg": float(centre[1]),
        "corners_ra_deg": corners[:, 0].tolist(),
        "corners_dec_deg": corners[:, 1].tolist(),
        "_aux": {k: v for k, v in ref.aux.items()},
        "aux_files": format_aux_files(aux_files),
        "mask_bits": int(bits),
        "convention": conv["name"],
        "psf_source": psf_source,
        "n_psf_stars": int(n_psf_stars),
        "provenance": provenance,
    }
    rec["_content"] = _content_hash(data, rec)
    return rec


#: What makes two images the same observation besides their pixels: time, site and
#: calibration as the index read them (not header text: EXPTIME moves the mid-exposure time).
SAME_IMAGE_COLUMNS = ("mjd_mid_utc", "exptime_s", "site_lat_deg", "site_lon_deg", "site_height_m", "band", "magzp",
                      "gain", "saturate", "is_difference", "wcs_header")


def _content_hash(data: np.ndarray, rec: dict) -> str:
    """Same pixels, time, site, band, calibration and WCS: the same image, whatever the file name."""
    h = hashlib.sha1(np.ascontiguousarray(data).tobytes())
    for key in SAME_IMAGE_COLUMNS:
        h.update(f"|{key}={rec[key]!r}".encode())
    return h.hexdigest()


def _exposure_ids(rows: pd.DataFrame) -> np.ndarray:
    """Images taken at the same time from the same site share an exposure id.

    EXPID (or the convention's exposure-number keyword) is used when every image has one;
    otherwise the id is a stable hash of (time to 0.1 s, site, band, image type).
    """
    if rows["_expid"].notna().all():
        keys = [f"{e}|{d}" if c == "generic" else f"{c}:{e}|{d}"
                for e, d, c in zip(rows["_expid"], rows["is_difference"], rows["_conv"])]
    else:
        keys = [
            f"{round(m * 864000)}|{la:.4f}|{lo:.4f}|{b}|{d}"
            for m, la, lo, b, d in zip(rows["mjd_mid_utc"], rows["site_lat_deg"], rows["site_lon_deg"], rows["band"], rows["is_difference"])
        ]
    return np.array([int(hashlib.sha1(k.encode()).hexdigest()[:15], 16) for k in keys], dtype=np.int64)


REJECTED_COLUMNS = ["path", "hdu", "reason", "kind"]


class NoUsableImageError(ValueError):
    """No image could be indexed; ``rejected`` holds every file's reason."""

    def __init__(self, message, rejected: pd.DataFrame):
        super().__init__(message)
        self.rejected = rejected


def reason_counts(rejected: pd.DataFrame) -> str:
    """'6 no PSF, 3 not a survey image, ...' from a rejected table."""
    kinds = rejected["kind"] if "kind" in rejected else rejected["reason"].map(problem_kind)
    return ", ".join(f"{n} {k}" for k, n in Counter(kinds).most_common())


def _file_header(path):
    """(merged header of the first image HDU, HDU) or (None, None)."""
    try:
        with fits.open(path, memmap=False) as hdul:
            for i, h in enumerate(hdul):
                if (isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))
                        and h.header.get("ZNAXIS", h.header.get("NAXIS", 0)) == 2
                        and str(h.header.get("EXTNAME", "") or h.header.get("EXTTYPE", "")).strip().upper() not in AUX_EXTNAMES):
                    return cv.merged_header(hdul, i), i
    except Exception:  # noqa: BLE001 - unreadable files are refused, with the reason, by list_image_hdus
        return None, None
    return None, None


def index_survey(paths, site=None, on_bad_image: str = "error", progress=None, *, sites=None, conventions=None,
                 ccd_tables=None, refused=()):
    """Index images, deciding what to do with bad ones.

    Parameters
    ----------
    paths : iterable of str
        FITS files (plain or tile-compressed). Weight maps and masks among them are
        attached to their image, not indexed.
    site : dict or str, optional
        ``lat_deg``, ``lon_deg``, ``height_m`` (or a site-table name / MPC code) used when
        neither the header nor the site table gives a site.
    on_bad_image : {"error", "skip"}
        ``error`` raises on the first bad image; ``skip`` leaves it out and records it.
    progress : callable, optional
        Called with a message every few hundred files.
    sites, conventions, ccd_tables
        The config's ``survey.sites``, ``survey.conventions``, ``survey.ccd_tables``.
    refused : iterable of (path, problem)
        Paths the survey globs matched that are no readable file (``survey_files``): refused
        like bad images (an error, or recorded under ``skip``).

    Returns
    -------
    images : DataFrame
        One row per usable image HDU (columns per ``skystack.core.io.IMAGES``).
    rejected : DataFrame
        path, hdu (-1 for a whole file), reason, kind; duplicates and auxiliary files
        that belong to no indexed image are recorded here too.

    Raises
    ------
    NoUsableImageError
        When no image is usable (its ``rejected`` attribute holds every reason).
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"survey.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    ctx = make_context(site, sites, conventions, ccd_tables)
    refused = [(str(path), str(problem)) for path, problem in refused]
    records, rejected, seen = [], [], {}
    files = sorted(dict.fromkeys(map(str, paths)))
    # Which files are weight maps or masks, and which image each image's aux files are.
    aux_files, siblings = {}, {}
    for path in files:
        hdr, _ = _file_header(path)
        if hdr is None:
            continue
        conv = cv.find_convention(hdr, path, ctx.conventions)
        kind = cv.aux_kind(path, hdr, conv)
        if kind:
            aux_files[path] = (kind, conv["name"])
        else:
            siblings[path] = cv.sibling_aux_files(path, conv)
    claimed = {str(Path(p)): img for img, sib in siblings.items() for p in sib.values()}
    attached: set[str] = set()

    def refuse(path, hdu, err: BadImageError):
        if on_bad_image == "error":
            raise err
        rejected.append((path, hdu, err.problem, err.kind))

    for path, problem in refused:
        refuse(str(path), -1, BadImageError(path, None, problem))
    for k, path in enumerate(files, 1):
        if path in aux_files:
            continue
        try:
            refs = list_image_hdus(path)
        except BadImageError as err:
            refuse(path, -1, err)
            continue
        for ref in refs:
            try:
                with iers_offline():  # bundled IERS tables only: nothing is downloaded
                    rec = _describe_hdu(ref, ctx, siblings.get(path))
            except BadImageError as err:
                refuse(path, ref.hdu, err)
                continue
            except fits.VerifyError as err:  # a card the index reads that astropy cannot parse
                refuse(path, ref.hdu, _unparseable_card(path, ref.hdu, err))
                continue
            first = seen.setdefault(rec["_content"], (path, ref.hdu))
            if first != (path, ref.hdu):
                rejected.append((path, ref.hdu, f"duplicate of {first[0]} [HDU {first[1]}]", "duplicate"))
                continue
            records.append(rec)
            attached.update(str(Path(p)) for p in _aux_paths(rec["aux_files"]))
        if progress and k % 200 == 0:
            progress(f"indexed {k}/{len(files)} files")
    for path, (kind, conv_name) in aux_files.items():
        if str(Path(path)) in attached:
            continue
        image = claimed.get(str(Path(path)))
        problem = (f"auxiliary file ({kind} by the {conv_name} convention) of {image}, which was not indexed"
                   if image else f"auxiliary file ({kind} by the {conv_name} convention) that no image among the "
                                 "survey paths claims (is its image missing from survey.paths?)")
        refuse(path, -1, BadImageError(path, None, problem, kind="auxiliary file of no indexed image"))
    rejected_df = pd.DataFrame(rejected, columns=REJECTED_COLUMNS).astype({"hdu": "int64"})
    if not records:
        first = f"; first: {rejected[0][0]} [HDU {rejected[0][1]}]: {rejected[0][2]}" if rejected else ""
        raise NoUsableImageError(f"no usable image among {len(files) + len(refused)} file(s)"
                                 + (f": {reason_counts(rejected_df)}" if rejected else "") + first, rejected_df)
    return _finish_index(pd.DataFrame.from_records(records)), rejected_df


def _unparseable_card(path, hdu: int, err: Exception) -> BadImageError:
    """A rejection naming the card of astropy's 'Unparsable card (KEY)' and its text."""
    import re

    match = re.search(r"card \((.+?)\)", str(err))
    text = match.group(1) if match else "?"
    with contextlib.suppress(Exception), fits.open(path, memmap=False) as hdul:  # else the keyword alone
        text = " ".join(cv.merged_header(hdul, hdu).cards[text].image.split("/")[0].split())
    return BadImageError(path, hdu, f"unparseable header card {text} ({err})", kind="unparseable header card")


def _aux_paths(text) -> list[str]:
    from .pixels import parse_aux_files

    return [p for p, _ in parse_aux_files(text).values()]


def index_images(paths, site=None, **kwargs) -> pd.DataFrame:
    """One row per image HDU of the given files (columns per ``skystack.core.io.IMAGES``).

    Raises
    ------
    BadImageError
        Naming the file, HDU and problem, for the first image that cannot be used.
    """
    images, rejected = index_survey(paths, site, on_bad_image="error", **kwargs)
    if len(rejected):  # only duplicates reach here
        first = rejected.iloc[0]
        raise BadImageError(first["path"], first["hdu"], f"the same image given twice ({first['reason']})")
    return images


def _finish_index(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values(["mjd_mid_utc", "path", "hdu"], kind="stable").reset_index(drop=True)
    df.insert(0, "image_id", np.arange(len(df), dtype=np.int64))
    df.insert(3, "exposure_id", _exposure_ids(df))
    df["aux_hdus"] = [",".join(f"{k}={v}" for k, v in sorted(a.items())) for a in df["_aux"]]
    df = df.drop(columns=["_expid", "_conv", "_aux", "_content"])
    df["partition"] = np.zeros(len(df), dtype=np.int64)
    return df
