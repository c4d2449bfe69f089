"""Refine a candidate's orbit on the images: maximise the combined matched-filter SNR over the
six elements, with JAX derivatives through Kepler, light time, the WCS and the filter.

A candidate is a trial orbit of a covering (``orbits.region``) that passed the search's
threshold. Its intersections give, per image, the trial's pixel position (x_i, y_i) from the
search's full WCS. Around it a patch is read from the tile cache, and the local WCS is
linearised: ``J_i`` (2 x 2) maps a tangent-plane offset (east, north arcsec) at the trial's
position to pixels (the distortion changes by far less than a pixel over a patch). An orbit x
is then at

    p_i(x) = (x_i, y_i) + J_i (t_i(x) - t_i(trial))

where t_i are the tangent-plane positions of ``orbits.covering``'s track model (the search's
direction model: two-body Kepler, light time iterated, the observatory's offset). The matched
filter at p_i with a Gaussian PSF of the image's width (widened by ``smoothing_px``) gives
psi_i(x), phi_i(x) as in ``search.matched_filter``, and the combined SNR is
``sum psi / sqrt(sum phi)`` over the images the trial kept (sigma-G clipping and the star
mask decided at the trial: clipping is not differentiable). Refinement runs first at the
search's smoothing, then at full resolution (continuation: the smoothed peak is wide enough to
be reached from any trial of the covering, the sharp one is the answer).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..core.units import counts_per_nmgy
from ..orbits.covering import (
    REGION_ELEMENTS,
    TrackGeometry,
    _device,
    _track,
    track_geometry,
)
from ..orbits.refine import refine_orbit
from ..orbits.table import ELEMENT_COLUMNS
from .combine import _grouped_sigma_g_keep

log = logging.getLogger(__name__)

#: Pixels beyond 3 PSF sigma that a patch keeps for the refined track to move into.
SHIFT_MARGIN_PX = 4
#: A refined track may move at most this many matched-filter sigmas (plus one pixel) from its
#: trial on any kept image: the covering puts every orbit of the region within about one sigma
#: of a trial (loss 0.2: mean exp(-d^2 / 4 sigma^2) >= 0.8), and a track that runs further is
#: chasing a residual or a cosmic ray, not the object the trial found.
MAX_SHIFT_SIGMA = 2.0
#: Scale (noise sigmas) of the per-image flux departures that the refinement down-weights.
ROBUST_SCALE_SIGMA = 3.0
#: Images per candidate are padded to a multiple of this (one compilation for most candidates).
IMAGE_PAD = 32
ARCSEC = 1.0 / 3600.0


class CandidateData(NamedTuple):
    """One candidate's images (leading axis = image, padded): what the SNR function reads."""

    patches: jnp.ndarray  # (m, k, k) ADU, background removed, NaN where bad
    offset_px: jnp.ndarray  # (m, 2) trial position minus the patch's centre pixel (x, y)
    pix_per_arcsec: jnp.ndarray  # (m, 2, 2) d(x, y) / d(east, north)
    track0: jnp.ndarray  # (m, 2) the trial's own tangent-plane position (arcsec)
    psf_sigma_px: jnp.ndarray  # (m,)
    noise_sigma: jnp.ndarray  # (m,)
    adu_per_nmgy: jnp.ndarray  # (m,)
    keep: jnp.ndarray  # (m,) 1.0 for images in the combination, 0.0 otherwise
    geometry: TrackGeometry  # per image
    epoch_jd_tdb: jnp.ndarray  # ()


def _positions_px(x, data: CandidateData):
    t = _track(x[None, :], data.epoch_jd_tdb, data.geometry)[0]  # (m, 2) arcsec
    return data.offset_px + jnp.einsum("mij,mj->mi", data.pix_per_arcsec, t - data.track0)


def _psi_phi(x, data: CandidateData, smoothing_px):
    pos = _positions_px(x, data)
    k = data.patches.shape[-1]
    off = jnp.arange(k, dtype=jnp.float64) - (k - 1) / 2
    s2 = data.psf_sigma_px**2 + smoothing_px**2
    gx = off[None, None, :] - pos[:, 0, None, None]
    gy = off[None, :, None] - pos[:, 1, None, None]
    psf = jnp.exp(-(gx * gx + gy * gy) / (2 * s2[:, None, None])) / (2 * jnp.pi * s2[:, None, None])
    good = jnp.isfinite(data.patches)
    d = jnp.where(good, data.patches, 0.0)
    p = jnp.where(good, psf, 0.0)
    var = data.noise_sigma**2
    psi = jnp.sum(d * p, axis=(1, 2)) * data.adu_per_nmgy / var
    phi = jnp.sum(p * p, axis=(1, 2)) * data.adu_per_nmgy**2 / var
    return psi, phi


