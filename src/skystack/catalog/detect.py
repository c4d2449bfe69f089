"""Candidate sources: SExtractor-style extraction on every image, merged across images.

Each science image is background-subtracted and thresholded with sep; detections get a
windowed centroid, Kron (AUTO) flux and half-light radius. Detections of all epochs and
bands are merged into unique sources by friends-of-friends within ``match_radius_arcsec``
on the sky. Per source: a position (inverse-variance weighted mean), per-band fluxes in
nanomaggies (median over detections), a star/galaxy guess from the half-light radius
against the PSF's, and a rough galaxy shape, all of which seed the Bayesian fit.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import sep
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..core.units import FWHM_PER_SIGMA
from .data import ImageData, pixel_to_sky, sky_to_pixel_jacobian
from .priors import MAG_TO_LN, NMGY_ZERO_MAG, color_names, sort_bands

GAUSS_R50_PER_SIGMA = 1.1774  # half-light radius of a circular Gaussian, in sigmas
KRON_FACTOR = 2.5
MIN_KRON_RADIUS = 3.5


def saturated_regions(mask: np.ndarray, saturated: np.ndarray | None) -> np.ndarray:
    """The masked pixels that belong to a saturated source: every connected region of the
    bad-pixel mask (8-connected) that holds at least one saturated pixel (the saturated core,
    its bleed trail and the pixels the pipeline masked or interpolated around them)."""
    if saturated is None or not (saturated & mask).any():
        return np.zeros(mask.shape, bool)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    hit = np.unique(labels[saturated & mask])
    return np.isin(labels, hit[hit > 0])


def _background(image: ImageData, global_rms: bool = False):
    """Background-subtracted pixels (C-contiguous float32), the noise rms (map, or the
    global scalar), and the bad-pixel mask."""
    data = np.ascontiguousarray(image.pixels, dtype=np.float32)
    mask = ~np.isfinite(data)
    filled = np.where(mask, np.nanmedian(data), data).astype(np.float32)
    if image.sky_subtracted:
        rms = np.sqrt(image.variance_map()).astype(np.float32)
        return np.ascontiguousarray(np.where(mask, 0.0, filled), dtype=np.float32), np.ascontiguousarray(rms), mask
    bkg = sep.Background(filled, mask=mask)
    sub = filled - bkg.back()
    sub[mask] = 0.0
    rms = np.float32(bkg.globalrms) if global_rms else np.ascontiguousarray(bkg.rms(), dtype=np.float32)
    return np.ascontiguousarray(sub, dtype=np.float32), rms, mask


def _pieces_of_saturated_sources(seg: np.ndarray, sat: np.ndarray, n_objects: int) -> np.ndarray:
    """For each detected object, the saturated region (label > 0) its segment touches most,
    else 0: the pieces of one saturated source's halo that its masked core and bleed trail
    cut apart."""
    regions, _ = ndimage.label(sat, structure=np.ones((3, 3), bool))
    reach = ndimage.grey_dilation(regions, footprint=np.ones((3, 3), bool))  # one pixel around each region
    out = np.zeros(n_objects, np.int64)
    touched = (seg > 0) & (reach > 0)
    for k in range(n_objects):
        near = reach[touched & (seg == k + 1)]
        if near.size:
            out[k] = np.bincount(near).argmax()
    return out


def _merge_pieces(df: pd.DataFrame, region: np.ndarray) -> pd.DataFrame:
    """One detection per saturated region from the pieces that touch it: fluxes (and pixel
    counts) added, positions flux-weighted, the shape of the brightest piece, the largest
    half-light radius."""
    keep = region == 0
    rows = [df[keep]]
    for r in np.unique(region[~keep]):
        g = df[region == r]
        if len(g) == 1:
            rows.append(g)
            continue
        w = np.clip(g["flux_auto"].to_numpy(float), 1e-12, None)
        row = g.iloc[[int(np.argmax(w))]].copy()
        for col in ("x", "y", "x_win", "y_win"):
            row[col] = np.sum(w * g[col].to_numpy(float)) / w.sum()
        row["flux"] = g["flux"].sum()
        row["flux_auto"] = g["flux_auto"].sum()
        row["flux_auto_err"] = np.sqrt(np.sum(g["flux_auto_err"].to_numpy(float) ** 2))
        row["npix"] = g["npix"].sum()
        row["flag"] = np.bitwise_or.reduce(g["flag"].to_numpy())
        row["r50_px"] = np.nanmax(g["r50_px"].to_numpy(float))
        row["snr"] = row["flux_auto"] / np.maximum(row["flux_auto_err"], 1e-12)
        rows.append(row)
    return pd.concat(rows).sort_index().reset_index(drop=True)


def extract_image(image: ImageData, thresh_sigma: float = 1.5, minarea: int = 5,
                  deblend_cont: float = 0.005, windowed: bool = True, global_rms: bool = False) -> pd.DataFrame:
    """Detections in one image, with SExtractor's default detection settings.

    A saturated source whose masked core and bleed trail (``saturated_regions``) cut its
    halo into pieces gives one detection: the pieces that touch the same saturated region
    are merged (``_merge_pieces``), instead of standing for several sources. (A faint source
    that touches the same masked region, e.g. on a long bleed trail, is merged with it too.)

    The threshold is ``thresh_sigma`` times the background rms: its local map, or with
    ``global_rms`` the image-wide value (as SExtractor's ``THRESH_TYPE RELATIVE`` with a
    flat noise model does).

    Returns
    -------
    DataFrame with x, y (0-based isophotal barycentre, px), x_win, y_win (windowed), a, b
    (profile rms along the axes, px), theta (rad, from +x towards +y), flux_auto,
    flux_auto_err (ADU), r50_px (half-light radius), snr, flag.
    """
    sub, rms, mask = _background(image, global_rms)
    sat = saturated_regions(mask, image.saturated)
    if sat.any():
        objs, seg = sep.extract(sub, thresh_sigma, err=rms, mask=mask, minarea=minarea, deblend_cont=deblend_cont,
                                segmentation_map=True)
    else:
        objs = sep.extract(sub, thresh_sigma, err=rms, mask=mask, minarea=minarea, deblend_cont=deblend_cont)
    df = pd.DataFrame({k: objs[k] for k in ("x", "y", "a", "b", "theta", "flux", "flag", "npix")})
    if len(df) == 0:
        return df.assign(x_win=[], y_win=[], flux_auto=[], flux_auto_err=[], r50_px=[], snr=[])
    a = np.maximum(objs["a"], 0.5)
    b = np.maximum(objs["b"], 0.5)
    theta = np.clip(objs["theta"], -np.pi / 2, np.pi / 2)
    kron, _ = sep.kron_radius(sub, objs["x"], objs["y"], a, b, theta, 6.0, mask=mask)
    kron = np.where(np.isfinite(kron) & (kron > 0), kron, MIN_KRON_RADIUS)
    r_kron = np.maximum(KRON_FACTOR * kron, MIN_KRON_RADIUS)
    flux, flux_err, _ = sep.sum_ellipse(sub, objs["x"], objs["y"], a, b, theta, r_kron, err=rms, mask=mask,
                                        subpix=1)
    r50, _ = sep.flux_radius(sub, objs["x"], objs["y"], 6.0 * a, 0.5, normflux=flux, subpix=5, mask=mask)
    df["flux_auto"], df["flux_auto_err"], df["r50_px"] = flux, flux_err, r50
    df["snr"] = flux / np.maximum(flux_err, 1e-12)
    if windowed:
        sig = np.clip(2.0 * np.where(np.isfinite(r50), r50, 1.5) / FWHM_PER_SIGMA, 0.5, 10.0)
        xw, yw, wflag = sep.winpos(sub, objs["x"], objs["y"], sig, mask=mask)
        ok = (wflag == 0) & np.isfinite(xw) & (np.hypot(xw - objs["x"], yw - objs["y"]) < 2.0)
        df["x_win"], df["y_win"] = np.where(ok, xw, objs["x"]), np.where(ok, yw, objs["y"])
    else:
        df["x_win"], df["y_win"] = df["x"], df["y"]
    if sat.any():
        df = _merge_pieces(df, _pieces_of_saturated_sources(seg, sat, len(df)))
    return df


def image_detections(image: ImageData, thresh_sigma: float = 3.0, **kw) -> pd.DataFrame:
    """Detections of one image on the sky: adds ra, dec, band, flux_nmgy, position error,
    shape estimates in arcsec and the PSF's half-light radius."""
    det = extract_image(image, thresh_sigma=thresh_sigma, **kw)
    if len(det) == 0:
        return det
    ra, dec = pixel_to_sky(image.wcs, det["x_win"], det["y_win"])
    _, jac = sky_to_pixel_jacobian(image.wcs, ra, dec)
    inv = np.linalg.inv(jac)                          # arcsec per px
    scale = np.sqrt(np.abs(np.linalg.det(inv)))
    psf_r50 = GAUSS_R50_PER_SIGMA * image.psf_sigma_px()
    cpn = image.counts_per_nmgy
    # Major-axis direction on the sky (east, north) -> angle from east towards north.
    vec = np.einsum("nij,nj->ni", inv, np.stack([np.cos(det["theta"]), np.sin(det["theta"])], -1))
    angle = np.degrees(np.arctan2(vec[:, 1], vec[:, 0])) % 180.0
    r50 = det["r50_px"].to_numpy(float)
    intrinsic = np.sqrt(np.clip(r50**2 - psf_r50**2, 0.04, None))
    snr = np.clip(det["snr"].to_numpy(float), 0.1, None)
    return det.assign(
        ra=ra, dec=dec, band=image.band, image_id=image.image_id,
        flux_nmgy=det["flux_auto"] / cpn, flux_err_nmgy=det["flux_auto_err"] / cpn,
        pos_err_arcsec=np.clip(r50 / snr, 0.01, None) * scale,
        size_ratio=r50 / psf_r50, radius_arcsec=intrinsic * scale,
        axis_ratio=np.clip(det["b"] / det["a"], 0.1, 1.0), angle_deg=angle,
    )


