"""The image index: one row per usable image HDU, bad images refused or recorded with a reason.

The header convention and the instrument adapters are in ``survey.headers``.
"""
from __future__ import annotations

import glob
import hashlib
import os
import warnings

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from ..astrometry.ephemeris import iers_offline
from ..core.units import DE421_JD_TDB, FWHM_PER_SIGMA, PALOMAR
from .headers import (
    BadImageError,
    ImageHDURef,
    _band,
    _is_ztf,
    _mid_time,
    _site_from_header,
    celestial_wcs,
    detector_id,
    is_difference_image,
    list_image_hdus,
    pixel_scale_arcsec,
)
from .pixels import clipped_stats, psf_sigma_from_image


def expand_paths(patterns) -> list[str]:
    """Expand globs into a sorted, de-duplicated list of files; error when one matches nothing."""
    out = []
    for pattern in patterns:
        hits = sorted(glob.glob(os.path.expandvars(os.path.expanduser(pattern))))
        if not hits:
            raise FileNotFoundError(f"survey path pattern matches no file: {pattern}")
        out.extend(hits)
    return sorted(dict.fromkeys(out))


def _describe_hdu(ref: ImageHDURef, default_site: dict | None) -> dict:
    path, hdu = ref.path, ref.hdu
    with fits.open(path, memmap=False) as hdul:
        hdr = hdul[hdu].header
        if "NAXIS1" not in hdr or "NAXIS2" not in hdr:
            raise BadImageError(path, hdu, "missing NAXIS1/NAXIS2")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", AstropyUserWarning)  # e.g. a damaged compressed tile
                data = np.asarray(hdul[hdu].data, dtype=np.float32)
                mask = np.asarray(hdul[ref.aux["MASK"]].data) != 0 if "MASK" in ref.aux else None
                variance = None
                if "VARIANCE" in ref.aux:
                    variance = np.asarray(hdul[ref.aux["VARIANCE"]].data, dtype=np.float64)
                elif "INVVAR" in ref.aux:
                    with np.errstate(divide="ignore"):
                        variance = 1.0 / np.asarray(hdul[ref.aux["INVVAR"]].data, dtype=np.float64)
                psf_image = np.asarray(hdul[ref.aux["PSF"]].data) if "PSF" in ref.aux else None
        except Exception as err:
            raise BadImageError(path, hdu, f"unreadable pixel data, truncated or damaged ({err})") from err
        if data.shape != (hdr["NAXIS2"], hdr["NAXIS1"]) and data.shape != (hdr.get("ZNAXIS2"), hdr.get("ZNAXIS1")):
            raise BadImageError(path, hdu, f"pixel data shape {data.shape} does not match NAXIS1/NAXIS2")
    wcs = celestial_wcs(hdr, path, hdu)
    site = _site_from_header(hdr) or (PALOMAR if _is_ztf(hdr) else default_site)
    if site is None:
        raise BadImageError(path, hdu, "no site: header has no OBSGEO-X/Y/Z or OBSGEO-L/B/H and config gives no survey.site")
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    location = EarthLocation.from_geodetic(site["lon_deg"] * u.deg, site["lat_deg"] * u.deg, site["height_m"] * u.m)
    time = _mid_time(hdr, path, hdu, location)
    jd_tdb = float(time.tdb.jd1 + time.tdb.jd2)
    if not DE421_JD_TDB[0] <= jd_tdb <= DE421_JD_TDB[1]:
        raise BadImageError(path, hdu, f"time {time.utc.isot} UTC is outside the DE421 ephemeris range (1899-07-29 to 2053-10-09)")
    exptime = float(hdr.get("EXPTIME", np.nan))
    if "EXPTIME" in hdr and not exptime > 0:
        raise BadImageError(path, hdu, f"EXPTIME must be positive, got {hdr['EXPTIME']!r}")
    saturate = float(hdr.get("SATURATE", np.inf))
    bad = ~np.isfinite(data) | (data >= saturate)
    if mask is not None:
        bad |= mask
    if bad.all():
        raise BadImageError(path, hdu, "every pixel is NaN, masked or saturated")
    good = np.where(bad, np.nan, data)
    sky_level, noise_sigma = clipped_stats(good)
    if variance is not None:
        finite = variance[np.isfinite(variance) & (variance > 0) & ~bad]
        if finite.size:
            noise_sigma = float(np.sqrt(np.median(finite)))
    if psf_image is not None:
        psf_sigma_px = psf_sigma_from_image(psf_image)
    elif "PSF_FWHM" in hdr:
        psf_sigma_px = float(hdr["PSF_FWHM"]) / FWHM_PER_SIGMA
    elif "SEEING" in hdr:
        psf_sigma_px = float(hdr["SEEING"]) / pixel_scale_arcsec(wcs) / FWHM_PER_SIGMA
    else:
        raise BadImageError(path, hdu, "no PSF: no PSF_FWHM, SEEING or PSF extension")
    if not (np.isfinite(noise_sigma) and noise_sigma > 0):
        raise BadImageError(path, hdu, f"noise estimate is {noise_sigma} (must be positive): constant image or bad variance map")
    if not (np.isfinite(psf_sigma_px) and psf_sigma_px > 0):
        raise BadImageError(path, hdu, f"PSF width is {psf_sigma_px} px (must be positive)")
    nx, ny = int(hdr["NAXIS1"]), int(hdr["NAXIS2"])
    corners = wcs.all_pix2world(np.array([[0, 0], [nx - 1, 0], [nx - 1, ny - 1], [0, ny - 1]], float), 0)
    centre = wcs.all_pix2world(np.array([[(nx - 1) / 2, (ny - 1) / 2]]), 0)[0]
    is_diff = is_difference_image(hdr, path)
    ccd_id = detector_id(hdr, hdu)
    return {
        "path": str(path),
        "hdu": hdu,
        "_expid": hdr.get("EXPID"),
        "ccd_id": ccd_id,
        "band": _band(hdr),
        "mjd_mid_utc": float(time.utc.mjd),
        "jd_tdb_mid": jd_tdb,
        "exptime_s": exptime,
        "naxis1": nx,
        "naxis2": ny,
        "wcs_header": wcs.to_header_string(relax=True),
        "site_lat_deg": float(site["lat_deg"]),
        "site_lon_deg": float(site["lon_deg"]),
        "site_height_m": float(site["height_m"]),
        "psf_sigma_px": psf_sigma_px,
        "noise_sigma": noise_sigma,
        "sky_level": sky_level,
        "magzp": float(hdr.get("MAGZP", np.nan)),
        "gain": float(hdr.get("GAIN", 1.0)),
        "saturate": saturate,
        "is_difference": bool(is_diff),
        "has_psf_image": psf_image is not None,
        "ra_center_deg": float(centre[0]),
        "dec_center_deg": float(centre[1]),
        "corners_ra_deg": corners[:, 0].tolist(),
        "corners_dec_deg": corners[:, 1].tolist(),
        "_aux": dict(ref.aux),
        "_content": _content_hash(data, hdr),
    }


