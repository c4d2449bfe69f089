"""Search a region of orbit space, not a list: trial orbits that cover a box of elements.

A *region* is a reference orbit (the six elements of ``orbits.table`` at its epoch) and a
half-width per element: the box ``|x_j - x_ref,j| <= h_j`` (a in AU, e, angles in degrees, the
schema's own units; the epoch is fixed). The survey is a list of exposures: mid-exposure TDB
Julian dates, the observatory and each exposure's Gaussian PSF width sigma_i (arcsec).
``covering_lattice`` places trial orbits so that every orbit of the box has a trial orbit whose
track loses at most ``max_snr_loss`` of the matched-filter SNR; ``covering_loss`` checks that
promise on sampled orbits with the actual predicted tracks, independently of the linear model
the lattice is built on.

The SNR loss of a track offset
------------------------------
The search predicts where an orbit falls exactly as ``astrometry.directions`` does (two-body
Kepler, light time iterated, the observatory's GCRS offset; astrometric ICRS). Let the object be
at sky offset ``d_i`` (arcsec) from the trial track on image i. With a Gaussian PSF of width
sigma_i the matched filter centred at the wrong place collects
``sum P(r) P(r - d) / sum P(r)^2 = exp(-d^2 / (4 sigma^2))`` of the SNR it collects at the
right place (two Gaussians' overlap; pixel sampling neglected). With equal weights per image the
combined SNR relative to a perfect trial is ``mean_i exp(-d_i^2 / (4 sigma_i^2))``; the **loss**
is one minus that.

A coarse pass on smoothed images uses a filter wider than the PSF, ``sigma_f = hypot(sigma, s)``
for smoothing s. It collects ``rho = 2 sigma sigma_f / (sigma^2 + sigma_f^2)`` of the matched
SNR at the right place and ``exp(-d^2 / (2 (sigma^2 + sigma_f^2)))`` of that at offset d: the
same formula with the loss width ``sqrt((sigma^2 + sigma_f^2) / 2) = sqrt(sigma^2 + s^2 / 2)``
(``smoothed_filter``), not sigma_f, which would promise too little loss.

For an orbit offset by ``delta`` (6 elements) from a trial, ``d_i ~ J_i delta`` with ``J_i``
(2 x 6) the Jacobian of exposure i's tangent-plane position (east, north arcsec) with respect to
the elements (``track_metric``: ``jax.jacfwd`` through the search's own direction model). So::

    loss ~ 1 - mean_i exp(-|J_i delta|^2 / (4 sigma_i^2)) ~ delta^T M delta,
    M = (1/N) sum_i J_i^T J_i / (4 sigma_i^2).

Validity. (1) The Gaussian overlap holds for a Gaussian PSF and the unclipped equal-weight
combination; every exposure is counted, whether or not the orbit falls on an image (select the
exposures first). (2) ``delta^T M delta`` is the small-offset expansion, but under the linear
track model the loss is bounded by it for every offset: by Jensen (exp is convex)
``mean_i exp(-x_i) >= exp(-mean_i x_i)``, so ``loss <= 1 - exp(-delta^T M delta)``; the lattice
uses this exact bound. (3) The linear track model itself: the track must be linear in the
elements over one cell, and the metric must not change over the box. That is where it fails.
The cells are long in element space along the poorly constrained directions (the whole box,
along a thin direction), and over such lengths the tracks are curved: for a KBO at 39.5 AU on
the demo survey's 3-year arc, the excess of the exact ``-ln(1 - loss)`` over the linear model's
``|w_a - w_b|^2`` reaches 0.3 rho^2 (max_snr_loss 0.2) to 0.8 rho^2 (0.05) over the box
+-(0.05 AU, 0.002, 0.02 deg), and ~180 rho^2 over one 10x wider, where the linear model's
nearest trial misses most tracks altogether. It comes from e, the argument of perihelion and the
mean anomaly (widening a, i or the node 10x changes nothing). Hence tiles, below.

The lattice (one tile)
----------------------
In box-scaled coordinates ``u_j = (x_j - x_ref,j) / h_j`` (the tile is the cube [-1, 1]^n over
the n elements with h_j > 0) the metric is ``M_u = D M D``; with ``M_u = V diag(lam) V^T`` the
whitened coordinates are ``w = A u``, ``A = diag(sqrt(lam)) V^T``, in which
``delta^T M delta = |w_a - w_b|^2``. Along eigen direction k the tile extends ``+-s_k``,
``s_k = sqrt(lam_k) sum_j |V_jk|``.

* *Covering radius.* rho^2 = -ln(1 - max_snr_loss) / safety_factor; the linear model then
  promises ``loss <= 1 - exp(-rho^2)``, below max_snr_loss by the safety factor's margin, which
  is left for the nonlinearity (next section). The test box's built coverings reach 0.75-0.85
  of max_snr_loss on 500 sampled orbits.
* *Thin directions.* Directions thinner than a cell get one point (w_k = 0): the j smallest s_k
  are made thin; the largest thin offset over the tile, ``r_T^2 = max over the cube's vertices
  |A_T u|^2`` (a convex function peaks at a vertex), is taken from the budget, and the lattice
  in the thick directions gets covering radius ``rho_T = sqrt(rho^2 - r_T^2)``. Of j = 0..n the
  split with the fewest points (Steiner estimate below) is used.
* *Lattice.* ``A_k*`` (the dual of the root lattice A_k: Z^(k+1) projected onto sum x = 0) in
  the k thick directions: the thinnest lattice covering in dimensions 1-5 and within 4% of the
  best known in 6-8 (Schuermann & Vallentin 2006). Unscaled (minimal norm k / (k + 1), cell
  volume 1 / sqrt(k + 1)) its covering radius is ``sqrt(k (k + 2) / (12 (k + 1)))`` (Conway &
  Sloane, SPLAG ch. 4 sec. 6.6), here scaled to ``rho_T``. Its covering thickness (ball volume
  per cell) is 1.46, 1.77, 2.12, 2.55 in 3-6 dimensions against 2.72, 4.93, 9.20, 17.4 for the
  cubic lattice Z^k (1.9x, 2.8x, 4.3x, 6.8x fewer points). ``lattice="cubic"`` gives Z^k with
  spacing ``2 rho_T / sqrt(k)`` for comparison.
* *Which points.* The tile's projection on the thick directions is a zonotope Z (generators:
  the columns of A_thick). A lattice point is kept when it lies within rho_T of Z's facets
  pushed out (a superset of Z + ball(rho_T), which holds every point whose Voronoi cell meets
  the tile). The points are enumerated exactly, coordinate by coordinate, in a parallelepiped of
  k facet normals, the lattice being rotated so that its generator is lower triangular in them.
* *Size.* ``lower_bound`` = vol(Z) / cell volume (no covering of the tile with this lattice
  and radius has fewer points) and ``estimate`` = vol(Z + ball(rho_T)) / cell volume (Steiner's
  formula with the zonotope's intrinsic volumes, V_j = 2^j sum over j-subsets of generators of
  the parallelotope volumes): within a few percent of the number kept.

Tiles: the nonlinearity
-----------------------
The region is cut into a grid of tiles (``tiles``: a count per element), each with the metric
at its own centre and its own lattice; every tile's lattice covers its tile, so the union covers
the region. The nonlinearity is measured per tile: for ``check_samples`` orbits drawn in it and
their nearest lattice points (``nearest_trials``), the excess
``e = -ln(1 - loss_exact) - |w_s - w_t|^2`` (exact tracks). A tile keeps the promise at the
lattice's deepest hole, with a 25% margin on the largest excess seen, when
``rho^2 + 1.25 max e <= -ln(1 - max_snr_loss)``, i.e. ``safety_factor >= 1 + 1.25 max e / rho^2``.
``choose_tiles`` (``tiles="auto"``) trades the two: finer tiles (halved along the element that
lowers the excess most; e in practice) need a smaller safety factor, hence fewer points per tile,
but add points at the tiles' edges; the split with the fewest points wins (``safety_factor``,
default 1.1, is the smallest allowed). For the KBO box: 8 tiles along e at 0.2 and 16 at 0.05,
both at 1.1. ``covering_loss`` on orbits sampled from the whole region is the independent check
(tests/test_covering.py, benchmarks/covering.py). Beyond the linear model the guarantee is
therefore an empirical one, measured on samples (their largest excess, with a 25% margin).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..astrometry.directions import _directions, _directions_jit, observer_states
from ..astrometry.kepler import OrbitArrays, ecliptic_to_icrs_matrix, orbit_arrays
from ..core.units import FWHM_PER_SIGMA, GAUSS_K
from .noise_peaks import tile_lipschitz_killing
from .table import ELEMENT_COLUMNS, validate_orbits

#: The six elements a region varies (the epoch is fixed).
REGION_ELEMENTS = ELEMENT_COLUMNS[:6]
_WRAPPED = ("node_deg", "argperi_deg", "mean_anomaly_deg")
ARCSEC_PER_RAD = 180.0 * 3600.0 / np.pi
#: Default linearisation safety factor: rho^2 = -ln(1 - max_snr_loss) / safety_factor.
DEFAULT_SAFETY_FACTOR = 1.1
#: Margin on the largest nonlinear excess measured in a tile.
EXCESS_MARGIN = 1.25
#: Search throughput for the refusal's time estimate: README's B2 (end to end on the demo
#: survey, 2 CPU cores).
DEFAULT_THROUGHPUT_ORBITS_PER_S = 12600.0
LATTICES = ("An*", "cubic")
REPO = Path(__file__).resolve().parents[3]


def smoothed_filter(psf_sigma, smoothing_sigma):
    """A Gaussian PSF of width ``psf_sigma`` seen by the matched filter widened in quadrature by
    ``smoothing_sigma`` (same units): ``(loss_sigma, peak_fraction)``.

    The filter ``sigma_f = hypot(sigma, s)`` keeps ``2 sigma sigma_f / (sigma^2 + sigma_f^2)`` of
    the matched filter's SNR at the right place, and at offset d the fraction
    ``exp(-d^2 / (4 loss_sigma^2))`` of that, ``loss_sigma = sqrt(sigma^2 + s^2 / 2)``."""
    sigma = np.asarray(psf_sigma, np.float64)
    sigma_f2 = sigma**2 + np.asarray(smoothing_sigma, np.float64) ** 2
    return np.sqrt(0.5 * (sigma**2 + sigma_f2)), 2.0 * sigma * np.sqrt(sigma_f2) / (sigma**2 + sigma_f2)


# ----------------------------------------------------------------------------- survey exposures
def survey_exposures(cfg: dict | None = None, known_objects_path=None) -> pd.DataFrame:
    """The exposures of the embedded simulated survey (``sim.survey``), without rendering.

    Parameters
    ----------
    cfg : mapping, optional
        ``survey.simulate`` settings, e.g. ``{"preset": "demo"}`` (default: the tiny preset).
    known_objects_path : path, optional
        Known objects (the track the schedule points at); default ``resources/known_objects.csv``.

    Returns
    -------
    DataFrame, one row per exposure
        exposure_id, jd_tdb (mid-exposure), site_lat_deg, site_lon_deg, site_height_m,
        ra_deg, dec_deg (pointing), band, psf_sigma_arcsec (mean over the exposure's images of
        the PSF at the image centre).
    """
    from ..orbits.table import load_known_objects
    from ..sim import survey as sim

    s = sim.settings(cfg)
    known = load_known_objects(s.get("known_objects_path") or known_objects_path
                               or REPO / "resources" / "known_objects.csv")
    if s["track"] not in set(known["name"]):
        raise ValueError(f"survey_exposures: no known object named {s['track']!r}")
    track = known[known["name"] == s["track"]].iloc[:1].assign(orbit_id=0)

    def track_radec(mjd_utc):
        from astropy.time import Time

        from ..astrometry.directions import sky_positions

        t = Time(np.asarray(mjd_utc) + s["exptime_s"] / 2 / 86400, format="mjd", scale="utc").tdb
        ra, dec = sky_positions(track, t.jd1 + t.jd2, s["site"])
        return ra[0], dec[0]

    exposures = sim.schedule(s, track_radec)
    images = sim.plan_images(s, exposures)
    frame = sim.images_frame(s, images)
    frame["psf_sigma_arcsec"] = [im.psf_fwhm_arcsec / FWHM_PER_SIGMA for im in images]
    per = frame.groupby("exposure_id", sort=True).agg(
        jd_tdb=("jd_tdb_mid", "first"), site_lat_deg=("site_lat_deg", "first"),
        site_lon_deg=("site_lon_deg", "first"), site_height_m=("site_height_m", "first"),
        psf_sigma_arcsec=("psf_sigma_arcsec", "mean")).reset_index()
    point = pd.DataFrame({"exposure_id": [e.exposure_id for e in exposures], "ra_deg": [e.ra_deg for e in exposures],
                          "dec_deg": [e.dec_deg for e in exposures], "band": [e.band for e in exposures]})
    return per.merge(point, on="exposure_id")


def exposure_site(exposures: pd.DataFrame) -> dict:
    """The ``site`` mapping (per-exposure arrays) of a ``survey_exposures`` table."""
    return {"lat_deg": exposures["site_lat_deg"].to_numpy(np.float64),
            "lon_deg": exposures["site_lon_deg"].to_numpy(np.float64),
            "height_m": exposures["site_height_m"].to_numpy(np.float64)}


# ----------------------------------------------------------------------------- track model
class TrackGeometry(NamedTuple):
    """Per-exposure geometry (host arrays, leading axis = exposure) and the tangent planes."""

    jd_tdb: np.ndarray  # (m,)
    observer_au: np.ndarray  # (m, 3) barycentric observer
    sun_taylor_au: np.ndarray  # (m, 3, 3)
    center: np.ndarray  # (m, 3) tangent point: the reference track's direction
    east: np.ndarray  # (m, 3)
    north: np.ndarray  # (m, 3)


def _elements_array(reference) -> np.ndarray:
    return np.array([float(reference[k]) for k in REGION_ELEMENTS])


def _orbit_arrays_jax(elements, epoch_jd_tdb) -> OrbitArrays:
    """``kepler.orbit_arrays`` in JAX (differentiable): elements (n, 6) in the schema's units."""
    a, e = elements[:, 0], elements[:, 1]
    i, node, w = (jnp.radians(elements[:, k]) for k in (2, 3, 4))
    ci, si, cn, sn, cw, sw = jnp.cos(i), jnp.sin(i), jnp.cos(node), jnp.sin(node), jnp.cos(w), jnp.sin(w)
    p_ecl = jnp.stack([cw * cn - sw * sn * ci, cw * sn + sw * cn * ci, sw * si], axis=-1)
    q_ecl = jnp.stack([-sw * cn - cw * sn * ci, -sw * sn + cw * cn * ci, cw * si], axis=-1)
    rot = jnp.asarray(ecliptic_to_icrs_matrix())
    epoch = jnp.broadcast_to(jnp.asarray(epoch_jd_tdb, jnp.float64), a.shape)
    return OrbitArrays(a, e, GAUSS_K / a**1.5, jnp.radians(elements[:, 5]), epoch, p_ecl @ rot.T, q_ecl @ rot.T)


