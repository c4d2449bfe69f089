"""Digital tracking: matched-filter partial sums along orbits, their combination, and merging.

Per intersection of an orbit with an image, with the image's PSF ``P`` (a Gaussian of the
indexed width, optionally widened by smoothing) centred at the sub-pixel position, and data
``d`` in ADU scaled to nanomaggies by the zero point (``c`` ADU per nmgy)::

    psi = sum(d c P) / sigma^2        phi = sum((c P)^2) / sigma^2

so that for a constant-flux object ``sum(psi) / sum(phi)`` is its flux in nmgy and
``sum(psi) / sqrt(sum(phi))`` its combined SNR. Bad (NaN) pixels are left out of both sums.
"""
from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pandas as pd

from ._jax import jax, jnp

log = logging.getLogger(__name__)

NMGY_AB_MAG = 22.5
SIGMA_G_PER_IQR = 0.7413  # sigma of a Gaussian = 0.7413 x its interquartile range


def counts_per_nmgy(magzp) -> np.ndarray:
    """ADU per nanomaggy for AB zero points (1 where the zero point is unknown)."""
    magzp = np.asarray(magzp, dtype=np.float64)
    return np.where(np.isfinite(magzp), 10.0 ** (-0.4 * (NMGY_AB_MAG - magzp)), 1.0)


@jax.jit
def _matched_filter(patches, dx_px, dy_px, psf_sigma_px, noise_sigma, adu_per_nmgy):
    """psi, phi for a batch of patches (float32 PSF model, float64 sums and scaling)."""
    k = patches.shape[-1]
    r = (k - 1) // 2
    off = jnp.arange(-r, r + 1, dtype=jnp.float32)
    sx = psf_sigma_px.astype(jnp.float32)[:, None, None]
    gx = off[None, None, :] - dx_px.astype(jnp.float32)[:, None, None]
    gy = off[None, :, None] - dy_px.astype(jnp.float32)[:, None, None]
    psf = jnp.exp(-(gx * gx + gy * gy) / (2 * sx * sx)) / (2 * jnp.pi * sx * sx)
    good = jnp.isfinite(patches)
    d = jnp.where(good, patches, 0.0)
    p = jnp.where(good, psf, 0.0)
    # float64 sums: a float32 reduction's rounding depends on the patch size, which depends
    # on the widest PSF in the batch, and results must not depend on how work is batched.
    d, p = d.astype(jnp.float64), p.astype(jnp.float64)
    s_dp = jnp.sum(d * p, axis=(1, 2))
    s_pp = jnp.sum(p * p, axis=(1, 2))
    var = noise_sigma.astype(jnp.float64) ** 2
    c = adu_per_nmgy.astype(jnp.float64)
    return s_dp * c / var, s_pp * c * c / var


def matched_filter(patches, x, y, psf_sigma_px, noise_sigma, adu_per_nmgy, batch: int = 65536):
    """Matched-filter terms for patches centred on ``round(x), round(y)``.

    Parameters
    ----------
    patches : ndarray (n, k, k) float32
        Pixels (ADU, background-subtracted), NaN where bad.
    x, y : ndarray (n,)
        Sub-pixel source positions (0-based px) whose nearest pixel is the patch centre.
    psf_sigma_px, noise_sigma, adu_per_nmgy : ndarray (n,)
        Per-intersection PSF width (px), pixel noise (ADU) and zero-point scale.

    Returns
    -------
    psi, phi : ndarray (n,) float64
        In nmgy / nmgy^2 units: flux = psi / phi, snr = psi / sqrt(phi).
    """
    n = len(patches)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    dx = x - np.floor(x + 0.5)
    dy = y - np.floor(y + 0.5)
    psi = np.empty(n)
    phi = np.empty(n)
    size = max(1, min(batch, n))
    for start in range(0, n, size):
        sl = slice(start, min(start + size, n))
        m = sl.stop - sl.start
        pad = size - m  # fixed batch shape: one compilation
        args = [np.asarray(a[sl]) for a in (patches, dx, dy, psf_sigma_px, noise_sigma, adu_per_nmgy)]
        if pad:
            args[0] = np.concatenate([args[0], np.full((pad,) + args[0].shape[1:], np.nan, np.float32)])
            args[1:] = [np.concatenate([a, np.ones(pad)]) for a in args[1:]]
        a, b = _matched_filter(*[jnp.asarray(v) for v in args])
        psi[sl] = np.asarray(a)[:m]
        phi[sl] = np.asarray(b)[:m]
    return psi, phi