def _content_hash(data: np.ndarray, hdr) -> str:
    """Same pixels and same time/filter/WCS keywords: the same image, whatever the file name."""
    h = hashlib.sha1(np.ascontiguousarray(data).tobytes())
    for key in ("MJD-OBS", "DATE-OBS", "MJD-AVG", "OBSMJD", "FILTER", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2"):
        h.update(f"{key}={hdr.get(key)}".encode())
    return h.hexdigest()


def _exposure_ids(rows: pd.DataFrame) -> np.ndarray:
    """Images taken at the same time from the same site share an exposure id.

    EXPID is used when every image has one; otherwise the id is a stable hash of
    (time to 0.1 s, site, band, image type).
    """
    if rows["_expid"].notna().all():
        keys = [f"{e}|{d}" for e, d in zip(rows["_expid"], rows["is_difference"])]
    else:
        keys = [
            f"{round(m * 864000)}|{la:.4f}|{lo:.4f}|{b}|{d}"
            for m, la, lo, b, d in zip(rows["mjd_mid_utc"], rows["site_lat_deg"], rows["site_lon_deg"], rows["band"], rows["is_difference"])
        ]
    return np.array([int(hashlib.sha1(k.encode()).hexdigest()[:15], 16) for k in keys], dtype=np.int64)


REJECTED_COLUMNS = ["path", "hdu", "reason"]


def index_survey(paths, site: dict | None = None, on_bad_image: str = "error", progress=None):
    """Index images, deciding what to do with bad ones.

    Parameters
    ----------
    paths : iterable of str
        FITS files (plain or tile-compressed).
    site : dict, optional
        ``lat_deg``, ``lon_deg``, ``height_m`` used when a header gives no site.
    on_bad_image : {"error", "skip"}
        ``error`` raises on the first bad image; ``skip`` leaves it out and records it.
    progress : callable, optional
        Called with a message every few hundred files.

    Returns
    -------
    images : DataFrame
        One row per usable image HDU (columns per ``skystack.core.io.IMAGES``).
    rejected : DataFrame
        path, hdu (-1 for a whole file), reason; duplicates are recorded here too.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"survey.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    records, rejected, seen = [], [], {}
    files = sorted(dict.fromkeys(map(str, paths)))
    for k, path in enumerate(files, 1):
        try:
            refs = list_image_hdus(path)
        except BadImageError as err:
            if on_bad_image == "error":
                raise
            rejected.append((path, -1, err.problem))
            continue
        for ref in refs:
            try:
                with iers_offline():  # bundled IERS tables only: nothing is downloaded
                    rec = _describe_hdu(ref, site)
            except BadImageError as err:
                if on_bad_image == "error":
                    raise
                rejected.append((path, ref.hdu, err.problem))
                continue
            first = seen.setdefault(rec["_content"], (path, ref.hdu))
            if first != (path, ref.hdu):
                rejected.append((path, ref.hdu, f"duplicate of {first[0]} [HDU {first[1]}]"))
                continue
            records.append(rec)
        if progress and k % 200 == 0:
            progress(f"indexed {k}/{len(files)} files")
    if not records:
        raise ValueError(f"no usable image among {len(files)} file(s)" + (f"; first problem: {rejected[0]}" if rejected else ""))
    return _finish_index(pd.DataFrame.from_records(records)), pd.DataFrame(rejected, columns=REJECTED_COLUMNS).astype({"hdu": "int64"})


def index_images(paths, site: dict | None = None) -> pd.DataFrame:
    """One row per image HDU of the given files (columns per ``skystack.core.io.IMAGES``).

    Raises
    ------
    BadImageError
        Naming the file, HDU and problem, for the first image that cannot be used.
    """
    images, rejected = index_survey(paths, site, on_bad_image="error")
    if len(rejected):  # only duplicates reach here
        first = rejected.iloc[0]
        raise BadImageError(first["path"], first["hdu"], f"the same image given twice ({first['reason']})")
    return images


def _finish_index(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values(["mjd_mid_utc", "path", "hdu"], kind="stable").reset_index(drop=True)
    df.insert(0, "image_id", np.arange(len(df), dtype=np.int64))
    df.insert(3, "exposure_id", _exposure_ids(df))
    df["aux_hdus"] = [",".join(f"{k}={v}" for k, v in sorted(a.items())) for a in df["_aux"]]
    df = df.drop(columns=["_expid", "_aux", "_content"])
    df["partition"] = np.zeros(len(df), dtype=np.int64)
    return df