def _tangent_arcsec(directions, center, east, north):
    """Gnomonic (east, north) arcsec of unit vectors (m, n, 3) on per-exposure planes (m, 3)."""
    along = jnp.einsum("mnk,mk->mn", directions, center)
    xi = jnp.einsum("mnk,mk->mn", directions, east) / along
    eta = jnp.einsum("mnk,mk->mn", directions, north) / along
    return jnp.stack([xi, eta], axis=-1) * ARCSEC_PER_RAD  # (m, n, 2)


def _track(elements, epoch_jd_tdb, geom: TrackGeometry):
    """Tangent-plane positions (n, m, 2) arcsec of orbits (n, 6) at the exposures, with the
    search's direction model (``directions._directions``: light time, observatory offset)."""
    orb = _orbit_arrays_jax(elements, epoch_jd_tdb)
    d, _ = _directions(orb, geom.jd_tdb, geom.observer_au, geom.sun_taylor_au)
    return jnp.swapaxes(_tangent_arcsec(d, geom.center, geom.east, geom.north), 0, 1)


_track_jit = jax.jit(_track)


def track_geometry(reference, jd_tdb, site=None) -> TrackGeometry:
    """Observer states and the tangent planes at the reference orbit's predicted track."""
    from .fit import _east_north

    jd = np.atleast_1d(np.asarray(jd_tdb, np.float64))
    obs, sun = observer_states(jd, site)
    ref = pd.DataFrame([{**{k: float(reference[k]) for k in ELEMENT_COLUMNS}, "orbit_id": 0}])
    d, _ = _directions_jit(orbit_arrays(validate_orbits(ref, "track_geometry reference")), jnp.asarray(jd),
                           jnp.asarray(obs), jnp.asarray(sun))
    d = np.asarray(d)[:, 0, :]
    ra, dec = np.arctan2(d[:, 1], d[:, 0]), np.arcsin(np.clip(d[:, 2], -1, 1))
    east, north = _east_north(ra, dec)
    return TrackGeometry(jd, obs, sun, d, east, north)


def track_positions(orbits: pd.DataFrame, geom: TrackGeometry) -> np.ndarray:
    """Tangent-plane positions (n, m, 2) arcsec of an orbit table at a geometry's exposures.

    Used only by ``refine`` and the tests; ``covering_loss`` computes exact directions itself.
    """
    orbits = validate_orbits(orbits, "track_positions")
    el = orbits[REGION_ELEMENTS].to_numpy(np.float64)
    epoch = orbits["epoch_jd_tdb"].to_numpy(np.float64)
    return np.asarray(_track_jit(jnp.asarray(el), jnp.asarray(epoch), _device(geom)))


def _device(geom: TrackGeometry) -> TrackGeometry:
    return TrackGeometry(*(jnp.asarray(f) for f in geom))


class TrackMetric(NamedTuple):
    """What ``track_metric`` returns.

    Attributes
    ----------
    matrix : (6, 6)
        M = (1/N) sum_i J_i^T J_i / (4 sigma_i^2), in the elements of ``REGION_ELEMENTS``
        (AU, 1, deg, deg, deg, deg): ``delta^T M delta`` ~ the SNR loss of an offset delta.
    jacobian : (N, 2, 6)
        d(east, north arcsec) / d(elements) per exposure, at the reference orbit.
    psf_sigma_arcsec : (N,)
    reference : dict
        The reference orbit (ELEMENT_COLUMNS).
    geometry : TrackGeometry
    """

    matrix: np.ndarray
    jacobian: np.ndarray
    psf_sigma_arcsec: np.ndarray
    reference: dict
    geometry: TrackGeometry


