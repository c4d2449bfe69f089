"""Galaxy postage stamps for the deconvolution stage: which galaxies, cut from which image,
with which PSF; reading external stacks.

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

from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits

from ..astrometry.astropy_wcs import astropy_world2pix_near, wcs_from_header_text
from ..survey.pixels import aux_of, read_pixels
from ..survey.stage import select_images

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
        x, y = astropy_world2pix_near(wcs_from_header_text(row["wcs_header"]), ra, dec, (ny, nx))
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


def gaussian_psf_image(sigma_px: float, size: int) -> np.ndarray:
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
    return gaussian_psf_image(psf_sigma_px, size)


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


def cut_stamps(galaxies: pd.DataFrame, index: pd.DataFrame, band: str, stamp_px: int, max_stamps: int,
               progress=None, warn=None):
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
    warn : callable, optional
        Called with a message naming how many galaxies gave no stamp, and why (no science
        image of the band holds the whole stamp; bad pixels in every stamp tried).

    Returns
    -------
    stamps : (n, s, s) float32, image units minus the sky
    psfs : (n, s, s) float32, each summing to 1
    meta : DataFrame, ``META_COLUMNS``, in galaxy order
    """
    if stamp_px % 2 == 0:
        raise ValueError(f"deconvolve.stamp_px must be odd, got {stamp_px}")
    images = select_images(index, "science", band)
    placed = place_galaxies(galaxies, images, stamp_px // 2).reset_index(drop=True)
    if warn is not None and len(placed) < len(galaxies):
        sizes = sorted({(int(r["naxis1"]), int(r["naxis2"])) for _, r in images.iterrows()})
        warn(f"{len(galaxies) - len(placed)} of {len(galaxies)} galaxies give no stamp: no {band}-band science image "
             f"({len(images)}, sizes {', '.join(f'{a}x{b}' for a, b in sizes[:4])}{' ...' if len(sizes) > 4 else ''} "
             f"px) holds the whole {stamp_px} px stamp around them")
    rows = images.set_index("image_id")
    kept = {}  # position in ``placed`` -> (stamp, psf, meta row)
    start = 0
    n_bad = 0
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
                else:
                    n_bad += 1
        if progress:
            progress(f"{len(kept)} clean stamps from the first {start} of {len(placed)} placed galaxies")
    if warn is not None and n_bad:
        warn(f"{n_bad} of {start} placed galaxies give no stamp: their {stamp_px} px stamp holds bad pixels "
             "(masked or saturated) in the image where they lie farthest from the edge")
    order = sorted(kept)[:max_stamps]
    meta = pd.DataFrame([(k,) + kept[pos][2] for k, pos in enumerate(order)], columns=META_COLUMNS)
    meta = meta.astype({"stamp": "int64", "image_id": "int64"})
    shape = (0, stamp_px, stamp_px)
    stamps = np.stack([kept[p][0] for p in order]) if order else np.zeros(shape, np.float32)
    psfs = np.stack([kept[p][1] for p in order]) if order else np.zeros(shape, np.float32)
    return stamps, psfs, meta


# ----------------------------------------------------------------------------- external stacks
# ----------------------------------------------------------------------------- shards
# ----------------------------------------------------------------------------- merge
def load_stack(path) -> np.ndarray:
    """Read a (n, ny, nx) stack from ``.npy`` or FITS (first HDU with data).

    Raises
    ------
    ValueError
        Naming the file, when the array is not three-dimensional or the format is unknown.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    elif name.endswith((".fits", ".fit", ".fts", ".fits.gz", ".fits.fz")):
        from astropy.io import fits

        with fits.open(path, memmap=False) as hdul:
            data = next((h.data for h in hdul if h.data is not None), None)
        if data is None:
            raise ValueError(f"{path}: no HDU with data")
        arr = np.asarray(data)
    else:
        raise ValueError(f"{path}: unknown stack format (expected .npy or FITS)")
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a (n, ny, nx) stack, got shape {arr.shape}")
    return arr


def load_stamps_and_psfs(stamp_path, psf_path) -> tuple[np.ndarray, np.ndarray]:
    """Read stamps and their PSFs, checking that the two stacks agree (PSF i for stamp i)."""
    stamps = load_stack(stamp_path)
    psfs = load_stack(psf_path)
    if len(stamps) != len(psfs):
        raise ValueError(f"{stamp_path} holds {len(stamps)} stamps but {psf_path} holds {len(psfs)} PSFs")
    return stamps, psfs
