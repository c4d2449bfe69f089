"""Images as the catalog sees them, and where a source falls in each.

:class:`ImageData` holds one image's pixels and calibration. :func:`source_geometry` turns
sky positions into what the model needs per (source, image): pixel position, the local
Jacobian from sky offsets to pixels, and the PSF mixture there. The astropy WCS is used
only here, at set-up, so the JAX model works with local affine maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, Union

import numpy as np
from astropy.wcs import WCS

from ..astrometry.astropy_wcs import astropy_world2pix_near, wcs_from_header_text
from ..core.units import MAD_TO_SIGMA, counts_per_nmgy
from .psf import PsfMixture, fit_psf_image, gaussian_psf

PsfSpec = Union[float, np.ndarray, PsfMixture, Callable]

#: Spacing (px) of the nodes at which a space-variant PSF is fitted (``ImageData.psf_at``).
PSF_GRID_PX = 128


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
        odd size), a fitted ``PsfMixture``, or a callable ``(x_px, y_px) -> sigma or image`` for a
        space-variant PSF
    sky_level : ADU, scalar or (ny, nx) map; still present in ``pixels`` unless
        ``sky_subtracted``
    gain : e-/ADU
    noise_var : per-pixel noise variance (ADU^2), scalar or map; required for the Gaussian
        likelihood of sky-subtracted images unless it can be derived (sky_level / gain)
    sky_subtracted : the sky (or static sky, for difference images) was removed; the pixel
        likelihood is then Gaussian with ``noise_var``
    image_id : caller's identifier
    psf_components : mixture size for fitted pixelised PSFs (None: chosen by the fit's residual,
        ``psf.fit_psf_mixture``)
    saturated : optional (ny, nx) bool map of pixels at or above the saturation level (they are
        NaN in ``pixels``); detection merges the pieces of a source that the masked region
        holding them (core, bleed trail) cuts apart (``detect.extract_image``)
    read_noise_var : read-noise variance (ADU^2) added to the Poisson likelihood of images that
        hold their sky
    noise_includes_sources : ``noise_var`` already holds the sources' shot noise (variance
        planes of LSST/HSC and Pan-STARRS); otherwise the Gaussian likelihood adds it at 1/gain
    mjd : mid-exposure time (MJD; NaN when unknown), which tells detection the epochs apart
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
    psf_components: int | None = None
    saturated: np.ndarray | None = None
    read_noise_var: float = 0.0
    noise_includes_sources: bool = False
    mjd: float = float("nan")
    _psf_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.pixels = np.asarray(self.pixels, dtype=np.float32)

    @classmethod
    def from_index_row(cls, row, pixels, psf_image=None, variance=None, variance_includes_sources: bool = False,
                       **kw) -> "ImageData":
        """Build from a row of the images table (``skystack.core.io.IMAGES``) and its pixels.

        The likelihood follows what the pixels hold. An image whose measured noise is what its
        sky and gain predict (``sky / gain`` within a factor 2 of ``noise_sigma^2``, the rest
        being read noise) keeps its sky and gets the Poisson likelihood with that read noise.
        Any other (difference images, sky-subtracted pipeline products, unknown gains) is
        made sky-free by subtracting the indexed sky level and gets the Gaussian likelihood
        with ``variance`` (a per-pixel map, ADU^2, e.g. from a weight map) or the measured noise.
        """
        diff = bool(row.get("is_difference", False))
        sky, noise2, gain = float(row["sky_level"]), float(row["noise_sigma"]) ** 2, float(row["gain"])
        common = dict(band=str(row["band"]), magzp=float(row["magzp"]), wcs_header=row["wcs_header"],
                      psf=psf_image if psf_image is not None else float(row["psf_sigma_px"]), gain=gain,
                      image_id=int(row.get("image_id", 0)), mjd=float(row.get("mjd_mid_utc", np.nan)))
        poisson_like = (not diff and sky > 0 and gain > 0 and np.isfinite(noise2)
                        and 0.5 * noise2 <= sky / gain <= 2.0 * noise2)
        if poisson_like:
            return cls(pixels=pixels, sky_level=sky, read_noise_var=max(noise2 - sky / gain, 0.0), **common, **kw)
        sky_free = pixels if diff or not np.isfinite(sky) else pixels - np.float32(sky)
        return cls(pixels=sky_free, sky_level=0.0, sky_subtracted=True,
                   noise_var=noise2 if variance is None else variance,
                   noise_includes_sources=variance is not None and variance_includes_sources,
                   **common, **kw)

    @property
    def shape(self):
        return self.pixels.shape

    @cached_property
    def wcs(self) -> WCS:
        if self.wcs_header is None:
            raise ValueError(f"image {self.image_id} has no WCS")
        return wcs_from_header_text(self.wcs_header)

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
            var = np.asarray(self.noise_var, np.float32)
            if var.ndim and not np.isfinite(var).all():  # bad pixels of a weight map: NaN in pixels too
                var = np.where(np.isfinite(var), var, np.nanmedian(var)).astype(np.float32)
            return np.broadcast_to(var, self.shape)
        if np.any(np.asarray(self.sky_level) > 0):
            return np.broadcast_to(np.asarray(self.sky_level, np.float32) / self.gain, self.shape)
        finite = self.pixels[np.isfinite(self.pixels)]
        mad = np.median(np.abs(finite - np.median(finite)))
        return np.full(self.shape, (MAD_TO_SIGMA * mad) ** 2, np.float32)

    def psf_at(self, x_px: float, y_px: float) -> PsfMixture:
        """The PSF mixture at a pixel position: one for a constant PSF; for a space-variant one, the
        PSF at the centre of the position's ``PSF_GRID_PX`` cell (a PSF varies over hundreds of
        pixels, and each mixture fit costs a fraction of a second)."""
        if callable(self.psf):
            key = node = (int(np.floor(x_px / PSF_GRID_PX)), int(np.floor(y_px / PSF_GRID_PX)))
            if key not in self._psf_cache:
                spec = self.psf((node[0] + 0.5) * PSF_GRID_PX, (node[1] + 0.5) * PSF_GRID_PX)
        else:
            key, spec = "const", self.psf
        if key in self._psf_cache:
            return self._psf_cache[key]
        if isinstance(spec, PsfMixture):
            mix = spec
        elif np.ndim(spec) == 0:
            mix = gaussian_psf(float(spec))
        else:
            mix = fit_psf_image(np.asarray(spec), self.psf_components)
        self._psf_cache[key] = mix
        return mix

    def cutout(self, x0: int, x1: int, y0: int, y1: int) -> "ImageData":
        """The pixels ``[y0:y1, x0:x1]`` as an image of their own: the WCS's reference pixel
        moved by (x0, y0) (exact for TAN, SIP and TPV, whose distortions are polynomials of the
        offset from it), sky, noise and saturation maps cut alike, and the PSF at the cutout's
        centre (its variation within a cutout of a few hundred pixels is left out)."""
        from astropy.io import fits

        cut = (slice(y0, y1), slice(x0, x1))

        def sub(value):
            return np.asarray(value)[cut] if np.ndim(value) == 2 else value

        header = None
        if self.wcs_header is not None:
            text = self.wcs_header
            hdr = fits.Header.fromstring(text, sep="\n" if "\n" in text else "")
            hdr["CRPIX1"] = float(hdr.get("CRPIX1", 0.0)) - x0
            hdr["CRPIX2"] = float(hdr.get("CRPIX2", 0.0)) - y0
            header = hdr.tostring(sep="\n")
        centre = self.psf_at(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1))
        return replace(self, pixels=self.pixels[cut], wcs_header=header, psf=centre, sky_level=sub(self.sky_level),
                       noise_var=sub(self.noise_var), saturated=sub(self.saturated), _psf_cache={})

    def psf_r50_px(self) -> float:
        """Half-light radius (px) of the PSF at the image centre: the radius holding half of the
        circularised mixture's light (for a Gaussian 1.1774 sigma; a Moffat's wings make its
        second moment large but not its half-light radius)."""
        ny, nx = self.shape
        mix = self.psf_at((nx - 1) / 2, (ny - 1) / 2)
        var = np.trace(mix.cov_px2, axis1=1, axis2=2) / 2.0
        enclosed = lambda r: float(np.sum(mix.amp * -np.expm1(-r * r / (2 * var))))  # noqa: E731
        lo, hi = 0.0, 10.0 * float(np.sqrt(var.max()))
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if enclosed(mid) < 0.5 * mix.amp.sum() else (lo, mid)
        return 0.5 * (lo + hi)

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
