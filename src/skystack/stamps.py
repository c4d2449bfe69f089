"""Galaxy postage stamps for the deconvolution stage: which galaxies, cut from which image,
with which PSF; external stacks; shard bounds; merging the shards.

Stamps are cut from science images (sky subtracted) of one band. Each galaxy is taken from
the image where it lies farthest from the edge (ties: the lowest image_id), so the choice
depends on nothing but the index and the galaxy list. Stamps are cut on the pixel grid (no
resampling, so the noise stays white); the galaxy sits within half a pixel of the centre
pixel, and its exact position is kept in the metadata.

PSF at a galaxy's position: the image's ``PSF`` extension when it has one, else a Gaussian of
the indexed width. Both describe the PSF at the image centre; images carry no model of how
the PSF changes across the field, so a galaxy away from the centre gets the centre's PSF
(see the README, "Deconvolution").
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from .deconvolve import convolve, deconvolve_stack, ellipticity, load_stamps_and_psfs, psf_spectra
from .io import atomic_path
from .survey import aux_of, read_pixels
from .wcs import astropy_world2pix_near

#: Per-stamp metadata (stamps.parquet). ra, dec in degrees; x, y: the galaxy's position in
#: its image (0-based pixels); noise_sigma: per-pixel noise of the image (stamp units).
#: External stacks have no position (NaN, image_id -1) and their noise is measured per stamp.
META_COLUMNS = ["stamp", "ra", "dec", "image_id", "x", "y", "noise_sigma"]
#: Per-stamp diagnostics of the merged result (diagnostics.parquet).
DIAG_COLUMNS = META_COLUMNS + ["iterations", "cost", "converged", "primal_step", "dual_step", "reduced_chi2",
                               "e1_observed", "e2_observed", "e1", "e2"]


# ----------------------------------------------------------------------------- which galaxies
def galaxies_from_catalog(catalog: pd.DataFrame) -> pd.DataFrame:
    """Catalog galaxies (p_star < 0.5), brightest in r first; columns ra, dec (deg)."""
    gal = catalog[catalog["p_star"] < 0.5]
    gal = gal.sort_values(["flux_r_nmgy", "ra"], ascending=[False, True], kind="stable")
    return pd.DataFrame({"ra": gal["ra"].to_numpy(float), "dec": gal["dec"].to_numpy(float)})


def galaxies_from_truth(sources: pd.DataFrame) -> pd.DataFrame:
    """Simulated galaxies (the survey's truth table), brightest in r first; columns ra, dec (deg)."""
    gal = sources[~sources["is_star"].astype(bool)]
    gal = gal.sort_values(["flux_r_nmgy", "ra_deg"], ascending=[False, True], kind="stable")
    return pd.DataFrame({"ra": gal["ra_deg"].to_numpy(float), "dec": gal["dec_deg"].to_numpy(float)})


def galaxies_for(source: str, table: pd.DataFrame) -> pd.DataFrame:
    """The galaxy list of ``deconvolve.source`` (catalog or truth)."""
    if source == "catalog":
        return galaxies_from_catalog(table)
    if source == "truth":
        return galaxies_from_truth(table)
    raise ValueError(f"deconvolve.source: no galaxy table for {source!r}")


# ----------------------------------------------------------------------------- where to cut
def _header_wcs(text: str) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)  # e.g. OBSGEO filled in: harmless here
        return WCS(fits.Header.fromstring(text), naxis=2, relax=True)


def place_galaxies(galaxies: pd.DataFrame, images: pd.DataFrame, half_px: int) -> pd.DataFrame:
    """For each galaxy, the image where it lies farthest from the edge, the whole stamp inside.

    Returns the galaxies that fit in some image, in their input order, with image_id and
    x, y (0-based pixels in that image).
    """
    n = len(galaxies)
    best_id = np.full(n, -1, dtype=np.int64)
    best_margin_px = np.full(n, -np.inf)
    best_xy = np.zeros((n, 2))
    ra, dec = galaxies["ra"].to_numpy(float), galaxies["dec"].to_numpy(float)
    for _, row in images.sort_values("image_id").iterrows():  # ascending ids: ties keep the lowest
        nx, ny = int(row["naxis1"]), int(row["naxis2"])
        x, y = astropy_world2pix_near(_header_wcs(row["wcs_header"]), ra, dec, (ny, nx))
        margin_px = np.fmin(np.fmin(x, nx - 1 - x), np.fmin(y, ny - 1 - y))
        # the centre pixel (rounded position) must leave half_px on every side
        xc, yc = np.floor(x + 0.5), np.floor(y + 0.5)
        fits_in = (xc >= half_px) & (xc <= nx - 1 - half_px) & (yc >= half_px) & (yc <= ny - 1 - half_px)
        better = np.isfinite(margin_px) & fits_in & (margin_px > best_margin_px)
        best_id[better], best_margin_px[better] = int(row["image_id"]), margin_px[better]
        best_xy[better] = np.stack([x[better], y[better]], 1)
    placed = galaxies.assign(image_id=best_id, x=best_xy[:, 0], y=best_xy[:, 1])
    return placed[best_id >= 0]


# ----------------------------------------------------------------------------- PSF
def centred_psf(psf_image: np.ndarray, size: int) -> np.ndarray:
    """A PSF image cropped or zero-padded to ``size`` (odd) about its centre pixel, sum 1."""
    psf = np.nan_to_num(np.asarray(psf_image, dtype=np.float64))
    out = np.zeros((size, size))
    cy, cx = (psf.shape[0] - 1) // 2, (psf.shape[1] - 1) // 2
    h = size // 2
    ry, rx = min(cy, psf.shape[0] - 1 - cy, h), min(cx, psf.shape[1] - 1 - cx, h)
    out[h - ry:h + ry + 1, h - rx:h + rx + 1] = psf[cy - ry:cy + ry + 1, cx - rx:cx + rx + 1]
    total = out.sum()
    if not total > 0:
        raise ValueError("PSF image has no positive flux")
    return out / total


