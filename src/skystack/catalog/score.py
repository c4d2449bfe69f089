"""Score a catalog against the truth, as in Celeste's comparison table.

Every true source is matched to the nearest catalog source within ``match_radius_arcsec``
(each catalog source used once, closest pairs first). Errors are means of absolute
differences over matched sources; shape errors use true galaxies only (angle only where
the true axis ratio is below 0.8, so that the angle is defined); "missed" counts true
sources of a type that are unmatched or given the other type.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .priors import NMGY_ZERO_MAG


def _tangent(ra, dec, ra0, dec0):
    return np.stack([((ra - ra0 + 180) % 360 - 180) * np.cos(np.radians(dec0)), dec - dec0], -1) * 3600.0


def match_catalog(catalog: pd.DataFrame, truth: pd.DataFrame, match_radius_arcsec: float = 2.0) -> np.ndarray:
    """Index into ``catalog`` of each truth row's match, -1 when unmatched."""
    out = np.full(len(truth), -1)
    if len(catalog) == 0 or len(truth) == 0:
        return out
    ra0, dec0 = float(np.median(truth["ra"])), float(np.median(truth["dec"]))
    t = _tangent(truth["ra"].to_numpy(float), truth["dec"].to_numpy(float), ra0, dec0)
    c = _tangent(catalog["ra"].to_numpy(float), catalog["dec"].to_numpy(float), ra0, dec0)
    k = min(4, len(catalog))
    dist, idx = cKDTree(c).query(t, k=k, distance_upper_bound=match_radius_arcsec)
    dist, idx = dist.reshape(len(t), k), idx.reshape(len(t), k)
    pairs = sorted((d, i, j) for i in range(len(t)) for d, j in zip(dist[i], idx[i]) if np.isfinite(d))
    used = set()
    for d, i, j in pairs:
        if out[i] < 0 and j not in used:
            out[i] = j
            used.add(j)
    return out


