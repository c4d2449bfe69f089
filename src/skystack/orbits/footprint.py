"""Which tiles and trial orbits of a covering can reach the survey's images.

A region wider than the survey's footprint is mostly orbits whose tracks never fall on an
image, or on too few to be detected: on the demo survey (a 4.3 arcmin mosaic following one
object for three years) 2% of a box 100 times the simulated family's spread in a, i, node and
mean anomaly falls on at least 5 exposures. Only that part needs trial orbits, and the covering's
promise is stated for it: **every orbit of the region whose track falls on at least
``min_exposures`` of the region's exposures has a trial orbit within ``max_snr_loss``**.

Fields. Each exposure's images are a rectangle in its tangent plane (the metric's, at the
reference track; east, north arcsec): the bounding box of its images' corners, widened by a
margin. Gaps between CCDs are inside it, so the rectangle over-counts, never under-counts.

Tiles. A tile (centre c, half-widths h over the varied elements) is evaluated at 2n + 1 orbits:
its centre and ``c +- h_j`` along each element, exactly (the search's direction model). At
exposure i the central differences ``D_i[:, j] = (p(c + h_j) - p(c - h_j)) / 2`` are the linear
track model's columns in the tile's box coordinates u in [-1, 1]^n, and the second differences
``|p(c + h_j) + p(c - h_j) - 2 p(c)| / 2`` its curvature along each element; their sum, widened
by ``CURVATURE_MARGIN`` and ``SLACK_ARCSEC``, bounds what the linear model leaves out (cross
terms included only through that margin: an empirical bound, checked in
tests/test_region_search.py with the search's own intersection code). A tile can reach exposure
i when its centre's position is within ``sum_j |D_i[:, j]|`` plus that bound of the rectangle
(per axis); a tile that can reach fewer than ``min_exposures`` exposures is dropped.
``prune_tiles`` halves the surviving tiles while that lowers the covering's estimated size
(finer tiles fit the fields better but each adds its own lattice's edges, and a point per tile
along directions thinner than a cell).

Trials. The orbits nearest a trial t (its Voronoi cell in the tile's whitened metric) are within
the covering radius rho_T of it in the thick directions and anywhere in the tile along the thin
ones, so at exposure i they are within (per axis a)
``|D_i A^-1[:, thick]|_a rho_T + sum_j |(D_i A^-1[:, thin] A[thin, :])_aj|`` of t (A the tile's
whitening, ``w = A u``). A trial whose linear position, widened by that and by twice the
curvature bound, reaches fewer than ``min_exposures`` rectangles is dropped: no orbit it stands
for can reach more.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pandas as pd

from .table import ELEMENT_COLUMNS

#: Widening of the summed second differences (cross terms of the track's curvature).
CURVATURE_MARGIN = 1.5
#: Fixed slack on every bound (arcsec): the light-time iteration's and rounding's noise.
SLACK_ARCSEC = 1.0
#: Most tiles ``prune_tiles`` keeps before it stops halving.
MAX_KEPT_TILES = 30_000
ELEMENTS = ELEMENT_COLUMNS[:6]
ARCSEC_PER_RAD = 180.0 * 3600.0 / np.pi


class Fields(NamedTuple):
    """Per exposure (the metric's order), the images' bounding rectangle in the tangent plane."""

    lo: np.ndarray  # (N, 2) east, north arcsec
    hi: np.ndarray  # (N, 2)


class TileTracks(NamedTuple):
    """Exact track samples of tiles (T tiles, N exposures, n varied elements)."""

    centre: np.ndarray  # (T, N, 2) arcsec
    diff: np.ndarray  # (T, N, 2, n): central differences, the linear model in box coordinates
    curvature: np.ndarray  # (T, N, 2): bound on what the linear model leaves out


def tangent_arcsec(ra_deg, dec_deg, geometry, exposure) -> np.ndarray:
    """Gnomonic (east, north) arcsec (n, 2) of sky positions on one exposure's tangent plane of
    a ``covering.TrackGeometry`` (the reference track's direction at that exposure)."""
    ra, dec = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    d = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1).reshape(-1, 3)
    along = d @ geometry.center[exposure]
    return np.stack([d @ geometry.east[exposure], d @ geometry.north[exposure]], -1) / along[:, None] * ARCSEC_PER_RAD


def exposure_fields(images: pd.DataFrame, exposure_ids, geometry, margin_arcsec: float = 0.0) -> Fields:
    """Bounding rectangles (in ``geometry``'s tangent planes) of each exposure's images' corners.

    ``images``: index rows (``exposure_id``, ``wcs_header``, ``naxis1``, ``naxis2``);
    ``exposure_ids`` (N,): the exposures in the geometry's order."""
    from ..astrometry.astropy_wcs import wcs_from_header_text

    ids = np.asarray(exposure_ids)
    lo = np.full((len(ids), 2), np.inf)
    hi = np.full((len(ids), 2), -np.inf)
    row_of = {int(e): i for i, e in enumerate(ids)}
    for _, im in images[images["exposure_id"].isin(ids)].iterrows():
        i = row_of[int(im["exposure_id"])]
        nx, ny = float(im["naxis1"]), float(im["naxis2"])
        w = wcs_from_header_text(im["wcs_header"])
        x = np.array([0.5, nx + 0.5, nx + 0.5, 0.5, (nx + 1) / 2, nx + 0.5, (nx + 1) / 2, 0.5]) - 1.0
        y = np.array([0.5, 0.5, ny + 0.5, ny + 0.5, 0.5, (ny + 1) / 2, ny + 0.5, (ny + 1) / 2]) - 1.0
        xy = tangent_arcsec(*w.all_pix2world(x, y, 0), geometry, i)
        lo[i] = np.minimum(lo[i], xy.min(axis=0))
        hi[i] = np.maximum(hi[i], xy.max(axis=0))
    if not np.isfinite(lo).all():
        missing = ids[~np.isfinite(lo).all(axis=1)]
        raise ValueError(f"exposure_fields: no images for exposure(s) {missing[:5].tolist()}")
    return Fields(lo - margin_arcsec, hi + margin_arcsec)


def tile_tracks(centres: np.ndarray, tile_hw: np.ndarray, epoch: float, geom, batch: int = 8192) -> TileTracks:
    """Exact positions of the tiles' centres and axis points, reduced to the linear model."""
    from .covering import _track_jit

    varied = np.flatnonzero(tile_hw > 0)
    n = len(varied)
    steps = np.zeros((2 * n + 1, 6))
    for k, j in enumerate(varied):
        steps[1 + 2 * k, j], steps[2 + 2 * k, j] = tile_hw[j], -tile_hw[j]
    pts = (centres[:, None, :] + steps[None]).reshape(-1, 6)
    out = np.empty((len(pts), len(geom.jd_tdb), 2))
    size = min(batch, 1 << max(0, int(len(pts) - 1).bit_length()))
    for s in range(0, len(pts), size):
        x = pts[s:s + size]
        m = len(x)
        if m < size:
            x = np.concatenate([x, np.repeat(x[:1], size - m, axis=0)])
        out[s:s + m] = np.asarray(_track_jit(jnp.asarray(x), epoch, geom))[:m]
    p = out.reshape(len(centres), 2 * n + 1, -1, 2)
    c, plus, minus = p[:, 0], p[:, 1::2], p[:, 2::2]  # (T, N, 2), (T, n, N, 2)
    diff = np.moveaxis((plus - minus) / 2.0, 1, -1)  # (T, N, 2, n)
    second = np.abs(plus + minus - 2.0 * c[:, None]).sum(axis=1) / 2.0  # (T, N, 2)
    return TileTracks(c, diff, CURVATURE_MARGIN * second + SLACK_ARCSEC)


def reach_counts(position: np.ndarray, half_extent: np.ndarray, fields: Fields) -> np.ndarray:
    """How many exposures' rectangles each box ``position +- half_extent`` (..., N, 2) meets."""
    meets = (position + half_extent >= fields.lo) & (position - half_extent <= fields.hi)
    return np.all(meets, axis=-1).sum(axis=-1)


def prune_tiles(x0: np.ndarray, hw: np.ndarray, counts: np.ndarray, epoch: float, geom, fields: Fields,
                min_exposures: int, tile_size, log=None):
    """Tiles of the grid that can reach at least ``min_exposures`` exposures, the grid halved
    while that lowers the covering's estimated size.

    ``tile_size(tile_hw)`` is the estimated number of lattice points of one tile. Each round the
    kept tiles' children along every element are predicted with the linear model (centres at
    ``+- D_j / 2``, that column halved); the halving with the smallest predicted total (children
    kept times their size) is made and evaluated exactly, until none lowers the total by 3%.
    (A tile much larger than the fields keeps both children, so a wide region keeps its few
    large tiles and is pruned trial by trial.)

    Returns ``(counts, kept_index (K, 6), tracks: TileTracks of the kept tiles, rounds)``."""
    counts = np.asarray(counts, np.int64).copy()
    varied = np.flatnonzero(hw > 0)
    idx = np.array(np.meshgrid(*[np.arange(c) for c in counts], indexing="ij")).reshape(6, -1).T
    rounds = []
    while True:
        tile_hw = hw / counts
        centres = x0 + hw * (-1.0 + (2 * idx + 1) / counts)
        tracks = tile_tracks(centres, tile_hw, epoch, geom)
        keep = reach_counts(tracks.centre, np.abs(tracks.diff).sum(axis=-1) + tracks.curvature, fields) >= min_exposures
        idx, tracks = idx[keep], TileTracks(*(a[keep] for a in tracks))
        total = len(idx) * tile_size(tile_hw)
        rounds.append({"tiles": {k: int(c) for k, c in zip(ELEMENTS, counts)}, "evaluated": int(len(keep)),
                       "kept": int(len(idx)), "estimate": float(total)})
        if log is not None:
            log.info("covering: %d of %d evaluated tiles reach >= %d exposures (about %.3g lattice points)",
                     len(idx), len(keep), min_exposures, total)
        if not len(idx) or 2 * len(idx) > MAX_KEPT_TILES:
            return counts, idx, tracks, rounds
        best = None
        for k, j in enumerate(varied):
            half = tracks.diff.copy()
            half[..., k] /= 2.0
            ext = np.abs(half).sum(axis=-1) + tracks.curvature
            n_kept = sum(int(np.sum(reach_counts(tracks.centre + sign * half[..., k], ext, fields) >= min_exposures))
                         for sign in (-1.0, 1.0))
            child_hw = tile_hw.copy()
            child_hw[j] /= 2.0
            predicted = n_kept * tile_size(child_hw)
            if best is None or predicted < best[0]:
                best = (predicted, j)
        if best[0] >= 0.97 * total:
            return counts, idx, tracks, rounds
        j = best[1]
        counts[j] *= 2
        child = np.repeat(idx, 2, axis=0)
        child[:, j] = 2 * child[:, j] + np.tile([0, 1], len(idx))
        idx = child


def trial_margins(tp: dict, tracks_diff: np.ndarray) -> np.ndarray:
    """Per exposure and axis (N, 2), how far from a trial the orbits of its Voronoi cell can be
    under the tile's linear model (module docstring)."""
    split = tp["split"]
    a_inv = np.linalg.inv(tp["a_mat"])
    b = tracks_diff @ a_inv  # (N, 2, n): D A^-1
    out = np.zeros(tracks_diff.shape[:2])
    if len(split.thick):
        out += np.linalg.norm(b[..., split.thick], axis=-1) * split.rho_thick
    if len(split.thin):
        out += np.abs(b[..., split.thin] @ tp["a_mat"][split.thin]).sum(axis=-1)
    return out


#: Trials per group below which ``trial_reach`` tests each trial rather than splitting the group.
REACH_LEAF_TRIALS = 2048
#: Margin (arcsec) by which a group's bounds must clear a field's edge to decide it for all its
#: trials at once: far above rounding, so the grouped decision is the per-trial one.
REACH_DECIDE_ARCSEC = 1e-6


def trial_reach(u: np.ndarray, tp: dict, centre_track: np.ndarray, tracks_diff: np.ndarray,
                curvature: np.ndarray, fields: Fields, min_exposures: int) -> np.ndarray:
    """Which of a tile's trials (box coordinates u (P, n)) may stand for an orbit that reaches
    at least ``min_exposures`` exposures.

    Branch and bound over groups of trials (a tile's lattice has tens of millions of points, most
    of them far from the fields): positions are linear in u, so over a group's bounding box in u
    they lie within ``c + D u_mid +- |D| u_half`` of its centre's, exactly. A group is dropped when
    fewer than ``min_exposures`` exposures can be met, kept when that many are met by every trial,
    and otherwise split at the middle of its widest undecided direction; small groups are tested
    trial by trial on their undecided exposures only (``reach_counts``, the same test)."""
    half = trial_margins(tp, tracks_diff) + 2.0 * curvature  # (N, 2)
    keep = np.zeros(len(u), bool)
    if not len(u):
        return keep
    lo, hi, eps = fields.lo - half, fields.hi + half, REACH_DECIDE_ARCSEC
    d_abs = np.abs(tracks_diff)  # (N, 2, n)
    stack = [np.arange(len(u))]
    while stack:
        idx = stack.pop()
        g = u[idx]
        g_lo, g_hi = g.min(axis=0), g.max(axis=0)
        mid, rad = (g_lo + g_hi) / 2.0, (g_hi - g_lo) / 2.0
        p_mid = centre_track + tracks_diff @ mid  # (N, 2)
        spread = d_abs @ rad  # (N, 2)
        possible = np.all((p_mid + spread >= lo - eps) & (p_mid - spread <= hi + eps), axis=-1)
        certain = np.all((p_mid - spread >= lo + eps) & (p_mid + spread <= hi - eps), axis=-1)
        n_certain = int(certain.sum())
        if possible.sum() < min_exposures:
            continue
        if n_certain >= min_exposures:
            keep[idx] = True
            continue
        open_ = possible & ~certain
        width = (d_abs[open_] * rad).sum(axis=(0, 1))  # (n,) how far each direction moves the open tracks
        if len(idx) <= REACH_LEAF_TRIALS or not width.max() > 0:
            d_open = tracks_diff[open_]
            pos = centre_track[open_][None] + (g @ d_open.reshape(-1, d_open.shape[-1]).T).reshape(len(g), -1, 2)
            sub = Fields(fields.lo[open_], fields.hi[open_])
            keep[idx] = n_certain + reach_counts(pos, half[open_][None], sub) >= min_exposures
            continue
        j = int(np.argmax(width))
        left = g[:, j] <= mid[j]
        stack += [idx[left], idx[~left]]
    return keep


def orbit_exposure_counts(orbits: pd.DataFrame, geom, fields: Fields) -> np.ndarray:
    """Exposures whose rectangles each orbit's exact track falls in (for checks)."""
    from .covering import track_positions

    pos = track_positions(orbits, geom)
    return reach_counts(pos, np.zeros_like(pos), fields)
