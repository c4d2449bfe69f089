"""Candidate sources: SExtractor-style extraction on every image, merged across images, and a
joint PSF-matched filter over all of them for the sources too faint for any one image.

Each science image is background-subtracted and thresholded with sep; detections get a
windowed centroid, Kron (AUTO) flux and half-light radius. Detections of all epochs and
bands are merged into unique sources by friends-of-friends within ``match_radius_arcsec``
on the sky. Per source: a position (inverse-variance weighted mean), per-band fluxes in
nanomaggies (median over detections), a star/galaxy guess from the half-light radius
against the PSF's, and a rough galaxy shape, all of which seed the Bayesian fit.

The joint matched filter (``joint_matched_filter``) correlates every background-subtracted
image with its PSF, turning it into a per-pixel point-source flux and inverse variance in
nanomaggies, resamples these onto one tangent-plane grid (``common_grid``, tile by tile:
``matched_filter_search``) and adds them by inverse variance (per band, and over bands for a
flat-SED detection). Its peaks (``matched_filter_peaks``: calibrated SNR above
``MF_SNR_THRESHOLD``, one image's contribution not enough, none next to a saturated star)
confirm sep sources seen once and sep's fainter (1.5 sigma) deblended sources, and the peaks
that no sep source explains become point-source candidates (``detect_sources``).

Backgrounds (``_background``) use the valid pixels only (NaN, zero-weight and zero-filled
pixels are invalid), with a mesh fitted to the covered area, and the edge of missing coverage
is masked a PSF FWHM deep, so a partly covered image gives no bogus source at its edge.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import sep
from astropy.wcs import WCS
from scipy import ndimage, signal
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..astrometry.astropy_wcs import astropy_world2pix_near
from ..core.units import FWHM_PER_SIGMA, MAD_TO_SIGMA
from .data import ImageData, pixel_to_sky, sky_to_pixel_jacobian
from .priors import MAG_TO_LN, NMGY_ZERO_MAG, color_names, sort_bands
from .psf import PsfMixture, mixture_image

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


#: Connected masked regions of at least this many pixels that hold no saturated pixel are
#: coverage gaps (off the chip, outside a resampled footprint, zero-weight areas), as opposed
#: to cosmic rays, bad pixels and the masked cores of saturated stars.
GAP_MIN_PX = 64
#: Connected runs of pixels exactly 0 at least this large are fill (0-weight), not data.
ZERO_FILL_MIN_PX = 25
#: Background mesh sizes tried, largest first (SExtractor's BACK_SIZE is 64).
BACK_MESH_PX = (64, 48, 32, 24, 16)
#: sep discards a mesh with fewer valid pixels than this fraction (BACK_MINGOODFRAC).
BACK_MIN_GOOD_FRAC = 0.5
#: The mesh must keep at least this fraction of the valid pixels in good meshes.
BACK_MIN_COVERED = 0.8


def invalid_pixels(image: ImageData) -> np.ndarray:
    """Pixels that carry no data: NaN, a non-positive or non-finite noise variance (0 weight),
    and connected runs of exact zeros of ``ZERO_FILL_MIN_PX`` or more (fill outside a
    resampled footprint; real noisy pixels are never exactly 0 that often)."""
    data = image.pixels
    bad = ~np.isfinite(data)
    zero = data == 0
    if np.count_nonzero(zero) >= ZERO_FILL_MIN_PX:
        lab, _ = ndimage.label(zero)
        big = np.bincount(lab.ravel()) >= ZERO_FILL_MIN_PX
        big[0] = False
        bad |= big[lab]
    if image.noise_var is not None and np.ndim(image.noise_var) == 2:
        var = np.asarray(image.noise_var)
        with np.errstate(invalid="ignore"):
            bad |= ~np.isfinite(var) | (var <= 0)
    return bad


def coverage_gaps(bad: np.ndarray, saturated: np.ndarray | None = None) -> np.ndarray:
    """The masked regions that are missing coverage (see ``GAP_MIN_PX``)."""
    if not bad.any():
        return np.zeros(bad.shape, bool)
    lab, n = ndimage.label(bad)
    gap = np.bincount(lab.ravel(), minlength=n + 1) >= GAP_MIN_PX
    gap[0] = False
    if saturated is not None and (saturated & bad).any():
        gap[np.unique(lab[saturated & bad])] = False
    return gap[lab]


def _disc(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= radius * radius + 1e-9


def _mesh_size(valid: np.ndarray) -> int:
    """The largest background mesh (``BACK_MESH_PX``) whose good meshes (at least half their
    pixels valid, as sep requires) hold ``BACK_MIN_COVERED`` of the valid pixels; the smallest
    mesh when none does."""
    ny, nx = valid.shape
    n_valid = max(int(valid.sum()), 1)
    for b in BACK_MESH_PX:
        my, mx = -(-ny // b), -(-nx // b)
        pad = np.zeros((my * b, mx * b), bool)
        pad[:ny, :nx] = valid
        count = pad.reshape(my, b, mx, b).sum(axis=(1, 3))
        hy = np.minimum(b, ny - b * np.arange(my))[:, None]
        hx = np.minimum(b, nx - b * np.arange(mx))[None, :]
        good = count >= BACK_MIN_GOOD_FRAC * hy * hx
        if count[good].sum() >= BACK_MIN_COVERED * n_valid:
            return b
    return BACK_MESH_PX[-1]


def _robust_level(values: np.ndarray, n_iter: int = 5, max_samples: int = 50_000) -> tuple[float, float]:
    """Sigma-clipped (3 sigma) median and MAD-based rms of the finite values (an even
    subsample of ``max_samples`` at most)."""
    v = values[np.isfinite(values)]
    v = v[:: max(1, v.size // max_samples)]
    if v.size == 0:
        return 0.0, 1.0
    med = float(np.median(v))
    sig = float(MAD_TO_SIGMA * np.median(np.abs(v - med)))
    for _ in range(n_iter):
        keep = np.abs(v - med) < 3.0 * sig
        if keep.sum() < 10:
            break
        med = float(np.median(v[keep]))
        sig = float(MAD_TO_SIGMA * np.median(np.abs(v[keep] - med)))
    if not sig > 0:
        sig = float(np.std(v)) or 1.0
    return med, sig


def _background(image: ImageData, global_rms: bool = False, erode_px: float | None = None):
    """Background-subtracted pixels (C-contiguous float32), the noise rms (map, or the
    global scalar), and the detection mask.

    The mask holds the invalid pixels (``invalid_pixels``) and, around coverage gaps
    (``coverage_gaps``), a rim ``erode_px`` wide (default: one PSF FWHM, at least 2 px) whose
    pixels see the gap's edge. The background uses the valid pixels only, with the mesh chosen
    from the covered area (``_mesh_size``): with sep's 64-px mesh a partly covered image (e.g. a
    fifth of it, in a strip) can have every mesh discarded, and sep then returns background 0
    and rms 1, which makes the covered part one bright source. Should sep's result still
    disagree with the valid pixels (the residual level off by more than half an rms, or sep's
    global rms off by more than 1.5x from the residuals' MAD), a constant sigma-clipped
    background and rms are used instead. Sky-subtracted images keep a zero background and the
    noise of ``variance_map``, where that is positive and finite and not merely the MAD of all
    pixels (fill included): elsewhere the valid pixels' MAD.
    """
    data = np.asarray(image.pixels, dtype=np.float32)
    bad = invalid_pixels(image)
    valid = ~bad
    mask = bad.copy()
    if not valid.any():
        zeros = np.zeros(data.shape, np.float32)
        return zeros, (np.float32(1.0) if global_rms else zeros + 1.0), np.ones(data.shape, bool)
    gaps = coverage_gaps(bad, image.saturated)
    if gaps.any():
        if erode_px is None:
            erode_px = max(2.0, FWHM_PER_SIGMA * image.psf_sigma_px())
        mask |= ndimage.binary_dilation(gaps, structure=_disc(erode_px))
    level, sigma = _robust_level(data[valid])
    filled = np.where(valid, data, np.float32(level)).astype(np.float32)
    if image.sky_subtracted:
        var = np.array(image.variance_map(), dtype=np.float32)
        derived = image.noise_var is None and not np.any(np.asarray(image.sky_level) > 0)
        ok = np.isfinite(var) & (var > 0) & (not derived)
        var[~ok] = np.float32(sigma * sigma)
        rms = np.sqrt(var)
        sub = np.where(mask, np.float32(0.0), filled)
        rms = np.float32(np.median(rms[valid])) if global_rms else np.ascontiguousarray(rms, dtype=np.float32)
        return np.ascontiguousarray(sub, dtype=np.float32), rms, mask
    mesh = _mesh_size(valid)
    bkg = sep.Background(np.ascontiguousarray(filled), mask=np.ascontiguousarray(bad), bw=mesh, bh=mesh)
    back = np.asarray(bkg.back(), dtype=np.float32)
    rms_map = np.asarray(bkg.rms(), dtype=np.float32)
    g_rms = float(bkg.globalrms)
    r_level, r_sigma = _robust_level((data - back)[valid])
    trusted = (np.isfinite(g_rms) and g_rms > 0 and abs(r_level) < 0.5 * r_sigma
               and 1 / 1.5 < g_rms / r_sigma < 1.5 and bool(np.all(rms_map[valid] > 0)))
    if not trusted:
        back = np.full(data.shape, level, np.float32)
        rms_map = np.full(data.shape, sigma, np.float32)
        g_rms = sigma
    sub = filled - back
    sub[mask] = 0.0
    rms = np.float32(g_rms) if global_rms else np.ascontiguousarray(rms_map, dtype=np.float32)
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
                  deblend_cont: float = 0.005, windowed: bool = True, global_rms: bool = False,
                  background=None) -> pd.DataFrame:
    """Detections in one image, with SExtractor's default detection settings.

    A saturated source whose masked core and bleed trail (``saturated_regions``) cut its
    halo into pieces gives one detection: the pieces that touch the same saturated region
    are merged (``_merge_pieces``), instead of standing for several sources. (A faint source
    that touches the same masked region, e.g. on a long bleed trail, is merged with it too.)

    The threshold is ``thresh_sigma`` times the background rms: its local map, or with
    ``global_rms`` the image-wide value (as SExtractor's ``THRESH_TYPE RELATIVE`` with a
    flat noise model does). ``background``: ``_background(image, global_rms)``'s result, when
    already computed. Pixels near the edge of missing coverage are masked (see ``_background``).

    Returns
    -------
    DataFrame with x, y (0-based isophotal barycentre, px), x_win, y_win (windowed), a, b
    (profile rms along the axes, px), theta (rad, from +x towards +y), flux_auto,
    flux_auto_err (ADU), r50_px (half-light radius), snr, flag.
    """
    sub, rms, mask = background if background is not None else _background(image, global_rms)
    sat = saturated_regions(mask & ~np.isfinite(image.pixels), image.saturated)
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
    shape estimates in arcsec and the PSF's half-light radius (``kw``: ``extract_image``'s)."""
    det = extract_image(image, thresh_sigma=thresh_sigma, **kw)
    if len(det) == 0:
        return det
    ra, dec = pixel_to_sky(image.wcs, det["x_win"], det["y_win"])
    _, jac = sky_to_pixel_jacobian(image.wcs, ra, dec)
    inv = np.linalg.inv(jac)                          # arcsec per px
    scale = np.sqrt(np.abs(np.linalg.det(inv)))
    psf_r50 = image.psf_r50_px()
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


def candidate_columns(bands) -> dict:
    """The columns of a candidate table (``merge_detections``, ``detect_sources``) and their
    dtypes, in order."""
    cols = {"ra": "float64", "dec": "float64", "ra_sd": "float64", "dec_sd": "float64", "n_detections": "int64"}
    for b in sort_bands(bands):
        cols[f"flux_{b}_nmgy"] = "float64"
        cols[f"flux_{b}_sd_nmgy"] = "float64"
    cols.update({"is_star": "bool", "p_star": "float64", "gal_radius_arcsec": "float64",
                 "gal_axis_ratio": "float64", "gal_angle_deg": "float64", "gal_frac_dev": "float64"})
    cols.setdefault("flux_r_nmgy", "float64")
    return cols


def _as_candidates(table: pd.DataFrame, bands) -> pd.DataFrame:
    """``table`` with exactly the candidate columns and dtypes, rows sorted by (dec, ra)."""
    cols = candidate_columns(bands)
    if len(table) == 0:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in cols.items()})
    out = table.reindex(columns=list(cols)).astype(cols)
    return out.sort_values(["dec", "ra"], kind="stable").reset_index(drop=True)