def track_metric(reference, jd_tdb, site, psf_sigma_arcsec) -> TrackMetric:
    """The track metric of the SNR loss at a reference orbit.

    Parameters
    ----------
    reference : mapping or Series
        ELEMENT_COLUMNS of the reference orbit.
    jd_tdb : array (N,)
        Mid-exposure TDB Julian dates.
    site : mapping or None
        ``lat_deg``, ``lon_deg``, ``height_m`` (scalars or arrays of length N); None = geocentre.
    psf_sigma_arcsec : float or array (N,)
        Gaussian PSF width per exposure.

    Returns
    -------
    TrackMetric
        J_i from ``jax.jacfwd`` through the search's direction model (light time iterated),
        projected on the tangent plane at the reference track (east, north arcsec), and
        ``M = (1/N) sum_i J_i^T J_i / (4 sigma_i^2)``. For small offsets delta, in a region where
        the track is locally linear, the combined SNR of an orbit offset by delta from a trial
        relative to the trial's own is ``mean_i exp(-|J_i delta|^2 / (4 sigma_i^2))``, about
        ``1 - delta^T M delta`` (and never below ``exp(-delta^T M delta)``: Jensen).
    """
    jd = np.atleast_1d(np.asarray(jd_tdb, np.float64))
    sigma = np.broadcast_to(np.asarray(psf_sigma_arcsec, np.float64), jd.shape).copy()
    if not (np.isfinite(sigma).all() and (sigma > 0).all()):
        raise ValueError("track_metric: psf_sigma_arcsec must be finite and > 0")
    geom = track_geometry(reference, jd, site)
    x0 = jnp.asarray(_elements_array(reference))
    epoch = float(reference["epoch_jd_tdb"])
    dgeom = _device(geom)
    jac = np.asarray(jax.jit(jax.jacfwd(lambda x: _track(x[None, :], epoch, dgeom)[0]))(x0))  # (N, 2, 6)
    scaled = jac / (2.0 * sigma[:, None, None])
    matrix = np.einsum("nai,naj->ij", scaled, scaled) / len(jd)
    ref = {k: float(reference[k]) for k in ELEMENT_COLUMNS}
    return TrackMetric(0.5 * (matrix + matrix.T), jac, sigma, ref, geom)


def linear_loss(metric: TrackMetric, delta) -> np.ndarray:
    """SNR loss of element offsets delta (..., 6) under the linear track model:
    ``1 - mean_i exp(-|J_i delta|^2 / (4 sigma_i^2))``."""
    off = np.einsum("nai,...i->...na", metric.jacobian, np.asarray(delta, np.float64))
    x = np.sum(off * off, axis=-1) / (4.0 * metric.psf_sigma_arcsec**2)
    return 1.0 - np.mean(np.exp(-x), axis=-1)


# ----------------------------------------------------------------------------- lattices
def an_star_basis(k: int) -> np.ndarray:
    """Generator (k x k, columns = basis vectors) of A_k*: Z^(k+1) projected onto sum x = 0,
    in an orthonormal basis of that plane. Covering radius ``an_star_covering_radius(k)``."""
    if k < 1:
        return np.zeros((0, 0))
    ones = np.ones((k + 1, 1)) / np.sqrt(k + 1)
    q, _ = np.linalg.qr(np.hstack([ones, np.eye(k + 1)[:, :k]]))
    plane = q[:, 1:]  # (k+1, k) orthonormal, orthogonal to (1, ..., 1)
    return plane[:k, :].T  # the images of e_1..e_k


def an_star_covering_radius(k: int) -> float:
    """Covering radius of the unscaled A_k* of ``an_star_basis`` (SPLAG ch. 4 sec. 6.6)."""
    return math.sqrt(k * (k + 2) / (12.0 * (k + 1))) if k > 0 else 0.0


def _lattice(kind: str, k: int, radius: float) -> np.ndarray:
    """Generator of the lattice ``kind`` in k dimensions scaled to covering radius ``radius``."""
    if k == 0:
        return np.zeros((0, 0))
    if kind == "An*":
        return an_star_basis(k) * (radius / an_star_covering_radius(k))
    if kind == "cubic":
        return np.eye(k) * (2.0 * radius / math.sqrt(k))
    raise ValueError(f"covering_lattice: unknown lattice {kind!r} (one of {', '.join(LATTICES)})")


def _ql(b: np.ndarray):
    """b = Q L with Q orthogonal, L lower triangular."""
    rev = np.eye(len(b))[::-1]
    q, r = np.linalg.qr(rev @ b @ rev)
    return rev @ q @ rev, rev @ r @ rev


def _half_widths(half_width) -> np.ndarray:
    if isinstance(half_width, (dict, pd.Series)):
        bad = sorted(set(half_width) - set(REGION_ELEMENTS))
        if bad:
            raise ValueError(f"covering_lattice: unknown half-width(s) {bad} (choose from {', '.join(REGION_ELEMENTS)})")
        hw = np.array([float(half_width.get(k, 0.0)) for k in REGION_ELEMENTS])
    else:
        hw = np.asarray(half_width, np.float64).reshape(6)
    if not (np.isfinite(hw).all() and (hw >= 0).all()):
        raise ValueError(f"covering_lattice: half-widths must be finite and >= 0 (got {hw.tolist()})")
    return hw


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _wrap(delta: np.ndarray) -> np.ndarray:
    """Element differences (..., 6) with the angles of ``_WRAPPED`` reduced to [-180, 180)."""
    out = np.array(delta, np.float64, copy=True)
    for col in _WRAPPED:
        j = REGION_ELEMENTS.index(col)
        out[..., j] = (out[..., j] + 180.0) % 360.0 - 180.0
    return out


# ----------------------------------------------------------------------------- one tile
class _Split(NamedTuple):
    thin: np.ndarray  # eigen directions with one point
    thick: np.ndarray
    r_thin2: float  # largest squared whitened offset of the tile in the thin directions
    rho_thick: float  # covering radius of the lattice in the thick directions
    lower_bound: float  # vol(Z) / cell
    estimate: float  # vol(Z + ball(rho_thick)) / cell


def _ball_volume(m: int) -> float:
    return math.pi ** (m / 2) / math.gamma(m / 2 + 1)


def _subset_volumes(gen: np.ndarray, j: int) -> float:
    """sum over j-subsets S of the columns of ``gen`` of the j-volume of the parallelotope g_S."""
    subsets = np.array(list(itertools.combinations(range(gen.shape[1]), j)))
    g = gen[:, subsets].transpose(1, 0, 2)  # (s, k, j)
    gram = np.einsum("ski,skj->sij", g, g)
    return float(np.sum(np.sqrt(np.maximum(np.linalg.det(gram), 0.0))))


def _splits(a_mat, support, rho2, kind: str) -> list[_Split]:
    """Candidate splits into thin and thick directions (the j thinnest thin, j = 0..n)."""
    n = a_mat.shape[0]
    order = np.argsort(support)
    vertices = np.array(list(itertools.product((-1.0, 1.0), repeat=a_mat.shape[1])))
    out = []
    for j in range(n + 1):
        thin, thick = np.sort(order[:j]), np.sort(order[j:])
        r2 = float(np.max(np.sum((vertices @ a_mat[thin].T) ** 2, axis=1))) if j else 0.0
        if r2 >= rho2 * (1 - 1e-9):
            break
        rho_t = math.sqrt(rho2 - r2)
        k = len(thick)
        if k == 0:
            out.append(_Split(thin, thick, r2, 0.0, 1.0, 1.0))
            continue
        cell = abs(np.linalg.det(_lattice(kind, k, rho_t)))
        v = [1.0] + [(2.0**i) * _subset_volumes(a_mat[thick], i) for i in range(1, k + 1)]  # intrinsic volumes of Z
        grown = sum(_ball_volume(k - i) * rho_t ** (k - i) * v[i] for i in range(k + 1))  # Steiner
        out.append(_Split(thin, thick, r2, rho_t, max(1.0, v[k] / cell), max(1.0, grown / cell)))
    return out


def _facets(gen: np.ndarray):
    """Unit facet normals (f, k) and support values (f,) of the zonotope sum_j [-g_j, g_j]."""
    k, n = gen.shape
    if k == 1:
        return np.ones((1, 1)), np.array([np.abs(gen).sum()])
    normals = []
    scale = max(np.abs(gen).max(), 1e-300)
    for sub in itertools.combinations(range(n), k - 1):
        g = gen[:, list(sub)]
        if np.linalg.matrix_rank(g, tol=1e-12 * scale) < k - 1:
            continue
        q, _ = np.linalg.qr(np.hstack([g, np.eye(k)]))
        normals.append(q[:, k - 1])  # orthogonal to span(g)
    normals = np.array(normals)
    return normals, np.abs(normals @ gen).sum(axis=1)


def _tile_plan(tile_hw: np.ndarray, matrix: np.ndarray, max_snr_loss: float, safety_factor: float,
               lattice: str) -> dict:
    """The lattice of one tile (half-widths (6,), metric (6, 6) at its centre), without points."""
    varied = np.flatnonzero(tile_hw > 0)
    rho2 = -math.log1p(-max_snr_loss) / safety_factor
    n = len(varied)
    out = {"varied": varied, "hw": tile_hw, "rho2": rho2}
    if n == 0:
        return {**out, "a_mat": np.zeros((0, 0)), "lam": np.zeros(0), "vec": np.zeros((0, 0)),
                "support": np.zeros(0), "split": _Split(np.zeros(0, int), np.zeros(0, int), 0.0, 0.0, 1.0, 1.0),
                "generator": np.zeros((0, 0)), "facets": None}
    d = np.diag(tile_hw[varied])
    m_u = d @ matrix[np.ix_(varied, varied)] @ d
    lam, vec = np.linalg.eigh(0.5 * (m_u + m_u.T))
    if not lam.max() > 0:
        raise ValueError("covering_lattice: the metric is zero on the varied elements (no exposure constrains them)")
    lam = np.clip(lam, lam.max() * 1e-15, None)
    a_mat = np.sqrt(lam)[:, None] * vec.T  # w = A u
    support = np.sqrt(lam) * np.abs(vec).sum(axis=0)  # half-extent of the tile along each eigen direction
    split = min(_splits(a_mat, support, rho2, lattice), key=lambda p: p.estimate)
    k = len(split.thick)
    gen, facets = np.zeros((0, 0)), None
    if k:
        normals, h = _facets(a_mat[split.thick])
        bounds = h + split.rho_thick  # Z's facets pushed out by rho: holds Z + ball(rho)
        basis = _lattice(lattice, k, split.rho_thick)
        # k facets to enumerate on: the smallest parallelepiped (fewest lattice points).
        combos = np.array(list(itertools.combinations(range(len(normals)), k)))
        dets = np.abs(np.linalg.det(normals[combos]))
        ok = dets > 1e-9
        cost = np.where(ok, np.sum(np.log(2 * bounds[combos]), axis=1) - np.log(np.where(ok, dets, 1.0)), np.inf)
        rows = list(combos[int(np.argmin(cost))])
        q_r, _ = np.linalg.qr(normals[rows].T)  # normals[rows] = L Q0 with Q0 = q_r^T
        _, l_b = _ql(basis)  # basis = Q1^T L_b
        gen = q_r @ l_b  # the lattice rotated so that normals[rows] @ gen = L L_b is lower triangular
        facets = (normals, bounds, rows)
    return {**out, "a_mat": a_mat, "lam": lam, "vec": vec, "support": support, "split": split,
            "generator": gen, "facets": facets}


