"""GalSim rendering shared by the simulators: Celeste-style sources, local WCS Jacobians, stamps.

Test fields are rendered with GalSim, not with the catalog's own Gaussian mixtures, so the
model is checked against code other than itself.
"""
from __future__ import annotations

import numpy as np
from astropy.wcs import WCS


def local_jacobian(w: WCS, x: float, y: float):
    """GalSim JacobianWCS (arcsec per px; u east, v north) of an astropy WCS at pixel (x, y)."""
    import galsim

    eps = 0.5
    ra, dec = w.all_pix2world(np.array([x, x + eps, x]), np.array([y, y, y + eps]), 0)
    cosd = np.cos(np.radians(dec[0]))
    du = ((ra[1:] - ra[0] + 180) % 360 - 180) * cosd * 3600 / eps
    dv = (dec[1:] - dec[0]) * 3600 / eps
    return galsim.JacobianWCS(du[0], du[1], dv[0], dv[1])


def source_object(src, psf, flux_counts: float):
    """A truth row as a GalSim object of total ``flux_counts`` convolved with ``psf``: a point
    source (``is_star``) or a de Vaucouleurs + exponential bulge-disk galaxy (``gal_frac_dev``,
    ``gal_radius_arcsec`` half-light radius, ``gal_axis_ratio``, ``gal_angle_deg``)."""
    import galsim

    if src["is_star"]:
        return psf.withFlux(flux_counts)
    radius = float(src["gal_radius_arcsec"])
    frac_dev = float(src["gal_frac_dev"])
    gal = galsim.Add([galsim.DeVaucouleurs(half_light_radius=radius, flux=frac_dev),
                      galsim.Exponential(half_light_radius=radius, flux=1.0 - frac_dev)])
    gal = gal.shear(q=float(src["gal_axis_ratio"]), beta=float(src["gal_angle_deg"]) * galsim.degrees)
    return galsim.Convolve(gal.withFlux(flux_counts), psf)


def draw_into(image, obj, x: float, y: float, wcs_local, half_px: int | None = None, max_half_px: int = 24) -> None:
    """Add ``obj`` centred at 0-based pixel (x, y) to a GalSim ``image`` (pixel-integrated).

    The stamp is ``2 half_px + 1`` pixels on a side (default: GalSim's good image size,
    between 6 and ``max_half_px``); the part outside ``image`` is dropped.
    """
    import galsim

    half = half_px if half_px is not None else int(min(max_half_px, max(6, obj.getGoodImageSize(1.0) // 2)))
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    bounds = galsim.BoundsI(ix - half, ix + half, iy - half, iy + half)
    overlap = bounds & image.bounds
    if not overlap.isDefined():
        return
    stamp = galsim.ImageF(bounds, wcs=wcs_local)
    obj.drawImage(stamp, offset=(x - ix, y - iy), method="auto")
    image[overlap] += stamp[overlap]
