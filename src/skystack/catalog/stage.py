"""The catalog stage in the workflow: images from the index, candidates, regions, outputs.

The science lives in the rest of the package; this module connects it to the image index
(``images.parquet``) and writes the stage's tables.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.table import Table

from ..astrometry.astropy_wcs import astropy_world2pix_near
from ..core.io import atomic_path, write_parquet
from ..report.figures import catalog_figure
from ..survey.conventions import load_conventions, psfex_path
from ..survey.pixels import aux_of, read_pixels, read_variance
from ..survey.psf import psf_from_stars, psfex_model_of
from ..survey.stage import select_images, with_zero_point
from .data import ImageData
from .detect import detect_sources
from .fit import fit_region
from .regions import make_regions, region_neighbours

#: Columns an external candidate file must have (fluxes in nanomaggies).
CANDIDATE_COLUMNS = ("ra", "dec", "flux_r_nmgy")


def load_image(row) -> ImageData:
    """Pixels (NaN where masked or saturated), WCS, PSF (the ``PSF`` extension, else the PSFEx
    model or the image's own stars the index measured it on, else the indexed Gaussian width),
    the per-pixel variance of an attached weight or variance map, and the map of saturated
    pixels (raw value at or above the indexed ``saturate``)."""
    aux = aux_of(row)
    saturate = float(row["saturate"])
    pixels = read_pixels(row["path"], int(row["hdu"]), aux, saturate)
    variance, variance_has_sources = read_variance(row["path"], int(row["hdu"]), aux, pixels.shape)
    psf = image_psf(row, aux, pixels, saturate)
    saturated = None
    if np.isfinite(saturate) and np.isnan(pixels).any():
        with fits.open(row["path"], memmap=False) as hdul:
            raw = np.asarray(hdul[int(row["hdu"])].data, dtype=np.float32)
        saturated = raw >= saturate
    return ImageData.from_index_row(row, pixels, psf, variance, variance_has_sources, saturated=saturated)


def image_psf(row, aux: dict, pixels: np.ndarray, saturate: float):
    """The richest PSF the image has, for the catalog's mixture fit: the ``PSF`` extension; the
    PSFEx model shipped with the image by its convention's naming rule (a function of the
    position; used even where a FWHM keyword gave the index its width); the median stamp of the
    image's own stars when the index measured the PSF on them; else None (the indexed Gaussian
    width)."""
    if "PSF" in aux:
        return np.asarray(fits.getdata(row["path"], aux["PSF"]), dtype=float)
    conv = next((c for c in load_conventions() if c["name"] == row.get("convention")), None)
    where = psfex_path(row["path"], conv) if conv is not None else None
    if where is not None:
        model = psfex_model_of(row["path"], int(row["hdu"]), where)
        return lambda x_px, y_px: model.image_at(x_px, y_px)
    if str(row.get("psf_source", "keyword")) == "stars":
        return psf_from_stars(pixels, None, saturate=saturate)["image"]
    return None


def _unit(ra_deg, dec_deg) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1)


def images_overlapping(index: pd.DataFrame, ra_deg, dec_deg, margin_arcsec: float) -> pd.DataFrame:
    """Index rows of images within ``margin_arcsec`` of any of the given positions."""
    if len(index) == 0 or len(ra_deg) == 0:
        return index.iloc[:0]
    centre = _unit(index["ra_center_deg"].to_numpy(float), index["dec_center_deg"].to_numpy(float))
    corners = [(_unit(np.asarray(r, float), np.asarray(d, float)) @ c).min()
               for r, d, c in zip(index["corners_ra_deg"], index["corners_dec_deg"], centre)]
    radius_rad = np.arccos(np.clip(corners, -1, 1)) + np.radians(margin_arcsec / 3600.0)
    sep_cos = (centre @ _unit(np.asarray(ra_deg, float), np.asarray(dec_deg, float)).T).max(axis=1)
    return index[sep_cos >= np.cos(radius_rad)]


def read_candidates(path) -> pd.DataFrame:
    """An external candidate list (parquet, CSV or FITS table) with at least ra, dec, flux_r_nmgy."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix in (".fits", ".fit"):
            df = Table.read(path).to_pandas()
        else:
            df = pd.read_csv(path)
    except Exception as err:  # the reader's own message says what is wrong with the file
        raise ValueError(f"{path}: cannot read the candidate list: {err}") from None
    missing = [c for c in CANDIDATE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: candidate list lacks column(s) {missing}")
    bad = ~np.isfinite(df[list(CANDIDATE_COLUMNS)].to_numpy(float)).all(axis=1) | (df["dec"].abs() > 90)
    if bad.any():
        raise ValueError(f"{path}: rows {np.flatnonzero(bad)[:5].tolist()} have non-finite or impossible ra/dec/flux")
    return df.sort_values(["dec", "ra"], kind="stable").reset_index(drop=True)


def on_some_image(candidates: pd.DataFrame, index: pd.DataFrame) -> np.ndarray:
    """True for candidates inside the footprint of at least one image."""
    from ..astrometry.astropy_wcs import wcs_from_header_text

    inside = np.zeros(len(candidates), bool)
    ra, dec = candidates["ra"].to_numpy(float), candidates["dec"].to_numpy(float)
    for _, row in index.iterrows():
        w = wcs_from_header_text(row["wcs_header"])
        x, y = astropy_world2pix_near(w, ra, dec, (int(row["naxis2"]), int(row["naxis1"])))
        inside |= (x >= -0.5) & (x < row["naxis1"] - 0.5) & (y >= -0.5) & (y < row["naxis2"] - 0.5)
    return inside


def candidates_on_images(candidates: pd.DataFrame, index: pd.DataFrame, source: str, warn=None) -> pd.DataFrame:
    """The candidates that some science image covers; the others are left out, and said so.

    A list with no candidate on any image is an error that names ``source``.
    """
    inside = on_some_image(candidates, select_images(index, "science"))
    if len(candidates) and not inside.any():
        raise ValueError(f"{source}: none of the {len(candidates)} candidates lies on any science image "
                         "(check that the list and the survey cover the same sky)")
    if warn is not None and (~inside).any():
        rows = np.flatnonzero(~inside)
        warn(f"{source}: {len(rows)} of {len(candidates)} candidates lie outside every science image and are "
             f"left out (rows {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''})")
    return candidates[inside].reset_index(drop=True)


def plan_regions(candidates: pd.DataFrame, max_sources_per_region: int, n_regions: int | None = None):
    """Candidates with a ``region`` column (balanced by count) and the plan as a dict."""
    regions = make_regions(candidates, n_regions=n_regions, max_sources_per_region=max_sources_per_region)
    out = candidates.assign(region=regions)
    n = int(regions.max()) + 1 if len(regions) else 1
    counts = np.bincount(regions, minlength=n).tolist() if len(regions) else [0]
    return out, {"n_regions": n, "sources_per_region": counts}


def region_inputs(regions: pd.DataFrame, region: int, margin_arcsec: float):
    """The region's own sources, its halo (sources of other regions within ``margin_arcsec``,
    fitted with it but not reported) and the fixed ring beyond (within twice the margin, held at
    their starting values while the halo is fitted)."""
    if len(regions) == 0 or "region" not in regions:
        empty = regions.drop(columns="region", errors="ignore")
        return empty, empty, empty
    labels = regions["region"].to_numpy()
    cands = regions.drop(columns="region")
    halo = region_neighbours(cands, labels, region, margin_arcsec)
    ring = region_neighbours(cands, labels, region, 2.0 * margin_arcsec)
    return cands[labels == region], halo, ring.drop(index=halo.index)


def fit_all_regions(candidates: pd.DataFrame, images: list[ImageData], *, max_sources_per_region: int,
                    margin_arcsec: float = 15.0, priors=None, **fit_kw) -> pd.DataFrame:
    """Every region of ``candidates`` fitted one after another, each with its halo, as the
    workflow's ``fit_region`` jobs do; the regions' tables joined."""
    regions, plan = plan_regions(candidates.reset_index(drop=True), max_sources_per_region)
    parts = []
    fit_kw.setdefault("residual_trials_factor", plan["n_regions"])
    for r in range(plan["n_regions"]):
        mine, halo, ring = region_inputs(regions, r, margin_arcsec)
        parts.append(fit_region(mine, ring, images, priors, region=r, halo=halo, margin_arcsec=margin_arcsec, **fit_kw))
    return pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)