def _enumerate(gen_s: np.ndarray, bounds_s: np.ndarray, limit: int, accept):
    """Integer z with |(gen_s z)_j| <= bounds_s[j] (gen_s lower triangular, k x k) that pass
    ``accept``. Returns (z, count), or (None, nodes) when a level has more than ``limit``."""
    k = len(gen_s)
    z = np.zeros((1, 0), dtype=np.int64)
    for j in range(k):
        partial = z @ gen_s[j, :j] if j else np.zeros(len(z))
        g = gen_s[j, j]
        lo = (-bounds_s[j] - partial) / g
        hi = (bounds_s[j] - partial) / g
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        lo = np.ceil(lo - 1e-9).astype(np.int64)
        hi = np.floor(hi + 1e-9).astype(np.int64)
        count = np.maximum(hi - lo + 1, 0)
        total = int(count.sum())
        if total > limit:
            return None, total
        last = j == k - 1
        pieces, begin = [], 0
        cum = np.cumsum(count)
        step = 2_000_000
        while begin < len(z):  # expand in pieces (memory); filter at the last level
            end = max(begin + 1, int(np.searchsorted(cum, cum[begin] - count[begin] + step, side="right")))
            c = count[begin:end]
            rows = np.repeat(np.arange(begin, end), c)
            offset = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
            piece = np.hstack([z[rows], (np.repeat(lo[begin:end], c) + offset)[:, None]])
            pieces.append(piece[accept(piece)] if last else piece)
            begin = end
        z = np.concatenate(pieces) if pieces else np.zeros((0, j + 1), dtype=np.int64)
    return z, len(z)


class _TooMany(Exception):
    def __init__(self, count, exact):
        super().__init__(count)
        self.count, self.exact = count, exact


def _tile_points(tp: dict, limit: int) -> np.ndarray:
    """Box coordinates u (p, n_varied) of a tile's kept lattice points."""
    n, split = len(tp["varied"]), tp["split"]
    if len(split.thick) == 0:
        return np.zeros((1, n))
    normals, bounds, rows = tp["facets"]
    gen = tp["generator"]
    gen_s = normals[rows] @ gen
    if not np.allclose(gen_s, np.tril(gen_s), atol=1e-9 * np.abs(gen_s).max()):
        raise RuntimeError("covering_lattice: lattice rotation failed to triangularise")
    facet_gen = normals @ gen

    def accept(z):
        return np.all(np.abs(z @ facet_gen.T) <= bounds * (1 + 1e-12) + 1e-12, axis=1)

    z, total = _enumerate(np.tril(gen_s), bounds[rows], limit, accept)
    if z is None:
        raise _TooMany(total, False)
    return _lattice_u(tp, z)


def _lattice_u(tp: dict, z: np.ndarray) -> np.ndarray:
    """Box coordinates of lattice points z (thin whitened coordinates 0)."""
    a_inv = np.linalg.inv(tp["a_mat"])
    return z @ (a_inv[:, tp["split"].thick] @ tp["generator"]).T


def _tile_nearest(tp: dict, u: np.ndarray, n_nearest: int):
    """The lattice points nearest each of the box coordinates u (s, n_varied) in the whitened
    metric (Babai rounding and every offset in {-1, 0, 1}^k around it): (distinct points' u,
    per-sample whitened thick distance to the nearest)."""
    split = tp["split"]
    k = len(split.thick)
    if k == 0:
        return np.zeros((1, u.shape[1])), np.zeros(len(u))
    gen = tp["generator"]
    wt = (u @ tp["a_mat"].T)[:, split.thick]
    base = np.round(wt @ np.linalg.inv(gen).T).astype(np.int64)
    offsets = np.array(list(itertools.product((-1, 0, 1), repeat=k)), dtype=np.int64)
    cand = base[:, None, :] + offsets[None, :, :]  # (s, 3^k, k)
    d2 = np.sum((cand @ gen.T - wt[:, None, :]) ** 2, axis=-1)
    m = min(n_nearest, offsets.shape[0])
    idx = np.argpartition(d2, m - 1, axis=1)[:, :m]
    near = np.take_along_axis(d2, idx, axis=1)
    # Only points within rho_T of an orbit of the tile: those are certainly kept (their
    # distance to Z is at most rho_T), so they are trials of the covering.
    limit = split.rho_thick**2 * (1 + 1e-9)
    if np.any(near.min(axis=1) > limit):
        raise RuntimeError("nearest_trials: no lattice point within the covering radius (search failed)")
    keep = near <= limit
    z = np.unique(np.take_along_axis(cand, idx[:, :, None], axis=1)[keep], axis=0)
    return _lattice_u(tp, z), np.sqrt(d2.min(axis=1))


def _tile_summary(tp: dict, lattice: str) -> dict:
    split, varied = tp["split"], tp["varied"]
    k = len(split.thick)
    cell_len = abs(np.linalg.det(tp["generator"])) ** (1.0 / k) if k else 0.0
    thin = set(split.thin.tolist())
    per_direction = []
    for j in range(len(varied)):
        per_direction.append({
            "eigenvalue": float(tp["lam"][j]),
            "half_extent": float(tp["support"][j]),
            "thin": j in thin,
            "points": 1 if j in thin else int(max(1, math.ceil(2 * (tp["support"][j] + split.rho_thick) / cell_len))),
            "direction": {REGION_ELEMENTS[varied[i]]: round(float(tp["vec"][i, j]), 6) for i in range(len(varied))},
            "dominant_element": REGION_ELEMENTS[varied[int(np.argmax(np.abs(tp["vec"][:, j])))]],
        })
    return {
        "lattice": (f"A{k}*" if lattice == "An*" else f"Z^{k}") if k else "single point",
        "dimension": int(k),
        "n_thin": len(thin),
        "covering_radius": float(split.rho_thick),
        "thin_offset": float(math.sqrt(split.r_thin2)),
        "rho": float(math.sqrt(tp["rho2"])),
        "per_direction": per_direction,
        "per_direction_points": [d["points"] for d in per_direction],
        "lower_bound": float(split.lower_bound),
        "estimate": float(split.estimate),
    }


# ----------------------------------------------------------------------------- tiles
class _Exact(NamedTuple):
    """What the exact checks need: the exposures' geometry (host arrays) and PSF widths."""

    jd: np.ndarray
    observer_au: np.ndarray
    sun_taylor_au: np.ndarray
    sigma: np.ndarray


def _exact_of(metric: TrackMetric) -> _Exact:
    g = metric.geometry
    return _Exact(g.jd_tdb, g.observer_au, g.sun_taylor_au, metric.psf_sigma_arcsec)


def _tile_counts(tiles, hw: np.ndarray) -> np.ndarray:
    if tiles is None:
        counts = np.ones(6, dtype=np.int64)
    elif isinstance(tiles, (dict, pd.Series)):
        bad = sorted(set(tiles) - set(REGION_ELEMENTS))
        if bad:
            raise ValueError(f"covering_lattice: unknown tile element(s) {bad}")
        counts = np.array([int(tiles.get(k, 1)) for k in REGION_ELEMENTS], dtype=np.int64)
    else:
        counts = np.asarray(tiles, dtype=np.int64).reshape(6)
    if (counts < 1).any():
        raise ValueError(f"covering_lattice: tile counts must be >= 1 (got {counts.tolist()})")
    return np.where(hw > 0, counts, 1)


def _tile_grid(x0: np.ndarray, hw: np.ndarray, counts: np.ndarray):
    """Every tile's multi-index (T, 6), centre (T, 6) and the tiles' half-widths (6,)."""
    idx = np.array(list(itertools.product(*[range(int(c)) for c in counts])), dtype=np.int64)
    tile_hw = hw / counts
    centres = x0 + hw * (-1.0 + (2 * idx + 1) / counts)
    return idx, centres, tile_hw


