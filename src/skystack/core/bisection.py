"""One balanced bisection of points on the sphere, for image partitions and catalog regions.

Points are cut recursively along the widest axis of their unit vectors (no RA wrap, no
trouble at the poles), at the count that keeps the parts' sizes in proportion to the number
of parts on each side, so part sizes differ by at most one. Ties are broken by a key given
by the caller, so the result is a function of the points and keys alone.
"""
from __future__ import annotations

import numpy as np


def unit_vectors(ra_deg, dec_deg) -> np.ndarray:
    """(n, 3) ICRS unit vectors of directions given in degrees."""
    ra, dec = np.radians(np.asarray(ra_deg, np.float64)), np.radians(np.asarray(dec_deg, np.float64))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def chord(separation_arcsec) -> np.ndarray:
    """Distance between unit vectors ``separation_arcsec`` apart on the sphere (exact, any Dec)."""
    return 2.0 * np.sin(np.radians(np.asarray(separation_arcsec, np.float64) / 3600.0) / 2.0)


def balanced_bisection(ra_deg, dec_deg, n_parts: int, tie_key=None) -> np.ndarray:
    """Part number (0 .. n_parts-1) of every point.

    Parameters
    ----------
    ra_deg, dec_deg : array (n,)
        Directions of the points (deg).
    n_parts : int
        Number of parts (>= 1); parts beyond the number of points stay empty.
    tie_key : array (n,), optional
        Breaks ties of equal coordinates (default: the input order).

    Returns
    -------
    int64 array (n,): part sizes differ by at most one, and each part is spatially coherent.
    """
    if n_parts < 1:
        raise ValueError(f"number of parts must be >= 1, got {n_parts}")
    xyz = unit_vectors(ra_deg, dec_deg).reshape(-1, 3)
    key = np.arange(len(xyz)) if tie_key is None else np.asarray(tie_key)
    part = np.zeros(len(xyz), dtype=np.int64)

    def split(members: np.ndarray, first: int, n: int) -> None:
        if n == 1 or len(members) == 0:
            part[members] = first
            return
        n_left_parts = n // 2
        n_left = int(round(len(members) * n_left_parts / n))
        pts = xyz[members]
        axis = int(np.argmax(pts.max(axis=0) - pts.min(axis=0)))
        order = members[np.lexsort((key[members], pts[:, axis]))]
        split(order[:n_left], first, n_left_parts)
        split(order[n_left:], first + n_left_parts, n - n_left_parts)

    split(np.arange(len(xyz)), 0, int(n_parts))
    return part
