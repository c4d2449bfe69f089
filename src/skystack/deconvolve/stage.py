"""The deconvolution stage: external stacks, shard bounds and solves, merging, the FITS cube."""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from astropy.io import fits

from ..core.io import atomic_path, write_parquet
from ..report.figures import deconvolution_figure
from .metrics import ellipticity, reduced_chi2
from .solvers import deconvolve_stack
from .stamps import (
    DIAG_COLUMNS,
    META_COLUMNS,
    cut_stamps,
    galaxies_for,
    load_stamps_and_psfs,
)


def check_external_stacks(stamps: np.ndarray, psfs: np.ndarray, stamp_path, psf_path) -> None:
    """Clear errors, naming the file, for stacks the solver cannot use."""
    if len(stamps) == 0:
        raise ValueError(f"{stamp_path}: the stack holds no stamps")
    if min(stamps.shape[1:]) < 3:
        raise ValueError(f"{stamp_path}: stamps of {stamps.shape[1:]} px are too small to deconvolve")
    if not np.isfinite(stamps).all():
        bad = np.flatnonzero(~np.isfinite(stamps).all(axis=(1, 2)))
        raise ValueError(f"{stamp_path}: stamps {bad[:10].tolist()} hold NaN or infinite pixels")
    finite = np.isfinite(psfs).all(axis=(1, 2))
    if not finite.all() or (psfs.sum(axis=(1, 2)) <= 0).any():
        bad = np.flatnonzero(~(finite & (np.nan_to_num(psfs).sum(axis=(1, 2)) > 0)))
        raise ValueError(f"{psf_path}: PSFs {bad[:10].tolist()} are not finite with a positive sum "
                         "(cannot be normalised)")
    if psfs.shape[1] % 2 == 0 or psfs.shape[2] % 2 == 0:
        raise ValueError(f"{psf_path}: PSFs must have odd sides to have a centre pixel, got {psfs.shape[1:]}")


def external_stacks(stamp_path, psf_path, max_stamps: int):
    """Stamps and PSFs from files (.npy or FITS cubes), checked, the PSFs normalised to sum 1.

    Returns stamps (n, ny, nx) float32, psfs (n, sy, sx) float32 and the metadata (no sky
    position: NaN, image_id -1; noise NaN, so the solver measures it per stamp).
    """
    stamps, psfs = load_stamps_and_psfs(stamp_path, psf_path)
    check_external_stacks(stamps, psfs, stamp_path, psf_path)
    stamps, psfs = stamps[:max_stamps], psfs[:max_stamps].astype(np.float64)
    psfs = psfs / psfs.sum(axis=(1, 2), keepdims=True)
    n = len(stamps)
    meta = pd.DataFrame({c: np.full(n, np.nan) for c in META_COLUMNS})
    meta["stamp"], meta["image_id"] = np.arange(n), -1
    return stamps.astype(np.float32), psfs.astype(np.float32), meta.astype({"stamp": "int64", "image_id": "int64"})


def write_stack(array: np.ndarray, path) -> None:
    """A stack as ``.npy``, written under a temporary name and renamed when complete."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array))


def shard_bounds(n_stamps: int, n_shards: int, shard: int) -> tuple[int, int]:
    """Contiguous stamps [start, stop) of a shard; the shards cover every stamp once."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not one of 0..{n_shards - 1}")
    return shard * n_stamps // n_shards, (shard + 1) * n_stamps // n_shards


def solver_options(cfg: dict) -> dict:
    """``deconvolve_stack`` keyword arguments from the ``deconvolve`` config section."""
    return dict(n_scales=int(cfg["n_scales"]), kappa=tuple(float(k) for k in cfg["kappa"]),
                n_reweights=int(cfg["n_reweights"]), tol=float(cfg["tol"]), max_iter=int(cfg["max_iter"]),
                mode=cfg["mode"], dtype=cfg["dtype"])


