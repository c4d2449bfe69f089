"""PSF width of an image when its header has no PSF keyword: a PSFEx model, else the image's own stars.

Three entry points:

* :func:`read_psfex` / :class:`PsfexModel`: the PSFEx ``.psf`` format (a ``PSF_DATA`` table whose
  ``PSF_MASK`` cell holds the (n_basis, ny, nx) basis, the polynomial in the table header's
  POLNAXIS/POLGRPi/POLNAMEi/POLZEROi/POLSCALi/POLDEG1/PSF_SAMP keywords), and legacypipe's merged
  table (the same quantities as columns, one row per CCD: ``psf_mask``, ``poldeg1``, ``polzero1/2``,
  ``polscal1/2``, ``psf_samp``, ``psf_fwhm``, ``expnum``, ``ccdname``).
* :func:`psf_from_stars`: detection with sep, a selection of isolated, unsaturated stars on the
  stellar locus, an elliptical Moffat fit of each, the median FWHM.
* :func:`estimate_psf`: what the image index calls: the PSFEx model at the image centre when a
  model is given, else the stars.

Conventions
-----------
Positions are 0-based pixels of the image the model belongs to (pixel centres at integers, as numpy
indexes them). PSFEx's context variables ``X_IMAGE``/``Y_IMAGE`` are SExtractor's 1-based FITS
pixels, so the scaled coordinates are ``x_s = (x_px + 1 - POLZERO1) / POLSCAL1`` (same for y).
legacypipe and the tractor evaluate the same polynomial at 0-based pixels without the +1; the two
differ by 1/POLSCAL (about 2.5e-4 of the polynomial range for DECam), far below anything measurable.

Basis ``k`` multiplies ``x_s**i * y_s**j`` with the terms in PSFEx's order (``poly.c``
``poly_powers``): ``x`` exponent fastest, total degree <= POLDEG1, i.e. for degree 2
``1, x, x^2, y, x y, y^2``. GalSim's ``DES_PSFEx`` and the tractor's ``PsfExModel`` use the same order.

PSFEx places the PSF centre at model pixel ``(n // 2, n // 2)`` of its (ny, nx) grid, whose step is
PSF_SAMP image pixels. The model is the *effective* PSF (already convolved with the pixel), so an
image-pixel stamp is its value sampled at image-pixel centres: :meth:`PsfexModel.image_at` samples
it with a separable Lanczos-3 kernel (normalised weights per output pixel, as PSFEx's own
``vignet_resample`` does) at model coordinates ``n//2 + (i - c - shift) / PSF_SAMP``. Then it
normalises the stamp to unit sum. No flux conservation is needed beyond that final normalisation.

Widths
------
``fwhm_px`` is the FWHM of the effective PSF (pixel included), as the geometric mean of the axes'
FWHM. For a model it is measured directly on the noise-free stamp (:func:`halfmax_fwhm`, the area
above half maximum). For stars it is the median over stars of an elliptical Moffat fit, which
recovers GalSim's FWHM within 1% on Gaussian and Moffat fields. ``psf_sigma_px``, the
Gaussian-equivalent width the index stores, is ``fwhm_px / 2.3548``, the same definition the index
uses for a ``PSF_FWHM``/``SEEING`` keyword.

Measured on the 19 DECam PSFEx models in the shared data, each at its image's centre:
fwhm_px = 0.940 +- 0.033 (range 0.83-0.99) times the image's CP ``FWHM`` keyword and
0.820 +- 0.036 times the file's ``psf_fwhm``. The file's psf_fwhm is itself 1.15 +- 0.06 times
the keyword. The Moffat fit on the same stamps gives 1-3% below the half-max FWHM. Plain second
moments of the whole 63x63 stamp (:func:`skystack.survey.pixels.psf_sigma_from_image`) are
1.9 +- 0.4 times FWHM/2.3548: the wings dominate them, so they are not the Gaussian-equivalent
width. :meth:`PsfexModel.measure` reports them (``sigma_moments_px``) and the Gaussian-weighted
adaptive moments (``sigma_adaptive_px``, 1.02 +- 0.04 times keyword/2.3548) for comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from ..core.units import FWHM_PER_SIGMA
from .pixels import psf_sigma_from_image

__all__ = [
    "PsfexModel",
    "adaptive_moments",
    "estimate_psf",
    "fit_moffat",
    "halfmax_fwhm",
    "lanczos_resample",
    "poly_powers",
    "psf_from_stars",
    "read_psfex",
]


# --------------------------------------------------------------------------- resampling, moments


def _lanczos(x: np.ndarray, a: int = 3) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.sinc(x) * np.sinc(x / a)
    out[np.abs(x) >= a] = 0.0
    return out


def _lanczos_matrix(coords: np.ndarray, n_in: int, a: int = 3) -> np.ndarray:
    """(len(coords), n_in) weights sampling a length-n_in signal at fractional indexes ``coords``."""
    w = _lanczos(coords[:, None] - np.arange(n_in)[None, :], a)
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=np.abs(total) > 1e-12)


def lanczos_resample(img: np.ndarray, size: tuple[int, int], step: float = 1.0,
                     shift: tuple[float, float] = (0.0, 0.0), a: int = 3) -> np.ndarray:
    """Resample ``img`` (centre at index n//2 on each axis) onto a (ny, nx) grid centred at n//2.

    Output pixel ``i`` is at input coordinate ``n_in//2 + (i - n_out//2 - shift) / step``: ``step``
    is the input grid's spacing in output pixels (PSF_SAMP) and ``shift`` (dx, dy) moves the
    profile's centre by that many output pixels. The result is not renormalised.
    """
    img = np.asarray(img, dtype=np.float64)
    ny_in, nx_in = img.shape
    ny, nx = size
    ux = nx_in // 2 + (np.arange(nx) - nx // 2 - shift[0]) / step
    uy = ny_in // 2 + (np.arange(ny) - ny // 2 - shift[1]) / step
    return _lanczos_matrix(uy, ny_in, a) @ img @ _lanczos_matrix(ux, nx_in, a).T


def adaptive_moments(img: np.ndarray, n_iter: int = 50, tol: float = 1e-6) -> tuple[float, float, float]:
    """Centroid (x, y) and Gaussian-equivalent sigma from circular Gaussian-weighted moments.

    The weight's sigma s is iterated to ``s^2 = 2 * M_w``, where M_w is the weighted per-axis
    second moment. For a Gaussian of sigma p, M_w = p^2 s^2 / (p^2 + s^2), so the fixed point is
    s = p. For a profile with wings it is the core's width.
    """
    img = np.asarray(img, dtype=np.float64)
    yy, xx = np.indices(img.shape)
    pos = np.clip(img, 0.0, None)
    total = pos.sum()
    if not total > 0:
        return float("nan"), float("nan"), float("nan")
    xc, yc = (pos * xx).sum() / total, (pos * yy).sum() / total
    s = max(1.0, psf_sigma_from_image(img))
    for _ in range(n_iter):
        w = np.exp(-((xx - xc) ** 2 + (yy - yc) ** 2) / (2 * s * s)) * img
        sw = w.sum()
        if not sw > 0:
            return float("nan"), float("nan"), float("nan")
        xn, yn = (w * xx).sum() / sw, (w * yy).sum() / sw
        m = (w * ((xx - xn) ** 2 + (yy - yn) ** 2)).sum() / sw / 2.0
        if not m > 0:
            return float("nan"), float("nan"), float("nan")
        s_new = math.sqrt(2.0 * m)
        if s_new < 0.1:  # collapsed onto one pixel: a hot pixel or a cosmic ray, no width to measure
            return float(xn), float(yn), float("nan")
        done = abs(s_new - s) < tol * s and abs(xn - xc) < tol and abs(yn - yc) < tol
        xc, yc, s = xn, yn, s_new
        if done:
            break
    return float(xc), float(yc), float(s)


def halfmax_fwhm(img: np.ndarray, up: int = 8) -> float:
    """FWHM (px) of a noise-free stamp: 2 sqrt(A / pi), A the area above half the peak.

    The stamp is upsampled ``up`` times with Lanczos-3 first. For an elliptical profile this is the
    geometric mean of the axes' FWHM. On GalSim Gaussians and Moffats (FWHM 2-6 px, pixel
    included) it is within 1% of GalSim's own FWHM.
    """
    img = np.asarray(img, dtype=np.float64)
    ny, nx = img.shape
    big = lanczos_resample(img, (ny * up + 1, nx * up + 1), step=up)
    area = np.sum(big >= big.max() / 2.0) / up ** 2
    return float(2.0 * math.sqrt(area / math.pi))


def _moffat_model(p, xx, yy):
    flux, x0, y0, l1, l2, rho, lbeta, bkg = p
    beta = 1.0 + math.exp(lbeta)
    a11, a22 = math.exp(2 * l1), math.exp(2 * l2)
    c = math.tanh(rho)
    a12 = c * math.sqrt(a11 * a22)
    det = a11 * a22 - a12 * a12
    dx, dy = xx - x0, yy - y0
    r2 = (a22 * dx * dx - 2 * a12 * dx * dy + a11 * dy * dy) / det
    norm = (beta - 1.0) / (math.pi * math.sqrt(det))
    return flux * norm * (1.0 + r2) ** (-beta) + bkg


def fit_moffat(stamp: np.ndarray, weight: np.ndarray | None = None, x0: float | None = None,
               y0: float | None = None, sigma0: float | None = None, fit_background: bool = True) -> dict:
    """Least-squares elliptical Moffat (sampled at pixel centres) plus a constant background.

    Returns dict(fwhm_px (geometric mean of the axes' FWHM), fwhm_major_px, fwhm_minor_px, beta,
    x, y, flux, success). ``weight`` is 1/sigma per pixel (0 excludes a pixel).
    """
    from scipy.optimize import least_squares

    stamp = np.asarray(stamp, dtype=np.float64)
    ny, nx = stamp.shape
    yy, xx = np.indices(stamp.shape, dtype=np.float64)
    w = np.ones_like(stamp) if weight is None else np.asarray(weight, dtype=np.float64)
    if x0 is None or y0 is None or sigma0 is None:
        ax, ay, asig = adaptive_moments(np.where(w > 0, stamp, 0.0))
        x0 = ax if x0 is None else x0
        y0 = ay if y0 is None else y0
        sigma0 = asig if sigma0 is None else sigma0
    if not (np.isfinite(x0) and np.isfinite(y0)):
        x0, y0 = (nx - 1) / 2.0, (ny - 1) / 2.0
    if not (np.isfinite(sigma0) and sigma0 > 0.3):
        sigma0 = 1.5
    beta0 = 3.0
    # Moffat alpha with the same FWHM as the starting Gaussian
    alpha0 = sigma0 * FWHM_PER_SIGMA / (2.0 * math.sqrt(2 ** (1 / beta0) - 1))
    flux0 = float(np.sum(np.where(w > 0, stamp, 0.0)))
    if not flux0 > 0:
        flux0 = float(np.nanmax(stamp)) * 2 * math.pi * sigma0 ** 2
    p0 = [flux0, x0, y0, math.log(alpha0), math.log(alpha0), 0.0, math.log(beta0 - 1), 0.0]
    keep = w > 0
    xs, ys, vs, ws = xx[keep], yy[keep], stamp[keep], w[keep]

    def resid(p):
        q = list(p)
        if not fit_background:
            q.append(0.0)
        return (_moffat_model(q, xs, ys) - vs) * ws

    if not fit_background:
        p0 = p0[:-1]
    lo = [-np.inf, -1.0, -1.0, math.log(0.2), math.log(0.2), -3.0, math.log(0.1), -np.inf]
    hi = [np.inf, nx, ny, math.log(10 * max(nx, ny)), math.log(10 * max(nx, ny)), 3.0, math.log(60.0), np.inf]
    if not fit_background:
        lo, hi = lo[:-1], hi[:-1]
    p0 = np.clip(p0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
    res = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac", max_nfev=400, tr_solver="lsmr")
    p = list(res.x) + ([] if fit_background else [0.0])
    flux, xf, yf, l1, l2, rho, lbeta, bkg = p
    beta = 1.0 + math.exp(lbeta)
    a11, a22 = math.exp(2 * l1), math.exp(2 * l2)
    a12 = math.tanh(rho) * math.sqrt(a11 * a22)
    evals = np.linalg.eigvalsh(np.array([[a11, a12], [a12, a22]]))
    k = 2.0 * math.sqrt(2 ** (1 / beta) - 1)
    major, minor = k * math.sqrt(evals[1]), k * math.sqrt(max(evals[0], 0.0))
    return {
        "fwhm_px": float(math.sqrt(major * minor)),
        "fwhm_major_px": float(major),
        "fwhm_minor_px": float(minor),
        "beta": float(beta),
        "x": float(xf),
        "y": float(yf),
        "flux": float(flux),
        "background": float(bkg),
        "success": bool(res.success) and flux > 0,
    }


# --------------------------------------------------------------------------- PSFEx


def poly_powers(degree: int, ndim: int = 2) -> list[tuple[int, ...]]:
    """Exponents of PSFEx's polynomial terms, in its order, for one context group of ``ndim`` variables.

    The first variable's exponent varies fastest and the total degree is at most ``degree``: for
    (2, 2): (0,0) (1,0) (2,0) (0,1) (1,1) (0,2), i.e. 1, x, x^2, y, xy, y^2.
    """
    if ndim == 0:
        return [()]
    out = []

    def rec(prefix_rev, dim, budget):
        # dims are nested with the LAST variable outermost, so the first varies fastest
        if dim < 0:
            out.append(tuple(reversed(prefix_rev)))
            return
        for e in range(budget + 1):
            rec(prefix_rev + [e], dim - 1, budget - e)

    rec([], ndim - 1, degree)
    return out


@dataclass
class PsfexModel:
    """A PSFEx PSF: basis images and the polynomial of the image position that weights them.

    ``basis``: (n_basis, ny, nx) on a grid of ``samp`` image pixels; ``zero``/``scale``: POLZERO/POLSCAL
    of X_IMAGE, Y_IMAGE (1-based FITS pixels, see the module docstring); ``powers``: the exponents
    of each basis' term. ``fwhm_px`` is the file's PSF_FWHM (``psf_fwhm`` column) when it has one.
    """

    basis: np.ndarray
    degree: int
    zero: tuple[float, float]
    scale: tuple[float, float]
    samp: float = 1.0
    fwhm_px: float = float("nan")
    n_stars: int | None = None
    expnum: int | None = None
    ccdname: str | None = None
    path: str = ""
    powers: list = field(default_factory=list)

    def __post_init__(self):
        self.basis = np.asarray(self.basis, dtype=np.float64)
        if not self.powers:
            self.powers = poly_powers(self.degree, 2 if self.degree > 0 else 0)
        if len(self.powers) != self.basis.shape[0]:
            raise ValueError(f"PSFEx model {self.path}: {self.basis.shape[0]} basis images but degree "
                             f"{self.degree} needs {len(self.powers)}")

    @property
    def native_size(self) -> int:
        """Odd stamp size (image pixels) covering the model's extent."""
        n = max(self.basis.shape[1:])
        size = math.ceil(n * self.samp - 1e-9)
        return size if size % 2 else size + 1

    def scaled(self, x_px: float, y_px: float) -> tuple[float, float]:
        """PSFEx's scaled context coordinates at 0-based image pixel (x_px, y_px)."""
        return ((x_px + 1.0 - self.zero[0]) / self.scale[0], (y_px + 1.0 - self.zero[1]) / self.scale[1])

    def coefficients(self, x_px: float, y_px: float) -> np.ndarray:
        """The weight of each basis image at image pixel (x_px, y_px)."""
        if self.degree == 0:
            return np.ones(1)
        xs, ys = self.scaled(x_px, y_px)
        return np.array([xs ** i * ys ** j for i, j in self.powers], dtype=np.float64)

    def raw_at(self, x_px: float, y_px: float) -> np.ndarray:
        """The model on its own grid (PSF_SAMP spacing), not normalised: sum_k c_k(x, y) basis_k."""
        return np.tensordot(self.coefficients(x_px, y_px), self.basis, axes=(0, 0))

    def image_at(self, x_px: float, y_px: float, size: int | None = None, centred: bool = True) -> np.ndarray:
        """The PSF at image pixel (x_px, y_px) on a (size, size) grid of image pixels, unit sum.

        ``centred=True``: the PSF centre is at the stamp's central pixel ``(size // 2, size // 2)``.
        ``centred=False``: the central pixel is image pixel ``(round(x_px), round(y_px))`` and the
        PSF centre sits at ``size // 2 + (x_px - round(x_px))`` (same for y), for rendering a star.
        Resampling (PSF_SAMP != 1 or a sub-pixel shift) is by Lanczos-3 (module docstring).
        """
        size = self.native_size if size is None else int(size)
        raw = self.raw_at(x_px, y_px)
        shift = (0.0, 0.0) if centred else (x_px - round(x_px), y_px - round(y_px))
        if self.samp == 1.0 and shift == (0.0, 0.0) and raw.shape == (size, size):
            img = raw.copy()
        else:
            img = lanczos_resample(raw, (size, size), step=self.samp, shift=shift)
        total = img.sum()
        if not total > 0:
            raise ValueError(f"PSFEx model {self.path}: the PSF at ({x_px}, {y_px}) has non-positive sum {total}")
        return img / total

    def measure(self, x_px: float, y_px: float) -> dict:
        """Widths of the PSF at (x_px, y_px).

        ``fwhm_px``: the stamp's half-maximum FWHM (:func:`halfmax_fwhm`); ``psf_sigma_px`` =
        fwhm_px / 2.3548; ``fwhm_moffat_px``, ``beta``: an elliptical Moffat fitted to the stamp (the
        star method's estimator: 1-3% below the half-max FWHM on the DECam models);
        ``sigma_adaptive_px``: Gaussian-weighted adaptive moments; ``sigma_moments_px``: the plain
        second moments of the whole stamp (:func:`skystack.survey.pixels.psf_sigma_from_image`).
        """
        img = self.image_at(x_px, y_px)
        fwhm = halfmax_fwhm(img)
        fit = fit_moffat(img, fit_background=False)
        _, _, s_ad = adaptive_moments(img)
        return {
            "fwhm_px": fwhm,
            "fwhm_moffat_px": fit["fwhm_px"],
            "beta": fit["beta"],
            "psf_sigma_px": fwhm / FWHM_PER_SIGMA,
            "sigma_adaptive_px": s_ad,
            "sigma_moments_px": psf_sigma_from_image(img),
            "image": img,
        }

    def sigma_at(self, x_px: float, y_px: float) -> float:
        """Gaussian-equivalent sigma (half-max FWHM / 2.3548, the index's definition) at (x_px, y_px)."""
        return halfmax_fwhm(self.image_at(x_px, y_px)) / FWHM_PER_SIGMA


def _psf_hdu(hdul, hdu):
    if hdu is not None:
        return hdul[hdu]
    for h in hdul:
        if h.name.upper() == "PSF_DATA":
            return h
    for h in hdul:
        if isinstance(h, fits.BinTableHDU) and any(c.lower() == "psf_mask" for c in h.columns.names):
            return h
    raise ValueError("no PSF_DATA table (a binary table with a PSF_MASK column)")


def read_psfex(path, hdu=None, *, ccdname: str | None = None, expnum: int | None = None) -> PsfexModel:
    """Read a PSFEx model: the standard ``.psf`` format or legacypipe's merged (per-CCD rows) table.

    ``hdu``: the table's HDU (default: the one named PSF_DATA, else the first table with a
    PSF_MASK column). A table with several rows (legacypipe's per-exposure file) needs ``ccdname``
    and/or ``expnum`` to pick one, which must then match exactly one row.
    """
    with fits.open(path, memmap=False) as hdul:
        tab = _psf_hdu(hdul, hdu)
        hdr, data = tab.header, tab.data
        names = {c.lower(): c for c in tab.columns.names}
        if "psf_mask" not in names:
            raise ValueError(f"{path}: table has no PSF_MASK column")
        nrow = len(data)
        rows = np.arange(nrow)
        if ccdname is not None and "ccdname" in names:
            rows = rows[np.char.strip(np.asarray(data[names["ccdname"]]).astype(str)) == str(ccdname).strip()]
        if expnum is not None and "expnum" in names:
            rows = rows[np.asarray(data[names["expnum"]])[rows].astype(np.int64) == int(expnum)]
        if len(rows) != 1:
            have = []
            if "ccdname" in names:
                have = [f"{e}/{str(c).strip()}" for e, c in zip(
                    np.asarray(data[names["expnum"]]) if "expnum" in names else [None] * nrow,
                    np.asarray(data[names["ccdname"]]))]
            raise ValueError(f"{path}: {len(rows)} of {nrow} rows match ccdname={ccdname!r} expnum={expnum!r}"
                             + (f" (rows: {', '.join(have)})" if have else ""))
        r = int(rows[0])

        def get(key, default=None):
            if key in names:
                v = data[names[key]][r]
                return v.strip() if isinstance(v, str) else v
            return hdr.get(key.upper(), default)

        basis = np.asarray(data[names["psf_mask"]][r], dtype=np.float64)
    if basis.ndim == 2:
        basis = basis[None]
    polnaxis = int(get("polnaxis", 2 if basis.shape[0] > 1 else 0))
    ngrp = int(get("polngrp", 1 if polnaxis else 0))
    if polnaxis not in (0, 2) or ngrp > 1:
        raise ValueError(f"{path}: PSFEx model with POLNAXIS={polnaxis}, POLNGRP={ngrp}: only one group of "
                         "X_IMAGE, Y_IMAGE (or a constant PSF) is supported")
    if polnaxis == 2:
        n1, n2 = str(get("polname1", "X_IMAGE")).upper(), str(get("polname2", "Y_IMAGE")).upper()
        if not (n1.startswith("X") and n2.startswith("Y") and n1.endswith("IMAGE") and n2.endswith("IMAGE")):
            raise ValueError(f"{path}: PSFEx context variables {n1}, {n2} are not image x, y")
        for g in ("polgrp1", "polgrp2"):
            if int(get(g, 1)) != 1:
                raise ValueError(f"{path}: {g.upper()}={get(g)}: only one context group is supported")
        degree = int(get("poldeg1"))
        zero = (float(get("polzero1")), float(get("polzero2")))
        scale = (float(get("polscal1")), float(get("polscal2")))
    else:
        degree, zero, scale = 0, (0.0, 0.0), (1.0, 1.0)
    fwhm = get("psf_fwhm")
    accepted = get("accepted")
    exp = get("expnum")
    ccd = get("ccdname")
    return PsfexModel(
        basis=basis, degree=degree, zero=zero, scale=scale, samp=float(get("psf_samp", 1.0)),
        fwhm_px=float(fwhm) if fwhm is not None else float("nan"),
        n_stars=int(accepted) if accepted is not None else None,
        expnum=int(exp) if exp is not None else None,
        ccdname=str(ccd).strip() if ccd is not None else None,
        path=str(path),
    )


# --------------------------------------------------------------------------- stars


def _locus(log_r: np.ndarray, min_members: int, half_width: float = 0.07) -> tuple[float, float]:
    """Centre and half-width (in ln size) of the stellar locus: the lower envelope of the sizes.

    Nothing real is smaller than the PSF (hot pixels and cosmic rays are removed beforehand by the
    minimum FWHM), so the locus is the smallest size whose +-``half_width`` window holds at least
    ``min_members`` objects and at least 30% of the densest window's count. That threshold keeps a
    field whose compact galaxies outnumber its stars from putting the locus on the galaxies, as
    taking the densest window would.
    """
    order = np.sort(log_r)
    counts = np.array([np.sum(np.abs(order - v) < half_width) for v in order])
    need = max(min(min_members, counts.max()), math.ceil(0.3 * counts.max()))
    first = int(np.flatnonzero(counts >= need)[0])
    centre = float(np.median(order[np.abs(order - order[first]) < half_width]))
    for _ in range(2):
        centre = float(np.median(order[np.abs(order - centre) < half_width]))
    members = order[np.abs(order - centre) < 2 * half_width]
    spread = 1.4826 * float(np.median(np.abs(members - centre))) if members.size > 2 else half_width
    return centre, float(np.clip(3.0 * spread, 0.04, 0.15))


def psf_from_stars(pixels, bad_mask=None, saturate: float = np.inf, max_stars: int = 50, min_stars: int = 5,
                   snr_min: float = 30.0, isolation_fwhm: float = 3.0, detect_thresh: float = 3.0,
                   min_fwhm: float = 1.5) -> dict:
    """The PSF FWHM measured on the image's own stars.

    ``pixels``: the image (sky not necessarily subtracted); ``bad_mask``: True where bad; pixels at
    or above ``saturate`` and non-finite ones count as bad too.

    1. sep background (mesh min(ny, nx)/4 clipped to 16..64 px) and detection at ``detect_thresh``
       x its rms (minarea 5, deblending on).
    2. Candidates: not truncated at the edge, SNR >= ``snr_min`` in a 3a aperture, b/a >= 0.5, no
       plateau at the peak (3+ pixels at exactly the maximum and at least half the image's maximum:
       a clipped core), size >= ``min_fwhm``. Size is the adaptive-moment sigma on a stamp in which
       the other sources' segments are blanked.
    3. Stellar locus: the lower envelope of ln(size) (see ``_locus``). Refused when a sizeable
       group of still more compact sources lies below it (the chosen group is then galaxies).
    4. Each star: no other detection within 1.5 FWHM + its a, none brighter than a tenth of the
       star within ``isolation_fwhm`` FWHM + twice its a, no bad pixel in the fitting stamp
       (half-size 2.5 FWHM + 1), the whole stamp inside the image.
    5. The ``max_stars`` highest-SNR stars: elliptical Moffat + constant fitted with the other
       segments' pixels excluded (weights 1/rms); fits more than 4 MAD (and 2%) from the median
       FWHM are dropped.

    Returns dict(psf_sigma_px = fwhm_px / 2.3548; fwhm_px, the median FWHM of the stars'
    effective PSF (pixel included); n_stars; image, the median of the flux-normalised stamps
    recentred by Lanczos-3, unit sum (the shifts widen it for undersampled stars: +5-6% FWHM at
    2 px, under 1% from 4 px on GalSim fields); fwhm_mad_px; beta, the median Moffat index; x, y, the stars'
    fitted positions). Raises ValueError naming the count found and ``min_stars`` when fewer are
    usable, and also when the median FWHM is below ``min_fwhm`` (undersampled, hot pixels, a
    colour-filter mosaic) or the stars' FWHM scatter by more than 25% (no single PSF).
    """
    import sep

    data = np.array(pixels, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {data.shape}")
    bad = ~np.isfinite(data)
    if bad_mask is not None:
        bad |= np.asarray(bad_mask, dtype=bool)
    if np.isfinite(saturate):
        bad |= data >= saturate
    ny, nx = data.shape

    def refuse(n, why):
        raise ValueError(f"PSF from stars: {n} usable star(s) found, at least {min_stars} needed ({why})")

    if bad.all() or min(ny, nx) < 16:
        refuse(0, f"image {nx}x{ny} px, {int(bad.sum())} bad pixels")
    data[bad] = 0.0
    box = int(np.clip(min(ny, nx) // 4, 16, 64))
    bkg = sep.Background(np.ascontiguousarray(data), mask=bad, bw=box, bh=box, fw=3, fh=3)
    sub = np.ascontiguousarray(data - bkg.back())
    sub[bad] = 0.0
    rms = bkg.rms()
    rms = np.where(rms > 0, rms, np.nanmedian(rms[rms > 0]) if np.any(rms > 0) else 1.0)
    try:
        objs, seg = sep.extract(sub, detect_thresh, err=rms, mask=bad, minarea=5, deblend_cont=0.005,
                                segmentation_map=True)
    except Exception as err:  # noqa: BLE001 - sep raises plain Exception (pixel stack, deblend overflow)
        refuse(0, f"detection failed: {err}")
    if len(objs) == 0:
        refuse(0, "no source detected")
    x, y, a, b = objs["x"], objs["y"], objs["a"], objs["b"]
    flux, fluxerr, _ = sep.sum_circle(sub, x, y, np.maximum(3.0 * a, 3.0), err=rms, mask=bad)
    snr = np.divide(flux, fluxerr, out=np.zeros_like(flux), where=fluxerr > 0)

    # plateau: several pixels at exactly the peak value (a clipped or saturated core)
    # size: adaptive (Gaussian-weighted) sigma on a stamp with the other sources' segments blanked,
    # so that neighbours in crowded fields do not widen it (sep's flux_radius would)
    plateau = np.zeros(len(objs), dtype=bool)
    size = np.full(len(objs), np.nan)
    top = float(np.max(data[~bad]))
    for k in range(len(objs)):
        x0, x1, y0, y1 = objs["xmin"][k], objs["xmax"][k] + 1, objs["ymin"][k], objs["ymax"][k] + 1
        cut = np.where(seg[y0:y1, x0:x1] == k + 1, data[y0:y1, x0:x1], -np.inf)
        peak = cut.max()
        plateau[k] = peak >= 0.5 * top and np.sum(cut >= peak - 1e-6 * abs(peak)) >= 3
        h = int(np.clip(4.0 * a[k] + 3.0, 5, 30))
        cx, cy = round(float(x[k])), round(float(y[k]))
        sl = (slice(max(cy - h, 0), cy + h + 1), slice(max(cx - h, 0), cx + h + 1))
        segc = seg[sl]
        size[k] = adaptive_moments(np.where((segc == 0) | (segc == k + 1), sub[sl], 0.0))[2]

    cand = ((objs["flag"] & (sep.OBJ_TRUNC | sep.OBJ_SINGU)) == 0) & (snr >= snr_min) \
        & (b >= 0.5 * a) & ~plateau & (size >= min_fwhm / FWHM_PER_SIGMA)
    if cand.sum() < min_stars:
        refuse(int(cand.sum()), f"{len(objs)} detections, {int(cand.sum())} bright, compact and unblended")
    log_r = np.log(size[cand])
    centre, width = _locus(log_r, min_stars)
    on_locus = np.zeros(len(objs), dtype=bool)
    on_locus[np.flatnonzero(cand)] = np.abs(log_r - centre) < width
    below = int(np.sum(log_r < centre - 2 * width))
    if below >= max(3, 0.5 * on_locus.sum()):
        raise ValueError(f"PSF from stars: no clear stellar locus: the first size group with {min_stars} or more "
                         f"members ({int(on_locus.sum())} at FWHM ~{FWHM_PER_SIGMA * math.exp(centre):.2f} px) has "
                         f"{below} more compact sources below it, so it is not the stars (too few or too scattered)")
    fwhm0 = FWHM_PER_SIGMA * math.exp(centre)  # only sets radii and the fit's start
    half = math.ceil(2.5 * fwhm0) + 1

    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(d, np.inf)
    # any neighbour in the core; within isolation_fwhm FWHM only one brighter than a tenth of the star
    # (fainter ones are masked out of the fit through the segmentation map)
    reach = isolation_fwhm * fwhm0 + 2.0 * a[None, :]
    brighter = flux[None, :] > 0.1 * flux[:, None]
    isolated = ~np.any((d < 1.5 * fwhm0 + a[None, :]) | ((d < reach) & brighter), axis=1)
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    inside = (ix - half >= 0) & (ix + half < nx) & (iy - half >= 0) & (iy + half < ny)
    ok = on_locus & isolated & inside
    idx = [k for k in np.flatnonzero(ok)
           if not bad[iy[k] - half:iy[k] + half + 1, ix[k] - half:ix[k] + half + 1].any()]
    if len(idx) < min_stars:
        refuse(len(idx), f"{int(cand.sum())} candidates, {int(on_locus.sum())} on the stellar locus, "
               f"{int((on_locus & isolated).sum())} isolated, {int(ok.sum())} away from the edge, "
               f"{len(idx)} free of bad pixels")
    idx = sorted(idx, key=lambda k: -snr[k])[:max_stars]

    fits_, stamps = [], []
    for k in idx:
        sl = (slice(iy[k] - half, iy[k] + half + 1), slice(ix[k] - half, ix[k] + half + 1))
        stamp = sub[sl]
        segc = seg[sl]
        w = np.where((segc == 0) | (segc == k + 1), 1.0 / rms[sl], 0.0)
        f = fit_moffat(stamp, weight=w, x0=x[k] - (ix[k] - half), y0=y[k] - (iy[k] - half),
                       sigma0=fwhm0 / FWHM_PER_SIGMA)
        if f["success"] and np.isfinite(f["fwhm_px"]) and f["fwhm_px"] > 0:
            clean = np.where(w > 0, stamp - f["background"], 0.0)
            # move the fitted centre onto the stamp's central pixel
            stamps.append(lanczos_resample(clean, clean.shape, shift=(half - f["x"], half - f["y"])) / f["flux"])
            f["x"], f["y"] = f["x"] + ix[k] - half, f["y"] + iy[k] - half
            fits_.append(f)
    fw = np.array([f["fwhm_px"] for f in fits_])
    if fw.size:
        med = np.median(fw)
        mad = 1.4826 * np.median(np.abs(fw - med))
        keep = np.abs(fw - med) <= max(4 * mad, 0.02 * med)
    else:
        keep = np.zeros(0, dtype=bool)
    if keep.sum() < min_stars:
        refuse(int(keep.sum()), f"{len(idx)} selected, {len(fits_)} fitted, {int(keep.sum())} consistent")
    fw = fw[keep]
    fwhm = float(np.median(fw))
    spread = float(1.4826 * np.median(np.abs(fw - fwhm)))
    if fwhm < min_fwhm:
        raise ValueError(f"PSF from stars: {len(fw)} stars fitted, but their median FWHM is {fwhm:.2f} px, below the "
                         f"{min_fwhm} px a fit can measure (undersampled, or not a PSF: hot pixels, a colour-filter mosaic)")
    if spread > 0.25 * fwhm:
        raise ValueError(f"PSF from stars: {len(fw)} stars fitted, but their FWHM scatter by {spread:.2f} px "
                         f"around {fwhm:.2f} px: not one PSF")
    image = np.median(np.array(stamps)[keep], axis=0)
    image = image / image.sum()
    return {
        "psf_sigma_px": fwhm / FWHM_PER_SIGMA,
        "fwhm_px": fwhm,
        "n_stars": int(keep.sum()),
        "image": image,
        "fwhm_mad_px": spread,
        "beta": float(np.median([f["beta"] for f, kk in zip(fits_, keep) if kk])),
        "x": np.array([f["x"] for f, kk in zip(fits_, keep) if kk]),
        "y": np.array([f["y"] for f, kk in zip(fits_, keep) if kk]),
    }


# --------------------------------------------------------------------------- index entry point


def _image_header(path, hdu):
    try:
        with fits.open(path, memmap=False) as hdul:
            hdr = hdul[hdu].header.copy()
            primary = hdul[0].header.copy() if hdu != 0 else hdr
        return hdr, primary
    except (OSError, IndexError, KeyError, TypeError, ValueError):  # no readable header: no saturation level
        return None, None


def _saturation(hdr) -> float:
    if hdr is None:
        return np.inf
    levels = [float(hdr[k]) for k in ("SATURATE", "SATURATA", "SATURATB")
              if k in hdr and isinstance(hdr[k], (int, float)) and hdr[k] > 0]
    return min(levels) if levels else np.inf


def psfex_model_of(path, hdu, psfex_path) -> PsfexModel:
    """The PSFEx model of image ``path[hdu]``; a multi-row legacypipe file is matched to the image
    by its header's CCDNAME/EXTNAME and EXPNUM."""
    try:
        return read_psfex(psfex_path)
    except ValueError as err:
        hdr, primary = _image_header(path, hdu)
        if "rows match" not in str(err) or hdr is None:
            raise
        ccd = hdr.get("CCDNAME", hdr.get("EXTNAME"))
        exp = hdr.get("EXPNUM", primary.get("EXPNUM") if primary is not None else None)
        return read_psfex(psfex_path, ccdname=str(ccd).strip() if ccd else None,
                          expnum=int(exp) if exp is not None else None)


def estimate_psf(path, hdu, pixels, bad_mask, wcs, psfex_path=None, min_stars=5) -> dict:
    """The PSF width of an image with no PSF keyword: dict(psf_sigma_px, psf_source, n_psf_stars).

    With ``psfex_path``: the PSFEx model evaluated at the image centre ((nx-1)/2, (ny-1)/2 in
    0-based pixels of ``pixels``), ``psf_source='psfex'``, ``n_psf_stars`` the number of stars
    PSFEx accepted (0 when the file does not say). A multi-row legacypipe file is matched to the
    image by its header's CCDNAME/EXTNAME and EXPNUM. Without it: :func:`psf_from_stars` on
    ``pixels`` (bad where ``bad_mask``, saturation from the header's SATURATE/SATURATA/SATURATB),
    ``psf_source='stars'``, raising ValueError when fewer than ``min_stars`` stars are usable.
    ``psf_sigma_px`` is FWHM / 2.3548 in both cases. ``wcs`` is accepted for the index's call; the
    PSF is measured in pixels and does not need it.
    """
    pixels = np.asarray(pixels)
    ny, nx = pixels.shape
    hdr, _ = _image_header(path, hdu)
    if psfex_path is not None:
        model = psfex_model_of(path, hdu, psfex_path)
        sigma = model.sigma_at((nx - 1) / 2.0, (ny - 1) / 2.0)
        return {"psf_sigma_px": float(sigma), "psf_source": "psfex", "n_psf_stars": int(model.n_stars or 0)}
    res = psf_from_stars(pixels, bad_mask, saturate=_saturation(hdr), min_stars=min_stars)
    return {"psf_sigma_px": float(res["psf_sigma_px"]), "psf_source": "stars", "n_psf_stars": int(res["n_stars"])}
