"""TAN and TAN-SIP in JAX against astropy (wcslib)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip

from skystack.astrometry.wcs import (
    MAX_SIP_ORDER,
    WcsParams,
    max_distortion_px,
    parse_header,
    pix2world,
    pix2world_batched,
    sip_distort,
    stack_wcs,
    take,
    world2pix,
    world2pix_batched,
)

NAXIS = (3072, 3080)
SCALE_DEG = 1.01 / 3600.0


def make_wcs(crval=(150.3, 20.0), rot_deg=17.0, sip_order=0, distortion_px=3.0, seed=0, crpix=(1500.5, 1600.2)):
    """A ZTF-like quadrant WCS; SIP terms of orders 2..sip_order reach ~distortion_px at the corners."""
    rng = np.random.default_rng(seed)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip_order else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = list(crpix)
    th = np.radians(rot_deg)
    w.wcs.cd = SCALE_DEG * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    if sip_order:
        r = 2200.0
        a, b = np.zeros((sip_order + 1,) * 2), np.zeros((sip_order + 1,) * 2)
        for m in (a, b):
            for p in range(sip_order + 1):
                for q in range(sip_order + 1 - p):
                    if p + q >= 2:
                        m[p, q] = rng.uniform(-1, 1) * distortion_px / 2 / r ** (p + q)
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w


def random_pixels(n, seed=1, pad=50):
    rng = np.random.default_rng(seed)
    return rng.uniform(-pad, NAXIS[0] + pad, n), rng.uniform(-pad, NAXIS[1] + pad, n)


def astropy_world2pix(w, ra, dec):
    return w.all_world2pix(ra, dec, 0, tolerance=1e-12, maxiter=100)


CASES = {
    "tan": dict(),
    "tan-rotated-150": dict(rot_deg=150.0, crval=(359.995, -33.0)),
    "sip2": dict(sip_order=2),
    "sip3": dict(sip_order=3, distortion_px=5.0, seed=3),
    "sip3-near-pole": dict(sip_order=3, crval=(40.0, 89.7), seed=4),
    "sip5": dict(sip_order=5, distortion_px=2.0, seed=5),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_astropy(case):
    w = make_wcs(**CASES[case])
    p = parse_header(w.to_header_string(relax=True), source=case)
    x, y = random_pixels(3000)
    ra, dec = w.all_pix2world(x, y, 0)
    ra2, dec2 = (np.asarray(v) for v in pix2world(p, x, y))
    dra = ((ra2 - ra + 180) % 360 - 180) * np.cos(np.radians(dec))
    assert np.max(np.hypot(dra, dec2 - dec)) * 3.6e6 < 1e-3  # milliarcsec
    xa, ya = astropy_world2pix(w, ra, dec)
    x2, y2 = (np.asarray(v) for v in world2pix(p, ra, dec))
    assert np.max(np.hypot(x2 - xa, y2 - ya)) < 1e-6
    # The SIP inverse converges: world2pix undoes pix2world to 1e-8 px.
    assert np.max(np.hypot(x2 - x, y2 - y)) < 1e-8


def test_header_variants_agree():
    """CD, PC x CDELT, newline-separated text and a Header object give the same WCS."""
    w = make_wcs(sip_order=3, seed=7)
    text = w.to_header_string(relax=True)  # PC + CDELT form
    hdr = fits.Header.fromstring(text)
    cd_hdr = hdr.copy()
    for i in (1, 2):
        for j in (1, 2):
            cd_hdr[f"CD{i}_{j}"] = w.wcs.cd[i - 1, j - 1] if w.wcs.has_cd() else w.pixel_scale_matrix[i - 1, j - 1]
            cd_hdr.remove(f"PC{i}_{j}", ignore_missing=True)
        cd_hdr.remove(f"CDELT{i}", ignore_missing=True)
    variants = [text, hdr, hdr.tostring(sep="\n"), cd_hdr.tostring()]
    params = [parse_header(v) for v in variants]
    for p in params[1:]:
        for a, b in zip(params[0], p):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)  # cards keep ~16 digits


def test_crota_header_matches_astropy():
    hdr = fits.Header()
    hdr.update(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRPIX1=100.0, CRPIX2=120.0, CRVAL1=210.0, CRVAL2=-12.0,
               CDELT1=-2.8e-4, CDELT2=2.8e-4, CROTA2=25.0)
    w = WCS(hdr)
    p = parse_header(hdr)
    ra, dec = w.all_pix2world([0.0, 500.0, 1000.0], [0.0, 900.0, -40.0], 0)
    x, y = world2pix(p, ra, dec)
    np.testing.assert_allclose(np.asarray(x), [0.0, 500.0, 1000.0], atol=1e-8)
    np.testing.assert_allclose(np.asarray(y), [0.0, 900.0, -40.0], atol=1e-8)


def test_stack_jit_and_vmap():
    """Images of different kinds stack into one batch; the batched functions match astropy."""
    wcss = [make_wcs(**kw) for kw in CASES.values()]
    stacked = stack_wcs([w.to_header_string(relax=True) for w in wcss])
    assert stacked.sip_a.shape == (len(wcss), MAX_SIP_ORDER + 1, MAX_SIP_ORDER + 1)
    x = np.stack([random_pixels(200, seed=i)[0] for i in range(len(wcss))])
    y = np.stack([random_pixels(200, seed=i)[1] for i in range(len(wcss))])
    ra, dec = (np.asarray(v) for v in pix2world_batched(stacked, x, y))
    x2, y2 = (np.asarray(v) for v in world2pix_batched(stacked, ra, dec))
    for i, w in enumerate(wcss):
        xa, ya = astropy_world2pix(w, ra[i], dec[i])
        assert np.max(np.hypot(x2[i] - xa, y2[i] - ya)) < 1e-6
    # The pytree goes through jit and vmap like any array.
    f = jax.jit(jax.vmap(lambda p, r, d: world2pix(p, r, d)))
    x3, _ = f(WcsParams(*(jnp.asarray(a) for a in stacked)), ra, dec)
    np.testing.assert_allclose(np.asarray(x3), x2, atol=1e-9)
    one = take(stacked, 2)
    np.testing.assert_allclose(np.asarray(world2pix(one, ra[2], dec[2])[0]), x2[2], atol=1e-9)


def test_points_behind_the_tangent_plane_are_nan():
    p = parse_header(make_wcs().to_header_string(relax=True))
    x, y = world2pix(p, np.array([150.3 + 180.0]), np.array([-20.0]))
    assert np.isnan(np.asarray(x)).all() and np.isnan(np.asarray(y)).all()


def test_distortion_bound_is_an_upper_bound():
    w = make_wcs(sip_order=3, distortion_px=5.0, seed=3)
    p = parse_header(w.to_header_string(relax=True))
    bound = float(max_distortion_px(p, *NAXIS))
    gx, gy = np.meshgrid(np.linspace(-0.5, NAXIS[0] - 0.5, 101), np.linspace(-0.5, NAXIS[1] - 0.5, 101))
    u, v = gx - p.crpix0_px[0], gy - p.crpix0_px[1]
    du, dv = (np.asarray(a) for a in sip_distort(p, u, v))
    actual = np.max(np.hypot(du - u, dv - v))
    assert 1.0 < actual <= bound < 10 * actual
    assert float(max_distortion_px(parse_header(make_wcs().to_header_string(relax=True)), *NAXIS)) == 0.0


@pytest.mark.parametrize("edit, message", [
    (dict(CTYPE1="RA---SIN", CTYPE2="DEC--SIN"), "only RA---TAN"),
    (dict(CTYPE1="DEC--TAN", CTYPE2="RA---TAN"), "only RA---TAN"),
    (dict(CTYPE1="RA---TAN-TPV", CTYPE2="DEC--TAN-TPV"), "unsupported distortion"),
    (dict(CUNIT1="rad"), "CUNIT1 = 'rad'"),
    (dict(PC1_1=0.0, PC1_2=0.0), "singular"),
    (dict(RADESYS="GALACTIC"), "RADESYS"),
    (dict(A_ORDER=7, A_7_0=1e-20), "A_ORDER = 7 exceeds"),
])
def test_bad_headers_are_refused(edit, message):
    hdr = fits.Header.fromstring(make_wcs(sip_order=2).to_header_string(relax=True))
    hdr.update(edit)
    with pytest.raises(ValueError, match=f"quadrant 7 of exp.fits: .*{message}"):
        parse_header(hdr.tostring(), source="quadrant 7 of exp.fits")


def test_missing_keyword_is_named():
    hdr = fits.Header.fromstring(make_wcs().to_header_string(relax=True))
    del hdr["CRVAL2"]
    with pytest.raises(ValueError, match="img.fits: missing keyword CRVAL2"):
        parse_header(hdr, source="img.fits")