def deconvolve_shard(stamps: np.ndarray, psfs: np.ndarray, noise_sigma: np.ndarray, cfg: dict, shard: int,
                     n_shards: int, progress=None):
    """Deconvolve the stamps of one shard.

    Sparse mode treats every stamp on its own, so any split gives the same result; low-rank
    mode couples all stamps and needs one shard. ``noise_sigma`` NaN: measured per stamp.

    Returns
    -------
    deconvolved : (stop - start, ny, nx), cfg dtype
    diagnostics : DataFrame, ``stamp`` the index in the whole stack
    """
    if cfg["mode"] == "lowrank" and n_shards != 1:
        raise ValueError(f"deconvolve.mode lowrank couples all stamps: it needs one shard, got {n_shards}")
    start, stop = shard_bounds(len(stamps), n_shards, shard)
    opts = solver_options(cfg)
    if stop == start:
        empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in (("stamp", "int64"), ("iterations", "int64"),
                              ("cost", "float64"), ("converged", "bool"), ("noise_sigma", "float64"),
                              ("primal_step", "float64"), ("dual_step", "float64"))})
        return np.zeros((0,) + stamps.shape[1:], opts["dtype"]), empty
    noise = np.asarray(noise_sigma, dtype=np.float64)[start:stop]
    noise = None if np.isnan(noise).any() else noise
    x, diag = deconvolve_stack(stamps[start:stop], psfs[start:stop], noise, progress=progress, **opts)
    diag["stamp"] = diag["stamp"].to_numpy() + start
    return x, diag


def merge_shards(stamps: np.ndarray, psfs: np.ndarray, meta: pd.DataFrame, parts, diagnostics):
    """The shards' results as one stack, in stamp order, and the per-stamp diagnostics.

    Parameters
    ----------
    parts : sequence of (n_k, ny, nx) arrays, shard order
    diagnostics : sequence of DataFrames, shard order

    Returns
    -------
    deconvolved : (n, ny, nx)
    diag : DataFrame, ``DIAG_COLUMNS``; noise_sigma is the one the solver used
    """
    x = np.concatenate([np.asarray(p) for p in parts]) if parts else np.zeros((0,) + stamps.shape[1:])
    if x.shape != stamps.shape:
        raise ValueError(f"the shards hold {x.shape} deconvolved stamps for {stamps.shape} observed ones")
    solved = pd.concat([d for d in diagnostics if len(d)], ignore_index=True) if any(len(d) for d in diagnostics) \
        else None
    if solved is None:
        return x, pd.DataFrame({c: pd.Series(dtype="float64") for c in DIAG_COLUMNS})
    if not np.array_equal(solved["stamp"].to_numpy(), np.arange(len(stamps))):
        raise ValueError("the shards' diagnostics do not cover stamps 0..n-1 in order")
    diag = meta.drop(columns=["noise_sigma"]).merge(solved, on="stamp", how="left", validate="one_to_one")
    diag["reduced_chi2"] = reduced_chi2(stamps, psfs, x, diag["noise_sigma"].to_numpy())
    diag["e1_observed"], diag["e2_observed"] = ellipticity(stamps)
    diag["e1"], diag["e2"] = ellipticity(x)
    return x, diag[DIAG_COLUMNS]


def write_cube(deconvolved: np.ndarray, psfs: np.ndarray, path, mode: str = "sparse") -> None:
    """The deconvolved stack as a FITS cube (primary HDU) with the PSFs (``PSF`` extension)."""
    hdus = fits.HDUList([fits.PrimaryHDU(np.asarray(deconvolved, np.float32)),
                         fits.ImageHDU(np.asarray(psfs, np.float32), name="PSF")])
    hdus[0].header["DECMODE"] = (mode, "deconvolution prior: sparse or lowrank")
    hdus[0].header["COMMENT"] = "Deconvolved galaxy stamps, in the units of the input stamps;"
    hdus[0].header["COMMENT"] = "axis 3 is the stamp index of diagnostics.parquet."
    with atomic_path(path) as tmp:
        hdus.writeto(tmp)


