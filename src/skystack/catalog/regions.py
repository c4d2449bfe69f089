"""Regions of sky balanced by source count (k-d tree style), and their neighbours.

Work is split by sources, not by area: the candidate list is cut recursively at the
median of the longer side (RA scaled by cos Dec, or Dec) into regions whose counts differ
by at most one at every split. Ties are broken by the input order, so the result is a
function of the candidate table alone.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree


def _tangent_arcsec(ra, dec):
    ra0, dec0 = np.median(ra), np.median(dec)
    return np.stack([((ra - ra0 + 180) % 360 - 180) * np.cos(np.radians(dec0)), dec - dec0], -1) * 3600.0


def _split(xy: np.ndarray, index: np.ndarray, n_regions: int, first_id: int, out: np.ndarray) -> None:
    if n_regions <= 1 or index.size <= 1:
        out[index] = first_id
        return
    pts = xy[index]
    axis = int(np.ptp(pts[:, 1]) > np.ptp(pts[:, 0]))
    order = index[np.lexsort((index, pts[:, axis]))]
    n_left = n_regions // 2
    cut = int(round(index.size * n_left / n_regions))
    _split(xy, order[:cut], n_left, first_id, out)
    _split(xy, order[cut:], n_regions - n_left, first_id + n_left, out)


def make_regions(candidates: pd.DataFrame, n_regions: int | None = None,
                 max_sources_per_region: int | None = None) -> np.ndarray:
    """Region id (0 .. n_regions-1) of every candidate.

    Parameters
    ----------
    candidates : table with ``ra``, ``dec`` (deg)
    n_regions : number of regions; or
    max_sources_per_region : the smallest number of regions that keeps every region at or
        below this count

    Returns
    -------
    int array aligned with ``candidates``: each source is in exactly one region and region
    counts differ by at most one per split (at most ``ceil(n / n_regions)``).
    """
    n = len(candidates)
    if n_regions is None:
        if max_sources_per_region is None:
            raise ValueError("give n_regions or max_sources_per_region")
        n_regions = max(1, int(np.ceil(n / max_sources_per_region)))
    n_regions = int(max(1, min(n_regions, max(n, 1))))
    out = np.zeros(n, dtype=np.int64)
    if n:
        xy = _tangent_arcsec(candidates["ra"].to_numpy(float), candidates["dec"].to_numpy(float))
        _split(xy, np.arange(n), n_regions, 0, out)
    return out


def region_neighbours(candidates: pd.DataFrame, regions: np.ndarray, region: int,
                      margin_arcsec: float = 15.0) -> pd.DataFrame:
    """Sources of other regions within ``margin_arcsec`` of any source of ``region``.

    They are rendered at their current estimates and held fixed while the region is fitted.
    """
    regions = np.asarray(regions)
    mine = regions == region
    if not mine.any() or mine.all():
        return candidates.iloc[:0]
    xy = _tangent_arcsec(candidates["ra"].to_numpy(float), candidates["dec"].to_numpy(float))
    tree = cKDTree(xy[mine])
    dist, _ = tree.query(xy[~mine], k=1, distance_upper_bound=margin_arcsec)
    others = np.flatnonzero(~mine)[np.isfinite(dist)]
    return candidates.iloc[others]
