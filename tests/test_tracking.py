"""Matched filter, combination and duplicate merging against direct numpy computations."""
import numpy as np
import pandas as pd
import pytest

from skystack.core.units import SIGMA_G_PER_IQR
from skystack.search.combine import combine_partials
from skystack.search.filters import merge_duplicates
from skystack.search.matched_filter import matched_filter, patch_radius_px


def sigma_g_keep(flux: np.ndarray, n_sigma: float) -> np.ndarray:
    """The clipping rule written plainly for one orbit: |f - median| <= n_sigma * sigma_G."""
    if len(flux) < 4:
        return np.ones(len(flux), bool)
    q25, q50, q75 = np.percentile(flux, [25, 50, 75])
    sigma_g = SIGMA_G_PER_IQR * (q75 - q25)
    if not sigma_g > 0:
        return np.ones(len(flux), bool)
    return np.abs(flux - q50) <= n_sigma * sigma_g


def gaussian_patch(r, dx, dy, sigma):
    off = np.arange(-r, r + 1)
    gx = off[None, :] - dx
    gy = off[:, None] - dy
    return np.exp(-(gx**2 + gy**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def test_noise_free_flux_is_exact():
    rng = np.random.default_rng(0)
    n, r = 50, 5
    x = rng.uniform(10, 20, n)
    y = rng.uniform(10, 20, n)
    sig = rng.uniform(0.8, 2.0, n)
    c = rng.uniform(20, 40, n)  # ADU per nmgy
    flux_nmgy = rng.uniform(1, 5, n)
    dx, dy = x - np.floor(x + 0.5), y - np.floor(y + 0.5)
    patches = np.stack([f * cc * gaussian_patch(r, a, b, s) for f, cc, a, b, s in zip(flux_nmgy, c, dx, dy, sig)]).astype(np.float32)
    psi, phi = matched_filter(patches, x, y, sig, np.full(n, 3.0), c)
    np.testing.assert_allclose(psi / phi, flux_nmgy, rtol=1e-5)


#: PSF sigma (px) -> measured largest |psi/phi / F - 2 s^2 / (2 s^2 + 1/12)| over sub-pixel
#: offsets (see the test below), rounded up; at 0.8 px the sampling of the model shows, at
#: 1-1.2 px the 3-sigma crop of the patch.
PIXEL_BIAS_RESIDUAL = {0.8: 4e-3, 1.0: 7e-4, 1.2: 3e-4, 1.5: 1.5e-4, 2.0: 5e-5, 2.5: 2e-5}


@pytest.mark.parametrize("sigma_px", sorted(PIXEL_BIAS_RESIDUAL))
def test_flux_bias_on_pixel_integrated_galsim_sources(sigma_px):
    """Flux of noise-free point sources drawn by GalSim (Gaussian PSF integrated over the
    pixel, tight GSParams: pixels exact to 1e-11 against erf), 100 sub-pixel offsets on a
    grid over [-0.5, 0.5)^2, patches of the pipeline's radius ceil(3 sigma).

    The model is the pixel-centre Gaussian of the same sigma, while the data are the pixel
    integral, close to a Gaussian of sigma_eff^2 = sigma^2 + 1/12, so psi / phi is low by
    the ratio 2 sigma^2 / (sigma^2 + sigma_eff^2) = 2 sigma^2 / (2 sigma^2 + 1/12).
    Measured psi / phi / F (min to max over the offsets; prediction in brackets):

    ======  ======  =================  ==========  ==================
    sigma   radius  psi / phi / F      [predicted]  flux bias
    ======  ======  =================  ==========  ==================
    0.8     3       0.93537 - 0.94017  [0.93888]   -6.5% to -6.0%
    1.0     3       0.95945 - 0.95959  [0.96000]   -4.05%
    1.2     4       0.97164            [0.97188]   -2.84%
    1.5     5       0.98172            [0.98182]   -1.83%
    2.0     6       0.98966            [0.98969]   -1.03%
    2.5     8       0.99336            [0.99338]   -0.66%
    ======  ======  =================  ==========  ==================

    The assertion holds each width to its measured residual against the prediction
    (``PIXEL_BIAS_RESIDUAL``); pixel-centre data (no bias) would miss it by the whole bias.
    """
    galsim = pytest.importorskip("galsim")
    r = patch_radius_px(sigma_px)
    grid = np.arange(-0.5, 0.5, 0.1)
    dx, dy = (a.ravel() for a in np.meshgrid(grid, grid))
    flux_nmgy, c, noise = 3.0, 25.0, 2.0
    exact = galsim.GSParams(folding_threshold=1e-6, maxk_threshold=1e-8, kvalue_accuracy=1e-10)
    patches = []
    for a, b in zip(dx, dy):
        im = galsim.ImageD(2 * r + 1, 2 * r + 1, scale=1.0)
        galsim.Gaussian(sigma=sigma_px, flux=flux_nmgy * c, gsparams=exact).drawImage(im, offset=(a, b))
        patches.append(im.array)
    patches = np.array(patches, np.float32)
    assert patches.sum(axis=(1, 2)).min() > 0.99 * flux_nmgy * c  # the crop keeps the source
    n = len(patches)
    psi, phi = matched_filter(patches, 100.0 + dx, 50.0 + dy, np.full(n, sigma_px), np.full(n, noise), np.full(n, c))
    ratio = psi / phi / flux_nmgy
    predicted = 2 * sigma_px**2 / (2 * sigma_px**2 + 1 / 12)
    print(f"\nsigma {sigma_px} px, radius {r}: psi/phi/F {ratio.min():.5f} to {ratio.max():.5f} "
          f"(predicted {predicted:.5f}), worst residual {np.abs(ratio - predicted).max():.2e}")
    assert np.abs(ratio - predicted).max() <= PIXEL_BIAS_RESIDUAL[sigma_px]


def test_pure_noise_snr_is_standard_normal():
    rng = np.random.default_rng(1)
    n, r = 20000, 4
    noise = 5.0
    patches = (noise * rng.normal(size=(n, 2 * r + 1, 2 * r + 1))).astype(np.float32)
    x, y = rng.uniform(0, 1, n) + 10, rng.uniform(0, 1, n) + 10
    psi, phi = matched_filter(patches, x, y, np.full(n, 1.2), np.full(n, noise), np.full(n, 25.0))
    snr = psi / np.sqrt(phi)
    assert abs(snr.mean()) < 0.03 and snr.std() == pytest.approx(1.0, abs=0.03)


def test_nan_pixels_left_out_of_both_sums():
    rng = np.random.default_rng(2)
    r, sig, noise, c = 4, 1.5, 2.0, 10.0
    patch = rng.normal(size=(2 * r + 1, 2 * r + 1)).astype(np.float32) + 3 * gaussian_patch(r, 0.2, -0.3, sig).astype(np.float32)
    patch[3, 4] = patch[0, :] = np.nan
    psi, phi = matched_filter(patch[None], [10.2], [4.7], [sig], [noise], [c])
    p = gaussian_patch(r, 0.2, -0.3, sig)
    good = np.isfinite(patch)
    assert psi[0] == pytest.approx((patch[good] * p[good]).sum() * c / noise**2, rel=1e-5)
    assert phi[0] == pytest.approx((p[good] ** 2).sum() * c * c / noise**2, rel=1e-5)


def test_combine_and_sigma_g_rejection():
    rng = np.random.default_rng(3)
    rows = []
    for oid in (5, 9):
        for image_id in range(40):
            phi = rng.uniform(0.5, 2)
            flux = 2.0 + rng.normal() / np.sqrt(phi)
            rows.append((oid, image_id, flux * phi, phi))
    rows.append((9, 99, 500.0 * 1.0, 1.0))  # a residual: a huge outlier in one image
    p = pd.DataFrame(rows, columns=["orbit_id", "image_id", "psi", "phi"])
    out = combine_partials(p, n_sigma_g=3.0).set_index("orbit_id")
    good = p[p["image_id"] != 99]
    for oid in (5, 9):
        g = good[good["orbit_id"] == oid]
        keep = sigma_g_keep((g["psi"] / g["phi"]).to_numpy(), 3.0)
        assert out.loc[oid, "snr"] == pytest.approx(g["psi"][keep].sum() / np.sqrt(g["phi"][keep].sum()))
    assert out.loc[9, "n_rejected"] >= 1 and out.loc[9, "flux_nmgy"] == pytest.approx(2.0, abs=0.3)
    masked = (p["image_id"] < 10).to_numpy()
    out2 = combine_partials(p, masked=masked).set_index("orbit_id")
    assert out2.loc[5, "n_images"] <= 30


def _combine_orbit_by_orbit(partials, n_sigma_g, masked):
    """The combination written plainly: one orbit at a time with sigma_g_keep."""
    p = partials.assign(_masked=masked).sort_values(["orbit_id", "image_id"], kind="stable")
    rows = []
    for oid, g in p.groupby("orbit_id", sort=True):
        keep = ((g["phi"] > 0) & ~g["_masked"]).to_numpy().copy()
        sub = np.flatnonzero(keep)
        keep[sub[~sigma_g_keep((g["psi"] / g["phi"]).to_numpy()[sub], n_sigma_g)]] = False
        rows.append((oid, int(keep.sum()), int(len(g) - keep.sum()), g["psi"].to_numpy()[keep].sum(),
                     g["phi"].to_numpy()[keep].sum()))
    return pd.DataFrame(rows, columns=["orbit_id", "n_images", "n_rejected", "psi", "phi"])


def test_combine_equals_orbit_by_orbit_clipping():
    """Every orbit's kept images and sums equal the plain per-orbit computation, for groups of
    every size (1 to 60 images), outliers, masked and zero-weight images, ties."""
    rng = np.random.default_rng(8)
    parts = []
    for oid in range(300):
        n = int(rng.integers(1, 61))
        phi = rng.uniform(0.2, 3.0, n)
        phi[rng.random(n) < 0.05] = 0.0
        flux = np.round(1.5 + rng.normal(size=n) / np.sqrt(np.maximum(phi, 0.2)), 1 if oid % 3 == 0 else 12)
        flux[rng.random(n) < 0.08] += 200.0
        parts.append(pd.DataFrame({"orbit_id": oid, "image_id": rng.permutation(1000)[:n], "psi": flux * phi, "phi": phi}))
    p = pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=1)  # any row order
    masked = rng.random(len(p)) < 0.1
    got = combine_partials(p, n_sigma_g=3.0, masked=masked)
    want = _combine_orbit_by_orbit(p, 3.0, masked)
    assert got["orbit_id"].tolist() == want["orbit_id"].tolist()
    assert got["n_images"].tolist() == want["n_images"].tolist()
    assert got["n_rejected"].tolist() == want["n_rejected"].tolist()
    assert (got["n_rejected"] > 0).mean() > 0.3
    np.testing.assert_allclose(got["psi"], want["psi"], rtol=1e-12)
    np.testing.assert_allclose(got["phi"], want["phi"], rtol=1e-12)


def test_merge_duplicates_keeps_best():
    img = np.arange(10)
    part = pd.concat([
        pd.DataFrame({"orbit_id": 1, "image_id": img, "x": img * 3.0, "y": 5.0}),
        pd.DataFrame({"orbit_id": 2, "image_id": img, "x": img * 3.0 + 0.5, "y": 5.2}),  # same object
        pd.DataFrame({"orbit_id": 3, "image_id": img, "x": img * 3.0 + 20, "y": 5.0}),  # another
    ])
    cand = pd.DataFrame({"orbit_id": [1, 2, 3], "snr": [9.0, 12.0, 8.0]})
    out = merge_duplicates(cand, part, match_px=2.0)
    assert out["orbit_id"].tolist() == [2, 3] and out["n_merged"].tolist() == [2, 1]


def test_merge_duplicates_drops_orbits_that_borrow_signal():
    """Orbit 2 follows object 1 in 4 of 10 images (not half, so not a plain duplicate); its
    SNR from the other 6 images is below threshold, so its signal is borrowed. Orbit 3
    overlaps as much but has real signal of its own elsewhere."""
    img = np.arange(10)
    track = pd.DataFrame({"orbit_id": 1, "image_id": img, "x": img * 3.0, "y": 5.0, "psi": 3.0, "phi": 1.0})
    off = np.where(img < 4, 0.0, 30.0)
    borrow = track.assign(orbit_id=2, x=img * 3.0 + off, psi=np.where(img < 4, 3.0, 0.5))
    real = track.assign(orbit_id=3, x=img * 3.0 - off, psi=np.where(img < 4, 3.0, 4.0))
    part = pd.concat([track, borrow, real], ignore_index=True)
    cand = pd.DataFrame({"orbit_id": [1, 2, 3], "snr": [9.5, 7.5, 11.0]})
    plain = merge_duplicates(cand, part, match_px=2.0)
    assert sorted(plain["orbit_id"]) == [1, 2, 3]
    out = merge_duplicates(cand, part, match_px=2.0, snr_threshold=7.0)
    # Residual SNRs off the kept tracks: orbit 1: 6*3/sqrt(6) = 7.3 (kept); orbit 2:
    # 6*0.5/sqrt(6) = 1.2, borrowed from orbit 3, the first kept orbit it follows.
    assert out["orbit_id"].tolist() == [3, 1]
    assert out.set_index("orbit_id")["n_merged"].to_dict() == {3: 2, 1: 1}
