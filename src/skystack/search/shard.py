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
from .matched_filter import CPU_BATCH_PATCHES, gathered_matched_filter, patch_radii_px, patch_radius_px

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
        Seconds spent per step ("intersect", "gather", "filter") are added to it; gathers
        overlap the filter's device work, so "filter" is the host's wait beyond them.

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
    image_id = hits["image_id"].to_numpy()
    meta = _image_columns(images, image_id, ["psf_sigma_px", "is_difference", "sky_level", "noise_sigma", "magzp"])
    sigma = np.hypot(meta["psf_sigma_px"], smoothing_sigma_px)
    radius = patch_radius_px(float(sigma.max()))
    # Difference images have zero background; science images carry their sky level.
    background = np.where(meta["is_difference"], 0.0, meta["sky_level"]).astype(np.float32)
    # Intersections image by image: a batch's patches then share a few images' tiles.
    order = np.argsort(image_id, kind="stable")
    x, y = hits["x"].to_numpy()[order], hits["y"].to_numpy()[order]
    ids = image_id[order]

    def gather(rows):
        t = clock.now()
        pixels = cache.patches(ids[rows], x[rows], y[rows], radius)
        clock.add("gather", clock.now() - t)
        return pixels

    k = 2 * radius + 1
    patch_bytes = k * k * 16  # the kernel's float64 products dominate
    per_patch = (sigma[order], meta["noise_sigma"][order], counts_per_nmgy(meta["magzp"][order]))
    psi_sorted, phi_sorted = _split_on_out_of_memory(lambda budget: gathered_matched_filter(
        gather, k, x, y, *per_patch, batch=_filter_batch(budget, patch_bytes), background=background[order],
        radius_px=patch_radii_px(per_patch[0])), max_batch_bytes)
    psi, phi = np.empty(len(order)), np.empty(len(order))
    psi[order], phi[order] = psi_sorted, phi_sorted
    out = hits[["orbit_id", "image_id", "x", "y"]].copy()
    out["psi"], out["phi"] = psi, phi
    clock.lap("filter", exclude="gather")
    return _in_orbit_image_order(out)


def _image_columns(images: pd.DataFrame, image_id: np.ndarray, columns: list[str]) -> dict:
    """Per intersection, the named index columns of its image (as numpy arrays)."""
    pos = pd.Index(images["image_id"].to_numpy()).get_indexer(image_id)
    if (pos < 0).any():
        raise KeyError(f"image ids not among the searched images: {np.unique(image_id[pos < 0])[:10].tolist()}")
    return {c: images[c].to_numpy()[pos] for c in columns}


def _filter_batch(max_batch_bytes: int, patch_bytes: int) -> int:
    """Patches per matched-filter call within the batch budget; on a CPU no more than what
    stays in its caches (``CPU_BATCH_PATCHES``)."""
    batch = max(1, int(max_batch_bytes) // patch_bytes)
    return min(batch, CPU_BATCH_PATCHES) if jax.default_backend() == "cpu" else batch


def _in_orbit_image_order(partials: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by (orbit_id, image_id); the intersections already come so ordered."""
    o, i = partials["orbit_id"].to_numpy(), partials["image_id"].to_numpy()
    if ((o[1:] > o[:-1]) | ((o[1:] == o[:-1]) & (i[1:] >= i[:-1]))).all():
        return partials.reset_index(drop=True)
    return partials.sort_values(["orbit_id", "image_id"], kind="stable").reset_index(drop=True)


class _StepClock:
    """Adds the seconds since the last lap to ``timings[step]`` (nothing when timings is None)."""

    def __init__(self, timings: dict | None):
        import time

        self.now, self.timings = time.perf_counter, timings
        self._last = self.now()
        self._inside = {}  # seconds added by ``add`` since the last lap, per step

    def add(self, step: str, seconds: float) -> None:
        """Seconds spent on ``step`` inside another step's lap."""
        self._inside[step] = self._inside.get(step, 0.0) + seconds
        if self.timings is not None:
            self.timings[step] = self.timings.get(step, 0.0) + seconds

    def lap(self, step: str, exclude: str | None = None) -> None:
        """Seconds since the last lap, less those ``add``-ed to ``exclude`` meanwhile."""
        now = self.now()
        if self.timings is not None:
            spent = now - self._last - (self._inside.get(exclude, 0.0) if exclude else 0.0)
            self.timings[step] = self.timings.get(step, 0.0) + spent
        self._last, self._inside = now, {}


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
