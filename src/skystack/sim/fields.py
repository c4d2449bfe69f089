"""Simulated multi-epoch, multi-band images with a known truth table, for tests and benchmarks.

Stars are the PSF; galaxies are de Vaucouleurs + exponential sums of one half-light radius,
sheared to an axis ratio and position angle, convolved with the PSF (``psf_profile``: a
Gaussian, a Moffat, or an SDSS-like sum of three Gaussians; for the last two the images carry
the PSF as a pixelised image, as a ``PSF`` extension would, drawn by GalSim); GalSim renders
them (pixel response included) with the local Jacobian of each image's TAN WCS, so each
epoch sees the sky through a slightly different pointing, rotation and seeing. Noise is
Poisson on sky plus sources (in electrons), or Gaussian on sky-subtracted images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from ..catalog.data import ImageData
from ..core.units import FWHM_PER_SIGMA, NMGY_ZERO_MAG, counts_per_nmgy
from .galsim_render import draw_into, local_jacobian, source_object


@dataclass(frozen=True)
class SimConfig:
    """Settings of a simulated field (units in the names)."""

    n_sources: int = 100
    seed: int = 0
    bands: tuple = ("g", "r", "i")
    n_epochs: int = 2
    pixel_scale_arcsec: float = 1.0
    psf_sigma_px: tuple = (1.2, 1.7)          # range over images (Gaussian-equivalent FWHM / 2.3548)
    psf_profile: str = "gaussian"             # gaussian, moffat or sdss3g
    moffat_beta: float = 3.0
    psf_image_half_px: int = 12               # pixelised PSF handed to the catalog (non-Gaussian profiles)
    sky_adu: float = 150.0
    gain: float = 2.0
    magzp: float = 27.0
    star_fraction: float = 0.5
    r_mag_range: tuple = (17.5, 21.5)
    radius_arcsec: tuple = (1.0, 0.3)         # lognormal median, ln sd
    isolated: bool = True
    spacing_px: float = 24.0                  # grid spacing of isolated sources
    pair_separation_px: float | None = None   # isolated grid of blended pairs: the pair's separation
    density_per_arcmin2: float = 4.0          # for crowded fields
    dither_px: float = 4.0
    rotation_deg: float = 0.5
    sky_subtracted: bool = False
    ra_center_deg: float = 150.0
    dec_center_deg: float = 2.0
    stamp_half_px: int = 18


def _rng(seed, *ids):
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, ids)]))


def make_truth(cfg: SimConfig) -> tuple[pd.DataFrame, float]:
    """Truth table and the field half-width (arcsec)."""
    rng = _rng(cfg.seed, 1)
    n = cfg.n_sources
    if cfg.isolated:
        side = int(np.ceil(np.sqrt(n)))
        gx, gy = np.meshgrid(np.arange(side), np.arange(side))
        gx, gy = gx.ravel()[:n], gy.ravel()[:n]
        step = cfg.spacing_px * cfg.pixel_scale_arcsec
        east = (gx - (side - 1) / 2) * step + rng.uniform(-0.15, 0.15, n) * step
        north = (gy - (side - 1) / 2) * step + rng.uniform(-0.15, 0.15, n) * step
        half = 0.5 * side * step
        if cfg.pair_separation_px is not None:  # each grid point holds a pair, at a random angle
            angle = rng.uniform(0, np.pi, n)
            offset = 0.5 * cfg.pair_separation_px * cfg.pixel_scale_arcsec
            east = np.concatenate([east + offset * np.cos(angle), east - offset * np.cos(angle)])
            north = np.concatenate([north + offset * np.sin(angle), north - offset * np.sin(angle)])
            n = 2 * n
    else:
        half = 0.5 * np.sqrt(n / cfg.density_per_arcmin2) * 60.0
        east, north = rng.uniform(-half, half, (2, n))
    dec = cfg.dec_center_deg + north / 3600.0
    ra = cfg.ra_center_deg + east / 3600.0 / np.cos(np.radians(cfg.dec_center_deg))
    lo, hi = cfg.r_mag_range
    mag_r = rng.uniform(lo, hi, n)
    is_star = rng.uniform(size=n) < cfg.star_fraction
    color_gr = np.where(is_star, rng.normal(0.7, 0.3, n), rng.normal(0.6, 0.2, n))
    color_ri = np.where(is_star, rng.normal(0.3, 0.2, n), rng.normal(0.35, 0.15, n))
    flux_r = 10 ** (-0.4 * (mag_r - NMGY_ZERO_MAG))
    truth = pd.DataFrame({
        "ra": ra, "dec": dec, "is_star": is_star,
        "flux_g_nmgy": flux_r * 10 ** (-0.4 * color_gr), "flux_r_nmgy": flux_r,
        "flux_i_nmgy": flux_r * 10 ** (0.4 * color_ri),
        "color_gr": color_gr, "color_ri": color_ri,
        "gal_frac_dev": np.where(is_star, np.nan, rng.uniform(0, 1, n)),
        "gal_axis_ratio": np.where(is_star, np.nan, rng.uniform(0.4, 1.0, n)),
        "gal_angle_deg": np.where(is_star, np.nan, rng.uniform(0, 180, n)),
        "gal_radius_arcsec": np.where(is_star, np.nan,
                                      np.clip(cfg.radius_arcsec[0] * np.exp(rng.normal(0, cfg.radius_arcsec[1], n)),
                                              0.4, 3.0)),
    })
    return truth, half


def tan_wcs(ra_deg, dec_deg, nx, ny, scale_arcsec, rotation_deg) -> WCS:
    """A TAN WCS with north up, east left, rotated by ``rotation_deg``."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    d = scale_arcsec / 3600.0
    w.wcs.cd = np.array([[-d * c, d * s], [d * s, d * c]])
    return w