def patch_radius_px(psf_sigma_px: float, smoothing_sigma_px: float = 0.0) -> int:
    """Patch half-size covering 3 sigma of the (smoothed) PSF."""
    return int(patch_radii_px(np.asarray(psf_sigma_px), smoothing_sigma_px))


def patch_radii_px(psf_sigma_px: np.ndarray, smoothing_sigma_px: float = 0.0) -> np.ndarray:
    """``patch_radius_px`` for an array of PSF widths."""
    return np.ceil(3.0 * np.hypot(np.asarray(psf_sigma_px, np.float64), smoothing_sigma_px)).astype(np.int64)


# ----------------------------------------------------------------------------- combination
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


def star_mask_hits(partials: pd.DataFrame, images: pd.DataFrame, stars: pd.DataFrame | None, radius_arcsec: float) -> np.ndarray:
    """True for intersections within ``radius_arcsec`` of a masked (bright) star."""
    if stars is None or stars.empty or partials.empty:
        return np.zeros(len(partials), bool)
    from astropy.io import fits
    from astropy.wcs import WCS

    from .wcs import astropy_world2pix_near

    hit = np.zeros(len(partials), bool)
    for image_id, idx in partials.groupby("image_id").indices.items():
        row = images.loc[images["image_id"] == image_id].iloc[0]
        wcs = WCS(fits.Header.fromstring(row["wcs_header"]))
        sx, sy = astropy_world2pix_near(wcs, stars["ra_deg"].to_numpy(), stars["dec_deg"].to_numpy(),
                                        (int(row["naxis2"]), int(row["naxis1"])))
        scale = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600
        px = partials["x"].to_numpy()[idx][:, None]
        py = partials["y"].to_numpy()[idx][:, None]
        d2 = (px - sx[None]) ** 2 + (py - sy[None]) ** 2
        hit[idx] = (d2 <= (radius_arcsec / scale) ** 2).any(axis=1)
    return hit


def merge_duplicates(candidates: pd.DataFrame, partials: pd.DataFrame, match_px: float,
                     snr_threshold: float | None = None) -> pd.DataFrame:
    """Keep the best (highest SNR) of candidate orbits that are the same object.

    A candidate is a duplicate of a better one kept before it when their predicted
    positions are within ``match_px`` in at least half of the images they share. With
    ``snr_threshold``, a candidate that only partly follows kept objects is a duplicate
    too when its SNR from the images where it is NOT on a kept object's track falls below
    the threshold: its signal is borrowed (its partials need ``psi`` and ``phi``).
    """
    if candidates.empty:
        return candidates.assign(n_merged=pd.Series(dtype="int64"))
    cand = candidates.sort_values(["snr", "orbit_id"], ascending=[False, True]).reset_index(drop=True)
    pos = {oid: g.set_index("image_id") for oid, g in partials[partials["orbit_id"].isin(cand["orbit_id"])].groupby("orbit_id")}
    kept, merged = [], {}
    for oid in cand["orbit_id"]:
        owner = _duplicate_of(pos.get(oid), [(best, pos.get(best)) for best in kept], match_px, snr_threshold)
        if owner is None:
            kept.append(oid)
            merged[oid] = 1
        else:
            merged[owner] += 1
    out = cand[cand["orbit_id"].isin(kept)].copy()
    out["n_merged"] = out["orbit_id"].map(merged).astype("int64")
    return out.reset_index(drop=True)


def _duplicate_of(mine: pd.DataFrame | None, kept: list, match_px: float, snr_threshold: float | None):
    """The kept orbit that ``mine`` duplicates, or None."""
    if mine is None:
        return None
    on_track = pd.Series(False, index=mine.index)
    most, most_shared = None, 0
    for best, other in kept:
        if other is None:
            continue
        shared = mine.index.intersection(other.index)
        if len(shared) == 0:
            continue
        close = np.hypot(mine.loc[shared, "x"] - other.loc[shared, "x"], mine.loc[shared, "y"] - other.loc[shared, "y"]) <= match_px
        if close.mean() >= 0.5:
            return best
        on_track.loc[shared[close.to_numpy()]] = True
        if close.sum() > most_shared:
            most, most_shared = best, int(close.sum())
    if snr_threshold is None or most is None:
        return None
    rest = mine[~on_track]
    phi = rest["phi"].sum()
    residual_snr = rest["psi"].sum() / np.sqrt(phi) if phi > 0 else 0.0
    return most if residual_snr < snr_threshold else None