def _friends_of_friends(ra, dec, radius_arcsec) -> np.ndarray:
    """Group labels of points linked by separations below ``radius_arcsec``."""
    ra0, dec0 = np.median(ra), np.median(dec)
    xy = np.stack([((ra - ra0 + 180) % 360 - 180) * np.cos(np.radians(dec0)), dec - dec0], -1) * 3600.0
    pairs = cKDTree(xy).query_pairs(radius_arcsec, output_type="ndarray")
    n = len(ra)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def merge_detections(det: pd.DataFrame, bands, match_radius_arcsec: float = 1.5,
                     min_detections: int = 1, star_size_ratio: float = 1.15) -> pd.DataFrame:
    """Unique sources from detections of many images (see module docs)."""
    bands = sort_bands(bands)
    if len(det) == 0:
        return pd.DataFrame(columns=["ra", "dec", "flux_r_nmgy", "n_detections"])
    det = det.assign(group=_friends_of_friends(det["ra"].to_numpy(), det["dec"].to_numpy(), match_radius_arcsec))
    rows = []
    for _, g in det.groupby("group", sort=True):
        if len(g) < min_detections:
            continue
        w = 1.0 / g["pos_err_arcsec"].to_numpy() ** 2
        dec = np.sum(w * g["dec"]) / w.sum()
        ra_ref = g["ra"].iloc[0]
        ra = (ra_ref + np.sum(w * ((g["ra"] - ra_ref + 180) % 360 - 180)) / w.sum()) % 360.0
        sd = np.sqrt(1.0 / w.sum())
        row = {"ra": ra, "dec": dec, "ra_sd": sd, "dec_sd": sd, "n_detections": len(g)}
        for b in bands:
            gb = g[g["band"] == b]
            if len(gb):
                wf = 1.0 / np.maximum(gb["flux_err_nmgy"].to_numpy(), 1e-6) ** 2
                row[f"flux_{b}_nmgy"] = np.sum(wf * gb["flux_nmgy"]) / wf.sum()
                row[f"flux_{b}_sd_nmgy"] = np.sqrt(1.0 / wf.sum())
            else:
                row[f"flux_{b}_nmgy"] = np.nan
                row[f"flux_{b}_sd_nmgy"] = np.nan
        best = g["snr"].to_numpy().argmax()
        size = float(np.median(g["size_ratio"]))
        row["is_star"] = bool(size < star_size_ratio)
        row["p_star"] = 0.8 if row["is_star"] else 0.2
        row["gal_radius_arcsec"] = float(np.median(g["radius_arcsec"]))
        row["gal_axis_ratio"] = float(g["axis_ratio"].iloc[best])
        row["gal_angle_deg"] = float(g["angle_deg"].iloc[best])
        row["gal_frac_dev"] = 0.5
        rows.append(row)
    out = pd.DataFrame(rows)
    if "flux_r_nmgy" not in out:
        out["flux_r_nmgy"] = np.nan
    # Reference flux for sources not detected in r: from the nearest band and prior colour.
    if len(out):
        missing = ~np.isfinite(out["flux_r_nmgy"]) | (out["flux_r_nmgy"] <= 0)
        fallback = out[[f"flux_{b}_nmgy" for b in bands]].clip(lower=1e-3).median(axis=1, skipna=True)
        out.loc[missing, "flux_r_nmgy"] = fallback[missing].fillna(0.1)
        out = out.sort_values(["dec", "ra"], kind="stable").reset_index(drop=True)
    return out