def _fill_reference_flux(out: pd.DataFrame, bands) -> pd.DataFrame:
    """Reference flux for sources not detected in r: from the nearest band and prior colour."""
    if "flux_r_nmgy" not in out:
        out["flux_r_nmgy"] = np.nan
    if len(out):
        missing = ~np.isfinite(out["flux_r_nmgy"]) | (out["flux_r_nmgy"] <= 0)
        fallback = out[[f"flux_{b}_nmgy" for b in bands]].clip(lower=1e-3).median(axis=1, skipna=True)
        out.loc[missing, "flux_r_nmgy"] = fallback[missing].fillna(0.1)
    return out


def _group_median(values: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """Median of ``values`` per group 0..n-1 (NaN for a group holding a NaN, as np.median)."""
    s = pd.Series(values)
    med = s.groupby(group).median().reindex(range(n)).to_numpy(float)
    has_nan = s.isna().groupby(group).any().reindex(range(n), fill_value=False).to_numpy(bool)
    return np.where(has_nan, np.nan, med)


def merge_detections(det: pd.DataFrame, bands, match_radius_arcsec: float = 1.5,
                     min_detections: int = 1, star_size_ratio: float = 1.15) -> pd.DataFrame:
    """Unique sources from detections of many images (see module docs); columns as
    ``candidate_columns``, an empty table with all of them when there are none."""
    bands = sort_bands(bands)
    if len(det) == 0:
        return _as_candidates(pd.DataFrame(), bands)
    labels = _friends_of_friends(det["ra"].to_numpy(), det["dec"].to_numpy(), match_radius_arcsec)
    size = np.bincount(labels)
    keep = size[labels] >= min_detections
    if not keep.any():
        return _as_candidates(pd.DataFrame(), bands)
    det = det[keep].reset_index(drop=True)
    _, group = np.unique(labels[keep], return_inverse=True)      # groups in label order, rows in det order
    n = int(group.max()) + 1

    def gsum(x):
        return np.bincount(group, weights=np.asarray(x, float), minlength=n)

    w = 1.0 / det["pos_err_arcsec"].to_numpy(float) ** 2
    ra_all, dec_all = det["ra"].to_numpy(float), det["dec"].to_numpy(float)
    first = np.full(n, len(det))
    np.minimum.at(first, group, np.arange(len(det)))
    ra_ref = ra_all[first]
    sw = gsum(w)
    out = {"ra": (ra_ref + gsum(w * ((ra_all - ra_ref[group] + 180) % 360 - 180)) / sw) % 360.0,
           "dec": gsum(w * dec_all) / sw}
    out["ra_sd"] = out["dec_sd"] = np.sqrt(1.0 / sw)
    out["n_detections"] = np.bincount(group, minlength=n)
    band_col = det["band"].to_numpy()
    flux, flux_err = det["flux_nmgy"].to_numpy(float), det["flux_err_nmgy"].to_numpy(float)
    for b in bands:
        sel = band_col == b
        wf = np.where(sel, 1.0 / np.maximum(flux_err, 1e-6) ** 2, 0.0)
        swf = gsum(wf)
        has = np.bincount(group, weights=sel.astype(float), minlength=n) > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"flux_{b}_nmgy"] = np.where(has, gsum(np.where(sel, wf * flux, 0.0)) / swf, np.nan)
            out[f"flux_{b}_sd_nmgy"] = np.where(has, np.sqrt(1.0 / swf), np.nan)
    # The highest-SNR detection of each group (the first of equals; NaN counts as highest).
    snr = np.nan_to_num(det["snr"].to_numpy(float), nan=np.inf)
    order = np.lexsort((np.arange(len(det)), -snr, group))
    best = order[np.r_[0, np.nonzero(np.diff(group[order]))[0] + 1]]
    is_star = _group_median(det["size_ratio"].to_numpy(float), group, n) < star_size_ratio
    out["is_star"] = is_star
    out["p_star"] = np.where(is_star, 0.8, 0.2)
    out["gal_radius_arcsec"] = _group_median(det["radius_arcsec"].to_numpy(float), group, n)
    out["gal_axis_ratio"] = det["axis_ratio"].to_numpy(float)[best]
    out["gal_angle_deg"] = det["angle_deg"].to_numpy(float)[best]
    out["gal_frac_dev"] = np.full(n, 0.5)
    return _as_candidates(_fill_reference_flux(pd.DataFrame(out), bands), bands)