def extract_stage(stamps_out, psfs_out, meta_out, *, cfg: dict, galaxies_path=None, images_path=None,
                  stamps_path=None, psfs_path=None, log: logging.Logger) -> None:
    """``extract_stamps``: stamps, PSFs and metadata, from the survey or from external stacks."""
    if cfg["source"] == "stacks":
        stamps, psfs, meta = external_stacks(stamps_path, psfs_path, cfg["max_stamps"])
        log.info("%d stamps of %s px and their PSFs (normalised to sum 1) from %s and %s", len(stamps),
                 stamps.shape[1:], stamps_path, psfs_path)
    else:
        galaxies = galaxies_for(cfg["source"], pd.read_parquet(galaxies_path))
        index = pd.read_parquet(images_path)
        log.info("%d galaxies (%s); cutting up to %d stamps of %d px from %s-band science images", len(galaxies),
                 cfg["source"], cfg["max_stamps"], cfg["stamp_px"], cfg["band"])
        stamps, psfs, meta = cut_stamps(galaxies, index, cfg["band"], cfg["stamp_px"], cfg["max_stamps"],
                                        progress=log.info, warn=log.warning)
        log.info("%d clean stamps from %d images; PSF: the image's at its centre (PSF extension, else Gaussian)",
                 len(stamps), meta["image_id"].nunique())
    write_stack(stamps, stamps_out)
    write_stack(psfs, psfs_out)
    write_parquet(meta, meta_out)


def shard_stage(stamps_path, psfs_path, meta_path, shard: int, n_shards: int, deconvolved_out, diagnostics_out, *,
                cfg: dict, log: logging.Logger) -> None:
    """``deconvolve_shard``: one contiguous range of stamps solved."""
    stamps, psfs = np.load(stamps_path), np.load(psfs_path)
    noise_sigma = pd.read_parquet(meta_path)["noise_sigma"].to_numpy(float)
    start, stop = shard_bounds(len(stamps), n_shards, shard)
    log.info("shard %d/%d: stamps %d..%d (%d), mode %s, %s", shard + 1, n_shards, start, stop - 1, stop - start,
             cfg["mode"], cfg["dtype"])
    t0 = time.time()
    x, diag = deconvolve_shard(stamps, psfs, noise_sigma, cfg, shard, n_shards,
                               progress=lambda done, n: log.info("%d/%d stamps, %.1f s", done, n, time.time() - t0))
    log.info("%d converged; median %d iterations", int(diag["converged"].sum()),
             int(diag["iterations"].median()) if len(diag) else 0)
    write_stack(x, deconvolved_out)
    write_parquet(diag, diagnostics_out)


def merge_stage(stamps_path, psfs_path, meta_path, shard_paths, diagnostics_paths, cube_out, diagnostics_out,
                figure_out, *, mode: str, log: logging.Logger) -> None:
    """``merge_deconvolved``: the shards joined into one FITS cube, diagnostics and a figure."""
    stamps, psfs = np.load(stamps_path), np.load(psfs_path)
    meta = pd.read_parquet(meta_path)
    x, diag = merge_shards(stamps, psfs, meta, [np.load(p) for p in shard_paths],
                           [pd.read_parquet(p) for p in diagnostics_paths])
    write_cube(x, psfs, cube_out, mode)
    write_parquet(diag, diagnostics_out)
    deconvolution_figure(stamps, psfs, x, diag, figure_out)
    log.info("%d stamps from %d shards; %d converged; median cost %.4g, median reduced chi2 %.3g", len(x),
             len(shard_paths), int(diag["converged"].sum()), float(diag["cost"].median()) if len(diag) else np.nan,
             float(diag["reduced_chi2"].median()) if len(diag) else np.nan)