def detect_sources(images: list[ImageData], *, thresh_sigma: float = 3.0, match_radius_arcsec: float = 1.5,
                   min_detections: int | None = None) -> pd.DataFrame:
    """Candidate sources from all images (every band and epoch).

    Parameters
    ----------
    images : images with WCS
    thresh_sigma : detection threshold per pixel in units of the background rms
    match_radius_arcsec : friends-of-friends linking length across images
    min_detections : detections a source needs (None: 2 when there are 3 or more images,
        else 1), which rejects cosmic rays and noise peaks seen once

    Returns
    -------
    DataFrame sorted by (dec, ra): ra, dec (deg), ra_sd, dec_sd (arcsec), n_detections,
    flux_<b>_nmgy and flux_<b>_sd_nmgy per band, flux_r_nmgy, is_star and p_star guesses,
    gal_radius_arcsec, gal_axis_ratio, gal_angle_deg, gal_frac_dev starting values.
    """
    if min_detections is None:
        min_detections = 2 if len(images) >= 3 else 1
    dets = [image_detections(im, thresh_sigma=thresh_sigma) for im in images]
    dets = [d for d in dets if len(d)]
    det = pd.concat(dets, ignore_index=True) if dets else pd.DataFrame()
    return merge_detections(det, [im.band for im in images], match_radius_arcsec, min_detections)


def add_magnitudes_and_colors(cat: pd.DataFrame, bands) -> pd.DataFrame:
    """Add mag_<b> and adjacent colours (with sds) from per-band fluxes (nmgy)."""
    bands = sort_bands(bands)
    cat = cat.copy()
    for b in bands:
        f = cat[f"flux_{b}_nmgy"].to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            cat[f"mag_{b}"] = np.where(f > 0, NMGY_ZERO_MAG - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)
    for name, (b1, b2) in zip(color_names(bands), zip(bands[:-1], bands[1:])):
        f1, f2 = cat[f"flux_{b1}_nmgy"].to_numpy(float), cat[f"flux_{b2}_nmgy"].to_numpy(float)
        s1, s2 = cat[f"flux_{b1}_sd_nmgy"].to_numpy(float), cat[f"flux_{b2}_sd_nmgy"].to_numpy(float)
        ok = (f1 > 0) & (f2 > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            cat[f"color_{name}"] = np.where(ok, np.log(np.where(ok, f2 / f1, 1.0)) / MAG_TO_LN, np.nan)
            cat[f"color_{name}_sd"] = np.where(ok, np.hypot(s1 / f1, s2 / f2) / MAG_TO_LN, np.nan)
    return cat
