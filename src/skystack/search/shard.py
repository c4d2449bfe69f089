"""The search shard driver: intersections, patch gathers and the matched filter for a chunk of
orbits against the images of one tile cache, with an out-of-memory retry and node-local
cache staging."""
from __future__ import annotations

import logging

import jax
import numpy as np
import pandas as pd

from ..core.units import counts_per_nmgy
from .intersect import intersect
from .matched_filter import _crop_to_own_radius, matched_filter, patch_radius_px

PARTIAL_COLUMNS = ["orbit_id", "image_id", "x", "y", "psi", "phi"]

log = logging.getLogger(__name__)


def search_partials(orbits: pd.DataFrame, images: pd.DataFrame, cache, *, smoothing_sigma_px: float = 0.0,
                    max_batch_bytes: int = 256 << 20, prepared=None, timings: dict | None = None) -> pd.DataFrame:
    """Sparse matched-filter partial sums of ``orbits`` against the images of one cache.

    Parameters
    ----------
    orbits : DataFrame
        Orbit table (``skystack.orbits.table``).
    images : DataFrame
        Index rows of the images to search (all must be in ``cache``).
    cache : skystack.survey.cache.TileCache
        The partition's tile cache.
    smoothing_sigma_px : float
        Extra Gaussian width added in quadrature to the PSF (keeps signal from neighbouring
        orbits of a sparse grid).
    prepared : ImageSet, optional
        ``search.intersect.prepare_images(images)``, made once for many orbit chunks.
    timings : dict, optional
        Seconds spent per step ("intersect", "gather", "filter") are added to it.

    Returns
    -------
    DataFrame with columns orbit_id, image_id, x, y, psi, phi (one row per intersection).
    """

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


def _empty_partials() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c.endswith("_id") else "float64") for c in PARTIAL_COLUMNS})


def _is_copy_of(dst, src, digest: str) -> bool:
    """Whether ``dst`` is a staged copy of ``src``: same size and index digest (a damaged or
    partial copy is staged again)."""
    from ..survey.cache import read_index

    try:
        return dst.stat().st_size == src.stat().st_size and read_index(dst)["digest"] == digest
    except (OSError, ValueError):
        return False


def stage_cache(path, staging_dir) -> str:
    """Copy a tile cache to node-local disk once (reused by every chunk of the job).

    The copy is named by the digest of the cache's index and checksum table, so runs that
    share a staging directory never read each other's pixels, and a rebuilt cache is staged
    afresh; a new copy is checked before it is renamed into place."""
    import os
    import shutil
    from pathlib import Path

    from ..survey.cache import CacheIntegrityError, TileCache, read_index

    if not staging_dir:
        return str(path)
    staging = Path(os.path.expandvars(staging_dir)).expanduser()
    staging.mkdir(parents=True, exist_ok=True)
    src = Path(path)
    digest = read_index(src)["digest"]
    dst = staging / f"{src.stem}-{digest[:32]}.tiles"
    if _is_copy_of(dst, src, digest):
        return str(dst)  # its tiles are checked against their checksums when it is opened
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.part")  # jobs on one node may stage at once
    try:
        shutil.copyfile(src, tmp)
        try:
            TileCache.open(tmp)  # a short or damaged copy is refused here, not after the rename
        except CacheIntegrityError as err:
            TileCache.open(src)  # a damaged cache is reported as itself
            raise CacheIntegrityError(f"staging {src} to {staging} gave a damaged copy ({err})") from None
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return str(dst)
