"""Filters on intersections and candidates: the bright-star mask, detections, duplicates."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..astrometry.astropy_wcs import astropy_world2pix_near, wcs_from_header_text
from ..core.units import FWHM_PER_SIGMA


def star_mask_hits(partials: pd.DataFrame, images: pd.DataFrame, stars: pd.DataFrame | None, radius_arcsec: float) -> np.ndarray:
    """True for intersections within ``radius_arcsec`` of a masked (bright) star."""
    if stars is None or stars.empty or partials.empty:
        return np.zeros(len(partials), bool)
    hit = np.zeros(len(partials), bool)
    for image_id, idx in partials.groupby("image_id").indices.items():
        row = images.loc[images["image_id"] == image_id].iloc[0]
        wcs = wcs_from_header_text(row["wcs_header"])
        sx, sy = astropy_world2pix_near(wcs, stars["ra_deg"].to_numpy(), stars["dec_deg"].to_numpy(),
                                        (int(row["naxis2"]), int(row["naxis1"])))
        scale = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600
        px = partials["x"].to_numpy()[idx][:, None]
        py = partials["y"].to_numpy()[idx][:, None]
        d2 = (px - sx[None]) ** 2 + (py - sy[None]) ** 2
        hit[idx] = (d2 <= (radius_arcsec / scale) ** 2).any(axis=1)
    return hit


def merge_duplicates(candidates: pd.DataFrame, partials: pd.DataFrame, match_px: float,
                     snr_threshold: float | None = None) -> pd.DataFrame:
    """Keep the best (highest SNR) of candidate orbits that are the same object.

    A candidate is a duplicate of a better one kept before it when their predicted
    positions are within ``match_px`` in at least half of the images they share. With
    ``snr_threshold``, a candidate that only partly follows kept objects is a duplicate
    too when its SNR from the images where it is NOT on a kept object's track falls below
    the threshold: its signal is borrowed (its partials need ``psi`` and ``phi``).
    """
    if candidates.empty:
        return candidates.assign(n_merged=pd.Series(dtype="int64"))
    cand = candidates.sort_values(["snr", "orbit_id"], ascending=[False, True]).reset_index(drop=True)
    pos = {oid: g.set_index("image_id") for oid, g in partials[partials["orbit_id"].isin(cand["orbit_id"])].groupby("orbit_id")}
    kept, merged = [], {}
    for oid in cand["orbit_id"]:
        owner = _duplicate_of(pos.get(oid), [(best, pos.get(best)) for best in kept], match_px, snr_threshold)
        if owner is None:
            kept.append(oid)
            merged[oid] = 1
        else:
            merged[owner] += 1
    out = cand[cand["orbit_id"].isin(kept)].copy()
    out["n_merged"] = out["orbit_id"].map(merged).astype("int64")
    return out.reset_index(drop=True)


def _duplicate_of(mine: pd.DataFrame | None, kept: list, match_px: float, snr_threshold: float | None):
    """The kept orbit that ``mine`` duplicates, or None."""
    if mine is None:
        return None
    on_track = pd.Series(False, index=mine.index)
    most, most_shared = None, 0
    for best, other in kept:
        if other is None:
            continue
        shared = mine.index.intersection(other.index)
        if len(shared) == 0:
            continue
        close = np.hypot(mine.loc[shared, "x"] - other.loc[shared, "x"], mine.loc[shared, "y"] - other.loc[shared, "y"]) <= match_px
        if close.mean() >= 0.5:
            return best
        on_track.loc[shared[close.to_numpy()]] = True
        if close.sum() > most_shared:
            most, most_shared = best, int(close.sum())
    if snr_threshold is None or most is None:
        return None
    rest = mine[~on_track]
    phi = rest["phi"].sum()
    residual_snr = rest["psi"].sum() / np.sqrt(phi) if phi > 0 else 0.0
    return most if residual_snr < snr_threshold else None


def is_detection(combined: pd.DataFrame, snr_threshold: float, min_images: int) -> np.ndarray:
    """The detection predicate: combined SNR at or above the threshold on at least
    ``min_images`` kept images."""
    return ((combined["snr"] >= snr_threshold) & (combined["n_images"] >= min_images)).to_numpy()


def duplicate_match_px(images: pd.DataFrame) -> float:
    """Positions closer than this (px) are the same object: the median PSF FWHM."""
    return float(images["psf_sigma_px"].median()) * FWHM_PER_SIGMA


def bright_star_mask(catalog: pd.DataFrame, mag_limit: float, p_star_min: float = 0.5) -> pd.DataFrame:
    """Stars brighter than ``mag_limit`` in r (in the brightest band the catalog has, when it has
    no r): the search masks intersections near them. An empty catalog masks nothing."""
    mags = [c for c in catalog.columns if c.startswith("mag_")]
    if "mag_r" in mags:
        mag = catalog["mag_r"].to_numpy(float)
    elif mags:
        mag = np.nanmin(catalog[mags].to_numpy(float), axis=1) if len(catalog) else np.zeros(0)
    else:
        mag = np.full(len(catalog), np.nan)
    keep = (catalog["p_star"].to_numpy(float) >= p_star_min) & (mag < mag_limit) if len(catalog) else np.zeros(0, bool)
    stars = catalog[keep]
    return pd.DataFrame({"ra_deg": stars["ra"].to_numpy(float) if len(stars) else np.zeros(0),
                         "dec_deg": stars["dec"].to_numpy(float) if len(stars) else np.zeros(0),
                         "mag_r": mag[keep]})