# ----------------------------------------------------------------------------- joint matched filter

#: Default matched-filter threshold (calibrated SNR of the combined map at a peak). Measured on
#: pure sky noise (``simulate_field`` with one source at r = 30: 32 fields of 6 images, g r i x 2
#: epochs, ~636 x 636 px, 1.01e6 beams of 1.133 FWHM^2; Gaussian PSFs of sigma 1.2-1.7 px and
#: Moffat beta 2.5 of sigma 1.1-1.4 px), peaks per 10^4 beams above 4.0 / 4.25 / 4.5 / 4.75 /
#: 5.0: 1.75 / 0.64 / 0.24 / 0.07 / 0.02. 4.5 keeps noise peaks below 1 per 10^4 beams with a
#: margin of 4.
MF_SNR_THRESHOLD = 4.5
#: Noise peaks allowed over a whole detection (all tiles): where the images cover so many beams
#: that ``MF_SNR_THRESHOLD`` would let more through, the threshold is raised
#: (``survey_threshold``), as a search over many trials must be.
MF_MAX_NOISE_PEAKS = 1.0
#: Noise peaks per beam at ``MF_SNR_THRESHOLD`` (measured, above).
MF_NOISE_PEAKS_PER_BEAM = 0.24e-4


def survey_threshold(n_beams: float, snr_threshold: float = MF_SNR_THRESHOLD) -> float:
    """The smallest threshold, at least ``snr_threshold``, at which ``n_beams`` beams of pure
    noise give at most ``MF_MAX_NOISE_PEAKS`` peaks. The rate scales from the measured
    ``MF_NOISE_PEAKS_PER_BEAM`` at ``MF_SNR_THRESHOLD`` as the density of maxima of a smooth
    Gaussian field above t does in 2-d: ``(t^2 - 1) exp(-t^2 / 2)``."""
    t0 = MF_SNR_THRESHOLD

    def expected(t):
        return n_beams * MF_NOISE_PEAKS_PER_BEAM * (t * t - 1) / (t0 * t0 - 1) * np.exp(-(t * t - t0 * t0) / 2)

    t = float(snr_threshold)
    while expected(t) > MF_MAX_NOISE_PEAKS and t < 20.0:
        t += 0.01
    return round(t, 2)


#: A peak covered by 3 or more images must keep this fraction of the threshold without the
#: image that contributes most to it (a cosmic ray, an asteroid or a bad pixel in one image).
MF_LEAVE_ONE_OUT_FRAC = 0.5
#: Peaks are not taken within this many PSF FWHMs of a saturated source's masked region.
MF_SATURATION_VETO_FWHM = 2.0
#: SNR (raw) from which a region of the map counts as a source for the calibration.
MF_CALIBRATION_SOURCE_SNR = 5.0
#: Pixels whose PSF footprint is less than this fraction covered (PSF^2-weighted) give no
#: flux estimate.
MF_MIN_PSF_COVERAGE = 0.5


def _psf_kernel(mix: PsfMixture, max_half_px: int = 25) -> np.ndarray:
    """The PSF mixture rendered on a centred odd grid reaching ~4 sigma (second moment) out,
    not renormalised (its sum is the captured light, so that matched-filter fluxes are totals)."""
    sigma = np.sqrt(max(mix.second_moment_px2(), 0.25))
    half = int(np.clip(np.ceil(4.0 * sigma), 4, max_half_px))
    return mixture_image(mix, (2 * half + 1, 2 * half + 1), (half, half))


def psf_fwhm_px(mix: PsfMixture) -> float:
    """FWHM (px) of a PSF mixture: the mean over 8 directions of the radius at half the peak."""
    c = mix.amp @ mix.mean_px
    t = np.linspace(0.0, 10.0 * np.sqrt(max(mix.second_moment_px2(), 0.25)), 2001)
    def value(pts):
        out = np.zeros(len(pts))
        for a, m, cov in zip(mix.amp, mix.mean_px, mix.cov_px2):
            inv = np.linalg.inv(cov)
            d = pts - m
            out += a / (2 * np.pi * np.sqrt(np.linalg.det(cov))) * np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, inv, d))
        return out
    peak = value(c[None])[0]
    radii = []
    for phi in np.linspace(0, np.pi, 8, endpoint=False):
        for sgn in (1.0, -1.0):
            pts = c + sgn * t[:, None] * np.array([np.cos(phi), np.sin(phi)])
            below = np.nonzero(value(pts) < 0.5 * peak)[0]
            radii.append(t[below[0]] if below.size else t[-1])
    return float(2.0 * np.mean(radii))


def _pixel_scale_arcsec(wcs: WCS, shape) -> float:
    ny, nx = shape
    ra, dec = pixel_to_sky(wcs, [(nx - 1) / 2], [(ny - 1) / 2])
    _, jac = sky_to_pixel_jacobian(wcs, ra, dec)
    return float(1.0 / np.sqrt(abs(np.linalg.det(jac[0]))))


def _boundary_px(shape, n: int = 9) -> np.ndarray:
    ny, nx = shape
    xs, ys = np.linspace(-0.5, nx - 0.5, n), np.linspace(-0.5, ny - 0.5, n)
    return np.concatenate([np.stack([xs, np.full(n, -0.5)], -1), np.stack([xs, np.full(n, ny - 0.5)], -1),
                           np.stack([np.full(n, -0.5), ys], -1), np.stack([np.full(n, nx - 0.5), ys], -1)])


