"""Combination of per-image partial sums along each orbit: sigma-G clipping, masks, SNR.

For a constant-flux object ``sum(psi) / sum(phi)`` is its flux in nmgy and
``sum(psi) / sqrt(sum(phi))`` its combined SNR (``search.matched_filter``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.units import SIGMA_G_PER_IQR


def combine_partials(partials: pd.DataFrame, *, n_sigma_g: float = 3.0, masked=None) -> pd.DataFrame:
    """Per-orbit combined statistics from per-image partial sums.

    Parameters
    ----------
    partials : DataFrame
        Columns orbit_id, image_id, psi, phi (from every partition of the chunk).
    n_sigma_g : float
        Sigma-G clipping threshold on per-image flux (outlier images, e.g. residuals).
    masked : ndarray of bool, optional
        Intersections to leave out (inside a bright-star mask).

    Returns
    -------
    DataFrame with orbit_id, n_images (kept), n_rejected, psi, phi, flux_nmgy,
    flux_sd_nmgy, snr; one row per orbit with at least one intersection.
    """
    cols = ["orbit_id", "n_images", "n_rejected", "psi", "phi", "flux_nmgy", "flux_sd_nmgy", "snr"]
    if partials.empty:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c.startswith("n_") or c == "orbit_id" else "float64") for c in cols})
    masked = np.zeros(len(partials), bool) if masked is None else np.asarray(masked, bool)
    # Rows in (orbit, image) order: the sums do not depend on how the partials were cut.
    p = partials.assign(_masked=masked).sort_values(["orbit_id", "image_id"], kind="stable").reset_index(drop=True)
    ids, psi, phi = p["orbit_id"].to_numpy(), p["psi"].to_numpy(), p["phi"].to_numpy()
    keep = (phi > 0) & ~p["_masked"].to_numpy()
    flux = np.where(keep, psi / np.where(phi > 0, phi, 1), np.nan)
    new_group = np.r_[True, ids[1:] != ids[:-1]]
    starts, group = np.flatnonzero(new_group), np.cumsum(new_group) - 1
    keep &= _grouped_sigma_g_keep(flux, keep, group, starts, n_sigma_g)
    n_rows = np.diff(np.r_[starts, len(ids)])
    n_kept = np.add.reduceat(keep.astype(np.int64), starts)
    psi_sum = np.add.reduceat(np.where(keep, psi, 0.0), starts)
    phi_sum = np.add.reduceat(np.where(keep, phi, 0.0), starts)
    pos = phi_sum > 0
    safe = np.where(pos, phi_sum, 1.0)
    out = pd.DataFrame({
        "orbit_id": ids[starts].astype("int64"), "n_images": n_kept, "n_rejected": (n_rows - n_kept).astype("int64"),
        "psi": psi_sum, "phi": phi_sum, "flux_nmgy": np.where(pos, psi_sum / safe, np.nan),
        "flux_sd_nmgy": np.where(pos, 1 / np.sqrt(safe), np.nan), "snr": np.where(pos, psi_sum / np.sqrt(safe), 0.0)})
    return out[cols]


def _grouped_sigma_g_keep(flux, keep, group, starts, n_sigma: float) -> np.ndarray:
    """Sigma-G keep mask for every group at once (rows grouped contiguously).

    Within a group with at least 4 kept fluxes and sigma_G = 0.7413 IQR > 0, a row is kept
    when |flux - median| <= n_sigma sigma_G; otherwise every row is kept. The quartiles are
    numpy's default (linear) percentiles of the kept fluxes, computed the same way, so each
    group gets the mask that rule gives on that group alone (tests/test_tracking.py).
    """
    n_kept = np.add.reduceat(keep.astype(np.int64), starts)
    values = np.where(keep, flux, np.inf)
    ordered = values[np.lexsort((values, group))]  # per group: kept fluxes ascending, then inf

    def quantile(q):
        index = q * np.maximum(n_kept - 1, 0)  # exact for quartiles
        lo = np.floor(index).astype(np.int64)
        t = index - lo
        a = ordered[starts + lo]
        b = ordered[starts + np.minimum(lo + 1, np.maximum(n_kept - 1, 0))]
        diff = b - a
        return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)  # numpy's interpolation

    with np.errstate(invalid="ignore"):
        q25, q50, q75 = quantile(0.25), quantile(0.5), quantile(0.75)
        sigma_g = SIGMA_G_PER_IQR * (q75 - q25)
        clip = (n_kept >= 4) & (sigma_g > 0)
        inside = np.abs(flux - q50[group]) <= n_sigma * sigma_g[group]
    return ~clip[group] | inside
