"""Per-detection results: light curves along an orbit, coadd stamps, the false-alarm model."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.units import SIGMA_G_PER_IQR, counts_per_nmgy


def light_curves(candidates: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Per-image flux (nmgy) with 1-sd errors along each candidate orbit."""
    lc = candidates.merge(images[["image_id", "mjd_mid_utc", "band"]], on="image_id")
    lc["flux_nmgy"] = lc["psi"] / lc["phi"]
    lc["flux_sd_nmgy"] = 1.0 / np.sqrt(lc["phi"])
    return lc[["orbit_id", "image_id", "mjd_mid_utc", "band", "x", "y", "flux_nmgy", "flux_sd_nmgy"]].sort_values(
        ["orbit_id", "mjd_mid_utc", "image_id"], kind="stable").reset_index(drop=True)


def stamps_nmgy(positions: pd.DataFrame, images: pd.DataFrame, caches: dict, radius: int = 8):
    """Per-image patches along an orbit in nmgy per pixel (background removed), in the rows'
    order, and each image's pixel noise in nmgy: ``(stamps (n, k, k), noise (n,))``."""
    meta = images.set_index("image_id")
    k = 2 * radius + 1
    stamps, noise = np.full((len(positions), k, k), np.nan), np.full(len(positions), np.nan)
    part_of = meta.loc[positions["image_id"], "partition"].to_numpy()
    for part in np.unique(part_of):
        sel = part_of == part
        g = positions[sel]
        m = meta.loc[g["image_id"]]
        patches = caches[int(part)].patches(g["image_id"].to_numpy(), g["x"].to_numpy(), g["y"].to_numpy(), radius)
        scale = counts_per_nmgy(m["magzp"].to_numpy())
        bg = np.where(m["is_difference"].to_numpy(), 0.0, m["sky_level"].to_numpy())
        stamps[sel] = (patches - bg[:, None, None]) / scale[:, None, None]
        noise[sel] = m["noise_sigma"].to_numpy() / scale
    return stamps, noise


def clipped_coadd(positions: pd.DataFrame, images: pd.DataFrame, caches: dict, radius: int = 8,
                  n_sigma: float = 3.0) -> np.ndarray:
    """Inverse-variance weighted mean along an orbit (nmgy per pixel) in which, pixel by pixel,
    the values more than ``n_sigma`` of their own image's noise from the stack's weighted
    median are left out: a cosmic ray or a star's residual in a few images does not show in
    the coadd, the object (in every image) does."""
    stamps, noise = stamps_nmgy(positions, images, caches, radius)
    w = np.where(np.isfinite(stamps), 1.0 / noise[:, None, None] ** 2, 0.0)
    values = np.where(np.isfinite(stamps), stamps, 0.0)
    median = _weighted_median_stack(values, w)
    keep = (w > 0) & (np.abs(values - median) <= n_sigma * noise[:, None, None])
    num, den = (values * w * keep).sum(axis=0), (w * keep).sum(axis=0)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _weighted_median_stack(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-pixel weighted median over the first axis (pixels without weight: NaN)."""
    order = np.argsort(values, axis=0, kind="stable")
    v, w = np.take_along_axis(values, order, 0), np.take_along_axis(weights, order, 0)
    cum = np.cumsum(w, axis=0)
    total = cum[-1]
    idx = np.argmax(cum >= 0.5 * total[None], axis=0)
    out = np.take_along_axis(v, idx[None], 0)[0]
    return np.where(total > 0, out, np.nan)


def coadd_stamp(positions: pd.DataFrame, images: pd.DataFrame, caches: dict, radius: int = 8) -> np.ndarray:
    """Inverse-variance weighted mean of the patches along an orbit, in nmgy per pixel (the
    unclipped counterpart of ``clipped_coadd``)."""
    stamps, noise = stamps_nmgy(positions, images, caches, radius)
    w = np.where(np.isfinite(stamps), 1.0 / noise[:, None, None] ** 2, 0.0)
    num, den = (np.where(w > 0, stamps, 0.0) * w).sum(axis=0), w.sum(axis=0)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def expected_false_alarms(n_orbits: int, snr_threshold: float, snr_sd: float = 1.0) -> float:
    """Expected detections on pure noise: each orbit tried exceeds the threshold with the
    Gaussian tail probability of its combined SNR, N(0, ``snr_sd``). An upper bound on the
    expectation, since neighbouring orbits share pixels and are not independent.

    ``snr_sd`` is 1 for the plain matched filter; sigma-G clipping widens it a little (1.02
    with 30 images per orbit), which ``robust_snr_sd`` measures on a run's own orbits."""
    from ..orbits.noise_peaks import gaussian_tail

    return float(n_orbits * gaussian_tail(snr_threshold / snr_sd))


def robust_snr_sd(snr) -> float:
    """The spread of the combined SNR over the orbits tried, sigma_G = 0.7413 IQR: the noise
    orbits dominate it, and the few with signal do not move the quartiles."""
    q25, q75 = np.percentile(np.asarray(snr, np.float64), [25, 75])
    return float(SIGMA_G_PER_IQR * (q75 - q25))