def common_grid(images: list[ImageData]) -> tuple[WCS, tuple[int, int]]:
    """A north-up tangent-plane grid covering the union of the images' footprints, at the
    finest image's pixel scale: its WCS (0-based pixel (0, 0) at the lower-left corner of the
    union's bounding box) and shape (ny, nx)."""
    scale = min(_pixel_scale_arcsec(im.wcs, im.shape) for im in images)
    pts = [np.stack(pixel_to_sky(im.wcs, *_boundary_px(im.shape).T), -1) for im in images]
    pts = np.concatenate(pts)
    ra, dec = np.radians(pts[:, 0]), np.radians(pts[:, 1])
    v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1).mean(0)
    ra0, dec0 = np.degrees(np.arctan2(v[1], v[0])) % 360.0, np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1])))
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]]) / 3600.0
    x, y = w.wcs_world2pix(pts[:, 0], pts[:, 1], 0)
    x0, y0 = np.floor(x.min()) - 1, np.floor(y.min()) - 1
    nx, ny = int(np.ceil(x.max() - x0)) + 2, int(np.ceil(y.max() - y0)) + 2
    w.wcs.crpix = [1.0 - x0, 1.0 - y0]
    return w, (ny, nx)


def _grid_to_image(grid: WCS, image: ImageData, y0: int, y1: int, x0: int, x1: int, step: int = 8):
    """Image pixel positions (x, y) of the grid pixels [y0:y1, x0:x1], from an exact mapping
    every ``step`` grid pixels interpolated bilinearly in between."""
    ky, kx = -(-(y1 - y0 - 1) // step) + 1, -(-(x1 - x0 - 1) // step) + 1
    gy, gx = np.meshgrid(y0 + step * np.arange(ky), x0 + step * np.arange(kx), indexing="ij")
    ra, dec = grid.wcs_pix2world(gx.ravel().astype(float), gy.ravel().astype(float), 0)
    ix, iy = astropy_world2pix_near(image.wcs, ra, dec, image.shape)
    ix, iy = ix.reshape(ky, kx), iy.reshape(ky, kx)
    fy, fx = np.meshgrid(np.arange(y1 - y0) / step, np.arange(x1 - x0) / step, indexing="ij")
    coords = np.stack([fy.ravel(), fx.ravel()])
    out = []
    for c in (ix, iy):
        out.append(ndimage.map_coordinates(np.nan_to_num(c, nan=-1e9), coords, order=1).reshape(fy.shape))
    return out


def image_matched_filter(image: ImageData, background=None):
    """Per-pixel PSF-fit flux information of one image, in nanomaggies.

    Returns ``(a, b)``: ``b`` is the inverse variance (nmgy^-2) of the flux of a point source
    centred on each pixel, fitted by weighted least squares with the PSF (at the image centre)
    to the background-subtracted pixels, masked pixels weightless, and ``a = flux * b``. Pixels
    whose PSF footprint is less than ``MF_MIN_PSF_COVERAGE`` covered get ``a = b = 0``.
    """
    sub, rms, mask = background if background is not None else _background(image)
    ny, nx = image.shape
    kernel = _psf_kernel(image.psf_at((nx - 1) / 2, (ny - 1) / 2))
    rms = np.broadcast_to(np.asarray(rms, np.float32), sub.shape)
    valid = ~mask & np.isfinite(rms) & (rms > 0)
    w = np.where(valid, 1.0 / np.where(valid, rms, 1.0) ** 2, 0.0).astype(np.float32)
    k1, k2 = kernel[::-1, ::-1].astype(np.float32), (kernel * kernel)[::-1, ::-1].astype(np.float32)
    num = signal.oaconvolve(w * np.where(valid, sub, 0.0).astype(np.float32), k1, mode="same")
    den = signal.oaconvolve(w, k2, mode="same")
    cover = signal.oaconvolve(valid.astype(np.float32), k2, mode="same") / k2.sum()
    keep = (cover >= MF_MIN_PSF_COVERAGE) & (den > 0)
    cpn = image.counts_per_nmgy
    a = np.where(keep, num * cpn, 0.0).astype(np.float32)
    b = np.where(keep, den * cpn * cpn, 0.0).astype(np.float32)
    return a, b


@dataclass
class MatchedFilterMaps:
    """The joint matched filter on the common grid (``common_grid``).

    a, b : per band, ``sum_i flux_i / var_i`` and ``sum_i 1 / var_i`` over the band's images
        (nanomaggies), so that ``a / b`` is the inverse-variance flux of a point source centred
        on each grid pixel and ``1 / sqrt(b)`` its error
    a_max, b_max : the largest single-image ``a`` at each pixel and that image's ``b``
    n_images : images that cover each pixel
    e_max, eb_max, n_epochs : the same for epochs (images whose mid-times are within
        ``EPOCH_GAP_DAYS`` of each other: one night), and the epochs that cover each pixel; a
        moving object (an asteroid in several exposures of a night) is one epoch's light
    fwhm_px : median PSF FWHM, in grid pixels
    veto : grid pixels within ``MF_SATURATION_VETO_FWHM`` PSF FWHMs of a saturated source's
        masked region in some image, where no peak is taken (None: nowhere): the matched filter
        of a star with a masked core peaks on a ring around it
    snr_offset, snr_scale : sigma-clipped median and MAD-rms of the raw SNR ``a / sqrt(b)``
        away from sources (``_snr_calibration``), which ``snr`` takes out, so that its noise is
        N(0, 1) even where the pixel noise is correlated or the background a little off (pure
        sky noise: about 0.1 and 0.98)
    """

    wcs: WCS
    shape: tuple
    bands: list
    a: dict
    b: dict
    a_max: np.ndarray
    b_max: np.ndarray
    n_images: np.ndarray
    fwhm_px: float
    snr_offset: float = 0.0
    snr_scale: float = 1.0
    veto: np.ndarray | None = None
    e_max: np.ndarray | None = None
    eb_max: np.ndarray | None = None
    n_epochs: np.ndarray | None = None

    def combined(self) -> tuple[np.ndarray, np.ndarray]:
        """``a`` and ``b`` summed over bands: a flat-SED (equal nanomaggies) detection."""
        return sum(self.a.values()), sum(self.b.values())

    def snr_at(self, ra_deg, dec_deg, snr_threshold: float | None = None, min_images: int = 1) -> np.ndarray:
        """``snr`` interpolated (bilinearly) at sky positions (0 off the grid, where vetoed, and
        where two or more epochs cover the position but without its strongest epoch the SNR
        falls below ``MF_LEAVE_ONE_OUT_FRAC`` of ``snr_threshold``: one epoch's light; and where
        fewer than ``min_images`` images cover it)."""
        ra, dec = np.asarray(ra_deg, float), np.asarray(dec_deg, float)
        if ra.size == 0:
            return np.zeros(0)
        x, y = self.wcs.wcs_world2pix(ra, dec, 0)
        xy = np.stack([y, x])
        out = ndimage.map_coordinates(self.snr(), xy, order=1, mode="constant", cval=0.0)
        if self.veto is not None:
            vetoed = ndimage.map_coordinates(self.veto.astype(np.float32), xy, order=0, cval=0.0)
            out = np.where(vetoed > 0.5, 0.0, out)
        if self.e_max is not None:
            threshold = MF_SNR_THRESHOLD if snr_threshold is None else snr_threshold
            a, b = self.combined()
            with np.errstate(invalid="ignore", divide="ignore"):
                db = b - self.eb_max
                rest = ((a - self.e_max) / np.sqrt(np.where(db > 0, db, np.nan)) - self.snr_offset) / self.snr_scale
            one_epoch = (self.n_epochs >= 2) & ~(np.nan_to_num(rest, nan=-np.inf)
                                                  >= MF_LEAVE_ONE_OUT_FRAC * threshold)
            hit = ndimage.map_coordinates(one_epoch.astype(np.float32), xy, order=0, cval=0.0)
            out = np.where(hit > 0.5, 0.0, out)
        few = ndimage.map_coordinates((self.n_images < min_images).astype(np.float32), xy, order=0, cval=1.0)
        return np.where(few > 0.5, 0.0, out)

    def raw_snr(self) -> np.ndarray:
        """``a / sqrt(b)`` of the combined maps (0 where nothing covers)."""
        a, b = self.combined()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, a / np.sqrt(np.where(b > 0, b, 1.0)), 0.0).astype(np.float32)

    def snr(self) -> np.ndarray:
        """The detection SNR map: ``raw_snr`` calibrated by its own noise (0 where nothing covers)."""
        raw = self.raw_snr()
        return np.where(self.n_images > 0, (raw - self.snr_offset) / self.snr_scale, 0.0).astype(np.float32)