def _mag(f):
    f = np.asarray(f, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(f > 0, NMGY_ZERO_MAG - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)


def _mean_abs(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.mean(np.abs(x))) if x.size else float("nan")


def _within(err, sd):
    err, sd = np.asarray(err, float), np.asarray(sd, float)
    ok = np.isfinite(err) & np.isfinite(sd)
    return float(np.mean(np.abs(err[ok]) <= sd[ok])) if ok.any() else float("nan")


def score_catalog(catalog: pd.DataFrame, truth: pd.DataFrame, *, pixel_scale_arcsec: float = 1.0,
                  match_radius_arcsec: float = 2.0, colors=("gr", "ri")) -> dict:
    """Celeste-style error table of ``catalog`` against ``truth`` (see module docs).

    Returns
    -------
    dict: n_truth, n_matched, position_px, missed_stars, missed_galaxies, mag_r,
    color_<c>, frac_dev, axis_ratio, radius_arcsec, angle_deg, and the 1-sd calibration
    fractions within1sd_flux_r, within1sd_<colour>, within1sd_position.
    """
    m = match_catalog(catalog, truth, match_radius_arcsec)
    ok = m >= 0
    t = truth[ok].reset_index(drop=True)
    c = catalog.iloc[m[ok]].reset_index(drop=True)
    is_star = truth["is_star"].to_numpy(bool)
    p_star = np.full(len(truth), np.nan)
    p_star[ok] = c["p_star"].to_numpy(float)
    missed_stars = np.mean(~ok[is_star] | (p_star[is_star] < 0.5)) if is_star.any() else float("nan")
    missed_gals = np.mean(~ok[~is_star] | (p_star[~is_star] >= 0.5)) if (~is_star).any() else float("nan")
    cosd = np.cos(np.radians(t["dec"].to_numpy(float)))
    d_east = ((c["ra"] - t["ra"] + 180) % 360 - 180).to_numpy(float) * cosd * 3600.0
    d_north = (c["dec"] - t["dec"]).to_numpy(float) * 3600.0
    out = {
        "n_truth": int(len(truth)), "n_matched": int(ok.sum()),
        "position_px": _mean_abs(np.hypot(d_east, d_north) / pixel_scale_arcsec),
        "missed_stars": float(missed_stars), "missed_galaxies": float(missed_gals),
        "mag_r": _mean_abs(_mag(c["flux_r_nmgy"]) - _mag(t["flux_r_nmgy"])),
    }
    for col in colors:
        if f"color_{col}" in c and f"color_{col}" in t:
            out[f"color_{col}"] = _mean_abs(c[f"color_{col}"] - t[f"color_{col}"])
    gal = ~t["is_star"].to_numpy(bool)
    for key, col in (("frac_dev", "gal_frac_dev"), ("axis_ratio", "gal_axis_ratio"),
                     ("radius_arcsec", "gal_radius_arcsec")):
        out[key] = _mean_abs((c[col] - t[col])[gal]) if col in c else float("nan")
    if "gal_angle_deg" in c:
        elongated = gal & (t["gal_axis_ratio"].to_numpy(float) < 0.8)
        d = (c["gal_angle_deg"] - t["gal_angle_deg"]).to_numpy(float)
        d = (d + 90.0) % 180.0 - 90.0
        out["angle_deg"] = _mean_abs(d[elongated])
    if "flux_r_sd_nmgy" in c:
        out["within1sd_flux_r"] = _within(c["flux_r_nmgy"] - t["flux_r_nmgy"], c["flux_r_sd_nmgy"])
    for col in colors:
        if f"color_{col}_sd" in c and f"color_{col}" in t:
            out[f"within1sd_color_{col}"] = _within(c[f"color_{col}"] - t[f"color_{col}"], c[f"color_{col}_sd"])
    if "ra_sd" in c:
        out["within1sd_position"] = _within(np.r_[d_east, d_north], np.r_[c["ra_sd"], c["dec_sd"]])
        out["position_floor_px"] = float(np.mean(expected_offset(c["ra_sd"].to_numpy(float),
                                                                 c["dec_sd"].to_numpy(float)))) / pixel_scale_arcsec
    return out


def expected_offset(sd_east, sd_north) -> np.ndarray:
    """E sqrt(X^2 + Y^2) for independent X ~ N(0, sd_east^2), Y ~ N(0, sd_north^2): the mean
    position error (``position_px``'s measure) of an estimator whose errors are exactly the sds:
    ``sqrt(2 / pi) s_max E(1 - s_min^2 / s_max^2)``, E the complete elliptic integral of the
    second kind (``sqrt(pi / 2) s`` for equal sds)."""
    from scipy.special import ellipe

    a = np.maximum(np.asarray(sd_east, np.float64), np.asarray(sd_north, np.float64))
    b = np.minimum(np.asarray(sd_east, np.float64), np.asarray(sd_north, np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(a > 0, 1.0 - (b / np.where(a > 0, a, 1.0)) ** 2, 0.0)
    return np.sqrt(2.0 / np.pi) * a * ellipe(m)


def calibration_table(catalog: pd.DataFrame, truth: pd.DataFrame, bands, *, match_radius_arcsec: float = 2.0,
                      colors=("gr", "ri")) -> dict:
    """Bias and 1-sd coverage of every reported quantity, over matched sources.

    ``bias_<q>`` is the mean of ``(estimate - truth) / sd`` (0 for an unbiased catalog),
    ``within1sd_<q>`` the fraction with ``|estimate - truth| <= sd`` (0.683 for honest Gaussian
    errors); q is ``flux_<band>``, ``color_<c>``, ``east`` and ``north``.
    """
    m = match_catalog(catalog, truth, match_radius_arcsec)
    ok = m >= 0
    t = truth[ok].reset_index(drop=True)
    c = catalog.iloc[m[ok]].reset_index(drop=True)
    pairs = {}
    for b in bands:
        if f"flux_{b}_sd_nmgy" in c and f"flux_{b}_nmgy" in t:
            pairs[f"flux_{b}"] = (c[f"flux_{b}_nmgy"] - t[f"flux_{b}_nmgy"], c[f"flux_{b}_sd_nmgy"])
    for col in colors:
        if f"color_{col}_sd" in c and f"color_{col}" in t:
            pairs[f"color_{col}"] = (c[f"color_{col}"] - t[f"color_{col}"], c[f"color_{col}_sd"])
    if "ra_sd" in c:
        cosd = np.cos(np.radians(t["dec"].to_numpy(float)))
        pairs["east"] = (((c["ra"] - t["ra"] + 180) % 360 - 180) * cosd * 3600.0, c["ra_sd"])
        pairs["north"] = ((c["dec"] - t["dec"]) * 3600.0, c["dec_sd"])
    out = {}
    for q, (err, sd) in pairs.items():
        err, sd = np.asarray(err, float), np.asarray(sd, float)
        good = np.isfinite(err) & np.isfinite(sd) & (sd > 0)
        out[f"bias_{q}"] = float(np.mean(err[good] / sd[good])) if good.any() else float("nan")
        out[f"within1sd_{q}"] = _within(err, sd)
    return out


def completeness_by_mag(catalog: pd.DataFrame, truth: pd.DataFrame, edges_mag, *,
                        match_radius_arcsec: float = 2.0) -> list[dict]:
    """Fraction of true sources matched, per bin of true r magnitude (``edges_mag`` bin edges)."""
    found = match_catalog(catalog, truth, match_radius_arcsec) >= 0
    mag = _mag(truth["flux_r_nmgy"])
    rows = []
    for lo, hi in zip(edges_mag[:-1], edges_mag[1:]):
        sel = (mag >= lo) & (mag < hi)
        rows.append({"mag_lo": float(lo), "mag_hi": float(hi), "n_truth": int(sel.sum()),
                     "completeness": float(found[sel].mean()) if sel.any() else float("nan")})
    return rows


def markdown_table(scores: dict[str, dict]) -> str:
    """Scores of several catalogs side by side as a Markdown table (rows = metrics)."""
    names = list(scores)
    keys = [k for k in scores[names[0]]]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        vals = []
        for n in names:
            v = scores[n].get(k, float("nan"))
            vals.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append(f"| {k} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