def gaussian_psf(sigma_px: float, size: int) -> np.ndarray:
    """A circular Gaussian PSF sampled at pixel centres, ``size`` (odd) pixels, sum 1."""
    off_px = np.arange(size) - size // 2
    g = np.exp(-0.5 * (off_px[:, None] ** 2 + off_px[None, :] ** 2) / sigma_px**2)
    return g / g.sum()


def image_psf(path, aux: dict, psf_sigma_px: float, size: int) -> np.ndarray:
    """The PSF an image provides: its ``PSF`` extension, else a Gaussian of ``psf_sigma_px``."""
    if "PSF" in aux:
        try:
            return centred_psf(fits.getdata(path, aux["PSF"]), size)
        except ValueError as err:
            raise ValueError(f"{path} [HDU {aux['PSF']}]: {err}") from err
    return gaussian_psf(psf_sigma_px, size)


# ----------------------------------------------------------------------------- cutting
def cut_one(pixels: np.ndarray, x_px: float, y_px: float, stamp_px: int) -> np.ndarray | None:
    """The ``stamp_px`` square centred on the pixel holding (x, y); None when it leaves the
    image or holds a bad (NaN) pixel."""
    half = stamp_px // 2
    xc, yc = int(np.floor(x_px + 0.5)), int(np.floor(y_px + 0.5))
    if xc < half or yc < half:
        return None
    cut = pixels[yc - half:yc + half + 1, xc - half:xc + half + 1]
    if cut.shape != (stamp_px, stamp_px) or not np.isfinite(cut).all():
        return None
    return cut


def science_images(index: pd.DataFrame, band: str) -> pd.DataFrame:
    """The index rows stamps may come from: science (not difference) images of ``band``."""
    return index[~index["is_difference"].astype(bool) & (index["band"] == band)]


def cut_stamps(galaxies: pd.DataFrame, index: pd.DataFrame, band: str, stamp_px: int, max_stamps: int,
               progress=None):
    """Sky-subtracted stamps of the first ``max_stamps`` galaxies that give a clean stamp.

    Parameters
    ----------
    galaxies : DataFrame
        ra, dec (deg), in order of preference (brightest first).
    index : DataFrame
        The image index (``images.parquet``).
    band : str
    stamp_px : int
        Stamp side, odd.
    max_stamps : int
    progress : callable, optional
        Called with a message after each image block.

    Returns
    -------
    stamps : (n, s, s) float32, image units minus the sky
    psfs : (n, s, s) float32, each summing to 1
    meta : DataFrame, ``META_COLUMNS``, in galaxy order
    """
    if stamp_px % 2 == 0:
        raise ValueError(f"deconvolve.stamp_px must be odd, got {stamp_px}")
    images = science_images(index, band)
    placed = place_galaxies(galaxies, images, stamp_px // 2).reset_index(drop=True)
    rows = images.set_index("image_id")
    kept = {}  # position in ``placed`` -> (stamp, psf, meta row)
    start = 0
    # Candidates in blocks of the number still missing, one read per image and block: the
    # bright galaxies of a big survey are spread over many images, and most are never needed.
    while len(kept) < max_stamps and start < len(placed):
        block = placed.iloc[start:start + max_stamps - len(kept)]
        start += len(block)
        for image_id, group in block.groupby("image_id", sort=True):
            row = rows.loc[image_id]
            aux = aux_of(row)
            pixels = read_pixels(row["path"], int(row["hdu"]), aux, float(row.get("saturate", np.inf)))
            psf = image_psf(row["path"], aux, float(row["psf_sigma_px"]), stamp_px).astype(np.float32)
            sky = np.float64(row["sky_level"])
            for pos, g in group.iterrows():
                cut = cut_one(pixels, g["x"], g["y"], stamp_px)
                if cut is not None:
                    kept[pos] = ((cut.astype(np.float64) - sky).astype(np.float32), psf,
                                 (g["ra"], g["dec"], int(image_id), g["x"], g["y"], float(row["noise_sigma"])))
        if progress:
            progress(f"{len(kept)} clean stamps from the first {start} of {len(placed)} placed galaxies")
    order = sorted(kept)[:max_stamps]
    meta = pd.DataFrame([(k,) + kept[pos][2] for k, pos in enumerate(order)], columns=META_COLUMNS)
    meta = meta.astype({"stamp": "int64", "image_id": "int64"})
    shape = (0, stamp_px, stamp_px)
    stamps = np.stack([kept[p][0] for p in order]) if order else np.zeros(shape, np.float32)
    psfs = np.stack([kept[p][1] for p in order]) if order else np.zeros(shape, np.float32)
    return stamps, psfs, meta


# ----------------------------------------------------------------------------- external stacks
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


# ----------------------------------------------------------------------------- shards
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


# ----------------------------------------------------------------------------- merge
def reduced_chi2(stamps, psfs, deconvolved, noise_sigma) -> np.ndarray:
    """Per stamp, mean((Y - H X)^2) / sigma^2: about 1 when the model leaves only noise."""
    stamps = np.asarray(stamps, dtype=np.float64)
    if len(stamps) == 0:
        return np.zeros(0)
    spec = psf_spectra(psfs, stamps.shape[1:], dtype="float64")
    model = np.asarray(convolve(np.asarray(deconvolved, dtype=np.float64), spec))
    return np.mean((stamps - model) ** 2, axis=(1, 2)) / np.asarray(noise_sigma, dtype=np.float64) ** 2


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