def _image_box(grid: WCS, image: ImageData) -> tuple[float, float, float, float]:
    """The image's footprint's bounding box on the grid: x_min, x_max, y_min, y_max (px)."""
    ra, dec = pixel_to_sky(image.wcs, *_boundary_px(image.shape).T)
    gx, gy = grid.wcs_world2pix(ra, dec, 0)
    return float(gx.min()), float(gx.max()), float(gy.min()), float(gy.max())


#: Images whose mid-exposure times are closer than this (days) belong to one epoch (a night).
EPOCH_GAP_DAYS = 0.3


def epoch_labels(images: list[ImageData]) -> np.ndarray:
    """An epoch number per image: mid-times (``ImageData.mjd``) sorted and cut at gaps above
    ``EPOCH_GAP_DAYS``; an image without a time is an epoch of its own."""
    mjd = np.array([im.mjd for im in images], float)
    labels = np.arange(len(images)) + len(images)  # no time: its own epoch
    timed = np.flatnonzero(np.isfinite(mjd))
    if timed.size:
        order = timed[np.argsort(mjd[timed], kind="stable")]
        labels[order] = np.r_[0, np.cumsum(np.diff(mjd[order]) > EPOCH_GAP_DAYS)]
    return labels


def joint_matched_filter(images: list[ImageData], backgrounds=None, grid=None, bands=None,
                         saturation_veto_fwhm: float | None = None) -> MatchedFilterMaps:
    """Every image's matched filter (``image_matched_filter``) resampled (bilinearly) onto the
    grid (``(wcs, shape)``; default ``common_grid``) and summed by inverse variance, per band
    (``bands``, default the images'); images without a finite zero point are left out. Grid
    pixels outside an image's coverage get nothing from it. Peaks are vetoed within
    ``saturation_veto_fwhm`` (default ``MF_SATURATION_VETO_FWHM``) PSF FWHMs of a saturated
    source's masked region."""
    grid, shape = common_grid(images) if grid is None else grid
    bands = sort_bands({im.band for im in images} if bands is None else bands)
    a = {b: np.zeros(shape, np.float32) for b in bands}
    b = {b: np.zeros(shape, np.float32) for b in bands}
    a_max = np.zeros(shape, np.float32)
    b_max = np.zeros(shape, np.float32)
    n_img = np.zeros(shape, np.int16)
    e_max, eb_max = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    n_epochs = np.zeros(shape, np.int16)
    ea, eb = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    veto = None
    fwhm = []
    scale = 1.0 / np.sqrt(abs(np.linalg.det(grid.wcs.cd))) / 3600.0  # grid px per arcsec
    labels = epoch_labels(images)

    def close_epoch():
        top = ea > e_max
        e_max[...] = np.where(top, ea, e_max)
        eb_max[...] = np.where(top, eb, eb_max)
        n_epochs[...] += eb > 0
        ea[...], eb[...] = 0.0, 0.0

    order = np.argsort(labels, kind="stable")
    for pos, k in enumerate(order):
        im = images[k]
        if pos and labels[k] != labels[order[pos - 1]]:
            close_epoch()
        if not np.isfinite(im.counts_per_nmgy):
            continue
        ai, bi = image_matched_filter(im, None if backgrounds is None else backgrounds[k])
        ny, nx = im.shape
        fwhm_im = psf_fwhm_px(im.psf_at((nx - 1) / 2, (ny - 1) / 2))          # image px
        fwhm.append(fwhm_im * _pixel_scale_arcsec(im.wcs, im.shape) * scale)   # grid px
        bx0, bx1, by0, by1 = _image_box(grid, im)
        x0, x1 = max(int(np.floor(bx0)) - 1, 0), min(int(np.ceil(bx1)) + 2, shape[1])
        y0, y1 = max(int(np.floor(by0)) - 1, 0), min(int(np.ceil(by1)) + 2, shape[0])
        if x1 <= x0 or y1 <= y0:
            continue
        ix, iy = _grid_to_image(grid, im, y0, y1, x0, x1)
        inside = (ix > -0.5) & (ix < nx - 0.5) & (iy > -0.5) & (iy < ny - 0.5)
        coords = np.stack([iy.ravel(), ix.ravel()])
        ra_i = ndimage.map_coordinates(ai, coords, order=1, mode="nearest").reshape(ix.shape)
        rb_i = ndimage.map_coordinates(bi, coords, order=1, mode="nearest").reshape(ix.shape)
        ra_i = np.where(inside, ra_i, 0.0)
        rb_i = np.where(inside, rb_i, 0.0)
        sl = (slice(y0, y1), slice(x0, x1))
        a[im.band][sl] += ra_i
        b[im.band][sl] += rb_i
        top = ra_i > a_max[sl]
        a_max[sl] = np.where(top, ra_i, a_max[sl])
        b_max[sl] = np.where(top, rb_i, b_max[sl])
        n_img[sl] += (rb_i > 0)
        ea[sl] += ra_i
        eb[sl] += rb_i
        sat = saturated_regions(~np.isfinite(im.pixels), im.saturated)
        if sat.any():
            veto_fwhm = MF_SATURATION_VETO_FWHM if saturation_veto_fwhm is None else saturation_veto_fwhm
            sat = ndimage.binary_dilation(sat, structure=_disc(veto_fwhm * fwhm_im))
            hit = ndimage.map_coordinates(sat.astype(np.float32), coords, order=0, cval=0.0).reshape(ix.shape)
            veto = np.zeros(shape, bool) if veto is None else veto
            veto[sl] |= (hit > 0.5) & inside
    close_epoch()
    maps = MatchedFilterMaps(grid, shape, bands, a, b, a_max, b_max, n_img, float(np.median(fwhm)) if fwhm else 3.0,
                             veto=veto, e_max=e_max, eb_max=eb_max, n_epochs=n_epochs)
    maps.snr_offset, maps.snr_scale = _snr_calibration(maps)
    return maps