def _tile_of(x: np.ndarray, x0: np.ndarray, hw: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat tile number of element rows x (n, 6) in the grid (row-major over the 6 counts)."""
    u = np.where(hw > 0, _wrap(x - x0) / np.where(hw > 0, hw, 1.0), 0.0)
    i = np.clip(np.floor((u + 1.0) / 2.0 * counts).astype(np.int64), 0, counts - 1)
    return np.ravel_multi_index(tuple(i.T), tuple(counts))


def _track_one(x, epoch, jd, obs, sun, center, east, north):
    return _track(x[None, :], epoch, TrackGeometry(jd, obs, sun, center, east, north))[0]


_jacobians_batch = jax.jit(jax.vmap(jax.jacfwd(_track_one), in_axes=(0, None, None, None, None, 0, 0, 0)))


def _metrics_at(centres: np.ndarray, epoch: float, exact: _Exact, batch: int = 64, jacobians: bool = False):
    """Track metrics (T, 6, 6) at orbits (T, 6) (tangent planes at each one's own track), and
    with ``jacobians`` the Jacobians (T, N, 2, 6) too."""
    from .fit import _east_north

    t = len(centres)
    out = np.empty((t, 6, 6))
    jacs = np.empty((t, len(exact.jd), 2, 6)) if jacobians else None
    jd, obs, sun = (jnp.asarray(a) for a in (exact.jd, exact.observer_au, exact.sun_taylor_au))
    scale = 1.0 / (2.0 * exact.sigma[:, None, None])
    size = min(batch, 1 << max(0, int(t - 1).bit_length()))
    for s in range(0, t, size):
        x = centres[s:s + size]
        m = len(x)
        if m < size:
            x = np.concatenate([x, np.repeat(x[:1], size - m, axis=0)])
        orb = _orbit_arrays_jax(jnp.asarray(x), epoch)
        d = np.swapaxes(np.asarray(_directions_jit(orb, jd, obs, sun)[0]), 0, 1)  # (b, m, 3)
        ra, dec = np.arctan2(d[..., 1], d[..., 0]), np.arcsin(np.clip(d[..., 2], -1, 1))
        east, north = _east_north(ra, dec)
        jac = np.asarray(_jacobians_batch(jnp.asarray(x), epoch, jd, obs, sun, jnp.asarray(d), jnp.asarray(east),
                                          jnp.asarray(north)))[:m]
        sc = jac * scale[None]
        mat = np.einsum("tnai,tnaj->tij", sc, sc) / len(exact.jd)
        out[s:s + m] = 0.5 * (mat + np.swapaxes(mat, 1, 2))
        if jacobians:
            jacs[s:s + m] = jac
    return (out, jacs) if jacobians else out


def _check_tile(centre: np.ndarray, tile_hw: np.ndarray, matrix: np.ndarray, epoch: float, exact: _Exact,
                max_snr_loss: float, safety_factor: float, lattice: str, n_samples: int, rng) -> dict:
    """Measure a tile's nonlinearity: the excess of the exact -ln(1 - loss) over the whitened
    distance, for orbits drawn in the tile and their nearest lattice points."""
    tp = _tile_plan(tile_hw, matrix, max_snr_loss, safety_factor, lattice)
    varied = tp["varied"]
    u_s = rng.uniform(-1.0, 1.0, (n_samples, len(varied)))
    u_t, _ = _tile_nearest(tp, u_s, 4)
    x_s = np.tile(centre, (n_samples, 1))
    x_s[:, varied] += u_s * tile_hw[varied]
    x_t = np.tile(centre, (len(u_t), 1))
    x_t[:, varied] += u_t * tile_hw[varied]
    loss, best = _loss_arrays(x_t, epoch, x_s, exact, candidates=None if len(u_t) <= 64 else 64)
    om2 = np.sum(((u_s - u_t[best]) @ tp["a_mat"].T) ** 2, axis=1)
    excess = -np.log1p(-np.minimum(loss, 1.0 - 1e-16)) - om2
    worst = float(max(excess.max(), 0.0))
    budget = -math.log1p(-max_snr_loss)
    top = float(max(np.mean(np.sort(excess)[-max(1, len(excess) // 20):]), 0.0))  # mean of the top 5%
    return {"excess_max": worst, "excess_top": top, "excess_over_rho2": worst / tp["rho2"], "max_loss": float(loss.max()),
            "passes": bool(tp["rho2"] + EXCESS_MARGIN * worst <= budget), "estimate": float(tp["split"].estimate)}


def choose_tiles(reference, half_width, metric: TrackMetric, max_snr_loss: float, *,
                 safety_factor: float = DEFAULT_SAFETY_FACTOR, lattice: str = "An*", check_samples: int = 200,
                 max_tiles: int = 1_000_000, max_rounds: int = 16, seed: int = 0, start=None):
    """Tiles and safety factor for which the nonlinearity fits the promise, with the fewest points.

    Each round checks the centre tile and three random ones: the largest excess e seen (module
    docstring) gives the safety factor the tiles need, ``s = 1 + 1.25 e / rho^2`` (at least
    ``safety_factor``), confirmed by a second check at that s; the covering's size at s is
    estimated from the checked tiles. Then the tiles are halved along the element whose halving
    lowers the worst tile's excess most (the mean of its top 5%, on the same draws for every
    element). Finer tiles need a smaller s (fewer points per tile) but add points at the tiles'
    edges; the round with the fewest points wins. It stops when s reaches ``safety_factor``,
    after ``max_rounds`` or before ``max_tiles``.

    Returns
    -------
    tiles : dict {element: count}
    safety_factor : float
    log : list of dicts, one per round
    """
    hw = _half_widths(half_width)
    x0 = _elements_array(reference)
    epoch = float(reference["epoch_jd_tdb"])
    exact = _exact_of(metric)
    counts = _tile_counts(start, hw)
    rng = np.random.default_rng(seed)
    budget = -math.log1p(-max_snr_loss)
    log, best = [], None

    def check(centres, tile_hw, mats, s, common):
        return [_check_tile(c, tile_hw, m, epoch, exact, max_snr_loss, s, lattice, check_samples,
                            np.random.default_rng(common + i)) for i, (c, m) in enumerate(zip(centres, mats))]

    for _ in range(max_rounds):
        idx, centres, tile_hw = _tile_grid(x0, hw, counts)
        picks = [int(np.ravel_multi_index(tuple(counts // 2), tuple(counts)))]
        if len(idx) > 1:
            picks += [int(i) for i in rng.choice(len(idx), size=min(3, len(idx) - 1), replace=False)]
        picks = list(dict.fromkeys(picks))
        mats = _metrics_at(centres[picks], epoch, exact)
        common = int(rng.integers(2**31))
        checks = check(centres[picks], tile_hw, mats, safety_factor, common)
        need = max(safety_factor, 1.0 + EXCESS_MARGIN * max(c["excess_over_rho2"] for c in checks))
        for _ in range(3):  # confirm at the safety factor found (the excess shrinks a little with rho)
            if need <= safety_factor:
                break
            again = check(centres[picks], tile_hw, mats, need, common)
            worst = max(c["excess_max"] for c in again)
            rho2 = budget / need
            if rho2 + EXCESS_MARGIN * worst <= budget * (1 + 1e-12):
                break
            need *= (rho2 + EXCESS_MARGIN * worst) / budget
        est = len(idx) * float(np.mean([_tile_plan(tile_hw, m, max_snr_loss, need, lattice)["split"].estimate
                                        for m in mats]))
        log.append({"tiles": {REGION_ELEMENTS[j]: int(counts[j]) for j in range(6)},
                    "excess_over_rho2": [round(c["excess_over_rho2"], 4) for c in checks],
                    "safety_factor": round(need, 4), "estimate": est})
        if best is None or est < best[2]:
            best = (counts.copy(), need, est)
        if need <= safety_factor:  # finer tiles cannot lower the safety factor any more
            break
        worst = int(np.argmax([c["excess_max"] for c in checks]))
        trial = []
        common = int(rng.integers(2**31))  # the same draws for every halving: a fair comparison
        for j in np.flatnonzero(hw > 0):
            half = tile_hw.copy()
            half[j] /= 2.0
            trial.append((_check_tile(centres[picks[worst]], half, mats[worst], epoch, exact, max_snr_loss,
                                      safety_factor, lattice, check_samples,
                                      np.random.default_rng(common))["excess_top"], j))
        j_best = min(trial)[1]
        log[-1]["split"] = REGION_ELEMENTS[j_best]
        if 2 * counts.prod() > max_tiles:
            break
        counts[j_best] *= 2
    counts, need, _ = best
    return {REGION_ELEMENTS[j]: int(counts[j]) for j in range(6)}, float(need), log


class TilePlans:
    """The tiles' lattices, planned on demand (and kept): ``plans[t]`` for tile t (row-major
    over the counts per element), each with the metric at the tile's centre."""

    def __init__(self, reference, hw, counts, metric, max_snr_loss, safety_factor, lattice, tiles=None, reach=None):
        self.x0, self.hw, self.counts = _elements_array(reference), hw, counts
        # The tiles that hold trials (flat numbers; all of the grid unless pruned to the survey's
        # fields), and for pruned ones their track samples (footprint.TileTracks rows by tile).
        self.tiles = np.arange(int(counts.prod())) if tiles is None else np.asarray(tiles, np.int64)
        self.reach = reach
        self.epoch = float(reference["epoch_jd_tdb"])
        self.tile_hw = hw / counts
        self.settings = (max_snr_loss, safety_factor, lattice)
        self.single = None
        if int(counts.prod()) == 1 or not isinstance(metric, TrackMetric):
            if int(counts.prod()) > 1:
                raise ValueError("covering_lattice: tiles need a TrackMetric (for the metric at each tile's centre)")
            self.single = np.asarray(metric.matrix if isinstance(metric, TrackMetric) else metric, np.float64)
        self.exact = _exact_of(metric) if isinstance(metric, TrackMetric) else None
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.tiles)

    def centre(self, t) -> np.ndarray:
        idx = np.array(np.unravel_index(np.asarray(t), tuple(self.counts))).T
        return self.x0 + self.hw * (-1.0 + (2 * idx + 1) / self.counts)

    def plan(self, tiles) -> list[dict]:
        """Plans of the given tile numbers (metrics computed together for the missing ones)."""
        tiles = [int(t) for t in np.atleast_1d(tiles)]
        todo = [t for t in dict.fromkeys(tiles) if t not in self._cache]
        if todo:
            centres = self.centre(todo)
            mats = self.single[None] if self.single is not None else _metrics_at(centres, self.epoch, self.exact)
            for t, c, m in zip(todo, centres, mats):
                tp = _tile_plan(self.tile_hw, m, *self.settings)
                tp["centre"] = c
                self._cache[t] = tp
        return [self._cache[t] for t in tiles]

    def __getitem__(self, t) -> dict:
        return self.plan([t])[0]

    def __iter__(self):
        for s in range(0, len(self), 256):
            yield from self.plan(self.tiles[s:s + 256])


