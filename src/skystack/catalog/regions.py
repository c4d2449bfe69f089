"""Regions of sky balanced by source count (k-d tree style), and their neighbours.

Work is split by sources, not by area: the candidates are cut by the balanced bisection of
``core.bisection`` into regions whose counts differ by at most one. Ties are broken by the
input order, so the result is a function of the candidate table alone.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..core.bisection import balanced_bisection, chord, unit_vectors


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
    return balanced_bisection(candidates["ra"].to_numpy(float), candidates["dec"].to_numpy(float), n_regions)


def region_neighbours(candidates: pd.DataFrame, regions: np.ndarray, region: int,
                      margin_arcsec: float = 15.0) -> pd.DataFrame:
    """Sources of other regions within ``margin_arcsec`` of any source of ``region``.

    They are rendered at their current estimates and held fixed while the region is fitted.
    """
    regions = np.asarray(regions)
    mine = regions == region
    if not mine.any() or mine.all():
        return candidates.iloc[:0]
    xyz = unit_vectors(candidates["ra"].to_numpy(float), candidates["dec"].to_numpy(float))
    tree = cKDTree(xyz[mine])
    dist, _ = tree.query(xyz[~mine], k=1, distance_upper_bound=chord(margin_arcsec))
    others = np.flatnonzero(~mine)[np.isfinite(dist)]
    return candidates.iloc[others]