def _snr_calibration(maps: MatchedFilterMaps) -> tuple[float, float]:
    """Sigma-clipped median and MAD-rms of the raw SNR map over the covered pixels away from
    sources: the connected regions above 2 that reach ``MF_CALIBRATION_SOURCE_SNR``, grown by a
    FWHM, are left out (their wings would widen the noise by ~5% in a field of 1 source per
    30 x 30 arcsec). Where too little is left to measure the noise (a quarter of the covered
    pixels and 25 beams), (0, 1); else the offset is limited to +-0.5 and the scale to [0.7, 2]
    (a small image dominated by one galaxy must not shift the whole map)."""
    raw = maps.raw_snr()
    covered = maps.n_images > 0
    use = covered.copy()
    lab, n = ndimage.label(raw > 2.0)
    if n:
        top = np.zeros(n + 1, bool)
        top[1:] = ndimage.maximum(raw, lab, index=np.arange(1, n + 1)) >= MF_CALIBRATION_SOURCE_SNR
        use &= ~ndimage.binary_dilation(top[lab], structure=_disc(maps.fwhm_px))
    beam = np.pi / (4 * np.log(2)) * maps.fwhm_px ** 2
    if use.sum() < max(100, 25 * beam, 0.25 * covered.sum()):
        return 0.0, 1.0
    offset, scale = _robust_level(raw[use])
    return float(np.clip(offset, -0.5, 0.5)), float(np.clip(scale, 0.7, 2.0))


def _peak_columns(bands) -> list[str]:
    cols = ["ra", "dec", "snr", "pos_err_arcsec", "n_images"]
    for band in bands:
        cols += [f"flux_{band}_nmgy", f"flux_{band}_sd_nmgy"]
    return cols


def _no_peaks(bands) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "n_images" else "float64")
                         for c in _peak_columns(bands)})


def matched_filter_peaks(maps: MatchedFilterMaps, snr_threshold: float = MF_SNR_THRESHOLD,
                         min_separation_fwhm: float = 1.0, min_images: int = 1) -> pd.DataFrame:
    """Local maxima of the combined SNR map above ``snr_threshold``, at least
    ``min_separation_fwhm`` PSF FWHMs from a higher one, that survive leaving out the image that
    contributes most (``MF_LEAVE_ONE_OUT_FRAC``) where 3 or more images cover the peak, and
    leaving out the epoch that contributes most where 2 or more epochs do, and covered by at least
    ``min_images`` images (a peak that one or two images alone carry cannot be told from a cosmic
    ray or a moving object, so a survey of 3 or more images asks for 3, as sep's detections
    need 2).

    Returns
    -------
    DataFrame: ra, dec (deg; the peak refined by a parabola through its neighbours), snr,
    pos_err_arcsec, n_images, flux_<b>_nmgy and flux_<b>_sd_nmgy per band (NaN where no image
    of the band covers the peak).
    """
    snr = maps.snr()
    a, b = maps.combined()
    cols = _peak_columns(maps.bands)
    above = snr >= snr_threshold
    if not above.any():
        return _no_peaks(maps.bands)
    radius = max(1.0, min_separation_fwhm * maps.fwhm_px)
    peak = above & (snr >= ndimage.maximum_filter(snr, footprint=_disc(radius), mode="constant", cval=-np.inf))
    if maps.veto is not None:
        peak &= ~maps.veto
    py, px = np.nonzero(peak)
    n_img = maps.n_images[py, px]

    def without(a_out, b_out):
        with np.errstate(invalid="ignore", divide="ignore"):
            db = b[py, px] - b_out[py, px]
            left = ((a[py, px] - a_out[py, px]) / np.sqrt(np.where(db > 0, db, np.nan)) - maps.snr_offset) \
                / maps.snr_scale
        return np.nan_to_num(left, nan=-np.inf) >= MF_LEAVE_ONE_OUT_FRAC * snr_threshold

    # Without the epoch that contributes most where two or more cover the peak (static sky is in
    # every epoch, a moving object in one); else without the image, where three or more do.
    n_ep = maps.n_epochs[py, px] if maps.n_epochs is not None else np.ones_like(n_img)
    keep = np.where(n_img < 3, True, without(maps.a_max, maps.b_max))
    if maps.e_max is not None:
        keep = np.where(n_ep >= 2, without(maps.e_max, maps.eb_max), keep)
    keep &= n_img >= min_images
    py, px, n_img = py[keep], px[keep], n_img[keep]
    ny, nx = snr.shape

    def vertex(m, c, p):
        d = m - 2 * c + p
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d < 0, np.clip(0.5 * (m - p) / np.where(d < 0, d, -1.0), -0.5, 0.5), 0.0)

    xm, xp = snr[py, np.clip(px - 1, 0, nx - 1)], snr[py, np.clip(px + 1, 0, nx - 1)]
    ym, yp = snr[np.clip(py - 1, 0, ny - 1), px], snr[np.clip(py + 1, 0, ny - 1), px]
    c = snr[py, px]
    fx = px + vertex(xm, c, xp)
    fy = py + vertex(ym, c, yp)
    ra, dec = maps.wcs.wcs_pix2world(fx, fy, 0)
    out = {"ra": np.asarray(ra) % 360.0, "dec": np.asarray(dec), "snr": c.astype(float)}
    scale = float(np.sqrt(abs(np.linalg.det(maps.wcs.wcs.cd)))) * 3600.0  # arcsec per grid px
    sigma_arcsec = maps.fwhm_px / FWHM_PER_SIGMA * scale
    out["pos_err_arcsec"] = np.sqrt(2.0) * sigma_arcsec / np.clip(c, 1.0, None)
    out["n_images"] = n_img.astype(np.int64)
    coords = np.stack([fy, fx])
    for band in maps.bands:
        ab = ndimage.map_coordinates(maps.a[band], coords, order=1, mode="nearest")
        bb = ndimage.map_coordinates(maps.b[band], coords, order=1, mode="nearest")
        good = bb > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"flux_{band}_nmgy"] = np.where(good, ab / np.where(good, bb, 1.0), np.nan)
            out[f"flux_{band}_sd_nmgy"] = np.where(good, 1.0 / np.sqrt(np.where(good, bb, 1.0)), np.nan)
    return pd.DataFrame(out)[cols]


#: Tiles (grid px, square) the joint matched filter is run on, so that its memory stays bounded
#: (about 40 bytes per grid pixel for 3 bands) however large the union of the images is.
MF_TILE_PX = 2048
#: Overlap of the tiles (grid px): peaks are taken in each tile's core only.
MF_TILE_MARGIN_PX = 32