# ----------------------------------------------------------------------------- shard driver
PARTIAL_COLUMNS = ["orbit_id", "image_id", "x", "y", "psi", "phi"]


def search_partials(orbits: pd.DataFrame, images: pd.DataFrame, cache, *, smoothing_sigma_px: float = 0.0,
                    max_batch_bytes: int = 256 << 20, prepared=None, timings: dict | None = None) -> pd.DataFrame:
    """Sparse matched-filter partial sums of ``orbits`` against the images of one cache.

    Parameters
    ----------
    orbits : DataFrame
        Orbit table (``skystack.orbits``).
    images : DataFrame
        Index rows of the images to search (all must be in ``cache``).
    cache : skystack.cache.TileCache
        The partition's tile cache.
    smoothing_sigma_px : float
        Extra Gaussian width added in quadrature to the PSF (keeps signal from neighbouring
        orbits of a sparse grid).
    prepared : ImageSet, optional
        ``search.prepare_images(images)``, made once for many orbit chunks.
    timings : dict, optional
        Seconds spent per step ("intersect", "gather", "filter") are added to it.

    Returns
    -------
    DataFrame with columns orbit_id, image_id, x, y, psi, phi (one row per intersection).
    """
    from .search import intersect

    if orbits.empty or images.empty:
        return _empty_partials()
    clock = _StepClock(timings)
    target = images if prepared is None else prepared
    hits = _split_on_out_of_memory(lambda budget: intersect(orbits, target, max_batch_bytes=budget), max_batch_bytes)
    clock.lap("intersect")
    if hits.empty:
        return _empty_partials()
    meta = images.set_index("image_id").loc[hits["image_id"].to_numpy()]
    sigma = np.hypot(meta["psf_sigma_px"].to_numpy(), smoothing_sigma_px)
    radius = patch_radius_px(float(sigma.max()))
    patches = cache.patches(hits["image_id"].to_numpy(), hits["x"].to_numpy(), hits["y"].to_numpy(), radius)
    patches = _crop_to_own_radius(patches, sigma)
    # Difference images have zero background; science images carry their sky level.
    background = np.where(meta["is_difference"].to_numpy(), 0.0, meta["sky_level"].to_numpy()).astype(np.float32)
    patches = patches - background[:, None, None]
    clock.lap("gather")
    filter_args = (patches, hits["x"].to_numpy(), hits["y"].to_numpy(), sigma,
                   meta["noise_sigma"].to_numpy(), counts_per_nmgy(meta["magzp"].to_numpy()))
    patch_bytes = patches[0].nbytes * 4  # the float64 products dominate
    psi, phi = _split_on_out_of_memory(
        lambda budget: matched_filter(*filter_args, batch=max(1, budget // patch_bytes)), max_batch_bytes)
    out = hits[["orbit_id", "image_id", "x", "y"]].copy()
    out["psi"], out["phi"] = psi, phi
    clock.lap("filter")
    return out.sort_values(["orbit_id", "image_id"], kind="stable").reset_index(drop=True)


class _StepClock:
    """Adds the seconds since the last lap to ``timings[step]`` (nothing when timings is None)."""

    def __init__(self, timings: dict | None):
        import time

        self._now, self.timings = time.perf_counter, timings
        self._last = self._now()

    def lap(self, step: str) -> None:
        now = self._now()
        if self.timings is not None:
            self.timings[step] = self.timings.get(step, 0.0) + now - self._last
        self._last = now


#: Below this batch budget an out-of-memory error is not retried (something else is wrong).
MIN_BATCH_BYTES = 1 << 20


def _is_out_of_memory(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _split_on_out_of_memory(run, max_batch_bytes: int):
    """``run(budget)``, retried with half the batch budget each time the device runs out of
    memory; the results do not depend on the batch size, so a retry changes nothing else."""
    budget = int(max_batch_bytes)
    while True:
        try:
            return run(budget)
        except jax.errors.JaxRuntimeError as err:
            if not _is_out_of_memory(err) or budget // 2 < MIN_BATCH_BYTES:
                raise
            log.warning("device out of memory with a %.1f MiB batch: split in two and retried", budget / 2**20)
            budget //= 2


def _crop_to_own_radius(patches: np.ndarray, sigma_px: np.ndarray) -> np.ndarray:
    """NaN outside each intersection's own patch radius: the patches of a batch share the
    widest PSF's size, and the sums must not depend on which images share the batch."""
    radius = patch_radii_px(sigma_px)
    half = patches.shape[-1] // 2
    if (radius >= half).all():
        return patches
    offset = np.abs(np.arange(-half, half + 1))
    outside = (offset[None, :, None] > radius[:, None, None]) | (offset[None, None, :] > radius[:, None, None])
    return np.where(outside, np.float32(np.nan), patches)


def _empty_partials() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c.endswith("_id") else "float64") for c in PARTIAL_COLUMNS})


def stage_cache(path, staging_dir) -> str:
    """Copy a tile cache to node-local disk once (reused by every chunk of the job)."""
    import os
    import shutil
    from pathlib import Path

    if not staging_dir:
        return str(path)
    staging = Path(os.path.expandvars(staging_dir)).expanduser()
    staging.mkdir(parents=True, exist_ok=True)
    src = Path(path)
    dst = staging / f"{src.parent.name}_{src.name}"
    if not dst.exists() or dst.stat().st_size != src.stat().st_size or dst.stat().st_mtime < src.stat().st_mtime:
        tmp = dst.with_name(f"{dst.name}.{os.getpid()}.part")  # jobs on one node may stage at once
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return str(dst)


# ----------------------------------------------------------------------------- orbit plan
ELEMENT_COLUMNS = ["a_au", "e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg", "epoch_jd_tdb"]


def plan_orbits(orbit_cfg: dict, seed: int, known_path, truth_path=None, file_path=None):
    """The listed orbits (grid, file, simulated truth) and the plan of chunks.

    Listed orbits take ids 0..L-1; random orbits follow with ids L..L+R-1, each generated
    from (seed, id) alone. Chunk c holds ids [c S, (c+1) S); a search job takes a range of
    ``chunks_per_job`` chunks.
    """
    from .orbits import load_known_objects, load_orbits, validate_orbits

    known = load_known_objects(known_path).set_index("name")
    ref_name = orbit_cfg["reference"]
    if ref_name not in known.index:
        raise ValueError(f"orbits.reference: {ref_name!r} is not in {known_path} (have {', '.join(known.index)})")
    reference = known.loc[ref_name, ELEMENT_COLUMNS].astype(float).to_dict()
    parts = []
    source = orbit_cfg["source"]
    if truth_path is not None and (source == "truth" or orbit_cfg["include_truth"]):
        truth = pd.read_parquet(truth_path)
        parts.append(truth[ELEMENT_COLUMNS].assign(name=truth["name"].astype(str)))
    if source == "grid":
        g = orbit_cfg["grid"]
        frac = np.linspace(g["a_frac_min"], g["a_frac_max"], g["n"])
        grid = pd.DataFrame([reference] * len(frac))
        grid["a_au"] = reference["a_au"] * (1 + frac)
        parts.append(grid.assign(name=[f"{ref_name} a{f:+.5f}" for f in frac]))
    if source == "file":
        user = load_orbits(file_path)
        parts.append(user[ELEMENT_COLUMNS].assign(name=user["name"].astype(str) if "name" in user else ""))
    listed = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=ELEMENT_COLUMNS + ["name"])
    listed.insert(0, "orbit_id", np.arange(len(listed), dtype=np.int64))
    if len(listed):
        validate_orbits(listed, source=str(file_path or "listed orbits"))
    n_random = int(orbit_cfg["n_random"])  # random orbits follow whatever is listed
    n_total = len(listed) + n_random
    size, per_job = int(orbit_cfg["chunk_size"]), int(orbit_cfg["chunks_per_job"])
    n_chunks = max(1, -(-n_total // size))
    plan = {
        "seed": int(seed), "preset": orbit_cfg["preset"], "reference": reference, "reference_name": ref_name,
        "focused_sigma": dict(orbit_cfg["focused_sigma"]), "n_listed": len(listed), "n_random": n_random,
        "n_total": n_total, "chunk_size": size, "chunks_per_job": per_job, "n_chunks": n_chunks,
        "n_chunk_ranges": -(-n_chunks // per_job),
    }
    return listed, plan


def orbits_for_ids(plan: dict, listed: pd.DataFrame, ids) -> pd.DataFrame:
    """Rebuild the orbits with the given ids from the plan (listed rows, then random ones)."""
    from .population import population

    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < plan["n_total"])]
    listed_ids = ids[ids < plan["n_listed"]]
    random_ids = ids[ids >= plan["n_listed"]]
    parts = [listed.set_index("orbit_id").loc[listed_ids].reset_index()[["orbit_id"] + ELEMENT_COLUMNS]]
    if len(random_ids):
        parts.append(population(plan["preset"], random_ids, plan["seed"], plan["reference"], plan["focused_sigma"]))
    return pd.concat(parts, ignore_index=True)


def chunk_range_ids(plan: dict, chunk_range: int) -> np.ndarray:
    """Orbit ids of one search job's chunk range."""
    size, per_job = plan["chunk_size"], plan["chunks_per_job"]
    start = chunk_range * per_job * size
    return np.arange(start, min(start + per_job * size, plan["n_total"]), dtype=np.int64)


# ----------------------------------------------------------------------------- detections
def light_curves(candidates: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Per-image flux (nmgy) with 1-sd errors along each candidate orbit."""
    lc = candidates.merge(images[["image_id", "mjd_mid_utc", "band"]], on="image_id")
    lc["flux_nmgy"] = lc["psi"] / lc["phi"]
    lc["flux_sd_nmgy"] = 1.0 / np.sqrt(lc["phi"])
    return lc[["orbit_id", "image_id", "mjd_mid_utc", "band", "x", "y", "flux_nmgy", "flux_sd_nmgy"]].sort_values(
        ["orbit_id", "mjd_mid_utc", "image_id"], kind="stable").reset_index(drop=True)


def coadd_stamp(positions: pd.DataFrame, images: pd.DataFrame, caches: dict, radius: int = 8) -> np.ndarray:
    """Inverse-variance weighted mean of the patches along an orbit, in nmgy per pixel."""
    meta = images.set_index("image_id")
    num = np.zeros((2 * radius + 1,) * 2)
    den = np.zeros_like(num)
    for part, g in positions.assign(partition=meta.loc[positions["image_id"], "partition"].to_numpy()).groupby("partition"):
        m = meta.loc[g["image_id"]]
        patches = caches[int(part)].patches(g["image_id"].to_numpy(), g["x"].to_numpy(), g["y"].to_numpy(), radius)
        scale = counts_per_nmgy(m["magzp"].to_numpy())[:, None, None]
        bg = np.where(m["is_difference"].to_numpy(), 0.0, m["sky_level"].to_numpy())[:, None, None]
        w = (scale / m["noise_sigma"].to_numpy()[:, None, None]) ** 2 * np.isfinite(patches)
        num += np.nansum(np.where(np.isfinite(patches), (patches - bg) / scale, 0.0) * w, axis=0)
        den += w.sum(axis=0)
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def match_truth(detections: pd.DataFrame, truth_positions: pd.DataFrame, candidates: pd.DataFrame, match_px: float) -> pd.Series:
    """For each detection, the injected orbit it recovers (positions within ``match_px`` in at
    least half the images both cover), or -1."""
    out = pd.Series(-1, index=detections.index, dtype="int64")
    truth_by = {oid: g.set_index("image_id")[["x", "y"]] for oid, g in truth_positions.groupby("orbit_id")}
    for i, oid in detections["orbit_id"].items():
        mine = candidates[candidates["orbit_id"] == oid].set_index("image_id")[["x", "y"]]
        for toid, t in truth_by.items():
            shared = mine.index.intersection(t.index)
            if len(shared) and np.mean(np.hypot(mine.loc[shared, "x"] - t.loc[shared, "x"], mine.loc[shared, "y"] - t.loc[shared, "y"]) <= match_px) >= 0.5:
                out[i] = toid
                break
    return out