def _robust_weights(psi, phi, keep):
    """Per-image weights of a constant-flux object: an image whose flux departs from the
    combined flux by z of its noise sigmas weighs 1 / (1 + (z / c)^2) (Cauchy, c =
    ``ROBUST_SCALE_SIGMA``), the combined flux itself re-estimated with the weights twice."""
    w = keep
    safe_phi = jnp.where(phi > 0, phi, 1.0)  # padded images (phi 0, keep 0): finite derivatives
    for _ in range(3):
        flux = jnp.sum(w * psi) / (jnp.sum(w * phi) + 1e-300)
        z = (psi - flux * phi) / jnp.sqrt(safe_phi)
        w = keep / (1.0 + (z / ROBUST_SCALE_SIGMA) ** 2)
    return w


def combined_snr(x, data: CandidateData, smoothing_px):
    """Combined SNR of elements x (6,) on a candidate's kept images, each image weighted by how
    well its flux agrees with the others' (``_robust_weights``): without it the refinement
    climbs onto a cosmic ray or a residual that one image's filter reaches with its tail."""
    psi, phi = _psi_phi(x, data, smoothing_px)
    w = _robust_weights(psi, phi, data.keep)
    return jnp.sum(w * psi) / jnp.sqrt(jnp.sum(w * phi))


_psi_phi_jit = jax.jit(_psi_phi)
_snr_many = jax.jit(jax.vmap(combined_snr, in_axes=(0, None, None)))

#: SNR slices through the refined elements: offsets in units of each element's 1-sd.
SLICE_SIGMAS = np.linspace(-4.0, 4.0, 17)


def snr_slices(x: np.ndarray, sigma: np.ndarray, data: CandidateData) -> dict:
    """{element: (offsets, SNR)} along each element through x (full resolution, the others
    held), over +-4 of ``sigma``: the conditional sd 1 / sqrt(F_jj) (the elements are strongly
    correlated, and a slice over the marginal sd would show only the peak's spike)."""
    out = {}
    for j, name in enumerate(REGION_ELEMENTS):
        if not (np.isfinite(sigma[j]) and sigma[j] > 0):
            continue
        offsets = SLICE_SIGMAS * sigma[j]
        xs = np.tile(x, (len(offsets), 1))
        xs[:, j] += offsets
        out[name] = (offsets, np.asarray(_snr_many(jnp.asarray(xs), data, jnp.asarray(0.0))))
    return out
_positions_jit = jax.jit(_positions_px)


def _pix_per_arcsec(wcs, x: float, y: float) -> np.ndarray:
    """Inverse of the local d(east, north arcsec)/d(x, y) of an astropy WCS at a pixel."""
    sky = wcs.pixel_to_world_values(np.array([x, x + 1.0, x]), np.array([y, y, y + 1.0]))
    ra, dec = np.radians(sky[0]), np.radians(sky[1])
    east = (np.angle(np.exp(1j * (ra[1:] - ra[0])))) * np.cos(dec[0]) * 3600.0 * 180.0 / np.pi
    north = (dec[1:] - dec[0]) * 3600.0 * 180.0 / np.pi
    arcsec_per_px = np.array([east, north])  # columns: d/dx, d/dy
    return np.linalg.inv(arcsec_per_px)


def _pad(a: np.ndarray, m: int, fill) -> np.ndarray:
    if len(a) == m:
        return a
    pad = np.full((m - len(a),) + a.shape[1:], fill, dtype=a.dtype)
    return np.concatenate([a, pad])


