"""Atomic file output and the documented table schemas.

Every output is written to a temporary name beside its final path and renamed into
place when complete, so a killed job never leaves a finished-looking file. The temporary
name is ``.<name>.<8 random characters>.tmp<suffixes>`` (the tile cache adds ``.body``);
a job killed by SIGKILL cannot remove it, so the next writer of the same output does.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


def temporary_name_pattern(path) -> re.Pattern:
    """The names ``atomic_path`` gives the temporary files of ``path`` (and what writers add to
    them, such as the tile cache's ``.body``): ``.<name>.<8 characters of mkstemp>.tmp...``."""
    return re.compile(rf"\.{re.escape(Path(path).name)}\.[a-z0-9_]{{8}}\.tmp(\..*)?")


def remove_stale_temporaries(path) -> list[Path]:
    """Remove the temporary files (or directories) that killed writers of ``path`` left beside
    it, and return them. Only one job writes an output at a time (Snakemake's rule), so every
    such file is stale when its output is written again."""
    path = Path(path)
    pattern = temporary_name_pattern(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        stale = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    On an exception the temporary file (or directory) is removed and nothing
    appears at ``path``. Temporary files of ``path`` left by killed writers are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    unit: str
    doc: str


def _schema(*cols: tuple[str, str, str, str]) -> tuple[Column, ...]:
    return tuple(Column(*c) for c in cols)


# One row per image HDU: images.parquet, written by survey.stage.index_stage.
IMAGES = _schema(
    ("image_id", "int64", "", "row number in the sorted index, stable for a given set of files"),
    ("path", "str", "", "file path as given"),
    ("hdu", "int64", "", "HDU number in the file (0-based)"),
    ("exposure_id", "int64", "", "images of one exposure share it (same time and site)"),
    ("ccd_id", "int64", "", "detector (quadrant) number within the exposure, or HDU order"),
    ("band", "str", "", "band (u, g, r, i, z, y, ...; normalised from the filter keyword; 'unknown' when absent)"),
    ("mjd_mid_utc", "float64", "d", "mid-exposure time, MJD in UTC"),
    ("jd_tdb_mid", "float64", "d", "mid-exposure time, JD in TDB"),
    ("exptime_s", "float64", "s", "exposure time"),
    ("naxis1", "int64", "px", "image width (x, fastest axis)"),
    ("naxis2", "int64", "px", "image height (y)"),
    ("wcs_header", "str", "", "celestial WCS as FITS header text (TAN, TAN-SIP or TPV)"),
    ("site_lat_deg", "float64", "deg", "observatory geodetic latitude"),
    ("site_lon_deg", "float64", "deg", "observatory geodetic east longitude"),
    ("site_height_m", "float64", "m", "observatory height above the WGS84 ellipsoid"),
    ("psf_sigma_px", "float64", "px", "Gaussian sigma of the PSF"),
    ("noise_sigma", "float64", "adu", "per-pixel noise standard deviation"),
    ("sky_level", "float64", "adu", "median background level"),
    ("magzp", "float64", "mag", ("AB zero point of the pixel values: m = magzp - 2.5 log10(counts); NaN when "
                                 "neither the header nor survey.ccd_tables has one (stages needing photometry refuse it)")),
    ("gain", "float64", "e-/adu", "electrons per pixel unit (gain x EXPTIME for per-second pixels; 1.0 when unknown)"),
    ("saturate", "float64", "adu", "saturation level (inf when unknown)"),
    ("is_difference", "bool", "", "difference image (static sky removed)"),
    ("has_psf_image", "bool", "", "a pixelized PSF extension is present"),
    ("ra_center_deg", "float64", "deg", "ICRS right ascension of the image centre"),
    ("dec_center_deg", "float64", "deg", "ICRS declination of the image centre"),
    ("corners_ra_deg", "list<float64>", "deg", "RA of the 4 pixel-grid corners"),
    ("corners_dec_deg", "list<float64>", "deg", "Dec of the 4 pixel-grid corners"),
    ("aux_hdus", "str", "", "auxiliary extensions of the image, e.g. 'MASK=2,PSF=3'"),
    ("aux_files", "str", "", ("auxiliary files attached by the instrument's naming convention, e.g. "
                              "'MASK=/d/x_ood_r.fits[1],WEIGHT=/d/x_oow_r.fits[1]' (WEIGHT/INVVAR inverse variance, "
                              "VARIANCE, MASK)")),
    ("mask_bits", "int64", "", "bits of the attached mask that mark a bad pixel (-1: any non-zero)"),
    ("convention", "str", "", "header convention the image was read with (survey/conventions.yaml)"),
    ("psf_source", "str", "", "where psf_sigma_px comes from: keyword, extension, psfex or stars"),
    ("n_psf_stars", "int64", "", "stars the PSF was measured on (0 unless psf_source is stars)"),
    ("provenance", "str", "", ("the keyword or rule behind time, site, band, magzp, gain and PSF, e.g. "
                               "'time=MJD-OBS + EXPTIME/2 (UTC); site=OBS-LAT/OBS-LONG (west longitude) agrees with "
                               "ctio-blanco ...'")),
    ("partition", "int64", "", "tile-cache partition the image belongs to"),
)

_KIND = {"int64": "i", "float64": "f", "bool": "b"}


def check_schema(df: pd.DataFrame, schema: tuple[Column, ...], where: str) -> None:
    """Refuse a table that does not match its documented schema: a ValueError naming
    ``where``, the column and the problem (missing, or a dtype of the wrong kind)."""
    missing = [c.name for c in schema if c.name not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
    for col in schema:
        kind = _KIND.get(col.dtype)
        if kind is not None and df[col.name].dtype.kind != kind:
            raise ValueError(f"{where}: column {col.name} has dtype {df[col.name].dtype}, the schema says {col.dtype}")


def write_parquet(df: pd.DataFrame, path, schema: tuple[Column, ...] | None = None) -> None:
    """Write ``df`` to parquet atomically, checked against ``schema`` when one is given."""
    if schema is not None:
        check_schema(df, schema, str(path))
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_ecsv(df: pd.DataFrame, path) -> None:
    """Write ``df`` to ECSV atomically (astropy table)."""
    from astropy.table import Table

    with atomic_path(path) as tmp:
        Table.from_pandas(df).write(tmp, format="ascii.ecsv")
