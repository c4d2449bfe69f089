"""Sources found in the residuals of the fit: a faint star on the flank of a bright one, which the
first detection merges away, is found, fitted, and takes its light back from its neighbour.

Images are rendered by GalSim (Moffat PSF); the truth is what was rendered. The cutouts the
residual search runs on keep the WCS of their image, checked against astropy on SIP and on a real
DECam TPV header."""
import numpy as np
import pytest
from astropy.io import fits
from conftest import SHARED_DATA, needs_shared
from test_wcs import make_wcs

from skystack.astrometry.astropy_wcs import wcs_from_header_text
from skystack.catalog.data import ImageData
from skystack.catalog.detect import detect_sources
from skystack.catalog.stage import fit_all_regions
from skystack.sim.fields import galsim_psf, psf_image, tan_wcs

FWHM_PX = 3.5
BRIGHT_ADU, FAINT_ADU = 60000.0, 3000.0


def _flank_field(separation_px: float, n_images: int = 4, n: int = 81, seed: int = 0):
    """A star of 60000 ADU and one of 3000 ADU (5%) ``separation_px`` east of it, Moffat beta 3
    of FWHM 3.5 px, on ``n_images`` sky-subtracted exposures (sky variance 25 ADU^2, gain 4)."""
    psf = galsim_psf("moffat", FWHM_PX, 3.0)
    stars = [(38.0, 40.0, BRIGHT_ADU), (38.0 + separation_px, 40.3, FAINT_ADU)]
    model = sum(psf.withFlux(f).drawImage(nx=n, ny=n, scale=1.0, method="auto",
                                          offset=(x - n // 2, y - n // 2)).array for x, y, f in stars)
    rng = np.random.default_rng(seed)
    w = tan_wcs(150.0, 2.0, n, n, 1.0, 0.0)
    header = w.to_header().tostring(sep="\n")
    images = []
    for k in range(n_images):
        pixels = model + rng.normal(0.0, 1.0, (n, n)) * np.sqrt(25.0 + model / 4.0)
        images.append(ImageData(pixels=pixels.astype(np.float32), band="r", magzp=22.5, wcs_header=header,
                                psf=psf_image(psf, 1.0, 15), noise_var=25.0, sky_subtracted=True, gain=4.0,
                                mjd=60000.0 + k))
    return images, w.all_pix2world([[x, y] for x, y, _ in stars], 0)


def _separation_arcsec(table, radec):
    """(rows of table, true stars) separations."""
    cosd = np.cos(np.radians(radec[:, 1]))
    return np.hypot((table["ra"].to_numpy()[:, None] - radec[None, :, 0]) * cosd,
                    table["dec"].to_numpy()[:, None] - radec[None, :, 1]) * 3600.0


@pytest.mark.parametrize("separation_px", [5.0, 7.0])
def test_a_faint_star_on_a_bright_ones_flank_is_found_in_the_residuals(separation_px):
    """At 1.4 and 2 FWHM the faint star's matched-filter peak is on the bright star's slope, so
    the detection gives one candidate; without the residual search the bright star's flux takes
    much of the faint one's light (over 40% of it, more than 5 sd, though the residuals inflate
    the sd); with it, both fluxes are within 3 sd of the
    truth and the faint star within 0.3 arcsec (0.09 FWHM) of its position."""
    images, radec = _flank_field(separation_px)
    cands = detect_sources(images)
    assert len(cands) == 1 and _separation_arcsec(cands, radec)[0, 1] > separation_px - 1.0
    merged = fit_all_regions(cands, images, max_sources_per_region=64, detect_residuals=False)
    excess = merged["flux_r_nmgy"].iloc[0] - BRIGHT_ADU
    print(separation_px, excess, excess / merged["flux_r_sd_nmgy"].iloc[0])
    assert excess > 0.4 * FAINT_ADU and excess / merged["flux_r_sd_nmgy"].iloc[0] > 5.0
    cat = fit_all_regions(cands, images, max_sources_per_region=64)
    assert len(cat) == 2 and cat["found_in_residuals"].tolist() == [False, True]
    sep = _separation_arcsec(cat, radec)
    assert sep[0, 0] < 0.1 and sep[1, 1] < 0.3, sep
    z = (cat["flux_r_nmgy"].to_numpy() - [BRIGHT_ADU, FAINT_ADU]) / cat["flux_r_sd_nmgy"].to_numpy()
    print(separation_px, z, sep.min(axis=0))
    assert np.all(np.abs(z) < 3.0), z


def test_an_isolated_star_leaves_nothing_in_its_residuals():
    """With the faint star far from the bright one, the detection finds both and the residual search
    adds nothing: no source is found twice, none in the bright star's wings."""
    images, radec = _flank_field(25.0)
    cands = detect_sources(images)
    assert len(cands) == 2
    cat = fit_all_regions(cands, images, max_sources_per_region=64)
    assert len(cat) == 2 and not cat["found_in_residuals"].any()


def _check_cutout(header_text: str, shape_yx, x0: int, x1: int, y0: int, y1: int):
    image = ImageData(pixels=np.zeros(shape_yx, np.float32), band="r", magzp=25.0, wcs_header=header_text)
    cut = image.cutout(x0, x1, y0, y1)
    assert cut.shape == (y1 - y0, x1 - x0)
    rng = np.random.default_rng(3)
    x, y = rng.uniform(x0, x1 - 1, 200), rng.uniform(y0, y1 - 1, 200)
    full = np.array(wcs_from_header_text(header_text).all_pix2world(x, y, 0))
    part = np.array(cut.wcs.all_pix2world(x - x0, y - y0, 0))
    assert np.max(np.abs(full - part)) * 3600.0 < 1e-6


def test_cutout_keeps_a_sip_wcs():
    w = make_wcs(sip_order=4, distortion_px=20.0)
    _check_cutout(w.to_header(relax=True).tostring(sep="\n"), (3080, 3072), 1700, 2200, 2400, 2731)


TPV_IMAGE = ("real/decam/legacypipe-testcase3/images/decam/CP/V4.8.2a/CP20150328/"
             "c4d_150329_083320_ooi_r_ls9.N11.fits")


@needs_shared(TPV_IMAGE)
def test_cutout_keeps_a_real_tpv_wcs():
    header = fits.getheader(SHARED_DATA / TPV_IMAGE, "N11")
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    _check_cutout(header.tostring(sep="\n"), shape, 7, shape[1] - 5, 3, shape[0] - 9)
