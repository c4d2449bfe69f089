"""Images as the catalog sees them, and where a source falls in each.

:class:`ImageData` holds one image's pixels and calibration. :func:`source_geometry` turns
sky positions into what the model needs per (source, image): pixel position, the local
Jacobian from sky offsets to pixels, and the PSF mixture there. The astropy WCS is used
only here, at set-up, so the JAX model works with local affine maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Union

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ..astrometry.astropy_wcs import astropy_world2pix_near
from ..core.units import MAD_TO_SIGMA, counts_per_nmgy
from .psf import PsfMixture, fit_psf_image, gaussian_psf

PsfSpec = Union[float, np.ndarray, Callable]


@dataclass(eq=False)
class ImageData:
    """One image for the catalog.

    Attributes
    ----------
    pixels : (ny, nx) float32, ADU; NaN marks bad pixels
    band : filter name
    magzp : AB zero point, ``counts = 10**(-0.4 (m - magzp))``
    wcs_header : celestial WCS as FITS header text (None: pixel work only, e.g. detection)
    psf : Gaussian sigma (px, before pixelisation), a pixelised PSF image (centred,
        odd size), or a callable ``(x_px, y_px) -> sigma or image`` for a space-variant PSF
    sky_level : ADU, scalar or (ny, nx) map; still present in ``pixels`` unless
        ``sky_subtracted``
    gain : e-/ADU
    noise_var : per-pixel noise variance (ADU^2), scalar or map; required for the Gaussian
        likelihood of sky-subtracted images unless it can be derived (sky_level / gain)
    sky_subtracted : the sky (or static sky, for difference images) was removed; the pixel
        likelihood is then Gaussian with ``noise_var``
    image_id : caller's identifier
    psf_components : mixture size for fitted pixelised PSFs
    saturated : optional (ny, nx) bool map of pixels at or above the saturation level (they are
        NaN in ``pixels``); detection merges the pieces of a source that the masked region
        holding them (core, bleed trail) cuts apart (``detect.extract_image``)
    """

    pixels: np.ndarray
    band: str
    magzp: float
    wcs_header: str | None = None
    psf: PsfSpec = 1.5
    sky_level: float | np.ndarray = 0.0
    gain: float = 1.0
    noise_var: float | np.ndarray | None = None
    sky_subtracted: bool = False
    image_id: int = 0
    psf_components: int = 2
    saturated: np.ndarray | None = None
    _psf_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.pixels = np.asarray(self.pixels, dtype=np.float32)

    @classmethod
    def from_index_row(cls, row, pixels, psf_image=None, **kw) -> "ImageData":
        """Build from a row of the images table (``skystack.core.io.IMAGES``) and its pixels."""
        diff = bool(row.get("is_difference", False))
        return cls(pixels=pixels, band=str(row["band"]), magzp=float(row["magzp"]),
                   wcs_header=row["wcs_header"],
                   psf=psf_image if psf_image is not None else float(row["psf_sigma_px"]),
                   sky_level=0.0 if diff else float(row["sky_level"]), gain=float(row["gain"]),
                   noise_var=float(row["noise_sigma"]) ** 2, sky_subtracted=diff,
                   image_id=int(row.get("image_id", 0)), **kw)

    @property
    def shape(self):
        return self.pixels.shape

    @cached_property
    def wcs(self) -> WCS:
        if self.wcs_header is None:
            raise ValueError(f"image {self.image_id} has no WCS")
        # The image index stores 80-character cards back to back; tests may use one per line.
        sep = "\n" if "\n" in self.wcs_header else ""
        return WCS(fits.Header.fromstring(self.wcs_header, sep=sep))

    @property
    def counts_per_nmgy(self) -> float:
        """ADU of a 1-nanomaggy source (AB mag 22.5)."""
        return counts_per_nmgy(self.magzp) if np.isfinite(self.magzp) else float("nan")

    def sky_map(self) -> np.ndarray:
        """Sky still present in the pixels (ADU), as a full-size array."""
        if self.sky_subtracted:
            return np.zeros(self.shape, np.float32)
        return np.broadcast_to(np.asarray(self.sky_level, np.float32), self.shape)

    def variance_map(self) -> np.ndarray:
        """Pixel noise variance (ADU^2) for the Gaussian likelihood."""
        if self.noise_var is not None:
            return np.broadcast_to(np.asarray(self.noise_var, np.float32), self.shape)
        if np.any(np.asarray(self.sky_level) > 0):
            return np.broadcast_to(np.asarray(self.sky_level, np.float32) / self.gain, self.shape)
        finite = self.pixels[np.isfinite(self.pixels)]
        mad = np.median(np.abs(finite - np.median(finite)))
        return np.full(self.shape, (MAD_TO_SIGMA * mad) ** 2, np.float32)

    def psf_at(self, x_px: float, y_px: float) -> PsfMixture:
        """The PSF mixture at a pixel position (cached for a constant PSF)."""
        spec = self.psf(x_px, y_px) if callable(self.psf) else self.psf
        key = None if callable(self.psf) else "const"
        if key in self._psf_cache:
            return self._psf_cache[key]
        if np.ndim(spec) == 0:
            mix = gaussian_psf(float(spec))
        else:
            mix = fit_psf_image(np.asarray(spec), self.psf_components)
        if key is not None:
            self._psf_cache[key] = mix
        return mix

    def psf_sigma_px(self) -> float:
        """Effective Gaussian sigma of the PSF at the image centre (px, pixel response included)."""
        ny, nx = self.shape
        return float(np.sqrt(self.psf_at((nx - 1) / 2, (ny - 1) / 2).second_moment_px2()))


def sky_to_pixel_jacobian(wcs: WCS, ra_deg, dec_deg, step_arcsec: float = 0.5, shape_yx=None):
    """Pixel positions and local Jacobians ``d(x, y) / d(east, north)`` (px per arcsec).

    Central differences over ``step_arcsec`` in each sky direction. With the image's
    ``shape_yx`` given, points far off the image come back NaN (see
    ``skystack.astrometry.astropy_wcs.astropy_world2pix_near``).

    Returns
    -------
    xy : (n, 2) pixel positions (0-based); jac : (n, 2, 2)
    """
    ra = np.atleast_1d(np.asarray(ra_deg, float))
    dec = np.atleast_1d(np.asarray(dec_deg, float))
    d_ra = step_arcsec / 3600.0 / np.cos(np.radians(dec))
    d_dec = step_arcsec / 3600.0
    pts_ra = np.concatenate([ra, ra + d_ra, ra - d_ra, ra, ra])
    pts_dec = np.concatenate([dec, dec, dec, dec + d_dec, dec - d_dec])
    if shape_yx is None:
        x, y = wcs.all_world2pix(pts_ra, pts_dec, 0)
    else:
        x, y = astropy_world2pix_near(wcs, pts_ra, pts_dec, shape_yx)
    n = ra.size
    xy = np.stack([x, y], -1).reshape(5, n, 2)
    jac = np.stack([(xy[1] - xy[2]) / (2 * step_arcsec), (xy[3] - xy[4]) / (2 * step_arcsec)], -1)
    return xy[0], jac


def pixel_to_sky(wcs: WCS, x_px, y_px):
    """RA and Dec (deg) of 0-based pixel positions."""
    ra, dec = wcs.all_pix2world(np.asarray(x_px, float), np.asarray(y_px, float), 0)
    return np.asarray(ra) % 360.0, np.asarray(dec)
