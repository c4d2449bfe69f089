"""Orbit x image intersections: where each orbit falls on each image.

Physics (all float64):

- two-body Kepler orbits around the Sun (``skystack.orbits``), the Sun's barycentric
  position from DE421;
- observer = Earth's centre (DE421) + the observatory's GCRS offset, at mid-exposure TDB;
- light time iterated to convergence: the body is seen where it was at ``t - tau`` with
  ``tau = |r_body(t - tau) - r_obs(t)| / c``, the body's position being its heliocentric
  Kepler position plus the Sun's barycentric position at ``t - tau``. Kepler's equation is
  solved once, at ``t``; the step back by ``tau`` is a third-order two-body Taylor step
  (``orbits.earlier_position_au``, error < 1e-11 AU) and the Sun's a second-order one from
  DE421 (< 500 m over the 6-day light time from 1000 AU);
- astrometric ICRS direction (no aberration, no light deflection), as in star catalogs,
  which is what a WCS fitted to catalog stars maps;
- each image's TAN or TAN-SIP WCS (``skystack.wcs``).

An intersection is in bounds when the pixel position lies on the detector area:
``-0.5 <= x < naxis1 - 0.5`` and ``-0.5 <= y < naxis2 - 0.5`` (0-based pixel centres at
integers, so ``round(x), round(y)`` is always a valid pixel).

Work is organised per exposure, in three steps that each compact what survives on the
device before the next (so the answer is the brute-force one, only cheaper):

1. each orbit is propagated once per exposure (all images of an exposure share time and
   site) and kept if it falls in the exposure's field circle, a cap that provably holds
   every image of the exposure with its candidate margin;
2. the survivors are projected on every image of the exposure with one 3x3 matrix per
   image (the plain gnomonic part) and kept if within the image's SIP bound of its edges;
3. only those get the Newton inversion of the SIP distortion, the exact bounds test, and
   come back to the host.

Batches have fixed, padded shapes (few compilations) and respect a memory budget sized
for the worst case where every orbit falls in every field.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from . import ephemeris
from ._jax import jax, jnp
from .orbits import OrbitArrays, earlier_position_au, heliocentric_state, orbit_arrays, validate_orbits
from .wcs import WcsParams, max_distortion_px, pix2world_batched, pixel_matrix, sip_undistort, stack_wcs, take

LIGHT_TIME_ITERATIONS = 2  # from the geometric distance; the direction error after 2 is < 1e-14 rad
BYTES_PER_PAIR = 96  # device memory per (image, orbit) pair in a batch, worst case (estimate)
CANDIDATE_MARGIN_PX = 1.0  # slack added to each image's bound on its SIP displacement
FIELD_SLACK_RAD = 1e-6  # slack on each exposure's field radius (0.2 arcsec)
DEFAULT_MAX_BATCH_BYTES = 256 << 20
INTERSECTION_COLUMNS = {"orbit_id": "int64", "image_id": "int64", "x": "float64", "y": "float64"}
IMAGE_COLUMNS = ["image_id", "exposure_id", "jd_tdb_mid", "site_lat_deg", "site_lon_deg", "site_height_m",
                 "wcs_header", "naxis1", "naxis2"]
SAME_TIME_TOLERANCE_DAY = 1e-6


# ----------------------------------------------------------------------------- directions
def _directions(orb: OrbitArrays, jd_tdb, observer_au, sun_taylor_au):
    """Astrometric ICRS unit vectors from observers to bodies.

    The body's heliocentric state is solved once at the observation time; its position at
    the emission time ``t - tau`` follows from a third-order two-body Taylor step (see
    ``orbits.earlier_position_au``), the Sun's from its own Taylor terms.

    Parameters
    ----------
    orb : OrbitArrays
        n orbits.
    jd_tdb : (m,)
        Observation times (TDB JD).
    observer_au : (m, 3)
        Barycentric observer positions.
    sun_taylor_au : (m, 3, 3)
        The Sun's barycentric position, velocity, acceleration at ``jd_tdb``.

    Returns
    -------
    (m, n, 3) unit vectors and (m, n) light times in days.
    """
    obs = observer_au[:, None, :]
    sun_pos, sun_vel, sun_acc = (sun_taylor_au[:, None, k, :] for k in range(3))
    pos, vel = heliocentric_state(orb, jd_tdb[:, None])
    rel = pos + sun_pos - obs
    tau = _norm3(rel) / ephemeris.C_AU_PER_DAY
    for _ in range(LIGHT_TIME_ITERATIONS):
        dt = tau[..., None]
        sun = sun_pos - dt * sun_vel + 0.5 * dt * dt * sun_acc
        rel = earlier_position_au(pos, vel, tau) + sun - obs
        tau = _norm3(rel) / ephemeris.C_AU_PER_DAY
    return rel / _norm3(rel)[..., None], tau


def _norm3(v):
    # Written out: a reduction over a length-3 axis fuses poorly on some backends.
    return jnp.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + v[..., 2] * v[..., 2])


_directions_jit = jax.jit(_directions)


def _site_arrays(site, n):
    if site is None:
        return None
    return tuple(np.broadcast_to(np.asarray(site[k], dtype=np.float64), (n,)) for k in ("lat_deg", "lon_deg", "height_m"))


def observer_states(jd_tdb, site=None):
    """Barycentric observer positions (AU, (m, 3)) and the Sun's Taylor terms ((m, 3, 3)).

    ``site`` is a mapping with ``lat_deg``, ``lon_deg``, ``height_m`` (scalars or arrays
    of length m), or None for the Earth's centre.
    """
    jd = np.atleast_1d(np.asarray(jd_tdb, dtype=np.float64))
    obs = ephemeris.earth_barycentric_au(jd)
    if site is not None:
        obs = obs + ephemeris.observatory_gcrs_au(jd, *_site_arrays(site, len(jd)))
    return obs, ephemeris.sun_barycentric_taylor_au(jd)


def sky_positions(orbits: pd.DataFrame, jd_tdb, site=None):
    """Astrometric ICRS positions of orbits at times, as seen from a site.

    Parameters
    ----------
    orbits : DataFrame
        Orbit table (``skystack.orbits``), n rows.
    jd_tdb : float or array (m,)
        TDB Julian dates.
    site : mapping, optional
        ``lat_deg``, ``lon_deg`` (geodetic, east), ``height_m`` (WGS84); None = geocentre.

    Returns
    -------
    ra_deg, dec_deg : ndarray (n, m)
        RA in [0, 360) and Dec, degrees.
    """
    orb = orbit_arrays(validate_orbits(orbits, source="sky_positions orbits"))
    jd = np.atleast_1d(np.asarray(jd_tdb, dtype=np.float64))
    obs, sun = observer_states(jd, site)
    d, _ = _directions_jit(orb, jnp.asarray(jd), jnp.asarray(obs), jnp.asarray(sun))
    d = np.asarray(d)
    ra = np.degrees(np.arctan2(d[..., 1], d[..., 0])) % 360.0
    dec = np.degrees(np.arctan2(d[..., 2], np.hypot(d[..., 0], d[..., 1])))
    return ra.T, dec.T


# ----------------------------------------------------------------------------- batch kernel
def _batch_intersections(orb, orbit_ok, jd_tdb, observer_au, sun_taylor_au, field_center, field_cos_radius,
                         slot_ok, slot_matrix, slot_wcs, slot_limits_px, slot_margin_px, *, cap_field, cap_image):
    """In-bounds intersections of a batch of orbits with the images of a batch of exposures.

    Shapes: orbits (B_o,), exposures (B_e,), image slots (B_e, K). ``slot_limits_px`` holds
    (x_lo, x_hi, y_lo, y_hi) per slot. Three steps, each compacting what survives:

    1. propagate every orbit to every exposure; keep (exposure, orbit) pairs inside the
       exposure's field circle (at most ``cap_field``);
    2. project those on each image of their exposure with the plain gnomonic matrix; keep
       pairs within the image's SIP bound of its bounds (at most ``cap_image``);
    3. invert SIP for those (Newton) and test the exact bounds.

    Returns both candidate counts (the host grows a cap that was too small and reruns), and
    per entry of the last step: exposure, slot and orbit index, pixel position, and whether
    it is a real in-bounds intersection.
    """
    d, _ = _directions(orb, jd_tdb, observer_au, sun_taylor_au)  # (B_e, B_o, 3)
    n_e, n_o = d.shape[:2]
    cos_sep = jnp.einsum("eoi,ei->eo", d, field_center)
    in_field = (cos_sep >= field_cos_radius[:, None]) & orbit_ok[None, :]
    count_field = jnp.sum(in_field, dtype=jnp.int64)
    flat = jnp.nonzero(in_field.ravel(), size=cap_field, fill_value=0)[0]
    e_f, o_f = flat // n_o, flat % n_o
    live = jnp.arange(cap_field) < count_field

    h = jnp.einsum("ckij,cj->cki", slot_matrix[e_f], d.reshape(-1, 3)[flat])  # (cap_field, K, 3)
    w = h[..., 2]
    front = w > 0
    w = jnp.where(front, w, 1.0)
    crpix = slot_wcs.crpix0_px[e_f]
    x_tan = crpix[..., 0] + h[..., 0] / w
    y_tan = crpix[..., 1] + h[..., 1] / w
    lim, m = slot_limits_px[e_f], slot_margin_px[e_f]
    # A point on the image lies within the image's bound on the SIP displacement of its
    # plain gnomonic position, so nothing in bounds is lost here.
    near = (front & (x_tan >= lim[..., 0] - m) & (x_tan < lim[..., 1] + m) & (y_tan >= lim[..., 2] - m)
            & (y_tan < lim[..., 3] + m) & slot_ok[e_f] & live[:, None])
    count_image = jnp.sum(near, dtype=jnp.int64)
    k = near.shape[1]
    flat2 = jnp.nonzero(near.ravel(), size=cap_image, fill_value=0)[0]
    c_i, k_i = flat2 // k, flat2 % k
    e_i = e_f[c_i]
    params = take(slot_wcs, (e_i, k_i))
    u, v = jax.vmap(sip_undistort)(params, x_tan.ravel()[flat2] - params.crpix0_px[:, 0],
                                   y_tan.ravel()[flat2] - params.crpix0_px[:, 1])
    x = params.crpix0_px[:, 0] + u
    y = params.crpix0_px[:, 1] + v
    lim_c = slot_limits_px[e_i, k_i]
    ok = ((jnp.arange(cap_image) < count_image) & (x >= lim_c[:, 0]) & (x < lim_c[:, 1]) & (y >= lim_c[:, 2])
          & (y < lim_c[:, 3]))
    return count_field, count_image, e_i, k_i, o_f[c_i], x, y, ok


_batch_intersections_jit = jax.jit(_batch_intersections, static_argnames=("cap_field", "cap_image"))


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


def batch_shape(n_orbits: int, n_exposures: int, images_per_exposure: int, max_batch_bytes: int):
    """Orbits and exposures per device batch, with ``B_e K B_o BYTES_PER_PAIR <= max_batch_bytes``
    (the worst case, where every orbit of the batch falls in every exposure's field).

    Returns
    -------
    b_o, b_e : int
        At least 1 each; coarse sizes so that few shapes get compiled.
    """
    pairs = max(1, int(max_batch_bytes) // BYTES_PER_PAIR)
    k = max(1, images_per_exposure)
    b_o_max = max(1, pairs // k)
    if n_orbits <= b_o_max:
        b_o = min(_round_up_coarse(n_orbits), b_o_max)
    else:
        # Equal batches, each as large as allowed.
        b_o = min(_round_up_coarse(-(-n_orbits // -(-n_orbits // b_o_max))), b_o_max)
    b_e_max = max(1, pairs // (k * b_o))
    b_e = min(_round_up_coarse(n_exposures), b_e_max) if n_exposures <= b_e_max else \
        min(_round_up_coarse(-(-n_exposures // -(-n_exposures // b_e_max))), b_e_max)
    return b_o, b_e


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
    slot_margin_px: np.ndarray  # (n_exposures, K) candidate margin (SIP bound + slack)

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
        Image index rows (``skystack.io.IMAGES``); uses image_id, exposure_id, jd_tdb_mid,
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

    # Per image: WCS, bounds and candidate margin; one extra row pads the slots.
    wcs = stack_wcs(images["wcs_header"].tolist(), _image_sources(images))
    naxis = images[["naxis1", "naxis2"]].to_numpy(np.float64)
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
    center, cos_radius = _field_circles(wcs, limits, margin, slots, n)
    return ImageSet(np.append(images["image_id"].to_numpy(np.int64), -1), slots, slots < n, jd, observer, sun, center,
                    cos_radius, WcsParams(*(np.asarray(f)[slots] for f in wcs)), matrix[slots], limits[slots],
                    margin[slots])


def _field_circles(wcs: WcsParams, limits, margin, slots, n_images):
    """A circle on the sky around each exposure that contains every direction whose plain
    gnomonic pixel position is within the candidate margin of one of its images.

    Such directions fill, per image, the gnomonic quadrilateral whose corners are the
    margin-expanded image corners (projected without SIP); its sides are great-circle arcs,
    so a spherical cap (radius < 90 deg) holding the corners holds the quadrilateral.
    """
    lo_x, hi_x = limits[:, 0] - margin, limits[:, 1] + margin
    lo_y, hi_y = limits[:, 2] - margin, limits[:, 3] + margin
    cx = np.stack([lo_x, hi_x, hi_x, lo_x], -1)
    cy = np.stack([lo_y, lo_y, hi_y, hi_y], -1)
    tan_only = WcsParams(*(jnp.asarray(f) for f in wcs._replace(sip_a=np.zeros_like(wcs.sip_a),
                                                                  sip_b=np.zeros_like(wcs.sip_b))))
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
    return center, cos_radius


def intersect(orbits: pd.DataFrame, images, *, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
              initial_cap: int | None = None) -> pd.DataFrame:
    """Every in-bounds intersection of every orbit with every image.

    Parameters
    ----------
    orbits : DataFrame
        Orbit table (``skystack.orbits``: orbit_id and J2000-ecliptic elements).
    images : DataFrame or ImageSet
        Image index rows (see ``prepare_images``), or their prepared form (reuse it when
        intersecting many orbit chunks with the same images).
    max_batch_bytes : int
        Device memory budget of one batch: (images in the batch) x (orbits in the batch) x
        ``BYTES_PER_PAIR`` stays below it.
    initial_cap : int, optional
        Starting size of the compacted candidate buffer per batch (grows by powers of two
        when a batch has more candidates; the answer does not depend on it).

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
    im = images
    n_exp, k = im.slots.shape

    b_o, b_e = batch_shape(len(orbits), n_exp, k, max_batch_bytes)
    n_o_pad, n_e_pad = -(-len(orbits) // b_o) * b_o, -(-n_exp // b_e) * b_e
    # Padding repeats the last orbit / exposure and is masked off: shapes stay fixed.
    take_o = np.minimum(np.arange(n_o_pad), len(orbits) - 1)
    orb = OrbitArrays(*(np.asarray(f)[take_o] for f in orbit_arrays(orbits)))
    orbit_ok = np.arange(n_o_pad) < len(orbits)
    take_e = np.minimum(np.arange(n_e_pad), n_exp - 1)
    jd, observer, sun, slots = im.jd_tdb[take_e], im.observer_au[take_e], im.sun_taylor_au[take_e], im.slots[take_e]
    center, cos_radius = im.field_center[take_e], im.field_cos_radius[take_e]
    slot_ok = im.slot_ok[take_e] & (np.arange(n_e_pad) < n_exp)[:, None]
    slot_wcs = WcsParams(*(f[take_e] for f in im.slot_wcs))
    slot_matrix, slot_limits, slot_margin = im.slot_matrix[take_e], im.slot_limits_px[take_e], im.slot_margin_px[take_e]

    # Compacted buffer sizes: powers of two, grown when a batch overflows them.
    cap_field = min(_pow2_at_least(initial_cap or max(256, b_e * b_o // 32)), _pow2_at_least(b_e * b_o))
    cap_image = min(_pow2_at_least(initial_cap or max(256, b_e * b_o // 32)), _pow2_at_least(b_e * b_o * k))

    def run(e0, o0, cap_field, cap_image):
        se, so = slice(e0, e0 + b_e), slice(o0, o0 + b_o)
        return _batch_intersections_jit(
            OrbitArrays(*(f[so] for f in orb)), orbit_ok[so], jd[se], observer[se], sun[se], center[se],
            cos_radius[se], slot_ok[se], slot_matrix[se], WcsParams(*(f[se] for f in slot_wcs)), slot_limits[se],
            slot_margin[se], cap_field=cap_field, cap_image=cap_image)

    orbit_ids = orbits["orbit_id"].to_numpy(np.int64)
    found = []
    batches = [(e0, o0) for e0 in range(0, n_e_pad, b_e) for o0 in range(0, n_o_pad, b_o)]
    pending = None
    # Dispatch the next batch before reading the previous one, so the host's bookkeeping
    # overlaps the device's work.
    for item in [*batches, None]:
        launched = (item, run(*item, cap_field, cap_image)) if item is not None else None
        if pending is not None:
            (e0, o0), out = pending
            while int(out[0]) > cap_field or int(out[1]) > cap_image:
                cap_field = max(cap_field, _pow2_at_least(int(out[0])))
                cap_image = max(cap_image, _pow2_at_least(int(out[1])))
                out = run(e0, o0, cap_field, cap_image)
            _, _, e_i, k_i, o_i, x, y, ok = (np.asarray(a) for a in out)
            sel = np.flatnonzero(ok)
            found.append(pd.DataFrame({"orbit_id": orbit_ids[o0 + o_i[sel]],
                                       "image_id": im.image_id[slots[e0 + e_i[sel], k_i[sel]]],
                                       "x": x[sel], "y": y[sel]}))
        pending = launched
    out = pd.concat(found, ignore_index=True).astype(INTERSECTION_COLUMNS)
    return out.sort_values(["orbit_id", "image_id"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- matched filter
# (per-intersection sums along orbits come below)
