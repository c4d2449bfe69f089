"""Combination of per-image partial sums along each orbit: sigma-G clipping, masks, SNR.

For a constant-flux object ``sum(psi) / sum(phi)`` is its flux in nmgy and
``sum(psi) / sqrt(sum(phi))`` its combined SNR (``search.matched_filter``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.units import SIGMA_G_PER_IQR


#: Columns of reduced partials: per-orbit sums of one partition (``reduce_partials``).
SUM_COLUMNS = ["orbit_id", "n_rows", "n_kept", "psi", "phi"]
COMBINED_COLUMNS = ["orbit_id", "n_images", "n_rejected", "psi", "phi", "flux_nmgy", "flux_sd_nmgy", "snr"]


def combine_partials(partials: pd.DataFrame, *, n_sigma_g: float | None = 3.0, masked=None) -> pd.DataFrame:
    """Per-orbit combined statistics from per-image partial sums.

    Parameters
    ----------
    partials : DataFrame
        Columns orbit_id, image_id, psi, phi (from every partition of the chunk).
    n_sigma_g : float or None
        Sigma-G clipping threshold on per-image flux (outlier images, e.g. residuals); None:
        no clipping (then ``combine_sums(reduce_partials(...))`` per partition gives the same).
    masked : ndarray of bool, optional
        Intersections to leave out (inside a bright-star mask).

    Returns
    -------
    DataFrame with orbit_id, n_images (kept), n_rejected, psi, phi, flux_nmgy,
    flux_sd_nmgy, snr; one row per orbit with at least one intersection.
    """
    if partials.empty:
        return _empty_combined()
    # Rows in (orbit, image) order: the sums do not depend on how the partials were cut.
    order = _orbit_image_order(partials["orbit_id"].to_numpy(), partials["image_id"].to_numpy())
    ids, psi, phi = (partials[c].to_numpy()[order] for c in ("orbit_id", "psi", "phi"))
    keep = phi > 0
    if masked is not None:
        masked = np.asarray(masked, bool)
        if len(masked) != len(partials):
            raise ValueError(f"masked: {len(masked)} values for {len(partials)} partials")
        keep &= ~masked[order]
    flux = np.where(keep, psi / np.where(phi > 0, phi, 1), np.nan)
    new_group = np.r_[True, ids[1:] != ids[:-1]]
    starts, group = np.flatnonzero(new_group), np.cumsum(new_group) - 1
    if n_sigma_g is not None:
        keep &= _grouped_sigma_g_keep(flux, keep, group, starts, n_sigma_g)
    n_rows = np.diff(np.r_[starts, len(ids)])
    n_kept = np.add.reduceat(keep.astype(np.int64), starts)
    psi_sum = np.add.reduceat(np.where(keep, psi, 0.0), starts)
    phi_sum = np.add.reduceat(np.where(keep, phi, 0.0), starts)
    return _combined(ids[starts], n_rows, n_kept, psi_sum, phi_sum)


def _orbit_image_order(orbit_id: np.ndarray, image_id: np.ndarray) -> np.ndarray:
    """Stable (orbit, image) row order, as a stable two-key sort gives.

    Integer ids whose ranges fit are packed into one int64 key: a stable argsort of it is
    the same permutation and much faster on partials that are already sorted per partition.
    """
    if len(orbit_id) and np.issubdtype(orbit_id.dtype, np.integer) and np.issubdtype(image_id.dtype, np.integer):
        o_lo, i_lo = int(orbit_id.min()), int(image_id.min())
        o_span, i_span = int(orbit_id.max()) - o_lo + 1, int(image_id.max()) - i_lo + 1
        inside = max(abs(o_lo), abs(i_lo), int(orbit_id.max()), int(image_id.max())) < 2 ** 62
        if inside and o_span * i_span < 2 ** 62:
            key = (orbit_id.astype(np.int64) - o_lo) * i_span + (image_id.astype(np.int64) - i_lo)
            return np.argsort(key, kind="stable")
    return np.lexsort((image_id, orbit_id))


def _empty_combined() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c.startswith("n_") or c == "orbit_id" else "float64")
                         for c in COMBINED_COLUMNS})


def _combined(orbit_id, n_rows, n_kept, psi_sum, phi_sum) -> pd.DataFrame:
    """The combined table from per-orbit sums of the kept images."""
    pos = phi_sum > 0
    safe = np.where(pos, phi_sum, 1.0)
    out = pd.DataFrame({
        "orbit_id": np.asarray(orbit_id).astype("int64"), "n_images": np.asarray(n_kept).astype("int64"),
        "n_rejected": (np.asarray(n_rows) - n_kept).astype("int64"), "psi": psi_sum, "phi": phi_sum,
        "flux_nmgy": np.where(pos, psi_sum / safe, np.nan), "flux_sd_nmgy": np.where(pos, 1 / np.sqrt(safe), np.nan),
        "snr": np.where(pos, psi_sum / np.sqrt(safe), 0.0)})
    return out[COMBINED_COLUMNS]


def reduce_partials(partials: pd.DataFrame, masked=None) -> pd.DataFrame:
    """Per-orbit sums of one partition's per-image partials, for a combination without clipping.

    Without sigma-G clipping an orbit's combined statistics need only sum(psi) and sum(phi)
    over its kept images (phi > 0, not star-masked) and how many rows it had, so a search job
    writes one row per orbit instead of one per intersection (``SUM_COLUMNS``). Clipping needs
    the median and quartiles of every image's flux along the orbit, over all partitions: no
    fixed-size summary of a partition gives those, so clipped searches keep per-image rows.
    """
    if partials.empty:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("psi", "phi") else "int64") for c in SUM_COLUMNS})
    masked = np.zeros(len(partials), bool) if masked is None else np.asarray(masked, bool)
    p = partials.assign(_masked=masked).sort_values(["orbit_id", "image_id"], kind="stable")
    ids, psi, phi = p["orbit_id"].to_numpy(), p["psi"].to_numpy(), p["phi"].to_numpy()
    keep = (phi > 0) & ~p["_masked"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return pd.DataFrame({
        "orbit_id": ids[starts].astype("int64"), "n_rows": np.diff(np.r_[starts, len(ids)]).astype("int64"),
        "n_kept": np.add.reduceat(keep.astype(np.int64), starts),
        "psi": np.add.reduceat(np.where(keep, psi, 0.0), starts),
        "phi": np.add.reduceat(np.where(keep, phi, 0.0), starts)})


def combine_sums(sums: pd.DataFrame) -> pd.DataFrame:
    """Per-orbit combined statistics from the partitions' ``reduce_partials`` rows: those of an
    orbit are added in the order given, then combined as ``combine_partials`` without clipping
    (equal to it to floating-point rounding, about 1e-16 relative, whatever the partitioning)."""
    if sums.empty:
        return _empty_combined()
    s = sums.sort_values("orbit_id", kind="stable")
    ids = s["orbit_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    total = {c: np.add.reduceat(s[c].to_numpy(), starts) for c in ("n_rows", "n_kept", "psi", "phi")}
    return _combined(ids[starts], total["n_rows"], total["n_kept"], total["psi"], total["phi"])


def _grouped_sigma_g_keep(flux, keep, group, starts, n_sigma: float) -> np.ndarray:
    """Sigma-G keep mask for every group at once (rows grouped contiguously).

    Within a group with at least 4 kept fluxes and sigma_G = 0.7413 IQR > 0, a row is kept
    when |flux - median| <= n_sigma sigma_G; otherwise every row is kept. The quartiles are
    numpy's default (linear) percentiles of the kept fluxes, computed the same way, so each
    group gets the mask that rule gives on that group alone (tests/test_tracking.py).
    """
    n_kept = np.add.reduceat(keep.astype(np.int64), starts)
    values = np.where(keep, flux, np.inf)
    ordered, offsets = _sorted_within_groups(values, group, starts)

    def quantile(q):
        index = q * np.maximum(n_kept - 1, 0)  # exact for quartiles
        lo = np.floor(index).astype(np.int64)
        t = index - lo
        a = ordered[offsets + lo]
        b = ordered[offsets + np.minimum(lo + 1, np.maximum(n_kept - 1, 0))]
        diff = b - a
        return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)  # numpy's interpolation

    with np.errstate(invalid="ignore"):
        q25, q50, q75 = quantile(0.25), quantile(0.5), quantile(0.75)
        sigma_g = SIGMA_G_PER_IQR * (q75 - q25)
        clip = (n_kept >= 4) & (sigma_g > 0)
        inside = np.abs(flux - q50[group]) <= n_sigma * sigma_g[group]
    return ~clip[group] | inside


def _sorted_within_groups(values, group, starts):
    """Each group's values in ascending order (NaN last), and where each group begins.

    Groups of similar size are laid out as rows of a NaN-padded matrix, one row sort per
    group: much faster than a two-key sort. Only the values are used, so the order of equal
    values does not matter, and any position below a group's size holds the value that
    sorting that group alone puts there. Very uneven group sizes use the two-key sort.
    """
    sizes = np.diff(np.r_[starts, len(values)])
    width = int(sizes.max()) if len(sizes) else 0
    if len(sizes) * width > 2 * len(values) + 4096:
        return values[np.lexsort((values, group))], starts
    offsets = np.arange(len(sizes)) * width
    padded = np.full(len(sizes) * width, np.nan)
    padded[np.arange(len(values)) + (offsets - starts)[group]] = values
    padded.reshape(len(sizes), width).sort(axis=1)
    return padded, offsets