#: SDSS-like PSF: core, its double and a wide wing, as in SDSS's psField fits (weights, sigma
#: relative to the core's).
SDSS3G_COMPONENTS = ((0.83, 1.0), (0.14, 2.1), (0.03, 5.5))


def galsim_psf(profile: str, fwhm_arcsec: float, beta: float = 3.0):
    """A GalSim PSF of the given profile and FWHM (arcsec)."""
    import galsim

    if profile == "gaussian":
        return galsim.Gaussian(fwhm=fwhm_arcsec)
    if profile == "moffat":
        return galsim.Moffat(beta=beta, fwhm=fwhm_arcsec)
    if profile == "sdss3g":
        core = galsim.Add([galsim.Gaussian(sigma=s, flux=a) for a, s in SDSS3G_COMPONENTS])
        return core.dilate(fwhm_arcsec / core.calculateFWHM())
    raise ValueError(f"unknown PSF profile {profile!r} (gaussian, moffat or sdss3g)")


def psf_image(psf, scale_arcsec: float, half_px: int) -> np.ndarray:
    """The PSF drawn on a centred (2 half_px + 1)^2 pixel grid, pixel response included, unit sum."""
    import galsim

    n = 2 * half_px + 1
    img = psf.drawImage(nx=n, ny=n, scale=scale_arcsec, method="auto").array.astype(np.float64)
    return img / img.sum()


def render_image(truth: pd.DataFrame, w: WCS, nx: int, ny: int, band: str, psf,
                 counts_per_nmgy: float, stamp_half_px: int) -> np.ndarray:
    """Noise-free source counts (ADU) of every truth source on an (ny, nx) image; ``psf`` a
    GalSim profile in arcsec."""
    import galsim

    image = galsim.ImageF(nx, ny, xmin=0, ymin=0)
    x, y = w.all_world2pix(truth["ra"].to_numpy(), truth["dec"].to_numpy(), 0)
    gsp = galsim.GSParams(maximum_fft_size=4096)
    for k, src in enumerate(truth.to_dict("records")):
        if not (-stamp_half_px < x[k] < nx + stamp_half_px and -stamp_half_px < y[k] < ny + stamp_half_px):
            continue
        obj = source_object(src, psf, float(src[f"flux_{band}_nmgy"]) * counts_per_nmgy).withGSParams(gsp)
        draw_into(image, obj, x[k], y[k], local_jacobian(w, x[k], y[k]), half_px=stamp_half_px)
    return image.array.astype(np.float64)