def write_catalog(catalog: pd.DataFrame, parquet_path, fits_path) -> None:
    """The merged catalog as parquet and as a FITS binary table (with units)."""
    write_parquet(catalog, parquet_path)
    table = Table.from_pandas(catalog.reset_index(drop=True))
    for name in table.colnames:
        if name in ("ra", "dec", "gal_angle_deg"):
            table[name].unit = "deg"
        elif name in ("ra_sd", "dec_sd", "gal_radius_arcsec"):
            table[name].unit = "arcsec"
        elif name.startswith("mag_") or name.startswith("color_"):
            table[name].unit = "mag"
    table.meta["EXTNAME"] = "CATALOG"
    table.meta["FLUXUNIT"] = "nanomaggy"  # *_nmgy columns; 1 nanomaggy is AB magnitude 22.5
    with atomic_path(fits_path) as tmp:
        table.write(tmp, format="fits")


def write_json(obj: dict, path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))


def detect_stage(images_path, candidates_out, *, source: str, candidates_path=None, thresh_sigma: float,
                 match_radius_arcsec: float, log: logging.Logger) -> pd.DataFrame:
    """``detect_sources``: candidates from sep on every science image, or from a file."""
    index = pd.read_parquet(images_path)
    if source == "file":
        candidates = candidates_on_images(read_candidates(candidates_path), index, candidates_path, warn=log.warning)
        log.info("%d candidates from %s", len(candidates), candidates_path)
    else:
        rows = with_zero_point(select_images(index, "science"), str(images_path), log)
        images = []
        for k, (_, row) in enumerate(rows.iterrows(), 1):
            images.append(load_image(row))
            if k % max(1, len(rows) // 10) == 0 or k == len(rows):
                log.info("loaded %d/%d science images", k, len(rows))
        candidates = detect_sources(images, thresh_sigma=thresh_sigma, match_radius_arcsec=match_radius_arcsec)
        log.info("%d candidates (%d likely stars) from %d science images in bands %s", len(candidates),
                 int(candidates["is_star"].sum()) if len(candidates) else 0, len(images), sorted(rows["band"].unique()))
    write_parquet(candidates, candidates_out)
    return candidates


def plan_regions_stage(candidates_path, regions_out, plan_out, *, max_sources_per_region: int,
                       log: logging.Logger) -> dict:
    """``plan_regions``: the candidates cut into regions balanced by count."""
    regions, plan = plan_regions(pd.read_parquet(candidates_path), max_sources_per_region)
    write_parquet(regions, regions_out)
    write_json(plan, plan_out)
    log.info("%d candidates in %d regions (sources per region %s)", len(regions), plan["n_regions"],
             plan["sources_per_region"])
    return plan


def fit_region_stage(regions_path, images_path, region: int, catalog_out, *, margin_arcsec: float, patch_px: int,
                     tol: float, max_iter: int, max_images: int, log: logging.Logger,
                     threads: int | None = None, detect_residuals: bool = True) -> pd.DataFrame:
    """``fit_region``: every source of one region fitted jointly to every overlapping science
    image, together with its halo of neighbours from other regions (the ring beyond held fixed).
    A region without sources (a survey without science images, a field without detections)
    gives an empty table. ``threads``: batches fitted side by side on a CPU (the rule's threads);
    ``detect_residuals``: search the fit's residuals for sources the detection missed."""
    all_regions = pd.read_parquet(regions_path)
    n_regions = int(all_regions["region"].max()) + 1 if len(all_regions) and "region" in all_regions else 1
    sources, halo, ring = region_inputs(all_regions, region, margin_arcsec)
    if len(sources) == 0:
        log.info("region %d: no sources; empty table", region)
        catalog = fit_region(sources, None, [])
        write_parquet(catalog, catalog_out)
        return catalog
    fitted = pd.concat([sources, halo], ignore_index=True)
    rows = images_overlapping(with_zero_point(select_images(pd.read_parquet(images_path), "science"),
                                              str(images_path), log),
                              fitted["ra"], fitted["dec"], margin_arcsec + patch_px)
    log.info("region %d: %d sources, %d halo neighbours fitted with them, %d fixed beyond, %d overlapping science "
             "images (all epochs and bands); %s thread(s)", region, len(sources), len(halo), len(ring), len(rows),
             threads or "all the process's")
    images = [load_image(row) for _, row in rows.iterrows()]
    t0 = time.time()
    catalog = fit_region(sources, ring, images, tol=tol, max_iter=max_iter, patch_px=patch_px,
                         max_images=max_images, region=region, progress=log.info, halo=halo, threads=threads,
                         detect_residuals=detect_residuals, residual_trials_factor=n_regions,
                         margin_arcsec=margin_arcsec)
    seconds = max(time.time() - t0, 1e-9)
    log.info("fitted %d sources (%d found in the residuals; +%d halo) in %.1f s (%.1f sources/s); %d not converged "
             "(flagged, kept); %d with residuals above the noise (fit_chi2 > 1.5: sds inflated, types tempered)",
             len(catalog), int(catalog["found_in_residuals"].sum()), len(halo), seconds,
             (len(catalog) + len(halo)) / seconds, int((~catalog["converged"].astype(bool)).sum()),
             int((catalog["fit_chi2"] > 1.5).sum()))
    write_parquet(catalog, catalog_out)
    return catalog


def merge_catalog_stage(region_paths, catalog_out, fits_out, figure_out, *, log: logging.Logger) -> pd.DataFrame:
    """``merge_catalog``: the regions' tables joined (parquet and FITS), with a figure."""
    parts = [pd.read_parquet(p) for p in region_paths]
    catalog = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
    catalog = catalog.sort_values(["dec", "ra"], kind="stable").reset_index(drop=True)
    catalog.insert(0, "source_id", range(len(catalog)))
    write_catalog(catalog, catalog_out, fits_out)
    catalog_figure(catalog, figure_out)
    log.info("catalog: %d sources from %d regions (%d stars with p_star >= 0.5, %d not converged)", len(catalog),
             len(parts), int((catalog["p_star"] >= 0.5).sum()), int((~catalog["converged"].astype(bool)).sum()))
    return catalog