def matched_filter_search(images: list[ImageData], backgrounds=None, snr_threshold: float = MF_SNR_THRESHOLD,
                          ra_deg=(), dec_deg=(), tile_px: int | None = None, min_images: int = 1,
                          trials_factor: float = 1.0, saturation_veto_fwhm: float | None = None
                          ) -> tuple[pd.DataFrame, np.ndarray, float]:
    """``matched_filter_peaks`` of ``joint_matched_filter`` over the common grid, tile by tile
    (``tile_px`` square cores, default twice the largest image's extent within 256 to
    ``MF_TILE_PX``, overlapping by ``MF_TILE_MARGIN_PX``, each with the images that
    reach it and its own calibration), the calibrated SNR at the positions ``ra_deg``,
    ``dec_deg`` (0 where vetoed or uncovered), and the threshold the peaks passed:
    ``snr_threshold`` raised by ``survey_threshold`` for the beams the images cover, times
    ``trials_factor`` (a search of one region of many counts them all)."""
    grid, (ny, nx) = common_grid(images)
    bands = sort_bands({im.band for im in images})
    ra_q, dec_q = np.asarray(ra_deg, float), np.asarray(dec_deg, float)
    qx, qy = grid.wcs_world2pix(ra_q, dec_q, 0) if ra_q.size else (np.zeros(0), np.zeros(0))
    snr_q = np.zeros(ra_q.size)
    boxes = [_image_box(grid, im) for im in images]
    if tile_px is None:
        # Tiles about twice an image's size: images scattered over a wide field (a survey of small
        # cutouts) then cost their own area, not the area of the box around them all.
        extent = max(max(bx1 - bx0, by1 - by0) for bx0, bx1, by0, by1 in boxes)
        tile_px = int(min(MF_TILE_PX, max(256, 2 * np.ceil(extent))))
    found, m = [], MF_TILE_MARGIN_PX
    n_beams = 0.0
    for ty in range(0, ny, tile_px):
        for tx in range(0, nx, tile_px):
            x0, x1, y0, y1 = max(tx - m, 0), min(tx + tile_px + m, nx), max(ty - m, 0), min(ty + tile_px + m, ny)
            mine = [k for k, (bx0, bx1, by0, by1) in enumerate(boxes)
                    if bx1 >= x0 - 1 and bx0 <= x1 and by1 >= y0 - 1 and by0 <= y1]
            if not mine:
                continue
            sub = grid.deepcopy()
            sub.wcs.crpix = [grid.wcs.crpix[0] - x0, grid.wcs.crpix[1] - y0]
            maps = joint_matched_filter([images[k] for k in mine],
                                        None if backgrounds is None else [backgrounds[k] for k in mine],
                                        grid=(sub, (y1 - y0, x1 - x0)), bands=bands,
                                        saturation_veto_fwhm=saturation_veto_fwhm)
            peaks = matched_filter_peaks(maps, snr_threshold, min_images=min_images)
            px, py = grid.wcs_world2pix(peaks["ra"].to_numpy(float), peaks["dec"].to_numpy(float), 0)
            core = (px >= tx - 0.5) & (px < tx + tile_px - 0.5) & (py >= ty - 0.5) & (py < ty + tile_px - 0.5)
            found.append(peaks[core])
            beam = np.pi / (4 * np.log(2)) * maps.fwhm_px ** 2
            n_beams += float((maps.n_images[ty - y0: ty - y0 + tile_px, tx - x0: tx - x0 + tile_px] > 0).sum()) / beam
            q = (qx >= tx - 0.5) & (qx < tx + tile_px - 0.5) & (qy >= ty - 0.5) & (qy < ty + tile_px - 0.5)
            if q.any():
                snr_q[q] = maps.snr_at(ra_q[q], dec_q[q], snr_threshold, min_images)
    found = [f for f in found if len(f)]
    peaks = pd.concat(found, ignore_index=True) if found else _no_peaks(bands)
    threshold = survey_threshold(n_beams * trials_factor, snr_threshold)
    return peaks[peaks["snr"].to_numpy(float) >= threshold].reset_index(drop=True), snr_q, threshold


#: sep's threshold (background rms) for the fainter sources the matched filter confirms
#: (``detect_sources`` step 2): SExtractor's and the heuristic baseline's 1.5.
FAINT_THRESH_SIGMA = 1.5
#: Starting galaxy shape of a candidate found by the matched filter only (a compact source).
MF_GAL_RADIUS_ARCSEC = 0.5


def _point_source_candidates(peaks: pd.DataFrame, bands) -> pd.DataFrame:
    """Candidates from matched-filter peaks: position and per-band fluxes from the maps,
    a point source (``is_star``), ``n_detections`` 0 (no single image detects it)."""
    out = pd.DataFrame({"ra": peaks["ra"].to_numpy(float), "dec": peaks["dec"].to_numpy(float),
                        "ra_sd": peaks["pos_err_arcsec"].to_numpy(float),
                        "dec_sd": peaks["pos_err_arcsec"].to_numpy(float),
                        "n_detections": np.zeros(len(peaks), np.int64)})
    for b in bands:
        out[f"flux_{b}_nmgy"] = peaks[f"flux_{b}_nmgy"].to_numpy(float) if f"flux_{b}_nmgy" in peaks else np.nan
        out[f"flux_{b}_sd_nmgy"] = (peaks[f"flux_{b}_sd_nmgy"].to_numpy(float) if f"flux_{b}_sd_nmgy" in peaks
                                    else np.nan)
    out["is_star"] = True
    out["p_star"] = 0.8
    out["gal_radius_arcsec"] = MF_GAL_RADIUS_ARCSEC
    out["gal_axis_ratio"] = 1.0
    out["gal_angle_deg"] = 0.0
    out["gal_frac_dev"] = 0.5
    return _fill_reference_flux(out, bands)


def _nearest(ra1, dec1, ra2, dec2, radius_arcsec) -> tuple[np.ndarray, np.ndarray]:
    """For each point 1: whether some point 2 lies within ``radius_arcsec``, and the index of
    the nearest point 2 (meaningful where it does)."""
    ra1, dec1, ra2, dec2 = (np.asarray(v, float) for v in (ra1, dec1, ra2, dec2))
    if len(ra1) == 0 or len(ra2) == 0:
        return np.zeros(len(ra1), bool), np.zeros(len(ra1), np.int64)
    ra0, dec0 = float(np.median(ra1)), float(np.median(dec1))

    def xy(ra, dec):
        return np.stack([((ra - ra0 + 180) % 360 - 180) * np.cos(np.radians(dec0)), dec - dec0], -1) * 3600.0

    dist, idx = cKDTree(xy(ra2, dec2)).query(xy(ra1, dec1), distance_upper_bound=radius_arcsec)
    near = np.isfinite(dist)
    return near, np.where(near, idx, 0)


