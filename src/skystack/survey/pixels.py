"""Pixels of an indexed image: reading with masks, robust sky and noise, PSF moments."""
from __future__ import annotations

import re

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


def _aux_data(hdul, where, path):
    """Pixels of an auxiliary image: an HDU number of the image's own file, or a
    (path, HDU) pair of another file."""
    if isinstance(where, (tuple, list)):
        other, hdu = where
        with fits.open(other, memmap=False) as aux:
            return np.asarray(aux[int(hdu)].data)
    return np.asarray(hdul[int(where)].data)


def bad_from_aux(hdul, aux: dict | None, shape) -> np.ndarray | None:
    """Pixels an image's auxiliary data marks bad: MASK bits (``MASK_BITS``, -1 or absent:
    any non-zero), and zero or non-finite inverse variance / variance. None when there is
    no such auxiliary data."""
    if not aux:
        return None
    bad = None

    def add(kind, b):
        nonlocal bad
        if b.shape != tuple(shape):
            raise ValueError(f"{kind} image shape {b.shape} does not match the image {tuple(shape)}")
        bad = b if bad is None else (bad | b)

    if "MASK" in aux:
        mask = _aux_data(hdul, aux["MASK"], None)
        bits = int(aux.get("MASK_BITS", -1))
        add("MASK", (mask != 0) if bits == -1 else ((mask.astype(np.int64) & bits) != 0))
    for key in ("WEIGHT", "INVVAR"):
        if key in aux:
            w = _aux_data(hdul, aux[key], None).astype(np.float64)
            add(key, ~(np.isfinite(w) & (w > 0)))
            break
    else:
        if "VARIANCE" in aux:
            v = _aux_data(hdul, aux["VARIANCE"], None).astype(np.float64)
            add("VARIANCE", ~(np.isfinite(v) & (v > 0)))
    return bad


def read_pixels(path, hdu: int, aux: dict | None = None, saturate: float = np.inf) -> np.ndarray:
    """Image pixels as float32 with NaN where bad: the attached mask (``MASK`` extension
    or mask file; CP data-quality bits non-zero, LSST bad planes), zero weight in an
    attached weight map, saturated, non-finite. ``aux`` is ``aux_of(row)``."""
    with fits.open(path, memmap=False) as hdul:
        data = np.asarray(hdul[hdu].data, dtype=np.float32)
        bad = bad_from_aux(hdul, aux, data.shape)
    if bad is not None:
        data = np.where(bad, np.float32(np.nan), data)
    if np.isfinite(saturate):
        data = np.where(data >= saturate, np.float32(np.nan), data)
    return data


_AUX_FILE = re.compile(r"([A-Z_]+)=(.+?)\[(\d+)\](?:,|$)")


def format_aux_files(aux_files: dict) -> str:
    """'MASK=/p/x_ood.fits[1],WEIGHT=/p/x_oow.fits[1]' from {kind: (path, hdu)}."""
    return ",".join(f"{k}={p}[{h}]" for k, (p, h) in sorted(aux_files.items()))


def parse_aux_files(text) -> dict:
    """{kind: (path, hdu)} from an ``aux_files`` value."""
    return {m.group(1): (m.group(2), int(m.group(3))) for m in _AUX_FILE.finditer(str(text or ""))}


def aux_of(row) -> dict:
    """The auxiliary data of an index row: ``aux_hdus`` extensions (kind -> HDU number),
    ``aux_files`` files (kind -> (path, HDU)) and ``MASK_BITS`` (from ``mask_bits``)."""
    text = row.get("aux_hdus", "")
    out = {k: int(v) for k, v in (item.split("=") for item in str(text or "").split(",") if item)}
    if "aux_files" in row:
        out.update(parse_aux_files(row["aux_files"]))
    if "mask_bits" in row and "MASK" in out and int(row["mask_bits"]) != -1:
        out["MASK_BITS"] = int(row["mask_bits"])
    return out


def read_variance(path, hdu: int, aux: dict | None, shape) -> tuple[np.ndarray | None, bool]:
    """The per-pixel noise variance (pixel units squared) of an image from its attached weight
    (inverse variance) or variance map, and whether it holds the sources' shot noise (a
    VARIANCE plane, as LSST and Pan-STARRS write; weight maps are of the sky and read noise).
    ``(None, False)`` without such a map. Bad pixels (zero weight) come back NaN."""
    aux = aux or {}
    with fits.open(path, memmap=False) as hdul:
        for key, inverse in (("WEIGHT", True), ("INVVAR", True), ("VARIANCE", False)):
            if key in aux:
                v = _aux_data(hdul, aux[key], path).astype(np.float64)
                break
        else:
            return None, False
    if v.shape != tuple(shape):
        raise ValueError(f"{path}: {key} map shape {v.shape} does not match the image {tuple(shape)}")
    good = np.isfinite(v) & (v > 0)
    with np.errstate(divide="ignore"):
        var = np.where(good, 1.0 / v if inverse else v, np.nan)
    return var.astype(np.float32), not inverse