def covering_plan(reference, half_width, metric: TrackMetric, max_snr_loss: float, *, tiles=None,
                  safety_factor: float = DEFAULT_SAFETY_FACTOR, lattice: str = "An*",
                  max_tile_plans: int = 20_000, seed: int = 0, fields=None, min_exposures: int = 1) -> dict:
    """The covering without its points: per tile the thin/thick split, the lattice and its size.

    Parameters are those of ``covering_lattice`` (``tiles``: None = one tile, or counts per
    element, e.g. from ``choose_tiles``). With more than ``max_tile_plans`` tiles the sizes are
    extrapolated from that many random tiles (``sizes_sampled``). With ``fields``
    (``footprint.Fields`` of the metric's exposures) only the tiles that can reach at least
    ``min_exposures`` of them are kept, the grid made finer for it (``footprint.prune_tiles``);
    sizes are then those of the kept tiles (before their trials are pruned).

    Returns
    -------
    dict
        n_tiles, tiles (counts per element), estimate and lower_bound (sums over the tiles: see
        the module docstring), the centre tile's lattice, dimension, covering_radius,
        thin_offset, rho, per_direction and per_direction_points, promised_loss,
        linear_loss_bound, safety_factor; ``tile_plans`` (a ``TilePlans``: per tile its centre,
        half-widths, whitening, generator, ...) for ``nearest_trials``.
    """
    if not 0.0 < max_snr_loss < 1.0:
        raise ValueError(f"covering_lattice: max_snr_loss must be in (0, 1) (got {max_snr_loss})")
    if safety_factor <= 0:
        raise ValueError(f"covering_lattice: safety_factor must be > 0 (got {safety_factor})")
    if lattice not in LATTICES:
        raise ValueError(f"covering_lattice: unknown lattice {lattice!r} (one of {', '.join(LATTICES)})")
    hw = _half_widths(half_width)
    counts = _tile_counts(tiles, hw)
    kept, reach, reach_rounds = None, None, None
    if fields is not None:
        if not isinstance(metric, TrackMetric):
            raise ValueError("covering_lattice: pruning to the survey's fields needs a TrackMetric")
        from .footprint import prune_tiles

        counts, kept_idx, tracks, reach_rounds = prune_tiles(
            _elements_array(reference), hw, counts, float(reference["epoch_jd_tdb"]), _device(metric.geometry),
            fields, min_exposures,
            lambda t_hw: _tile_plan(t_hw, metric.matrix, max_snr_loss, safety_factor, lattice)["split"].estimate)
        if not len(kept_idx):
            raise ValueError(f"covering_lattice: no orbit of the region falls on {min_exposures} or more of the "
                             f"{len(fields.lo)} exposures it reaches (search.min_images)")
        kept = np.ravel_multi_index(tuple(kept_idx.T), tuple(counts))
        reach = ({int(t): k for k, t in enumerate(kept)}, tracks)
    plans = TilePlans(reference, hw, counts, metric, max_snr_loss, safety_factor, lattice, tiles=kept, reach=reach)
    n_tiles = len(plans)
    sampled = n_tiles > max_tile_plans
    which = (np.sort(np.random.default_rng(seed).choice(n_tiles, max_tile_plans, replace=False)) if sampled
             else np.arange(n_tiles))
    lower = estimate = 0.0
    curvatures = np.zeros(7)
    for s in range(0, len(which), 256):
        for tp in plans.plan(plans.tiles[which[s:s + 256]]):
            lower += tp["split"].lower_bound
            estimate += tp["split"].estimate
            lk = tile_lipschitz_killing(tp["a_mat"].T @ tp["a_mat"], counts[tp["varied"]])
            curvatures[:len(lk)] += lk
    scale = n_tiles / len(which)
    centre_tile = int(np.ravel_multi_index(tuple(counts // 2), tuple(counts)))
    if kept is not None and centre_tile not in reach[0]:  # the kept tile nearest the grid's centre
        centre_tile = int(kept[np.argmin(np.abs(kept_idx - counts // 2).sum(axis=1))])
    head = _tile_summary(plans[centre_tile], lattice)
    rho2 = plans[centre_tile]["rho2"]
    return {
        **head,
        "n_tiles": n_tiles,
        "n_grid_tiles": int(counts.prod()),
        "tiles": {REGION_ELEMENTS[j]: int(counts[j]) for j in range(6)},
        "min_exposures": int(min_exposures) if fields is not None else None,
        "reach_rounds": reach_rounds,
        "lower_bound": float(lower * scale),
        "estimate": float(estimate * scale),
        "lipschitz_killing": (curvatures * scale).tolist(),
        "sizes_sampled": bool(sampled),
        "promised_loss": float(max_snr_loss),
        "linear_loss_bound": float(-math.expm1(-rho2)),
        "safety_factor": float(safety_factor),
        "lattice_kind": lattice,
        "varied_elements": [REGION_ELEMENTS[i] for i in np.flatnonzero(hw > 0)],
        "half_width": {REGION_ELEMENTS[i]: float(hw[i]) for i in range(6)},
        "reference": {k: float(reference[k]) for k in ELEMENT_COLUMNS},
        "tile_plans": plans,
    }


def _trial_table(x: np.ndarray, epoch: float, start_id: int, tile=None) -> pd.DataFrame:
    trials = pd.DataFrame(x, columns=REGION_ELEMENTS)
    for col in _WRAPPED:
        trials[col] = trials[col] % 360.0
    trials.insert(0, "orbit_id", np.arange(start_id, start_id + len(x), dtype=np.int64))
    trials["epoch_jd_tdb"] = epoch
    if tile is not None:
        trials["tile"] = np.asarray(tile, np.int64)
    return validate_orbits(trials, source="covering_lattice trials")


def covering_lattice(reference, half_width, metric: TrackMetric, max_snr_loss: float, max_trials: int = 1_000_000,
                     *, tiles="auto", safety_factor: float = DEFAULT_SAFETY_FACTOR, lattice: str = "An*",
                     throughput_orbits_per_s: float = DEFAULT_THROUGHPUT_ORBITS_PER_S, start_id: int = 0,
                     check_samples: int = 200, seed: int = 0, fields=None, min_exposures: int = 1):
    """Trial orbits that cover a box of orbit space to within ``max_snr_loss`` of SNR.

    Parameters
    ----------
    reference : mapping or Series
        The box's centre (ELEMENT_COLUMNS; its epoch is every trial's epoch).
    half_width : mapping {element: half-width} or array (6,)
        Per element of ``REGION_ELEMENTS`` (schema units: AU, 1, degrees); missing or 0 = not
        varied.
    metric : TrackMetric (or a (6, 6) array for one tile)
        From ``track_metric`` at ``reference`` for the survey's exposures (its exposures and PSF
        widths also serve the tiles' metrics and checks).
    max_snr_loss : float in (0, 1)
        Largest SNR loss allowed for any orbit of the box against its best trial.
    max_trials : int
        Refuse (ValueError naming the number needed and the search time) above this.
    tiles : "auto", None or {element: count}
        "auto": ``choose_tiles`` (tiles and safety factor); None: one tile (the linear model
        over the whole box).
    safety_factor : float
        rho^2 = -ln(1 - max_snr_loss) / safety_factor (see the module docstring); with
        tiles="auto" the smallest allowed (``choose_tiles`` raises it as the tracks need).
    lattice : {"An*", "cubic"}
    throughput_orbits_per_s : float
        Search speed for the refusal's time estimate (default: README's B2).
    start_id : int
        ``orbit_id`` of the first trial.
    check_samples, seed
        For ``choose_tiles``.
    fields, min_exposures
        ``footprint.Fields`` of the metric's exposures: only the tiles and trials that may stand
        for an orbit falling on at least ``min_exposures`` of them are kept (``footprint``); the
        promise then holds for those orbits. None: every orbit of the box.

    Returns
    -------
    trials : DataFrame
        ``orbit_id``, ELEMENT_COLUMNS and ``tile``.
    summary : dict
        ``covering_plan``'s, with n_trials and (tiles="auto") tile_log.

    Raises
    ------
    ValueError
        Above ``max_trials``: the number needed (counted, or estimated when counting it would
        itself be too big) and a rough search time at ``throughput_orbits_per_s``.
    """
    tile_log = None
    if isinstance(tiles, str):
        if tiles != "auto":
            raise ValueError(f"covering_lattice: tiles must be 'auto', None or counts per element (got {tiles!r})")
        if not 0.0 < max_snr_loss < 1.0:
            raise ValueError(f"covering_lattice: max_snr_loss must be in (0, 1) (got {max_snr_loss})")
        if isinstance(metric, TrackMetric):
            tiles, safety_factor, tile_log = choose_tiles(reference, half_width, metric, max_snr_loss,
                                                          safety_factor=safety_factor, lattice=lattice,
                                                          check_samples=check_samples, seed=seed)
        else:
            tiles = None
    summary = covering_plan(reference, half_width, metric, max_snr_loss, tiles=tiles, safety_factor=safety_factor,
                            lattice=lattice, fields=fields, min_exposures=min_exposures)
    if tile_log is not None:
        summary["tile_log"] = tile_log

    def refuse(count: float, exact: bool):
        secs = count / throughput_orbits_per_s
        what = f"{int(count):,}" if exact else f"about {count:,.3g}"
        if fields is not None and not exact:  # the kept tiles' lattices, before their trials are pruned
            what = f"at most about {count:,.3g}"
        raise ValueError(f"covering_lattice: the region needs {what} trial orbits for max_snr_loss {max_snr_loss} "
                         f"(max_trials {max_trials:,}); at {throughput_orbits_per_s:,.0f} orbits/s the search would "
                         f"take about {_duration(secs)}")

    # Pruned to the fields, the kept tiles' sizes are before their trials are pruned too.
    if summary["lower_bound"] > (20 if fields is not None else 1) * max_trials or \
            summary["estimate"] > (40 if fields is not None else 4) * max_trials:
        refuse(summary["estimate"], exact=False)
    xs, tile_ids, n_lattice = [], [], 0
    plans = summary["tile_plans"]
    for t, tp in zip(plans.tiles, plans):
        try:
            u = _tile_points(tp, limit=max(20 * max_trials, 5_000_000))
        except _TooMany:
            refuse(summary["estimate"], exact=False)
        n_lattice += len(u)
        if plans.reach is not None:
            from .footprint import trial_reach

            k, tracks = plans.reach[0][int(t)], plans.reach[1]
            u = u[trial_reach(u, tp, tracks.centre[k], tracks.diff[k], tracks.curvature[k], fields, min_exposures)]
        x = np.tile(tp["centre"], (len(u), 1))
        x[:, tp["varied"]] += u * tp["hw"][tp["varied"]]
        xs.append(x)
        tile_ids.append(np.full(len(u), t))
    n_trials = sum(len(x) for x in xs)
    if n_trials > max_trials:
        refuse(n_trials, exact=True)
    trials = _trial_table(np.concatenate(xs), float(reference["epoch_jd_tdb"]), start_id, np.concatenate(tile_ids))
    summary["n_trials"] = len(trials)
    summary["n_lattice_points"] = int(n_lattice)
    return trials, summary


def nearest_trials(summary: dict, samples: pd.DataFrame, n_nearest: int = 4, start_id: int = 0):
    """The lattice points of a covering (a ``covering_plan`` or ``covering_lattice`` summary)
    nearest each sample in its tile's whitened metric, without building the whole lattice.

    Only lattice points within the covering radius of the sample are returned: their distance
    to the tile's projection is at most rho_T, so ``covering_lattice`` keeps them; they are
    trial orbits of the covering, and ``covering_loss`` against them is an upper bound on the
    loss against the whole covering. The guarantee can so be checked on coverings far too big
    to build. Candidates: Babai rounding in the lattice basis and every offset in {-1, 0, 1}^k.

    Returns
    -------
    trials : DataFrame
        The distinct nearest points (``orbit_id`` from ``start_id``, ``tile``).
    nearest_distance : ndarray (n_samples,)
        Whitened distance (thick coordinates) from each sample to its nearest lattice point.
    """
    ref = summary["reference"]
    x0 = _elements_array(ref)
    hw = np.array([summary["half_width"][k] for k in REGION_ELEMENTS])
    counts = np.array([summary["tiles"][k] for k in REGION_ELEMENTS], dtype=np.int64)
    x = samples[REGION_ELEMENTS].to_numpy(np.float64)
    tile = _tile_of(x, x0, hw, counts)
    xs, ts = [], []
    dist = np.empty(len(x))
    for t in np.unique(tile):
        tp = summary["tile_plans"][t]
        sel = tile == t
        v = tp["varied"]
        u = _wrap(x[sel] - tp["centre"])[:, v] / tp["hw"][v]
        u_t, dist[sel] = _tile_nearest(tp, u, n_nearest)
        xt = np.tile(tp["centre"], (len(u_t), 1))
        xt[:, v] += u_t * tp["hw"][v]
        xs.append(xt)
        ts.append(np.full(len(u_t), t))
    return _trial_table(np.concatenate(xs), float(ref["epoch_jd_tdb"]), start_id, np.concatenate(ts)), dist


# ----------------------------------------------------------------------------- sampling, checks
def sample_region(reference, half_width, n: int, seed: int = 0, start_id: int = 0) -> pd.DataFrame:
    """``n`` orbits drawn uniformly from the box (an orbit table)."""
    hw = _half_widths(half_width)
    rng = np.random.default_rng(seed)
    x = _elements_array(reference)[None, :] + rng.uniform(-1.0, 1.0, (n, 6)) * hw
    return _trial_table(x, float(reference["epoch_jd_tdb"]), start_id)


def _unit_directions(orbits: pd.DataFrame, exact: _Exact, batch: int = 8192) -> np.ndarray:
    """(n, m, 3) astrometric unit vectors with the search's own model (``kepler.orbit_arrays``,
    ``directions._directions_jit``), in batches padded to a few sizes (few compilations)."""
    orbits = validate_orbits(orbits, "covering_loss orbits")
    out = np.empty((len(orbits), len(exact.jd), 3))
    jd, obs, sun = jnp.asarray(exact.jd), jnp.asarray(exact.observer_au), jnp.asarray(exact.sun_taylor_au)
    for s in range(0, len(orbits), batch):
        part = orbits.iloc[s:s + batch]
        m = len(part)
        size = min(batch, max(256, 1 << int(m - 1).bit_length()))
        if size > m:
            part = pd.concat([part, part.iloc[[0] * (size - m)]], ignore_index=True)
        d, _ = _directions_jit(orbit_arrays(part), jd, obs, sun)
        out[s:s + m] = np.swapaxes(np.asarray(d), 0, 1)[:m]
    return out


def _loss_from_directions(u_t: np.ndarray, u_s: np.ndarray, sigma: np.ndarray, candidates):
    """(loss, best index) of samples (s, m, 3) against trials (t, m, 3)."""
    n_t, m = len(u_t), u_t.shape[1]
    k = n_t if candidates is None else min(int(candidates), n_t)
    if k < n_t:
        # Tangent planes at the first trial's track, scaled so that the squared Euclidean
        # distance is mean_i d_i^2 / (4 sigma_i^2): the k nearest trials are the candidates.
        c = u_t[0]
        east = np.stack([-c[:, 1], c[:, 0], np.zeros(len(c))], axis=1)
        east /= np.linalg.norm(east, axis=1, keepdims=True)
        north = np.cross(c, east)
        scale = ARCSEC_PER_RAD / (2.0 * sigma * math.sqrt(m))

        def plane(u):
            along = np.einsum("nmk,mk->nm", u, c)
            xy = np.stack([np.einsum("nmk,mk->nm", u, east), np.einsum("nmk,mk->nm", u, north)], -1)
            return (xy / along[..., None] * scale[None, :, None]).reshape(len(u), -1)

        x_t, x_s = plane(u_t), plane(u_s)
        t2 = np.sum(x_t * x_t, axis=1)
    loss = np.empty(len(u_s))
    best = np.empty(len(u_s), dtype=np.int64)
    chunk = max(1, int(1_000_000 // max(1, k * m)))
    for s0 in range(0, len(u_s), chunk):
        us = u_s[s0:s0 + chunk]
        if k < n_t:
            xs = x_s[s0:s0 + chunk]
            d2 = np.sum(xs * xs, axis=1)[:, None] + t2[None, :] - 2.0 * xs @ x_t.T
            cand = np.argpartition(d2, k - 1, axis=1)[:, :k]
        else:
            cand = np.broadcast_to(np.arange(n_t), (len(us), n_t))
        chord = np.linalg.norm(u_t[cand] - us[:, None, :, :], axis=-1)  # (s, k, m)
        ang = 2.0 * np.arcsin(np.minimum(chord / 2.0, 1.0)) * ARCSEC_PER_RAD
        snr = np.mean(np.exp(-ang**2 / (4.0 * sigma**2)), axis=-1)  # (s, k)
        j = np.argmax(snr, axis=1)
        rows = np.arange(len(us))
        loss[s0:s0 + chunk] = 1.0 - snr[rows, j]
        best[s0:s0 + chunk] = cand[rows, j]
    return loss, best


def _loss_arrays(x_t: np.ndarray, epoch: float, x_s: np.ndarray, exact: _Exact, candidates=64):
    u_t = _unit_directions(_trial_table(x_t, epoch, 0), exact)
    u_s = _unit_directions(_trial_table(x_s, epoch, 0), exact)
    return _loss_from_directions(u_t, u_s, exact.sigma, candidates)


def covering_loss(trials: pd.DataFrame, samples: pd.DataFrame, jd_tdb, site, psf_sigma_arcsec, *,
                  candidates: int | None = 64, return_best: bool = False):
    """Exact SNR loss of each sampled orbit against its best trial orbit.

    ``1 - max_trial mean_i exp(-d_i^2 / (4 sigma_i^2))`` with d_i the angle between the two
    orbits' predicted directions on exposure i (``kepler.orbit_arrays`` and
    ``directions._directions_jit``: the search's model, light time iterated): no
    linearisation, no metric.

    Parameters
    ----------
    trials, samples : DataFrame
        Orbit tables.
    jd_tdb, site, psf_sigma_arcsec
        As for ``track_metric``.
    candidates : int or None
        The exact loss is evaluated against the ``candidates`` trials nearest in track distance
        ``mean_i d_i^2 / (4 sigma_i^2)`` (tangent-plane positions of the actual tracks), all
        trials when None. The best of a subset is never better than the best of all, so the
        loss returned is an upper bound on the loss against every trial (and exact whenever the
        best trial is among the candidates).
    return_best : bool
        Also return each sample's best trial ``orbit_id``.

    Returns
    -------
    loss : ndarray (n_samples,)
    (best_trial_id : ndarray (n_samples,) int64, when ``return_best``)
    """
    jd = np.atleast_1d(np.asarray(jd_tdb, np.float64))
    sigma = np.broadcast_to(np.asarray(psf_sigma_arcsec, np.float64), jd.shape).copy()
    obs, sun = observer_states(jd, site)
    exact = _Exact(jd, obs, sun, sigma)
    loss, best = _loss_from_directions(_unit_directions(trials, exact), _unit_directions(samples, exact), sigma,
                                       candidates)
    if return_best:
        return loss, trials["orbit_id"].to_numpy(np.int64)[best]
    return loss


def _sample_tiles(summary: dict, x: np.ndarray):
    ref = summary["reference"]
    x0 = _elements_array(ref)
    hw = np.array([summary["half_width"][k] for k in REGION_ELEMENTS])
    counts = np.array([summary["tiles"][k] for k in REGION_ELEMENTS], dtype=np.int64)
    return _tile_of(x, x0, hw, counts)


def loss_excess(summary: dict, trials: pd.DataFrame, samples: pd.DataFrame, loss: np.ndarray,
                best_trial_id: np.ndarray) -> dict:
    """How far the exact loss exceeds the linear model: per sample
    ``e = -ln(1 - loss) - |w_s - w_t|^2`` (whitened in the sample's tile, t its best trial).

    Returns
    -------
    dict
        excess_max_over_rho2 (largest e / rho^2), safety_needed (the safety factor for which
        ``rho^2 + max e = -ln(1 - max_snr_loss)``: a covering built with a larger one keeps its
        promise at the deepest hole of the lattice given the excess seen), max_loss,
        ratio_max (``max -ln(1 - loss) / -ln(1 - max_snr_loss)``: below 1 = promise kept).
    """
    x_s = samples[REGION_ELEMENTS].to_numpy(np.float64)
    x_t = trials.set_index("orbit_id").loc[best_trial_id, REGION_ELEMENTS].to_numpy(np.float64)
    tile = _sample_tiles(summary, x_s)
    om2 = np.empty(len(x_s))
    for t in np.unique(tile):
        tp = summary["tile_plans"][t]
        sel = tile == t
        v = tp["varied"]
        du = _wrap(x_s[sel] - x_t[sel])[:, v] / tp["hw"][v]
        om2[sel] = np.sum((du @ tp["a_mat"].T) ** 2, axis=1)
    neg_log = -np.log1p(-np.minimum(loss, 1.0 - 1e-16))
    e = neg_log - om2
    budget = -math.log1p(-summary["promised_loss"])
    rho2 = summary["rho"] ** 2
    worst = float(max(e.max(), 0.0))
    return {"excess_max_over_rho2": worst / rho2,
            "safety_needed": float(1.0 / (1.0 - worst / budget)) if worst < budget else math.inf,
            "max_loss": float(loss.max()), "ratio_max": float(neg_log.max() / budget)}


def random_trials_needed(summary: dict, metric: TrackMetric, fraction: float = 0.9, *, max_snr_loss=None,
                         n_samples: int = 300, n_proposals: int = 2000, outer: float = 3.0, seed: int = 0,
                         model: str = "linear") -> dict:
    """How many orbits drawn uniformly from the region (the published method: random sampling)
    are needed for ``fraction`` of the region's orbits to have one within ``max_snr_loss``.

    For a region orbit s let p_s be the probability that one random orbit is within the loss.
    N random orbits cover s with probability ``1 - (1 - p_s)^N``; the N returned solves
    ``mean_s [1 - (1 - p_s)^N] = fraction`` over ``n_samples`` orbits s. p_s is estimated by
    importance sampling in the whitened coordinates of the metric at s over the region's box
    (w = A u): proposals uniform in the ball of radius ``sqrt(outer * B)`` around s
    (B = -ln(1 - max_snr_loss); the loss region holds the ball of radius sqrt(B), Jensen) in the
    directions where the region is wider than that, and uniform over the region's whole extent
    in the others; kept when inside the region, scored with the loss. ``edge_fraction`` is the
    share of the hits in the ball's outer 10% of radius (~0: the ball holds the loss region).

    ``model="linear"`` scores proposals with the linear track model at s (its Jacobians:
    ``1 - mean_i exp(-|J_i du|^2 / (4 sigma_i^2))``). ``model="exact"`` uses the exact tracks;
    over wide regions the region within the loss is curved (a thin banana across the box), the
    straight proposals miss it and p_s comes out too small, while the linear model measures the
    volume it would have straight, which curving barely changes away from the box's edges. The
    two agree within 3% on the KBO box and on one 10x wider (whose banana is still mostly
    caught), and N orbits drawn directly cover 90% (tests/test_covering.py). ``n_zero`` counts orbits no proposal
    covered (p_s taken as 0; ``n_random_99`` is then NaN).
    """
    if model not in ("exact", "linear"):
        raise ValueError(f"random_trials_needed: model must be 'exact' or 'linear' (got {model!r})")
    loss_max = float(summary["promised_loss"] if max_snr_loss is None else max_snr_loss)
    exact = _exact_of(metric)
    ref = summary["reference"]
    epoch = float(ref["epoch_jd_tdb"])
    x0 = _elements_array(ref)
    hw = np.array([summary["half_width"][k] for k in REGION_ELEMENTS])
    varied = np.flatnonzero(hw > 0)
    n = len(varied)
    budget = -math.log1p(-loss_max)
    radius = math.sqrt(outer * budget)
    rng = np.random.default_rng(seed)
    samples = sample_region(ref, hw, n_samples, seed=seed + 1)
    x_s = samples[REGION_ELEMENTS].to_numpy(np.float64)
    mats, jacs = _metrics_at(x_s, epoch, exact, jacobians=True)  # at each sample
    u_dirs = _unit_directions(samples, exact) if model == "exact" else None
    d_h = np.diag(hw[varied])
    p = np.empty(n_samples)
    err = np.empty(n_samples)
    edge = hits_all = 0
    group = max(1, 40_000 // n_proposals)
    for g0 in range(0, n_samples, group):
        rows = list(range(g0, min(g0 + group, n_samples)))
        props, vol_ratio, radial = [], [], []
        for i in rows:
            m_u = d_h @ mats[i][np.ix_(varied, varied)] @ d_h
            lam, vec = np.linalg.eigh(0.5 * (m_u + m_u.T))
            lam = np.clip(lam, lam.max() * 1e-15, None)
            a_mat = np.sqrt(lam)[:, None] * vec.T
            support = np.sqrt(lam) * np.abs(vec).sum(axis=0)
            thin = support < radius
            k = int((~thin).sum())
            w_s = a_mat @ ((x_s[i] - x0)[varied] / hw[varied])
            w = np.empty((n_proposals, n))
            g = rng.normal(size=(n_proposals, k))
            r = rng.uniform(size=(n_proposals, 1)) ** (1.0 / max(k, 1))
            w[:, ~thin] = w_s[~thin] + radius * r * g / np.linalg.norm(g, axis=1, keepdims=True) if k else 0.0
            w[:, thin] = rng.uniform(-1.0, 1.0, (n_proposals, int(thin.sum()))) * support[thin]
            u = w @ np.linalg.inv(a_mat).T
            x = np.tile(x0, (n_proposals, 1))
            x[:, varied] += u * hw[varied]
            props.append(x)
            radial.append(r[:, 0] if k else np.zeros(n_proposals))
            vol_prop = _ball_volume(k) * radius**k * float(np.prod(2.0 * support[thin]))
            vol_ratio.append(vol_prop / ((2.0**n) * float(np.prod(np.sqrt(lam)))))
        xp = np.concatenate(props)
        own = np.repeat(np.arange(len(rows)), n_proposals)
        inside = np.all(np.abs(_wrap(xp - x0)[:, varied]) <= hw[varied], axis=1)
        ok = np.zeros(len(xp), dtype=bool)
        if model == "linear":
            for j, i in enumerate(rows):
                sel = (own == j) & inside
                off = np.einsum("nai,pi->pna", jacs[i], _wrap(xp[sel] - x_s[i]))
                lin = 1.0 - np.mean(np.exp(-np.sum(off * off, axis=-1) / (4.0 * exact.sigma**2)), axis=-1)
                ok[sel] = lin <= loss_max
        elif inside.any():
            up = _unit_directions(_trial_table(xp[inside], epoch, 0), exact)
            chord = np.linalg.norm(up - u_dirs[np.asarray(rows)[own[inside]]], axis=-1)
            ang = 2.0 * np.arcsin(np.minimum(chord / 2.0, 1.0)) * ARCSEC_PER_RAD
            ok[inside] = 1.0 - np.mean(np.exp(-ang**2 / (4.0 * exact.sigma**2)), axis=-1) <= loss_max
        for j, i in enumerate(rows):
            hit = ok[own == j]
            frac = hit.mean()
            p[i] = frac * vol_ratio[j]
            err[i] = math.sqrt(max(frac * (1 - frac), 0.0) / n_proposals) / max(frac, 1e-300)
            hits_all += int(hit.sum())
            edge += int(np.sum(radial[j][hit] > 0.9))
    p = np.clip(p, 0.0, 1.0)
    zero = int(np.sum(p <= 0))
    return {"n_random": random_needed(p, fraction), "n_random_99": random_needed(p, 0.99) if zero == 0 else math.nan,
            "n_zero": zero, "fraction": fraction, "max_snr_loss": loss_max, "median_p": float(np.median(p)),
            "rel_error": float(np.median(err)), "edge_fraction": edge / max(hits_all, 1), "p": p, "model": model}


def random_needed(p: np.ndarray, fraction: float) -> float:
    """N with ``mean_s [1 - (1 - p_s)^N] = fraction`` (inf when unreachable)."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0 - 1e-16)

    def covered(n_random):
        return float(np.mean(-np.expm1(n_random * np.log1p(-p))))

    if covered(1e30) < fraction:
        return math.inf
    lo, hi = 1.0, 2.0
    while covered(hi) < fraction:
        lo, hi = hi, hi * 2.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if covered(mid) < fraction else (lo, mid)
    return float(hi)