def detect_sources(images: list[ImageData], *, thresh_sigma: float = 3.0, match_radius_arcsec: float = 1.5,
                   min_detections: int | None = None, matched_filter: bool = True,
                   mf_snr_threshold: float = MF_SNR_THRESHOLD,
                   faint_thresh_sigma: float | None = FAINT_THRESH_SIGMA) -> pd.DataFrame:
    """Candidate sources from all images (every band and epoch).

    sep's detections (per image, merged by friends-of-friends) carry shapes; with
    ``matched_filter`` the joint PSF-matched filter over all images (``joint_matched_filter``,
    ``matched_filter_peaks``) adds what no single image detects, in this order:

    1. a sep source with fewer than ``min_detections`` detections is kept when a matched-filter
       peak that no other sep source explains lies within ``match_radius_arcsec`` of it;
    2. sep's sources at ``faint_thresh_sigma`` (with ``min_detections``), which a lower threshold
       deblends from brighter neighbours whose matched-filter response hides their peak, are
       added where no candidate and no peak lies within ``match_radius_arcsec`` and the matched
       filter's SNR at their position reaches ``mf_snr_threshold``, so the candidates hold what
       sep finds at that threshold without its noise peaks;
    3. every matched-filter peak with no candidate within ``match_radius_arcsec`` becomes a
       point-source candidate (fluxes from the per-band maps, ``n_detections`` 0).

    Parameters
    ----------
    images : images with WCS
    thresh_sigma : sep's detection threshold per pixel in units of the background rms
    match_radius_arcsec : friends-of-friends linking length across images, and the distance
        within which a candidate explains a matched-filter peak
    min_detections : sep detections a source needs (None: 2 when there are 3 or more images,
        else 1), which rejects cosmic rays and noise peaks seen once
    matched_filter : add the joint matched filter's candidates (steps 1-3)
    mf_snr_threshold : SNR a matched-filter peak needs (flat SED over all bands and epochs;
        the map is calibrated to unit noise). The default 4.5 gives 0.24 noise peaks per 10^4
        beams (a beam is 1.133 PSF FWHM^2), measured on pure sky noise: 24 peaks in 1.0e6 beams
        (32 simulated fields of 6 images, g r i x 2 epochs, ~636 x 636 px, Gaussian and Moffat
        PSFs; ``MF_SNR_THRESHOLD``); 5.0 gives 0.02.
    faint_thresh_sigma : sep's threshold for step 2 (None, or not below ``thresh_sigma``: no
        step 2)

    Returns
    -------
    DataFrame sorted by (dec, ra) with the columns of ``candidate_columns``: ra, dec (deg),
    ra_sd, dec_sd (arcsec), n_detections, flux_<b>_nmgy and flux_<b>_sd_nmgy per band,
    flux_r_nmgy, is_star and p_star guesses, gal_radius_arcsec, gal_axis_ratio, gal_angle_deg,
    gal_frac_dev starting values (an empty table with these columns when nothing is found).
    """
    bands = sort_bands({im.band for im in images})
    if not images:
        return _as_candidates(pd.DataFrame(), bands)
    if min_detections is None:
        min_detections = 2 if len(images) >= 3 else 1
    backgrounds = [_background(im) for im in images]

    def sep_sources(thresh):
        dets = [image_detections(im, thresh_sigma=thresh, background=bg) for im, bg in zip(images, backgrounds)]
        dets = [d for d in dets if len(d)]
        return merge_detections(pd.concat(dets, ignore_index=True) if dets else pd.DataFrame(), bands,
                                match_radius_arcsec, 1)

    cands = sep_sources(thresh_sigma)
    seen = cands["n_detections"].to_numpy() >= min_detections
    if not matched_filter:
        return _as_candidates(cands[seen], bands)
    step2 = faint_thresh_sigma is not None and faint_thresh_sigma < thresh_sigma
    faint = cands.iloc[:0]
    if step2:
        faint = sep_sources(faint_thresh_sigma)
        faint = faint[faint["n_detections"].to_numpy() >= min_detections]
    peaks, faint_snr, mf_snr_threshold = matched_filter_search(images, backgrounds, mf_snr_threshold, faint["ra"],
                                                               faint["dec"], min_images=3 if min_detections > 1 else 1)
    # 1. Peaks that no kept sep source explains confirm the nearest sep source seen too few times.
    free = ~_nearest(peaks["ra"], peaks["dec"], cands["ra"][seen], cands["dec"][seen], match_radius_arcsec)[0]
    near, idx = _nearest(peaks["ra"][free], peaks["dec"][free], cands["ra"][~seen], cands["dec"][~seen],
                         match_radius_arcsec)
    rescued = np.zeros(len(cands), bool)
    rescued[np.nonzero(~seen)[0][idx[near]]] = True
    kept = [cands[seen | rescued]]
    # 2. sep's fainter sources that the matched filter confirms.
    if step2:
        alone = faint_snr >= mf_snr_threshold
        for other in (kept[0], peaks):
            alone &= ~_nearest(faint["ra"], faint["dec"], other["ra"], other["dec"], match_radius_arcsec)[0]
        kept.append(faint[alone])
    kept = pd.concat([k for k in kept if len(k)] or kept[:1], ignore_index=True)
    # 3. The other peaks, as point sources.
    new = ~_nearest(peaks["ra"], peaks["dec"], kept["ra"], kept["dec"], match_radius_arcsec)[0]
    parts = [p for p in (kept, _point_source_candidates(peaks[new], bands)) if len(p)]
    return _as_candidates(pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(), bands)


#: Fraction of a model's counts taken as its error when residuals are searched for sources: a
#: PSF or a profile described to a few percent leaves residuals of that order where its light
#: is, which must not read as new sources.
RESIDUAL_MODEL_ERROR_FRAC = 0.03
#: Matched-filter SNR a residual peak needs: 0.02 noise peaks per 10^4 beams (``detect_sources``
#: with ``mf_snr_threshold``), a tenth of the first detection's rate, since the residual search
#: comes on top of it.
RESIDUAL_SNR_THRESHOLD = 5.0
#: Residual peaks are not taken within this many PSF FWHMs of a saturated source's masked
#: region: its model (core masked, wings and spikes beyond any profile) leaves residuals there.
RESIDUAL_SATURATION_VETO_FWHM = 6.0


def residual_candidates(images: list[ImageData], models: list[np.ndarray], *,
                        snr_threshold: float = RESIDUAL_SNR_THRESHOLD,
                        min_images: int = 1, trials_factor: float = 1.0,
                        parents=None) -> tuple[pd.DataFrame, float]:
    """Point-source candidates (``candidate_columns``) from the joint matched filter of the
    residual images, pixels minus ``models`` (ADU, the expected counts of the sources fitted so
    far, sky excluded), and the threshold they passed.

    The background is estimated again on the residuals, where the sources no longer bias it,
    and the noise adds the models' shot noise and ``RESIDUAL_MODEL_ERROR_FRAC`` of their counts
    in quadrature, and no peak is taken within ``RESIDUAL_SATURATION_VETO_FWHM`` of a saturated
    source. What the first detection could not separate, a fainter source on the flank
    of a brighter one's matched-filter response, is then a peak of its own.

    ``parents``, a callable ``peaks -> (ra_deg, dec_deg)`` (NaN where none; ``peaks`` as
    ``matched_filter_peaks`` gives them), gives for each peak the centre of the source it would
    be a piece of (the nearest brighter one). A symmetric source that the model does not follow
    (a galaxy's profile, a PSF's wings) leaves residuals symmetric about its centre, where a
    neighbour has no twin: a peak is kept only if it exceeds the residual SNR at its reflection
    through that centre by the threshold, as a deblender that takes galaxies to be symmetric
    would split them."""
    bands = sort_bands({im.band for im in images})
    if not images:
        return _as_candidates(pd.DataFrame(), bands), snr_threshold
    residuals, backgrounds = [], []
    for im, model in zip(images, models):
        res = replace(im, pixels=np.asarray(im.pixels, np.float32) - model.astype(np.float32), _psf_cache={})
        sub, rms, mask = _background(res)
        shot = 0.0 if im.noise_includes_sources else np.maximum(model, 0.0) / max(im.gain, 1e-12)
        var = np.asarray(rms, np.float64) ** 2 + shot + (RESIDUAL_MODEL_ERROR_FRAC * model) ** 2
        residuals.append(res)
        backgrounds.append((sub, np.sqrt(var).astype(np.float32), mask))
    peaks, _, threshold = matched_filter_search(residuals, backgrounds, snr_threshold, min_images=min_images,
                                                trials_factor=trials_factor,
                                                saturation_veto_fwhm=RESIDUAL_SATURATION_VETO_FWHM)
    if parents is not None and len(peaks):
        ra, dec = peaks["ra"].to_numpy(float), peaks["dec"].to_numpy(float)
        p_ra, p_dec = parents(peaks)
        has = np.isfinite(p_ra) & np.isfinite(p_dec)
        keep = np.ones(len(peaks), bool)
        if has.any():
            cosd = np.cos(np.radians(p_dec[has]))
            east = ((ra[has] - p_ra[has] + 180.0) % 360.0 - 180.0) * cosd
            m_dec = p_dec[has] - (dec[has] - p_dec[has])
            m_ra = (p_ra[has] - east / np.cos(np.radians(m_dec))) % 360.0
            _, twin, _ = matched_filter_search(residuals, backgrounds, snr_threshold, m_ra, m_dec,
                                               min_images=min_images, trials_factor=trials_factor,
                                               saturation_veto_fwhm=RESIDUAL_SATURATION_VETO_FWHM)
            keep[has] = peaks["snr"].to_numpy(float)[has] - np.maximum(twin, 0.0) >= threshold
        peaks = peaks[keep].reset_index(drop=True)
    return _as_candidates(_point_source_candidates(peaks, bands), bands), threshold


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
