"""Orbit x image intersections: where each orbit falls on each image.

Where a body is seen (light time, apparent ICRS direction) is ``astrometry.directions``;
positions are float64 throughout, and each image's TAN, TAN-SIP or TPV WCS is ``astrometry.wcs``.

An intersection is in bounds when the pixel position lies on the detector area:
``-0.5 <= x < naxis1 - 0.5`` and ``-0.5 <= y < naxis2 - 0.5`` (0-based pixel centres at
integers, so ``round(x), round(y)`` is always a valid pixel).

Work is organised per exposure (all images of an exposure share time and site), in steps
between which what survives is compacted on the host (on a CPU, XLA's fixed-size
``nonzero`` is several times slower than numpy's). Nothing in bounds is ever
dropped: every cut is a proven bound, so the answer is brute force's, only cheaper.

1. cull: each orbit is propagated exactly only at track nodes (``NODE_SPACING_DAY`` apart);
   at an exposure its position is estimated on the straight line through the nearest
   node's state, and the pair is kept only if the estimate, widened by a bound on its
   error (acceleration, light time), reaches the exposure's field circle, a cap that
   provably holds every image of the exposure with its candidate margin;
2. the kept pairs get the exact direction (Kepler at the exposure time, light time) and
   are kept if inside the field circle;
3. those are projected on every image of the exposure with one 3x3 matrix per image (the
   plain gnomonic part: no SIP, TPV by its affine part at the image centre) and kept if
   within the image's distortion bound of its edges;
4. only those get the Newton inversion of the TPV and SIP distortion, the exact bounds
   test, and come back to the host.

Batches have fixed, padded shapes (few compilations) and respect a memory budget sized
for the worst case of each step.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..astrometry import ephemeris
from ..astrometry.directions import (
    _norm3,
    _paired_directions,
    observer_states,
)
from ..astrometry.kepler import OrbitArrays, heliocentric_state, orbit_arrays
from ..astrometry.wcs import (
    WcsParams,
    fit_plain,
    max_distortion_px,
    pix2world_batched,
    pixel_matrix,
    plain_wcs,
    stack_wcs,
    take,
    trim_sip,
    undistort,
)
from ..core.units import GM_SUN_AU3_D2
from ..orbits.table import validate_orbits

BYTES_PER_PAIR = 96  # device memory per (image, candidate) entry of an exact batch, worst case (estimate)
CULL_BYTES_PER_PAIR = 128  # device memory per (exposure, orbit) pair of a cull batch (estimate)
MIN_ORBITS_PER_BATCH = 256
NODE_SPACING_DAY = 120.0  # track nodes; a body with q = 20 AU strays < 15 arcsec from its node line in 60 days
SUN_BARYCENTRIC_SPEED_MAX_AU_PER_DAY = 2e-5  # DE421 1900-2050: at most 9.3e-6 AU/day
CULL_SAFETY = 1.01  # relative slack on the cull's error bound (rounding; the < 1e-11 AU light-time step)
CULL_SLACK = 1e-9  # absolute slack on the sine of the cull's angle bound
SLOT_GRID_CELLS = 16  # per side of each exposure's slot lookup grid
CANDIDATE_MARGIN_PX = 1.0  # slack added to each image's bound on its (SIP or TPV) distortion displacement
FIELD_SLACK_RAD = 1e-6  # slack on each exposure's field radius (0.2 arcsec)
DEFAULT_MAX_BATCH_BYTES = 256 << 20
#: On a CPU, the exact steps' batches are held to this much memory: they then stay in the
#: caches, 2x to 3x faster than one large batch on the demo (same intersections).
CPU_EXACT_BATCH_BYTES = 4 << 20
INTERSECTION_COLUMNS = {"orbit_id": "int64", "image_id": "int64", "x": "float64", "y": "float64"}
IMAGE_COLUMNS = ["image_id", "exposure_id", "jd_tdb_mid", "site_lat_deg", "site_lon_deg", "site_height_m",
                 "wcs_header", "naxis1", "naxis2"]
SAME_TIME_TOLERANCE_DAY = 1e-6


# ----------------------------------------------------------------------------- step 1: cull
def _orbit_track_bounds(orb: OrbitArrays):
    """Per orbit: the largest heliocentric acceleration (``GM / q^2``, AU/day^2) and speed
    (vis-viva at perihelion, AU/day) anywhere on the orbit."""
    q = orb.a_au * (1.0 - orb.e)
    return GM_SUN_AU3_D2 / (q * q), jnp.sqrt(GM_SUN_AU3_D2 * (1.0 + orb.e) / q)


def _node_states(orb: OrbitArrays, node_jd_tdb):
    """Heliocentric states of every orbit at every track node: (J, n, 3) each."""
    return heliocentric_state(orb, node_jd_tdb[:, None])


def _track_estimate(node_pos_au, node_vel_au, acc_max, speed_max, exposure_node, exposure_dt_day,
                    sun_minus_observer_au):
    """Estimated observer-to-body vectors at exposures, and the sine of a proven bound on the
    angle between each estimate and the true astrometric direction.

    The body's heliocentric position at the exposure is taken on the straight line through
    its state at the exposure's track node, ``p_j + v_j dt``. The true barycentric body
    position seen at the exposure (at the emission time ``t - tau``) differs from that
    estimate by at most::

        eps = a_max dt^2 / 2 + (v_max + V_sun) tau,   tau <= (D + eps) / c

    (``D`` = the estimate's distance from the observer), i.e.
    ``eps <= (a_max dt^2 / 2 + k D) / (1 - k)`` with ``k = (v_max + V_sun) / c``, and the
    true direction is within ``asin(eps / D)`` of the estimate's. Shapes: nodes (J, B_o, 3),
    orbits (B_o,), exposures (B_e,); returns (B_e, B_o, 3) and (B_e, B_o), the sine being
    >= 1 where the estimate says nothing about the direction.
    """
    dt = exposure_dt_day[:, None, None]
    rel = node_pos_au[exposure_node] + node_vel_au[exposure_node] * dt + sun_minus_observer_au[:, None, :]
    dist = _norm3(rel)
    k = (speed_max + SUN_BARYCENTRIC_SPEED_MAX_AU_PER_DAY) / ephemeris.C_AU_PER_DAY
    eps = (0.5 * acc_max * exposure_dt_day[:, None] ** 2 + k * dist) / (1.0 - k)
    return rel, eps * CULL_SAFETY / dist + CULL_SLACK


class OrbitTracks(NamedTuple):
    """A batch of orbits for the cull (leading axis = orbit, nodes (J, B_o, 3))."""

    node_pos_au: jnp.ndarray  # (J, B_o, 3) heliocentric position at each track node
    node_vel_au: jnp.ndarray  # (J, B_o, 3) heliocentric velocity (AU/day) at each node
    acc_max: jnp.ndarray  # (B_o,) largest heliocentric acceleration on the orbit (AU/day^2)
    speed_max: jnp.ndarray  # (B_o,) largest heliocentric speed (AU/day)
    ok: jnp.ndarray  # (B_o,) bool, False for padding


class ExposureFields(NamedTuple):
    """A batch of exposures for the cull (leading axis = exposure)."""

    node: jnp.ndarray  # (B_e,) int, each exposure's track node
    dt_day: jnp.ndarray  # (B_e,) exposure time minus its node's
    sun_minus_observer_au: jnp.ndarray  # (B_e, 3)
    field_center: jnp.ndarray  # (B_e, 3) ICRS unit vector
    field_cos_radius: jnp.ndarray  # (B_e,)
    ok: jnp.ndarray  # (B_e,) bool, False for padding


class CandidatePairs(NamedTuple):
    """C candidate (exposure, orbit) pairs for the exact steps (leading axis = pair)."""

    orbits: OrbitArrays  # the pair's orbit constants
    jd_tdb: jnp.ndarray  # (C,) the exposure's mid-exposure TDB
    observer_au: jnp.ndarray  # (C, 3) barycentric observer
    sun_taylor_au: jnp.ndarray  # (C, 3, 3) the Sun's position, velocity, acceleration
    field_center: jnp.ndarray  # (C, 3)
    field_cos_radius: jnp.ndarray  # (C,)
    live: jnp.ndarray  # (C,) bool, False for padding
    exposure: jnp.ndarray  # (C,) int, index into the per-exposure arrays of ``SlotArrays``


class SlotArrays(NamedTuple):
    """Per-exposure image slots on the device, whole (leading axes (n_exposures, K) or
    (n_exposures, cells, L)); candidates index them by exposure."""

    plane_basis: jnp.ndarray  # (n_exp, 3, 3) gnomonic plane at the field centre
    grid_origin: jnp.ndarray  # (n_exp, 2) slot lookup grid in that plane
    grid_cell: jnp.ndarray  # (n_exp, 2)
    cell_slots: jnp.ndarray  # (n_exp, cells, L) slots that may reach each cell
    cell_slot_ok: jnp.ndarray  # (n_exp, cells, L) bool
    slot_ok: jnp.ndarray  # (n_exp, K) bool
    slot_matrix: jnp.ndarray  # (n_exp, K, 3, 3) see wcs.pixel_matrix
    slot_wcs: WcsParams  # fields with leading axes (n_exp, K)
    slot_limits_px: jnp.ndarray  # (n_exp, K, 4) x_lo, x_hi, y_lo, y_hi
    slot_margin_px: jnp.ndarray  # (n_exp, K) candidate margin (distortion bound + slack)


def _cull(tracks: OrbitTracks, fields: ExposureFields):
    """(exposure, orbit) pairs of a batch that may fall in the exposure's field circle.

    With the estimate and bound of ``_track_estimate``, a pair whose estimate is farther
    than ``R + theta`` from the field centre (radius ``R``, ``sin theta`` the bound) cannot
    fall in the field. Returns the (B_e, B_o) mask of kept pairs. The host compacts it: on
    a CPU, XLA's fixed-size ``nonzero`` is several times slower than numpy's.
    """
    rel, sin_t = _track_estimate(tracks.node_pos_au, tracks.node_vel_au, tracks.acc_max, tracks.speed_max,
                                 fields.node, fields.dt_day, fields.sun_minus_observer_au)
    field_center, field_cos_radius = fields.field_center, fields.field_cos_radius
    dist = _norm3(rel)
    anywhere = sin_t >= 1.0
    sin_t = jnp.minimum(sin_t, 1.0)
    cos_t = jnp.sqrt(1.0 - sin_t * sin_t)
    cos_r = field_cos_radius[:, None]
    sin_r = jnp.sqrt(jnp.maximum(1.0 - cos_r * cos_r, 0.0))
    dot = (rel[..., 0] * field_center[:, None, 0] + rel[..., 1] * field_center[:, None, 1]
           + rel[..., 2] * field_center[:, None, 2])
    # angle(rel, centre) <= R + theta, written with cosines; R + theta >= pi holds everything.
    near = anywhere | (cos_r <= -cos_t) | (dot >= dist * (cos_r * cos_t - sin_r * sin_t))
    return near & tracks.ok[None, :] & fields.ok[:, None]


_node_states_jit = jax.jit(_node_states)
_cull_jit = jax.jit(_cull)


# ----------------------------------------------------------------------------- steps 2-4: exact
def _batch_intersections(pairs: CandidatePairs, sl: SlotArrays):
    """Steps 2 and 3 for C candidate (exposure, orbit) pairs.

    2. exact direction; keep the pair if inside the exposure's field circle;
    3. look up the slots listed for its cell of the exposure's grid (``_slot_lookup``),
       project on each of those images with the plain gnomonic matrix and keep
       (pair, slot) entries within the image's distortion bound of its bounds.

    Returns the (C, 3) directions, the (C, L) slots looked up and the (C, L) mask of
    step 3 (compacted by the host).
    """
    d, _ = _paired_directions(pairs.orbits, pairs.jd_tdb, pairs.observer_au, pairs.sun_taylor_au)  # (C, 3)
    in_field = pairs.live & (jnp.sum(d * pairs.field_center, axis=-1) >= pairs.field_cos_radius)
    exposure = pairs.exposure
    p = jnp.einsum("cij,cj->ci", sl.plane_basis[exposure], d)
    depth = jnp.where(p[:, 2] > 0, p[:, 2], 1.0)
    n_cells = SLOT_GRID_CELLS
    ij = jnp.floor((p[:, :2] / depth[:, None] - sl.grid_origin[exposure]) / sl.grid_cell[exposure])
    ij = jnp.clip(jnp.where(jnp.isfinite(ij), ij, 0), 0, n_cells - 1).astype(jnp.int32)
    cell = ij[:, 0] * n_cells + ij[:, 1]
    slots = sl.cell_slots[exposure, cell]  # (C, L)
    e = exposure[:, None]
    h = jnp.einsum("clij,cj->cli", sl.slot_matrix[e, slots], d)  # (C, L, 3)
    w = h[..., 2]
    front = w > 0
    w = jnp.where(front, w, 1.0)
    crpix = sl.slot_wcs.crpix0_px[e, slots]
    x_tan = crpix[..., 0] + h[..., 0] / w
    y_tan = crpix[..., 1] + h[..., 1] / w
    lim, m = sl.slot_limits_px[e, slots], sl.slot_margin_px[e, slots]
    # A point on the image lies within the image's bound on the (SIP or TPV) displacement
    # of its plain gnomonic position, so nothing in bounds is lost here.
    near = (front & (x_tan >= lim[..., 0] - m) & (x_tan < lim[..., 1] + m) & (y_tan >= lim[..., 2] - m)
            & (y_tan < lim[..., 3] + m) & sl.slot_ok[e, slots] & sl.cell_slot_ok[exposure, cell] & in_field[:, None])
    return d, slots, near


def _pixels(directions, exposure, slot, sl: SlotArrays):
    """Step 4 for (direction, exposure, slot) entries: TPV and SIP inverted (Newton) from
    the plain gnomonic position; pixel positions and whether they are in bounds."""
    h = jnp.einsum("cij,cj->ci", sl.slot_matrix[exposure, slot], directions)
    params = take(sl.slot_wcs, (exposure, slot))
    crpix = params.crpix0_px
    u, v = jax.vmap(undistort)(params, h[:, 0] / h[:, 2], h[:, 1] / h[:, 2])
    x, y = crpix[:, 0] + u, crpix[:, 1] + v
    lim = sl.slot_limits_px[exposure, slot]
    return x, y, (x >= lim[:, 0]) & (x < lim[:, 1]) & (y >= lim[:, 2]) & (y < lim[:, 3])


def _gathered_batch(orbits: OrbitArrays, per_exposure, orbit_index, exposure_index, live, sl: SlotArrays):
    """``_batch_intersections`` for candidates given by (orbit, exposure) indices into arrays
    already on the device: each batch then sends only its indices."""
    jd_tdb, observer_au, sun_taylor_au, field_center, field_cos_radius = (a[exposure_index] for a in per_exposure)
    pairs = CandidatePairs(OrbitArrays(*(f[orbit_index] for f in orbits)), jd_tdb, observer_au, sun_taylor_au,
                           field_center, field_cos_radius, live, exposure_index)
    return _batch_intersections(pairs, sl)


_batch_intersections_jit = jax.jit(_gathered_batch)


def _gathered_pixels(directions, index, exposure, slot, sl: SlotArrays):
    """``_pixels`` for the batch's directions at ``index``, gathered on the device (the
    directions stay there)."""
    return _pixels(directions[index], exposure, slot, sl)


_pixels_jit = jax.jit(_gathered_pixels)


# ----------------------------------------------------------------------------- host driver
def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _empty_intersections() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in INTERSECTION_COLUMNS.items()})


def _exposure_table(images: pd.DataFrame, where: str):
    """Per exposure: time and site (checked equal over its images), and its image rows."""
    groups = images.groupby("exposure_id", sort=True)
    cols = ["jd_tdb_mid", "site_lat_deg", "site_lon_deg", "site_height_m"]
    first = groups[cols].first()
    spread = groups[cols].max() - groups[cols].min()
    tol = pd.Series({"jd_tdb_mid": SAME_TIME_TOLERANCE_DAY, "site_lat_deg": 1e-9, "site_lon_deg": 1e-9,
                     "site_height_m": 1e-3})
    bad = (spread > tol).any(axis=1)
    if bad.any():
        eid = bad.index[bad.to_numpy()][0]
        col = spread.columns[(spread.loc[eid] > tol).to_numpy()][0]
        raise ValueError(f"{where}: exposure_id {eid}: its images disagree on {col} (spread {spread.loc[eid, col]})")
    rows = [np.asarray(idx) for idx in groups.indices.values()]
    return first, rows


def _image_sources(images: pd.DataFrame) -> list[str]:
    """How error messages name each image: file and HDU when known, and image_id."""
    ids = images["image_id"].tolist()
    if "path" in images.columns and "hdu" in images.columns:
        return [f"{p}[HDU {h}] (image_id {i})" for p, h, i in zip(images["path"], images["hdu"], ids)]
    return [f"image_id {i}" for i in ids]


def _check_images(images: pd.DataFrame, where: str) -> None:
    missing = [c for c in IMAGE_COLUMNS if c not in images.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
    if images["image_id"].duplicated().any():
        raise ValueError(f"{where}: duplicate image_id {images.loc[images['image_id'].duplicated(), 'image_id'].iloc[0]}")
    num = images[["jd_tdb_mid", "site_lat_deg", "site_lon_deg", "site_height_m", "naxis1", "naxis2"]].astype(float)
    bad = ~np.isfinite(num.to_numpy()).all(axis=1) | (num["naxis1"] < 1).to_numpy() | (num["naxis2"] < 1).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: {_image_sources(images.iloc[[i]])[0]}: non-finite time/site or empty image size")


def _round_up_coarse(n: int) -> int:
    """``n`` rounded up to a multiple of 1/8 of the next power of two: at most 12.5 %
    padding, and few distinct sizes (so few compilations)."""
    step = max(1, _pow2_at_least(n) // 8)
    return -(-n // step) * step


def batch_shape(n_orbits: int, n_exposures: int, max_batch_bytes: int, bytes_per_pair: int = CULL_BYTES_PER_PAIR):
    """Orbits and exposures per cull batch, with ``B_o B_e bytes_per_pair <= max_batch_bytes``.

    Exposures come first (all of them when the budget allows at least
    ``MIN_ORBITS_PER_BATCH`` orbits with them): the track nodes of an orbit batch are then
    propagated once.

    Returns
    -------
    b_o, b_e : int
        At least 1 each; coarse sizes so that few shapes get compiled.
    """
    pairs = max(1, int(max_batch_bytes) // bytes_per_pair)
    b_e_max = max(1, pairs // max(1, min(n_orbits, MIN_ORBITS_PER_BATCH)))
    b_e = _equal_batches(n_exposures, b_e_max)
    b_o = _equal_batches(n_orbits, max(1, pairs // b_e))
    return b_o, b_e


def _equal_batches(n: int, most: int) -> int:
    """Batch size for ``n`` items, at most ``most``: equal batches, each as large as allowed."""
    if n <= most:
        return min(_round_up_coarse(n), most)
    return min(_round_up_coarse(-(-n // -(-n // most))), most)


def track_nodes(jd_tdb, spacing_day: float = NODE_SPACING_DAY):
    """Track node times covering the exposures, and each exposure's nearest node.

    Returns
    -------
    node_jd_tdb : (J,)
        Node times, ``spacing_day`` apart (only those with exposures around them).
    exposure_node : (n,) int64
        Each exposure's node.
    exposure_dt_day : (n,)
        Exposure time minus node time, ``|dt| <= spacing_day / 2``.
    """
    jd = np.asarray(jd_tdb, dtype=np.float64)
    t0 = float(jd.min())
    cell = np.floor((jd - t0) / spacing_day).astype(np.int64)
    used, exposure_node = np.unique(cell, return_inverse=True)
    node_jd = t0 + (used + 0.5) * spacing_day
    return node_jd, exposure_node.astype(np.int64), jd - node_jd[exposure_node]


class ImageSet(NamedTuple):
    """Images prepared for ``intersect`` (host arrays), grouped by exposure.

    Slots ``(n_exposures, K)`` list each exposure's images (K = most images of any
    exposure); unused slots point at a spare row and are masked off. Prepare once and
    reuse for many orbit chunks: parsing headers and computing the observer's position
    are host work that does not depend on the orbits.
    """

    image_id: np.ndarray  # (n_images + 1,) int64, last = -1 (spare row)
    slots: np.ndarray  # (n_exposures, K) int64 rows of image_id
    slot_ok: np.ndarray  # (n_exposures, K) bool
    jd_tdb: np.ndarray  # (n_exposures,) mid-exposure TDB JD
    observer_au: np.ndarray  # (n_exposures, 3) barycentric observer position
    sun_taylor_au: np.ndarray  # (n_exposures, 3, 3) the Sun's position, velocity, acceleration
    field_center: np.ndarray  # (n_exposures, 3) ICRS unit vector
    field_cos_radius: np.ndarray  # (n_exposures,) cosine of the field circle's radius
    slot_wcs: WcsParams  # fields with leading axes (n_exposures, K)
    slot_matrix: np.ndarray  # (n_exposures, K, 3, 3) see wcs.pixel_matrix
    slot_limits_px: np.ndarray  # (n_exposures, K, 4) x_lo, x_hi, y_lo, y_hi
    slot_margin_px: np.ndarray  # (n_exposures, K) candidate margin (distortion bound + slack)
    node_jd_tdb: np.ndarray  # (J,) track node times (see ``track_nodes``)
    exposure_node: np.ndarray  # (n_exposures,) int64 each exposure's node
    exposure_dt_day: np.ndarray  # (n_exposures,) exposure time minus its node's
    plane_basis: np.ndarray  # (n_exposures, 3, 3) gnomonic plane at the field centre (see ``_slot_lookup``)
    grid_origin: np.ndarray  # (n_exposures, 2) slot lookup grid in that plane
    grid_cell: np.ndarray  # (n_exposures, 2)
    cell_slots: np.ndarray  # (n_exposures, SLOT_GRID_CELLS**2, L) int64 slots that may reach each cell
    cell_slot_ok: np.ndarray  # (n_exposures, SLOT_GRID_CELLS**2, L) bool

    @property
    def n_images(self) -> int:
        return len(self.image_id) - 1

    @property
    def n_exposures(self) -> int:
        return len(self.jd_tdb)


def prepare_images(images: pd.DataFrame) -> ImageSet:
    """Parse WCS headers, group images by exposure and place each exposure's observer.

    Parameters
    ----------
    images : DataFrame
        Image index rows (``skystack.core.io.IMAGES``); uses image_id, exposure_id, jd_tdb_mid,
        site_lat_deg, site_lon_deg, site_height_m, wcs_header, naxis1, naxis2 (and path,
        hdu for error messages when present). Images of one exposure must share time
        and site.

    Returns
    -------
    ImageSet
    """
    where = "intersect: images"
    _check_images(images, where)
    if images.empty:
        raise ValueError(f"{where}: no images")
    images = images.reset_index(drop=True)
    n = len(images)

    # Per image: WCS, bounds and candidate margin; one extra row pads the slots. TPV
    # images get their plain affine map fitted at the image centre (a small margin).
    naxis = images[["naxis1", "naxis2"]].to_numpy(np.float64)
    wcs = fit_plain(trim_sip(stack_wcs(images["wcs_header"].tolist(), _image_sources(images))), naxis[:, 0], naxis[:, 1])
    margin = max_distortion_px(wcs, naxis[:, 0], naxis[:, 1]) + CANDIDATE_MARGIN_PX
    limits = np.stack([np.full(n, -0.5), naxis[:, 0] - 0.5, np.full(n, -0.5), naxis[:, 1] - 0.5], -1)
    pad = lambda a: np.concatenate([a, a[:1]], axis=0)  # noqa: E731
    wcs = WcsParams(*(pad(np.asarray(f)) for f in wcs))
    matrix = np.asarray(pixel_matrix(WcsParams(*(jnp.asarray(f) for f in wcs))))
    limits, margin = pad(limits), pad(margin)

    # Per exposure: one time, one site, one propagation.
    exposures, rows = _exposure_table(images, where)
    k = max(len(r) for r in rows)
    slots = np.full((len(exposures), k), n, dtype=np.int64)
    for e, r in enumerate(rows):
        slots[e, : len(r)] = r
    site = {"lat_deg": exposures["site_lat_deg"].to_numpy(), "lon_deg": exposures["site_lon_deg"].to_numpy(),
            "height_m": exposures["site_height_m"].to_numpy()}
    jd = exposures["jd_tdb_mid"].to_numpy(np.float64)
    observer, sun = observer_states(jd, site)
    center, cos_radius, lookup = _field_circles(wcs, limits, margin, slots, n)
    return ImageSet(np.append(images["image_id"].to_numpy(np.int64), -1), slots, slots < n, jd, observer, sun, center,
                    cos_radius, WcsParams(*(np.asarray(f)[slots] for f in wcs)), matrix[slots], limits[slots],
                    margin[slots], *track_nodes(jd), *lookup)


def _field_circles(wcs: WcsParams, limits, margin, slots, n_images):
    """A circle on the sky around each exposure that contains every direction whose plain
    gnomonic pixel position is within the candidate margin of one of its images.

    Such directions fill, per image, the gnomonic quadrilateral whose corners are the
    margin-expanded image corners (projected by the plain WCS: no SIP, TPV by its affine
    part); its sides are great-circle arcs, so a spherical cap (radius < 90 deg) holding
    the corners holds the quadrilateral.
    """
    lo_x, hi_x = limits[:, 0] - margin, limits[:, 1] + margin
    lo_y, hi_y = limits[:, 2] - margin, limits[:, 3] + margin
    cx = np.stack([lo_x, hi_x, hi_x, lo_x], -1)
    cy = np.stack([lo_y, lo_y, hi_y, hi_y], -1)
    tan_only = WcsParams(*(jnp.asarray(f) for f in plain_wcs(wcs)))
    ra, dec = (np.radians(np.asarray(a)) for a in pix2world_batched(tan_only, jnp.asarray(cx), jnp.asarray(cy)))
    corners = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1)  # (n + 1, 4, 3)
    pts = corners[slots]  # (n_exp, K, 4, 3)
    used = (slots < n_images)[:, :, None]
    center = np.sum(np.where(used[..., None], pts, 0.0), axis=(1, 2))
    norm = np.linalg.norm(center, axis=-1, keepdims=True)
    center = np.where(norm > 1e-12, center / np.maximum(norm, 1e-300), np.array([1.0, 0.0, 0.0]))
    cos_sep = np.einsum("ekci,ei->ekc", pts, center)
    radius = np.arccos(np.clip(np.min(np.where(used, cos_sep, 1.0), axis=(1, 2)), -1.0, 1.0)) + FIELD_SLACK_RAD
    # A field wider than a hemisphere is not a cap: accept every direction there.
    cos_radius = np.where((radius < np.pi / 2) & (norm[:, 0] > 1e-12), np.cos(radius), -2.0)
    return center, cos_radius, _slot_lookup(pts, used[..., 0], center, cos_radius)


def _slot_lookup(pts, used, center, cos_radius, n_cells: int = SLOT_GRID_CELLS):
    """Per exposure, a grid over the gnomonic plane tangent at its field centre whose cells list
    the slots whose quadrilateral (see ``_field_circles``) may reach them.

    Great circles are straight lines in any gnomonic plane, so each quadrilateral lies in the
    box around its corners' projections; a cell lists every slot whose box meets it. A
    direction within an image's candidate margin thus finds the image in its cell's list.
    Exposures whose field circle is not a cap below 90 deg list every slot in every cell.

    Returns
    -------
    basis : (n_exp, 3, 3)
        Rows: the plane's x and y axes and the field centre.
    origin, cell : (n_exp, 2)
        The grid's lower-left corner and cell size in the plane.
    cell_slots, cell_slot_ok : (n_exp, n_cells**2, L)
        Slot indices per cell (L = the most any cell needs) and which are real.
    """
    n_exp, k = used.shape
    pole = np.where(np.abs(center[:, 2:3]) < 0.9, np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]))
    ax = np.cross(pole, center)
    ax /= np.linalg.norm(ax, axis=-1, keepdims=True)
    basis = np.stack([ax, np.cross(center, ax), center], axis=1)
    proj = np.einsum("eij,ekcj->ekci", basis, pts)
    capped = cos_radius > 0
    depth = np.where(capped[:, None, None], proj[..., 2], 1.0)
    xi, eta = proj[..., 0] / depth, proj[..., 1] / depth
    pad = 1e-9 * (1.0 + np.maximum(np.abs(xi).max(-1), np.abs(eta).max(-1)))  # rounding
    lo = np.stack([xi.min(-1) - pad, eta.min(-1) - pad], -1)  # (n_exp, K, 2)
    hi = np.stack([xi.max(-1) + pad, eta.max(-1) + pad], -1)
    origin = np.where(used[..., None], lo, np.inf).min(axis=1)
    top = np.where(used[..., None], hi, -np.inf).max(axis=1)
    cell = np.maximum((top - origin) / n_cells, 1e-12)
    first = np.clip(np.floor((lo - origin[:, None]) / cell[:, None]), 0, n_cells - 1).astype(np.int64)
    last = np.clip(np.floor((hi - origin[:, None]) / cell[:, None]), 0, n_cells - 1).astype(np.int64)
    idx = np.arange(n_cells)
    in_x = (idx[None, None, :] >= first[..., 0:1]) & (idx[None, None, :] <= last[..., 0:1])  # (n_exp, K, G)
    in_y = (idx[None, None, :] >= first[..., 1:2]) & (idx[None, None, :] <= last[..., 1:2])
    member = in_x[:, :, :, None] & in_y[:, :, None, :] & used[:, :, None, None]  # (n_exp, K, G, G)
    member |= (~capped[:, None, None, None]) & used[:, :, None, None]
    member = member.reshape(n_exp, k, n_cells * n_cells).transpose(0, 2, 1)  # (n_exp, cells, K)
    width = max(1, int(member.sum(-1).max()))
    order = np.argsort(~member, axis=-1, kind="stable")[..., :width]  # listed slots first
    cell_slot_ok = np.take_along_axis(member, order, axis=-1)
    return basis, np.where(np.isfinite(origin), origin, 0.0), cell, order.astype(np.int64), cell_slot_ok


def intersect(orbits: pd.DataFrame, images, *, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> pd.DataFrame:
    """Every in-bounds intersection of every orbit with every image.

    Parameters
    ----------
    orbits : DataFrame
        Orbit table (``skystack.orbits.table``: orbit_id and J2000-ecliptic elements).
    images : DataFrame or ImageSet
        Image index rows (see ``prepare_images``), or their prepared form (reuse it when
        intersecting many orbit chunks with the same images).
    max_batch_bytes : int
        Device memory budget of one batch of either step (see ``batch_shape`` and
        ``BYTES_PER_PAIR``).
    Returns
    -------
    DataFrame
        Columns orbit_id (int64), image_id (int64), x, y (float64, 0-based pixels, astropy
        convention), one row per intersection with ``-0.5 <= x < naxis1 - 0.5`` and
        ``-0.5 <= y < naxis2 - 0.5``, sorted by (orbit_id, image_id).
    """
    orbits = validate_orbits(orbits, source="intersect: orbits")
    if isinstance(images, pd.DataFrame):
        _check_images(images, "intersect: images")
        if orbits.empty or images.empty:
            return _empty_intersections()
        images = prepare_images(images)
    if orbits.empty:
        return _empty_intersections()
    orb = orbit_arrays(orbits)
    exposure_idx, orbit_idx = _cull_pairs(orb, images, max_batch_bytes)
    if len(exposure_idx) == 0:
        return _empty_intersections()
    return _exact_intersections(orb, orbits["orbit_id"].to_numpy(np.int64), images, exposure_idx, orbit_idx,
                                max_batch_bytes, sort=True)


def _pipelined(items, launch, finish) -> list:
    """``finish(item, launch(item))`` for each item, launching the next item before finishing
    the previous one, so host bookkeeping overlaps device work."""
    done, pending = [], None
    for item in [*items, None]:
        launched = (item, launch(item)) if item is not None else None
        if pending is not None:
            done.append(finish(*pending))
        pending = launched
    return done


def _cull_pairs(orb: OrbitArrays, im: ImageSet, max_batch_bytes: int):
    """Step 1 over all batches: (exposure, orbit) index pairs that may fall in the field."""
    n_o, n_exp = len(orb.a_au), im.n_exposures
    b_o, b_e = batch_shape(n_o, n_exp, max_batch_bytes)
    n_o_pad, n_e_pad = -(-n_o // b_o) * b_o, -(-n_exp // b_e) * b_e
    # Padding repeats the last orbit / exposure and is masked off: shapes stay fixed.
    take_o = np.minimum(np.arange(n_o_pad), n_o - 1)
    orb_pad = OrbitArrays(*(np.asarray(f)[take_o] for f in orb))
    orbit_ok = np.arange(n_o_pad) < n_o
    acc_max, speed_max = (np.asarray(a) for a in _orbit_track_bounds(orb_pad))
    take_e = np.minimum(np.arange(n_e_pad), n_exp - 1)
    exposure_ok = np.arange(n_e_pad) < n_exp
    node_of, dt = im.exposure_node[take_e], im.exposure_dt_day[take_e]
    sun_minus_observer = (im.sun_taylor_au[:, 0, :] - im.observer_au)[take_e]
    center, cos_radius = im.field_center[take_e], im.field_cos_radius[take_e]
    node_jd = jnp.asarray(im.node_jd_tdb)
    nodes = {}

    def launch(item):
        e0, o0 = item
        if o0 not in nodes:  # batches go orbit batch by orbit batch: keep only its nodes
            nodes.clear()
            nodes[o0] = _node_states_jit(OrbitArrays(*(f[o0:o0 + b_o] for f in orb_pad)), node_jd)
        se, so = slice(e0, e0 + b_e), slice(o0, o0 + b_o)
        return _cull_jit(OrbitTracks(*nodes[o0], acc_max[so], speed_max[so], orbit_ok[so]),
                         ExposureFields(node_of[se], dt[se], sun_minus_observer[se], center[se], cos_radius[se],
                                        exposure_ok[se]))

    def finish(item, keep):
        e_i, o_i = np.nonzero(np.asarray(keep))
        return item[0] + e_i, item[1] + o_i

    batches = [(e0, o0) for o0 in range(0, n_o_pad, b_o) for e0 in range(0, n_e_pad, b_e)]
    found = _pipelined(batches, launch, finish)
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _exact_intersections(orb: OrbitArrays, orbit_ids, im: ImageSet, exposure_idx, orbit_idx,
                         max_batch_bytes: int, sort: bool = False) -> pd.DataFrame:
    """Steps 2-4 on the candidate pairs, in chunks of fixed (padded) shapes; ``sort``: rows
    in (orbit_id, image_id) order (else in candidate order)."""
    n_c, k = len(exposure_idx), im.cell_slots.shape[-1]  # slots looked up per candidate
    if jax.default_backend() == "cpu":
        max_batch_bytes = min(int(max_batch_bytes), CPU_EXACT_BATCH_BYTES)
    size = _equal_batches(n_c, max(1, int(max_batch_bytes) // (k * BYTES_PER_PAIR)))
    n_pad = -(-n_c // size) * size
    take_c = np.minimum(np.arange(n_pad), n_c - 1)
    e_all, o_all, live = exposure_idx[take_c], orbit_idx[take_c], np.arange(n_pad) < n_c
    # Per-image arrays go to the device once; each chunk indexes them by exposure.
    slots = jax.tree_util.tree_map(jnp.asarray, SlotArrays(
        im.plane_basis, im.grid_origin, im.grid_cell, im.cell_slots, im.cell_slot_ok, im.slot_ok, im.slot_matrix,
        im.slot_wcs, im.slot_limits_px, im.slot_margin_px))

    orbits_dev = OrbitArrays(*(jnp.asarray(f) for f in orb))
    per_exposure = tuple(jnp.asarray(a) for a in (im.jd_tdb, im.observer_au, im.sun_taylor_au, im.field_center,
                                                  im.field_cos_radius))

    def launch(c0):
        part = slice(c0, c0 + size)
        return _batch_intersections_jit(orbits_dev, per_exposure, o_all[part], e_all[part], live[part], slots)

    def finish(c0, out):
        directions, looked_up, near = out
        c_i, l_i = np.nonzero(np.asarray(near))
        k_i = np.asarray(looked_up)[c_i, l_i]
        if len(c_i) == 0:
            return _no_columns()
        m = _round_up_coarse(len(c_i))  # padded: few compiled shapes
        take = np.minimum(np.arange(m), len(c_i) - 1)
        e_i = e_all[c0 + c_i]
        x, y, ok = (np.asarray(a)[: len(c_i)] for a in _pixels_jit(directions, c_i[take], e_i[take], k_i[take], slots))
        rows = c0 + c_i[ok]
        return (orbit_ids[o_all[rows]], im.image_id[im.slots[e_i[ok], k_i[ok]]], x[ok], y[ok])

    found = _pipelined(range(0, n_pad, size), launch, finish)
    # Plain arrays per batch, one table at the end: per-batch DataFrames cost more than the work.
    columns = [np.concatenate([f[j] for f in found]).astype(t) for j, t in enumerate(INTERSECTION_COLUMNS.values())]
    if sort:
        columns = _sorted_by_orbit_image(*columns)
    return pd.DataFrame(dict(zip(INTERSECTION_COLUMNS, columns)))


def _no_columns():
    return tuple(np.empty(0, t) for t in INTERSECTION_COLUMNS.values())


def _sorted_by_orbit_image(o, i, *rest) -> list:
    """The columns (orbit_id, image_id, others) in stable (orbit_id, image_id) row order.

    The ids are packed into one int64 key when their ranges allow: a stable argsort of it
    gives the two-key sort's permutation, faster than a pandas multi-column sort.
    """
    if len(o) == 0:
        return [o, i, *rest]
    o_lo, i_lo = int(o.min()), int(i.min())
    o_span, i_span = int(o.max()) - o_lo + 1, int(i.max()) - i_lo + 1
    if o_span * i_span < 2 ** 62:
        order = np.argsort((o - o_lo) * i_span + (i - i_lo), kind="stable")
    else:
        order = np.lexsort((i, o))
    return [c[order] for c in (o, i, *rest)]