def candidate_data(trial: pd.Series, rows: pd.DataFrame, images: pd.DataFrame, caches: dict, keep: np.ndarray,
                   radius_px: int) -> CandidateData:
    """Patches and geometry of one candidate's intersections ``rows`` (image_id, x, y)."""
    from ..astrometry.astropy_wcs import wcs_from_header_text

    meta = images.set_index("image_id").loc[rows["image_id"].to_numpy()]
    x, y = rows["x"].to_numpy(float), rows["y"].to_numpy(float)
    patches = np.empty((len(rows), 2 * radius_px + 1, 2 * radius_px + 1), np.float64)
    for part in np.unique(meta["partition"]):
        sel = (meta["partition"] == part).to_numpy()
        patches[sel] = caches[int(part)].patches(rows["image_id"].to_numpy()[sel], x[sel], y[sel], radius_px)
    bg = np.where(meta["is_difference"].to_numpy(), 0.0, meta["sky_level"].to_numpy(float))
    patches -= bg[:, None, None]
    jac = np.stack([_pix_per_arcsec(wcs_from_header_text(h), xi, yi)
                    for h, xi, yi in zip(meta["wcs_header"], x, y)])
    site = {"lat_deg": meta["site_lat_deg"].to_numpy(float), "lon_deg": meta["site_lon_deg"].to_numpy(float),
            "height_m": meta["site_height_m"].to_numpy(float)}
    jd = meta["jd_tdb_mid"].to_numpy(float)
    geom = track_geometry(trial, jd, site)
    epoch = float(trial["epoch_jd_tdb"])
    x0 = np.array([float(trial[k]) for k in REGION_ELEMENTS])
    track0 = np.asarray(_track(jnp.asarray(x0)[None, :], epoch, _device(geom))[0])
    m = -(-len(rows) // IMAGE_PAD) * IMAGE_PAD
    geom = TrackGeometry(*(_pad(np.asarray(a), m, a[-1] if len(a) else 0.0) for a in geom))
    return CandidateData(
        patches=jnp.asarray(_pad(patches, m, np.nan)),
        offset_px=jnp.asarray(_pad(np.stack([x - np.floor(x + 0.5), y - np.floor(y + 0.5)], axis=1), m, 0.0)),
        pix_per_arcsec=jnp.asarray(_pad(jac, m, 0.0)), track0=jnp.asarray(_pad(track0, m, 0.0)),
        psf_sigma_px=jnp.asarray(_pad(meta["psf_sigma_px"].to_numpy(float), m, 1.0)),
        noise_sigma=jnp.asarray(_pad(meta["noise_sigma"].to_numpy(float), m, 1.0)),
        adu_per_nmgy=jnp.asarray(_pad(counts_per_nmgy(meta["magzp"].to_numpy(float)), m, 1.0)),
        keep=jnp.asarray(_pad(keep.astype(np.float64), m, 0.0)), geometry=_device(geom),
        epoch_jd_tdb=jnp.asarray(epoch))


#: An image whose flux differs from the candidate's weighted-median flux by more than this many
#: of its own noise sigmas is left out of the refinement: a constant-flux object has such an
#: image once in 1.7e6; a cosmic ray or a subtraction residual that a trial happens to thread
#: has it on every image it contributes, and sigma-G clipping misses them when they are a
#: quarter of a short arc's images.
OUTLIER_NOISE_SIGMA = 5.0


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def trial_keep(rows: pd.DataFrame, masked: np.ndarray, n_sigma_g: float) -> np.ndarray:
    """The images a candidate is refined on: those the search's combination kept (phi > 0, not
    star-masked, within the sigma-G clip: ``search.combine``'s rule), less the images whose
    flux is an outlier for its noise (``OUTLIER_NOISE_SIGMA``)."""
    psi, phi = rows["psi"].to_numpy(float), rows["phi"].to_numpy(float)
    keep = (phi > 0) & ~np.asarray(masked, bool)
    flux = np.where(keep, psi / np.where(phi > 0, phi, 1.0), np.nan)
    group = np.zeros(len(rows), np.int64)
    keep &= _grouped_sigma_g_keep(flux, keep, group, np.array([0]), n_sigma_g)
    if keep.sum() >= 3:
        centre = _weighted_median(flux[keep], phi[keep])
        keep &= np.abs(np.where(keep, flux, centre) - centre) * np.sqrt(phi) <= OUTLIER_NOISE_SIGMA
    return keep


class Refined(NamedTuple):
    elements: dict
    sigma: dict
    covariance: np.ndarray
    snr_trial_full: float
    snr_refined: float
    converged: bool
    steps: int
    positions: pd.DataFrame
    max_shift_px: float  # largest move of the refined track from the trial's on a kept image
    refined: bool  # False: the track ran off (max_shift_px too large): a duplicate or not a detection
    slices: dict  # {element: (offsets, SNR)} through the result (``snr_slices``)  # image_id, x, y, psi, phi along the refined orbit (kept images flagged)


def refine_candidate(trial: pd.Series, rows: pd.DataFrame, images: pd.DataFrame, caches: dict, *,
                     keep: np.ndarray, smoothing_px: float, max_steps: int = 40) -> Refined:
    """Refine one candidate from its trial orbit: at the search's smoothing, then without."""
    radius = int(np.ceil(3.0 * np.hypot(images["psf_sigma_px"].max(), smoothing_px))) + SHIFT_MARGIN_PX
    data = candidate_data(trial, rows, images, caches, keep, radius)
    x0 = {k: float(trial[k]) for k in ELEMENT_COLUMNS}
    full = jnp.asarray(0.0)
    snr_trial_full = float(combined_snr(jnp.asarray([x0[k] for k in REGION_ELEMENTS]), data, full))
    x, res = dict(x0), None
    for s in ([float(smoothing_px)] if smoothing_px > 0 else []) + [0.0]:
        res = refine_orbit(x, combined_snr, args=(data, jnp.asarray(s)), max_steps=max_steps)
        x = {**x, **res.elements}
    xr = jnp.asarray([x[k] for k in REGION_ELEMENTS])
    shift = np.asarray(_positions_jit(xr, data) - data.offset_px)[:len(rows)]
    max_shift = float(np.hypot(shift[:, 0], shift[:, 1])[keep].max()) if keep.any() else 0.0
    limit = MAX_SHIFT_SIGMA * float(np.hypot(images["psf_sigma_px"].max(), smoothing_px)) + 1.0
    ran_off = max_shift > limit
    psi, phi = (np.asarray(a)[:len(rows)] for a in _psi_phi_jit(xr, data, full))
    pos = np.asarray(_positions_jit(xr, data))[:len(rows)]
    centre_x, centre_y = np.floor(rows["x"].to_numpy(float) + 0.5), np.floor(rows["y"].to_numpy(float) + 0.5)
    positions = pd.DataFrame({"image_id": rows["image_id"].to_numpy(), "x": centre_x + pos[:, 0],
                              "y": centre_y + pos[:, 1], "psi": psi, "phi": phi, "kept": keep})
    for c in ("node_deg", "argperi_deg", "mean_anomaly_deg"):
        x[c] = x[c] % 360.0
    sigma = {k: float(v) for k, v in zip(REGION_ELEMENTS, res.sigma)}
    snr = float(res.snr_after)
    with np.errstate(divide="ignore", invalid="ignore"):
        conditional = 1.0 / np.sqrt(np.diag(res.fisher)) if res.fisher is not None else np.asarray(res.sigma)
    slices = {} if ran_off else snr_slices(np.asarray(xr), conditional, data)
    return Refined(x, sigma, res.covariance, snr_trial_full, snr, bool(res.converged) and not ran_off,
                   int(res.steps), positions, max_shift, not ran_off, slices)


def same_object(a: pd.DataFrame, b: pd.DataFrame, match_px: float) -> bool:
    """Two refined tracks are one object when within ``match_px`` on at least half of the images
    they share."""
    shared = a.merge(b, on="image_id", suffixes=("_a", "_b"))
    if shared.empty:
        return False
    d = np.hypot(shared["x_a"] - shared["x_b"], shared["y_a"] - shared["y_b"])
    return bool((d <= match_px).mean() >= 0.5)


def _drop_ghosts(out: list, tracks: list, match_px: float, snr_threshold: float, log: logging.Logger):
    """Drop refined objects that are only a brighter one's light: an orbit whose track crosses a
    bright object's on a part of the survey (a third of the images, say) collects its flux
    there. Brightest first, each object's SNR is recomputed without the images on which a
    brighter kept object's track is within ``match_px``; below ``snr_threshold`` it is merged
    into that object (objects below ``snr_threshold`` are dropped later anyway). An independent
    object crossing another's track loses only those images."""
    order = np.argsort([-r["snr"] for r in out], kind="stable")
    kept_out, kept_tracks = [], []
    for i in order:
        t = tracks[i]
        near = np.zeros(len(t), bool)
        owner = None
        for j, b in enumerate(kept_tracks):
            m = t[["image_id", "x", "y"]].merge(b[["image_id", "x", "y"]], on="image_id", how="left",
                                                suffixes=("", "_b"))
            close = (np.hypot(m["x"] - m["x_b"], m["y"] - m["y_b"]) <= match_px).to_numpy()
            if close[t["kept"].to_numpy()].any() and owner is None:
                owner = j
            near |= close
        use = t["kept"].to_numpy() & ~near
        psi, phi = t["psi"].to_numpy()[use], t["phi"].to_numpy()[use]
        alone = float(psi.sum() / np.sqrt(phi.sum())) if use.any() else 0.0
        if owner is not None and alone < snr_threshold <= out[i]["snr"]:
            shared = int((t["kept"].to_numpy() & near).sum())
            log.info("refined orbit %d: SNR %.2f, of which %.2f without the %d images it shares with orbit %d's "
                     "track: that object's light, merged", out[i]["orbit_id"], out[i]["snr"], alone, shared,
                     kept_out[owner]["orbit_id"])
            kept_out[owner]["n_merged_refined"] += 1
            continue
        kept_out.append(out[i])
        kept_tracks.append(t)
    return kept_out, kept_tracks


def refine_detections(det: pd.DataFrame, candidates: pd.DataFrame, images: pd.DataFrame, caches: dict, *,
                      masked: np.ndarray, n_sigma_g: float, smoothing_px: float, match_px: float,
                      refined_snr_threshold: float, min_images: int = 3, log: logging.Logger = log):
    """Refine every candidate of ``det`` (trial elements, ``orbit_id``), merge the refined tracks
    of one object, keep those at or above ``refined_snr_threshold`` at full resolution.

    A refinement whose track moves more than ``MAX_SHIFT_SIGMA`` filter widths from its trial
    has climbed onto something else: onto an object already kept (a duplicate, merged), else it
    is not a detection.

    Returns ``(detections, track, slices)``: detections with the refined elements, their 1-sd
    uncertainties (``sigma_<element>``, from the curvature of the log-likelihood at the peak),
    ``snr_search`` (the trial's, at the search's smoothing), ``snr_trial`` (the trial at full
    resolution), ``snr`` (refined), ``converged``, ``n_merged_refined``; candidates with fewer
    than ``min_images`` images consistent with one object are dropped; and the refined tracks
    (``orbit_id``, image_id, x, y, psi, phi, kept); and {orbit_id: SNR slices}.
    """
    out, tracks, slices = [], [], {}
    for _, d in det.sort_values(["snr", "orbit_id"], ascending=[False, True]).iterrows():
        sel = (candidates["orbit_id"] == d["orbit_id"]).to_numpy()
        rows = candidates[sel].assign(_masked=masked[sel]).sort_values("image_id", kind="stable")
        keep = trial_keep(rows, rows["_masked"].to_numpy(), n_sigma_g)
        if keep.sum() < min_images:
            log.info("candidate orbit %d: SNR %.2f (search) on %d images, of which %d are consistent with one "
                     "constant-flux object: not refined, not a detection", d["orbit_id"], d["snr"], len(rows),
                     int(keep.sum()))
            continue
        r = refine_candidate(d, rows, images, caches, keep=keep, smoothing_px=smoothing_px)
        dup = next((i for i, t in enumerate(tracks) if same_object(r.positions, t, match_px)), None)
        verdict = (f": the track of orbit {out[dup]['orbit_id']}" if dup is not None
                   else " (ran off: not a detection)" if not r.refined else "" if r.converged else " (not converged)")
        log.info("candidate orbit %d: SNR %.2f (search) -> %.2f (trial, full resolution) -> %.2f refined in %d "
                 "steps, track moved up to %.2f px%s", d["orbit_id"], d["snr"], r.snr_trial_full, r.snr_refined,
                 r.steps, r.max_shift_px, verdict)
        if dup is not None:
            out[dup]["n_merged_refined"] += 1
            continue
        if not r.refined:  # it left the covering's reach of its trial without meeting a kept object
            continue
        psi, phi = r.positions["psi"].to_numpy(), r.positions["phi"].to_numpy()
        kept = r.positions["kept"].to_numpy()
        row = {**d.to_dict(), **r.elements, **{f"sigma_{k}": v for k, v in r.sigma.items()},
               "snr_search": float(d["snr"]), "snr_trial": r.snr_trial_full, "snr": r.snr_refined,
               "flux_nmgy": float(psi[kept].sum() / phi[kept].sum()) if kept.any() else np.nan,
               "flux_sd_nmgy": float(1 / np.sqrt(phi[kept].sum())) if kept.any() else np.nan,
               "n_images": int(kept.sum()), "refined": r.refined, "converged": r.converged, "refine_steps": r.steps,
               "max_shift_px": r.max_shift_px,
               "n_merged_refined": 0}
        out.append(row)
        tracks.append(r.positions)
        slices[int(d["orbit_id"])] = r.slices
    out, tracks = _drop_ghosts(out, tracks, match_px, refined_snr_threshold, log)
    slices = {int(o["orbit_id"]): slices[int(o["orbit_id"])] for o in out}
    table = pd.DataFrame(out)
    track = (pd.concat([t.assign(orbit_id=int(o["orbit_id"])) for t, o in zip(tracks, out)], ignore_index=True)
             if tracks else pd.DataFrame(columns=["image_id", "x", "y", "psi", "phi", "kept", "orbit_id"]))
    if table.empty:
        return table, track, slices
    good = table["snr"] >= refined_snr_threshold
    log.info("%d candidates refined into %d objects; %d at or above refined SNR %.1f", len(det), len(table),
             int(good.sum()), refined_snr_threshold)
    return (table[good].reset_index(drop=True), track[track["orbit_id"].isin(table.loc[good, "orbit_id"])],
            slices)