def simulate_field(cfg: SimConfig | None = None, **overrides) -> tuple[list[ImageData], pd.DataFrame]:
    """Images (every band x epoch) and the truth table of a simulated field.

    Returns
    -------
    images : list of ImageData, pixels in ADU (sky included unless ``sky_subtracted``)
    truth : ra, dec (deg), is_star, flux_<band>_nmgy, color_gr, color_ri (AB mag),
        gal_frac_dev, gal_axis_ratio, gal_angle_deg (east of... from east towards north),
        gal_radius_arcsec (NaN for stars)
    """
    cfg = cfg or SimConfig()
    if overrides:
        cfg = SimConfig(**{**cfg.__dict__, **overrides})
    truth, half_arcsec = make_truth(cfg)
    n_side = int(np.ceil(2 * half_arcsec / cfg.pixel_scale_arcsec + 2 * cfg.dither_px + 16))
    images = []
    for e in range(cfg.n_epochs):
        for bi, band in enumerate(cfg.bands):
            rng = _rng(cfg.seed, 2, e, bi)
            dither = rng.uniform(-cfg.dither_px, cfg.dither_px, 2) * cfg.pixel_scale_arcsec / 3600.0
            rot = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)
            sigma = rng.uniform(*cfg.psf_sigma_px)
            psf = galsim_psf(cfg.psf_profile, sigma * FWHM_PER_SIGMA * cfg.pixel_scale_arcsec, cfg.moffat_beta)
            w = tan_wcs(cfg.ra_center_deg + dither[0] / np.cos(np.radians(cfg.dec_center_deg)),
                        cfg.dec_center_deg + dither[1], n_side, n_side, cfg.pixel_scale_arcsec, rot)
            cpn = counts_per_nmgy(cfg.magzp)
            model = render_image(truth, w, n_side, n_side, band, psf, cpn, cfg.stamp_half_px)
            noise_rng = _rng(cfg.seed, 3, e, bi)
            expected_e = (cfg.sky_adu + np.clip(model, 0, None)) * cfg.gain
            if cfg.sky_subtracted:
                pixels = model + noise_rng.normal(0.0, 1.0, model.shape) * np.sqrt(expected_e) / cfg.gain
                noise_var = cfg.sky_adu / cfg.gain
                sky = 0.0
            else:
                pixels = noise_rng.poisson(expected_e) / cfg.gain
                noise_var = None
                sky = cfg.sky_adu
            header = w.to_header().tostring(sep="\n")
            images.append(ImageData(pixels=pixels.astype(np.float32), band=band, magzp=cfg.magzp,
                                    wcs_header=header, sky_level=sky, gain=cfg.gain,
                                    psf=float(sigma) if cfg.psf_profile == "gaussian"
                                    else psf_image(psf, cfg.pixel_scale_arcsec, cfg.psf_image_half_px),
                                    noise_var=noise_var, sky_subtracted=cfg.sky_subtracted,
                                    image_id=len(images), mjd=59000.0 + e + 0.01 * bi))
    return images, truth


def perturbed_start(truth: pd.DataFrame, seed: int = 3) -> pd.DataFrame:
    """Starting values as a detection gives them: the truth's rows shuffled, fluxes off by 30%
    (lognormal), positions by 0.3 arcsec per axis."""
    rng = np.random.default_rng(seed)
    n = len(truth)
    out = truth.sample(frac=1.0, random_state=1).reset_index(drop=True)
    for b in [c[5:-5] for c in out.columns if c.startswith("flux_") and c.endswith("_nmgy")]:
        out[f"flux_{b}_nmgy"] *= np.exp(rng.normal(0, 0.3, n))
    out["ra"] += rng.normal(0, 0.3, n) / 3600 / np.cos(np.radians(out["dec"]))
    out["dec"] += rng.normal(0, 0.3, n) / 3600
    return out
