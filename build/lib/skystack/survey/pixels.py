"""Pixels of an indexed image: reading with masks, robust sky and noise, PSF moments."""
from __future__ import annotations

import numpy as np
from astropy.io import fits

from ..core.units import MAD_TO_SIGMA


def clipped_stats(data: np.ndarray, n_sigma: float = 3.0, n_iter: int = 5) -> tuple[float, float]:
    """Median and noise sigma (1.4826 MAD) with iterative sigma clipping of finite pixels."""
    values = data[np.isfinite(data)].astype(np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    for _ in range(n_iter):
        med = np.median(values)
        sigma = MAD_TO_SIGMA * np.median(np.abs(values - med))
        if not sigma > 0:
            break
        keep = np.abs(values - med) < n_sigma * sigma
        if keep.all():
            break
        values = values[keep]
    med = float(np.median(values))
    return med, float(MAD_TO_SIGMA * np.median(np.abs(values - med)))


def psf_sigma_from_image(psf: np.ndarray) -> float:
    """Gaussian-equivalent sigma (px) of a pixelized PSF from its second moments."""
    psf = np.clip(np.asarray(psf, dtype=np.float64), 0.0, None)
    total = psf.sum()
    yy, xx = np.indices(psf.shape)
    xc, yc = (psf * xx).sum() / total, (psf * yy).sum() / total
    var = (psf * ((xx - xc) ** 2 + (yy - yc) ** 2)).sum() / total / 2.0
    return float(np.sqrt(var))


def read_pixels(path, hdu: int, aux: dict | None = None, saturate: float = np.inf) -> np.ndarray:
    """Image pixels as float32 with NaN where bad (MASK non-zero, saturated, non-finite)."""
    with fits.open(path, memmap=False) as hdul:
        data = np.asarray(hdul[hdu].data, dtype=np.float32)
        if aux and "MASK" in aux:
            data = np.where(np.asarray(hdul[aux["MASK"]].data) != 0, np.float32(np.nan), data)
    if np.isfinite(saturate):
        data = np.where(data >= saturate, np.float32(np.nan), data)
    return data


def aux_of(row) -> dict:
    """The auxiliary-extension map of an index row (``aux_hdus`` column)."""
    text = row["aux_hdus"] if "aux_hdus" in row else ""
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
