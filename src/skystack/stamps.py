"""Galaxy postage stamps for the deconvolution stage: which galaxies, cut from which image,
with which PSF; shard bounds; and checks on external stacks.

Stamps are cut from science images (sky subtracted) of one band. Each galaxy is taken from
the image where it lies farthest from the edge (ties: the lowest image_id), so the choice
does not depend on anything but the index and the galaxy list.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS

from .survey import aux_of, read_pixels
from .wcs import astropy_world2pix_near

META_COLUMNS = ["stamp", "ra", "dec", "image_id", "x", "y", "noise_sigma"]


def galaxies_from_catalog(catalog: pd.DataFrame) -> pd.DataFrame:
    """Catalog galaxies (p_star < 0.5), brightest in r first."""
    gal = catalog[catalog["p_star"] < 0.5]
    gal = gal.sort_values(["flux_r_nmgy", "ra"], ascending=[False, True], kind="stable")
    return pd.DataFrame({"ra": gal["ra"].to_numpy(float), "dec": gal["dec"].to_numpy(float)})


def galaxies_from_truth(sources: pd.DataFrame) -> pd.DataFrame:
    """Simulated galaxies (the survey's truth table), brightest in r first."""
    gal = sources[~sources["is_star"].astype(bool)]
    gal = gal.sort_values(["flux_r_nmgy", "ra_deg"], ascending=[False, True], kind="stable")
    return pd.DataFrame({"ra": gal["ra_deg"].to_numpy(float), "dec": gal["dec_deg"].to_numpy(float)})


def _place(galaxies: pd.DataFrame, images: pd.DataFrame, half: int) -> pd.DataFrame:
    """For each galaxy, the image where it lies farthest from the edge (whole stamp inside)."""
    best = np.full(len(galaxies), -1)
    best_margin = np.full(len(galaxies), -np.inf)
    best_xy = np.zeros((len(galaxies), 2))
    ra, dec = galaxies["ra"].to_numpy(), galaxies["dec"].to_numpy()
    for _, row in images.sort_values("image_id").iterrows():
        w = WCS(fits.Header.fromstring(row["wcs_header"]))
        nx, ny = int(row["naxis1"]), int(row["naxis2"])
        x, y = astropy_world2pix_near(w, ra, dec, (ny, nx))
        margin = np.fmin(np.fmin(x, nx - 1 - x), np.fmin(y, ny - 1 - y))
        better = np.isfinite(margin) & (margin >= half) & (margin > best_margin)
        best[better], best_margin[better] = int(row["image_id"]), margin[better]
        best_xy[better] = np.stack([x[better], y[better]], 1)
    return galaxies.assign(image_id=best, x=best_xy[:, 0], y=best_xy[:, 1])[best >= 0]


def centred_psf(psf_image: np.ndarray, size: int) -> np.ndarray:
    """A PSF image cropped or zero-padded to ``size`` (odd), centred, normalised to sum 1."""
    psf = np.nan_to_num(np.asarray(psf_image, dtype=np.float64))
    out = np.zeros((size, size))
    h_in, h_out = psf.shape[0] // 2, size // 2
    r = min(h_in, h_out)
    out[h_out - r:h_out + r + 1, h_out - r:h_out + r + 1] = psf[h_in - r:h_in + r + 1, h_in - r:h_in + r + 1]
    total = out.sum()
    if not total > 0:
        raise ValueError("PSF image has no positive flux")
    return out / total


def gaussian_psf(sigma_px: float, size: int) -> np.ndarray:
    off = np.arange(size) - size // 2
    g = np.exp(-0.5 * (off[:, None] ** 2 + off[None, :] ** 2) / sigma_px**2)
    return g / g.sum()


def cut_stamps(galaxies: pd.DataFrame, index: pd.DataFrame, band: str, stamp_px: int, max_stamps: int):
    """Stamps (n, s, s) float32, PSFs (n, s, s) and their metadata (``META_COLUMNS``).

    The PSF is the image's ``PSF`` extension (measured at the image centre) when it has one,
    else a Gaussian of the indexed width; a galaxy without a clean stamp (NaN pixels) is
    skipped.
    """
    if stamp_px % 2 == 0:
        raise ValueError(f"deconvolve.stamp_px must be odd, got {stamp_px}")
    half = stamp_px // 2
    images = index[(~index["is_difference"].astype(bool)) & (index["band"] == band)]
    placed = _place(galaxies, images, half)
    rows = images.set_index("image_id")
    stamps, psfs, meta, pixels_of = [], [], [], {}
    for _, g in placed.iterrows():
        if len(stamps) == max_stamps:
            break
        row = rows.loc[int(g["image_id"])]
        if g["image_id"] not in pixels_of:
            pixels_of.clear()  # one image in memory at a time is enough: galaxies are few per image
            pixels_of[g["image_id"]] = read_pixels(row["path"], int(row["hdu"]), aux_of(row), float(row["saturate"]))
        pix = pixels_of[g["image_id"]]
        xc, yc = int(np.floor(g["x"] + 0.5)), int(np.floor(g["y"] + 0.5))
        cut = pix[yc - half:yc + half + 1, xc - half:xc + half + 1]
        if cut.shape != (stamp_px, stamp_px) or not np.isfinite(cut).all():
            continue
        aux = aux_of(row)
        psf = (centred_psf(fits.getdata(row["path"], aux["PSF"]), stamp_px) if "PSF" in aux
               else gaussian_psf(float(row["psf_sigma_px"]), stamp_px))
        stamps.append((cut - np.float32(row["sky_level"])).astype(np.float32))
        psfs.append(psf.astype(np.float32))
        meta.append((len(meta), g["ra"], g["dec"], int(g["image_id"]), g["x"], g["y"], float(row["noise_sigma"])))
    meta = pd.DataFrame(meta, columns=META_COLUMNS).astype({"stamp": "int64", "image_id": "int64"})
    shape = (0, stamp_px, stamp_px)
    return (np.stack(stamps) if stamps else np.zeros(shape, np.float32),
            np.stack(psfs) if psfs else np.zeros(shape, np.float32), meta)


def check_external_stacks(stamps: np.ndarray, psfs: np.ndarray, stamp_path, psf_path) -> None:
    """Clear errors, naming the file, for stacks the solver cannot use."""
    if not np.isfinite(stamps).all():
        bad = np.flatnonzero(~np.isfinite(stamps).all(axis=(1, 2)))
        raise ValueError(f"{stamp_path}: stamps {bad[:10].tolist()} hold NaN or infinite pixels")
    if not np.isfinite(psfs).all() or (psfs.sum(axis=(1, 2)) <= 0).any():
        bad = np.flatnonzero(~(np.isfinite(psfs).all(axis=(1, 2)) & (np.nan_to_num(psfs).sum(axis=(1, 2)) > 0)))
        raise ValueError(f"{psf_path}: PSFs {bad[:10].tolist()} are not finite with a positive sum")
    if psfs.shape[1] % 2 == 0 or psfs.shape[2] % 2 == 0:
        raise ValueError(f"{psf_path}: PSFs must have odd sides to have a centre pixel, got {psfs.shape[1:]}")


def shard_bounds(n_stamps: int, n_shards: int, shard: int) -> tuple[int, int]:
    """Contiguous stamps [start, stop) of a shard; the shards cover every stamp once."""
    return shard * n_stamps // n_shards, (shard + 1) * n_stamps // n_shards


def write_cube(deconvolved: np.ndarray, psfs: np.ndarray, path) -> None:
    """The deconvolved stack as a FITS cube (primary HDU) with the PSFs (``PSF`` extension)."""
    from .io import atomic_path

    hdus = fits.HDUList([fits.PrimaryHDU(np.asarray(deconvolved, np.float32)),
                         fits.ImageHDU(np.asarray(psfs, np.float32), name="PSF")])
    hdus[0].header["BUNIT"] = ("ADU", "same units as the input stamps")
    hdus[0].header["COMMENT"] = "Deconvolved galaxy stamps: axis 3 is the stamp index of diagnostics.parquet"
    with atomic_path(path) as tmp:
        hdus.writeto(tmp)
