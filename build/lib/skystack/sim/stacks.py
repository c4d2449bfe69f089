"""Simulated stacks of galaxy stamps and a space-variant PSF field, for deconvolution tests and benchmarks."""
from __future__ import annotations

import numpy as np


def _psf_field(n_psfs: int, rng):
    """Field positions in [0, 1]^2 and Moffat PSF parameters varying smoothly over them."""
    pos = rng.uniform(0, 1, size=(n_psfs, 2))
    u, v = pos[:, 0], pos[:, 1]
    fwhm_arcsec = 0.25 + 0.12 * (u**2 + v**2) / 2 + 0.04 * np.sin(np.pi * u)
    g1 = 0.08 * np.cos(np.pi * (u + 0.3 * v))
    g2 = 0.06 * np.sin(2 * np.pi * v) * (0.5 + 0.5 * u)
    return pos, fwhm_arcsec, g1, g2


def simulate_truth_stack(n: int, size: int = 41, n_psfs: int | None = None, seed: int = 0,
                         noise_sigma: float = 5e-4, pixel_scale_arcsec: float = 0.1,
                         n_galaxies: int | None = None):
    """Simulate Sersic galaxies blurred by space-variant Moffat PSFs, with Gaussian noise.

    Parameters
    ----------
    n : int
        Number of stamps.
    size : int
        Stamp and PSF side, pixels.
    n_psfs : int, optional
        Distinct PSFs (field positions); default one per stamp. Stamp i uses PSF i % n_psfs.
    seed : int
    noise_sigma : float
        Per-pixel noise; galaxies have unit flux.
    pixel_scale_arcsec : float
    n_galaxies : int, optional
        Distinct galaxy profiles to draw (stamp i shows galaxy i % n_galaxies, under its
        own PSF and noise); default one per stamp. Keeps large benchmark stacks quick.

    Returns
    -------
    truth, observed, psfs : np.ndarray, shape (n, size, size), float64
        ``observed = truth (*) psf + noise``, a 'same'-size linear convolution.
    sigma : np.ndarray (n,)
    """
    import galsim
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(seed)
    n_psfs = n if n_psfs is None else int(n_psfs)
    _, fwhm, g1, g2 = _psf_field(n_psfs, rng)
    psf_images = np.empty((n_psfs, size, size))
    for k in range(n_psfs):
        prof = galsim.Moffat(beta=3.0, fwhm=fwhm[k]).shear(g1=g1[k], g2=g2[k])
        img = prof.drawImage(nx=size, ny=size, scale=pixel_scale_arcsec).array
        psf_images[k] = img / img.sum()
    gsp = galsim.GSParams(maximum_fft_size=8192)
    trunc_arcsec = 0.5 * size * pixel_scale_arcsec
    n_gal = n if n_galaxies is None else min(int(n_galaxies), n)
    truth = np.empty((n_gal, size, size))
    sersic_n = rng.uniform(0.5, 4.0, n_gal)
    hlr_arcsec = rng.uniform(0.15, 0.45, n_gal)
    shear_mod = rng.uniform(0.0, 0.5, n_gal)
    shear_angle = rng.uniform(0, np.pi, n_gal)
    offset_px = rng.uniform(-1, 1, (n_gal, 2))
    for i in range(n_gal):
        # truncating at the stamp edge keeps the FFT small for high Sersic indices
        gal = galsim.Sersic(n=sersic_n[i], half_light_radius=hlr_arcsec[i], flux=1.0, trunc=trunc_arcsec, flux_untruncated=True,
                            gsparams=gsp)
        gal = gal.shear(g=shear_mod[i], beta=shear_angle[i] * galsim.radians)
        truth[i] = gal.drawImage(nx=size, ny=size, scale=pixel_scale_arcsec, offset=offset_px[i]).array
    truth = truth[np.arange(n) % n_gal]
    psfs = psf_images[np.arange(n) % n_psfs]
    blurred = fftconvolve(truth, psfs, mode="same", axes=(-2, -1))
    observed = blurred + rng.normal(0, noise_sigma, blurred.shape)
    return truth, observed, psfs, np.full(n, noise_sigma)
