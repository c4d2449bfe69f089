"""Survey images: the generic header convention, the image index and partitions.

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

A ZTF adapter maps ZTF's own keywords (``OBSMJD``, ``SEEING``, ``CCDID``, ``QID``, ...) onto
the same fields.
"""
from __future__ import annotations

import glob
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.utils import iers
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning

iers.conf.auto_download = False

AUX_EXTNAMES = ("PSF", "VARIANCE", "INVVAR", "MASK")
DE421_JD_TDB = (2414864.5, 2471184.5)  # 1899-07-29 to 2053-10-09: the kernel's coverage
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
# Palomar 48-inch (ZTF); used by the ZTF adapter when a header gives no site.
PALOMAR_P48 = {"lat_deg": 33.3563, "lon_deg": -116.8650, "height_m": 1712.0}


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


def expand_paths(patterns) -> list[str]:
    """Expand globs into a sorted, de-duplicated list of files; error when one matches nothing."""
    out = []
    for pattern in patterns:
        hits = sorted(glob.glob(os.path.expandvars(os.path.expanduser(pattern))))
        if not hits:
            raise FileNotFoundError(f"survey path pattern matches no file: {pattern}")
        out.extend(hits)
    return sorted(dict.fromkeys(out))


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
        from astropy.coordinates import EarthLocation
        import astropy.units as u

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


def clipped_stats(data: np.ndarray, n_sigma: float = 3.0, n_iter: int = 5) -> tuple[float, float]:
    """Median and noise sigma (1.4826 MAD) with iterative sigma clipping of finite pixels."""
    values = data[np.isfinite(data)].astype(np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    for _ in range(n_iter):
        med = np.median(values)
        sigma = 1.4826 * np.median(np.abs(values - med))
        if not sigma > 0:
            break
        keep = np.abs(values - med) < n_sigma * sigma
        if keep.all():
            break
        values = values[keep]
    med = float(np.median(values))
    return med, float(1.4826 * np.median(np.abs(values - med)))


def psf_sigma_from_image(psf: np.ndarray) -> float:
    """Gaussian-equivalent sigma (px) of a pixelized PSF from its second moments."""
    psf = np.clip(np.asarray(psf, dtype=np.float64), 0.0, None)
    total = psf.sum()
    yy, xx = np.indices(psf.shape)
    xc, yc = (psf * xx).sum() / total, (psf * yy).sum() / total
    var = (psf * ((xx - xc) ** 2 + (yy - yc) ** 2)).sum() / total / 2.0
    return float(np.sqrt(var))


def read_pixels(path, hdu: int, aux: dict | None = None, saturate: float = np.inf) -> np.ndarray:
    """Image pixels as float32 with NaN where bad (MASK non-zero, saturated, non-finite)."""
    with fits.open(path, memmap=False) as hdul:
        data = np.asarray(hdul[hdu].data, dtype=np.float32)
        if aux and "MASK" in aux:
            data = np.where(np.asarray(hdul[aux["MASK"]].data) != 0, np.float32(np.nan), data)
    if np.isfinite(saturate):
        data = np.where(data >= saturate, np.float32(np.nan), data)
    return data


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
    site = _site_from_header(hdr) or (PALOMAR_P48 if _is_ztf(hdr) else default_site)
    if site is None:
        raise BadImageError(path, hdu, "no site: header has no OBSGEO-X/Y/Z or OBSGEO-L/B/H and config gives no survey.site")
    from astropy.coordinates import EarthLocation
    import astropy.units as u

    location = EarthLocation.from_geodetic(site["lon_deg"] * u.deg, site["lat_deg"] * u.deg, site["height_m"] * u.m)
    time = _mid_time(hdr, path, hdu, location)
    jd_tdb = float(time.tdb.jd1 + time.tdb.jd2)
    if not DE421_JD_TDB[0] <= jd_tdb <= DE421_JD_TDB[1]:
        raise BadImageError(path, hdu, f"time {time.utc.isot} UTC is outside the DE421 ephemeris range (1900 to 2050)")
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
    imagetyp = str(hdr.get("IMAGETYP", "")).lower()
    is_diff = imagetyp.startswith("diff") or "diff" in Path(path).name.lower()
    ccd_id = int(hdr.get("CCDID", 0)) * 4 + int(hdr.get("QID", 1)) - 1 if "CCDID" in hdr else hdu
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
        One row per usable image HDU (columns per ``skystack.io.IMAGES``).
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
    """One row per image HDU of the given files (columns per ``skystack.io.IMAGES``).

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


def aux_of(row) -> dict:
    """The auxiliary-extension map of an index row (``aux_hdus`` column)."""
    text = row["aux_hdus"] if "aux_hdus" in row else ""
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)


def assign_partitions(images: pd.DataFrame, n_partitions: int) -> np.ndarray:
    """Partition number per image: balanced by count (sizes differ by at most one), spatially
    coherent (recursive bisection of the image centres' unit vectors along the widest axis,
    so there is no RA wrap) and deterministic (ties broken by image_id)."""
    if n_partitions < 1:
        raise ValueError(f"number of partitions must be >= 1, got {n_partitions}")
    xyz = _unit_vectors(images["ra_center_deg"].to_numpy(), images["dec_center_deg"].to_numpy())
    ids = images["image_id"].to_numpy()
    part = np.empty(len(images), dtype=np.int64)

    def split(members: np.ndarray, first: int, n_parts: int) -> None:
        if n_parts == 1:
            part[members] = first
            return
        n_left_parts = n_parts // 2
        n_left = int(round(len(members) * n_left_parts / n_parts))
        pts = xyz[members]
        axis = int(np.argmax(pts.max(axis=0) - pts.min(axis=0))) if len(members) else 0
        order = members[np.lexsort((ids[members], pts[:, axis]))]
        split(order[:n_left], first, n_left_parts)
        split(order[n_left:], first + n_left_parts, n_parts - n_left_parts)

    split(np.arange(len(images)), 0, n_partitions)
    return part
