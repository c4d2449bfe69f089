"""The search's filters and per-detection results against answers worked out independently:
the bright-star mask (separations from astropy's SkyCoord), truth matching, light curves
and coadd stamps (inverse-variance means worked out by hand)."""
import numpy as np
import pandas as pd
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

from skystack.search.evaluate import match_truth
from skystack.search.filters import bright_star_mask, star_mask_hits
from skystack.search.results import clipped_coadd, coadd_stamp, light_curves
from skystack.survey.cache import TileCache, write_tile_cache


# ----------------------------------------------------------------------------- star mask
def tan_wcs(ra, dec, crpix, scale_arcsec, rot_deg=0.0, flip=False) -> WCS:
    """A TAN WCS with square pixels of ``scale_arcsec``, rotated by ``rot_deg``."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = list(crpix)
    s = scale_arcsec / 3600.0
    c, sn = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    w.wcs.cd = np.array([[(1 if flip else -1) * s * c, s * sn], [(1 if flip else -1) * s * sn * -1, s * c]])
    w.wcs.set()
    return w


RADIUS_ARCSEC = 10.0
# Two images: 0.5"/px rotated by 30 deg at (150, +2), and a flipped 1"/px one at (30, +60),
# where a degree of RA is half a degree on the sky. Image 5 has no intersections.
WCS_A = tan_wcs(150.0, 2.0, (60.5, 40.5), 0.5, rot_deg=30.0)
WCS_B = tan_wcs(30.0, 60.0, (50.5, 50.5), 1.0, flip=True)
WCS_C = tan_wcs(250.0, -40.0, (50.5, 50.5), 1.0)
IMAGES = pd.DataFrame({
    "image_id": [7, 3, 5],
    "naxis1": [120, 100, 100],
    "naxis2": [80, 100, 100],
    "wcs_header": [WCS_A.to_header_string(), WCS_B.to_header_string(), WCS_C.to_header_string()],
})
SCALE = {7: 0.5, 3: 1.0}
WCS_OF = {7: WCS_A, 3: WCS_B}
# Stars placed at known pixels of their image (0-based), turned into RA/Dec by astropy:
# one off the left edge of image 7 (its mask still reaches onto the image), and one far
# from every image.
STAR_PIXELS = [(7, 30.2, 20.7), (7, 90.4, 55.1), (7, -3.0, 40.0), (3, 50.3, 50.8)]


def star_table():
    ra, dec = [], []
    for image_id, x, y in STAR_PIXELS:
        sky = WCS_OF[image_id].pixel_to_world(x, y)
        ra.append(sky.ra.deg)
        dec.append(sky.dec.deg)
    ra.append(200.0)
    dec.append(-30.0)
    return pd.DataFrame({"ra_deg": ra, "dec_deg": dec})


def mask_case():
    """Intersections 2% inside and 2% outside the mask radius around every star, at six
    position angles, plus points far from any star; rows shuffled across images."""
    rows = []
    for k, (image_id, sx, sy) in enumerate(STAR_PIXELS):
        r_px = RADIUS_ARCSEC / SCALE[image_id]
        for f in (0.98, 1.02):
            for ang in np.radians([0, 47, 110, 180, 233, 300]):
                x, y = sx + f * r_px * np.cos(ang), sy + f * r_px * np.sin(ang)
                if 0 <= x <= IMAGES.set_index("image_id").loc[image_id, "naxis1"] - 1:
                    rows.append((image_id, x, y, f))
    rows += [(7, 60.0, 10.0, np.nan), (3, 5.0, 95.0, np.nan), (3, 90.0, 10.0, np.nan)]
    df = pd.DataFrame(rows, columns=["image_id", "x", "y", "f"])
    df["designed_inside"] = df["f"] < 1
    df = df.iloc[np.random.default_rng(3).permutation(len(df))].reset_index(drop=True)
    df.insert(0, "orbit_id", np.arange(len(df)))
    return df


def test_star_mask_hits_match_astropy_separations():
    partials = mask_case()
    stars = star_table()
    # The known answer: the angular separation of each intersection from its nearest star,
    # by astropy (pixel -> sky with the image's own WCS, then a great-circle distance).
    star_sky = SkyCoord(stars["ra_deg"].to_numpy() * u.deg, stars["dec_deg"].to_numpy() * u.deg)
    want = np.zeros(len(partials), bool)
    for i, row in partials.iterrows():
        sky = WCS_OF[row["image_id"]].pixel_to_world(row["x"], row["y"])
        sep = sky.separation(star_sky).to_value(u.arcsec)
        want[i] = sep.min() <= RADIUS_ARCSEC
        # The construction is what it claims: 2% inside or outside the radius (the TAN
        # projection distorts distances by ~1e-9 this close to the star), the far points
        # more than 1.5 radii from every star.
        if np.isfinite(row["f"]):
            assert sep.min() / RADIUS_ARCSEC == pytest.approx(row["f"], abs=1e-6)
        else:
            assert sep.min() > 1.5 * RADIUS_ARCSEC
    np.testing.assert_array_equal(want, partials["designed_inside"].to_numpy())
    assert 10 < want.sum() < len(want) - 10  # both kinds, on both images
    assert set(partials.loc[want, "image_id"]) == {3, 7}
    got = star_mask_hits(partials, IMAGES, stars, RADIUS_ARCSEC)
    assert got.dtype == bool and got.shape == (len(partials),)
    np.testing.assert_array_equal(got, want)


def test_star_mask_star_off_the_image_still_masks():
    """The star 3 px off the left edge of image 7 masks points on the image within 20 px."""
    stars = star_table().iloc[[2]]
    p = pd.DataFrame({"orbit_id": [0, 1, 2], "image_id": [7, 7, 7], "x": [0.0, 15.0, 18.0], "y": [40.0, 40.0, 40.0]})
    # 3 px, 18 px and 21 px from the star at 0.5"/px: 1.5", 9", 10.5".
    np.testing.assert_array_equal(star_mask_hits(p, IMAGES, stars, RADIUS_ARCSEC), [True, True, False])


def test_star_mask_radius_scales_with_the_image_pixel_scale():
    """The same 5" offset is 10 px on image 7 and 5 px on image 3: masked on both at 6", neither at 4"."""
    stars = star_table().iloc[[0, 3]]
    (_, ax, ay), (_, bx, by) = STAR_PIXELS[0], STAR_PIXELS[3]
    p = pd.DataFrame({"orbit_id": [0, 1], "image_id": [7, 3], "x": [ax + 10.0, bx], "y": [ay, by + 5.0]})
    np.testing.assert_array_equal(star_mask_hits(p, IMAGES, stars, 6.0), [True, True])
    np.testing.assert_array_equal(star_mask_hits(p, IMAGES, stars, 4.0), [False, False])


def test_star_mask_nothing_to_mask():
    p = mask_case()
    assert not star_mask_hits(p, IMAGES, None, RADIUS_ARCSEC).any()
    assert not star_mask_hits(p, IMAGES, star_table().iloc[:0], RADIUS_ARCSEC).any()
    assert len(star_mask_hits(p.iloc[:0], IMAGES, star_table(), RADIUS_ARCSEC)) == 0
    assert not star_mask_hits(p, IMAGES, star_table().iloc[[4]], RADIUS_ARCSEC).any()  # far from every image


def test_bright_star_mask_keeps_stars_brighter_than_the_limit():
    cat = pd.DataFrame({
        "ra": [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0],
        "dec": [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0],
        "p_star": [0.9, 0.5, 0.4999, 1.0, 0.9, 0.0, 0.8],
        "mag_r": [15.0, 17.99, 12.0, 18.0, 18.01, 10.0, np.nan],
        "other": list("abcdefg"),
    })
    # kept: p_star >= 0.5 and mag_r < 18: rows 0 (0.9, 15) and 1 (exactly 0.5, 17.99);
    # dropped: 2 (p_star just under 0.5), 3 (mag exactly 18), 4 (fainter), 5 (a galaxy), 6 (no mag).
    got = bright_star_mask(cat, 18.0)
    assert list(got.columns) == ["ra_deg", "dec_deg", "mag_r"]
    np.testing.assert_array_equal(got["ra_deg"], [10.0, 11.0])
    np.testing.assert_array_equal(got["dec_deg"], [-1.0, -2.0])
    np.testing.assert_array_equal(got["mag_r"], [15.0, 17.99])
    assert bright_star_mask(cat, 10.0).empty
    assert len(bright_star_mask(cat, 99.0)) == 4  # rows 0, 1, 3, 4


# ----------------------------------------------------------------------------- truth matching
def track(orbit_id, image_ids, x0, y0, vx=1.5, vy=-0.5):
    image_ids = np.asarray(image_ids)
    return pd.DataFrame({"orbit_id": orbit_id, "image_id": image_ids,
                         "x": x0 + vx * image_ids, "y": y0 + vy * image_ids})


def off_by(df, images, dx, dy=0.0):
    out = df.copy()
    sel = out["image_id"].isin(images)
    out.loc[sel, "x"] += dx
    out.loc[sel, "y"] += dy
    return out


MATCH_PX = 2.0


def test_match_truth_known_cases():
    ims = np.arange(8)
    t7 = track(7, ims, 100.0, 200.0)
    t9 = track(9, ims, 100.0, 260.0, vx=-1.0, vy=0.3)  # 60 px away from truth 7
    truth = pd.concat([t9, t7], ignore_index=True)
    cands = pd.concat([
        # 101: on truth 7 in 8 of 8 images, 1.9 px off (inside 2 px)
        off_by(track(101, ims, 100.0, 200.0), ims, 1.2, 1.47),
        # 102: on truth 7 in exactly 4 of 8 (half): matched
        off_by(track(102, ims, 100.0, 200.0), [0, 2, 4, 6], 2.5),
        # 103: on truth 7 in 3 of 8 (fewer than half): no match
        off_by(track(103, ims, 100.0, 200.0), [0, 1, 2, 4, 6], 2.5),
        # 104: on truth 9 in 6 of 8, 60 px from truth 7 everywhere: truth 9 (not the first listed)
        off_by(track(104, ims, 100.0, 260.0, vx=-1.0, vy=0.3), [3, 5], 0.0, 4.0),
        # 105: on truth 7 in both images they share (6, 7); its 4 others are outside truth
        # 7's coverage and do not count against it
        track(105, [6, 7, 20, 21, 22, 23], 100.0, 200.0),
        # 106: covers no image truth covers
        track(106, [30, 31, 32], 100.0, 200.0),
        # 107: 2.1 px off in every image (just outside)
        off_by(track(107, ims, 100.0, 200.0), ims, 2.1),
    ], ignore_index=True)
    det = pd.DataFrame({"orbit_id": [101, 102, 103, 104, 105, 106, 107], "snr": 10.0},
                       index=[10, 11, 12, 13, 14, 15, 16])
    got = match_truth(det, truth, cands, MATCH_PX)
    assert got.dtype == np.int64
    assert list(got.index) == list(det.index)
    assert got.tolist() == [7, 7, -1, 9, 7, -1, -1]


def test_match_truth_each_of_two_crossing_truths():
    """Two truths whose tracks cross at image 4: each detection gets its own truth."""
    ims = np.arange(9)
    ta = track(1, ims, 100.0, 100.0, vx=2.0, vy=0.0)
    tb = track(2, ims, 100.0, 116.0, vx=2.0, vy=-4.0)  # at image 4 both are at (108, 100)
    truth = pd.concat([ta, tb], ignore_index=True)
    cands = pd.concat([off_by(track(50, ims, 100.0, 100.0, vx=2.0, vy=0.0), ims, 0.5),
                       off_by(track(60, ims, 100.0, 116.0, vx=2.0, vy=-4.0), ims, -0.5)], ignore_index=True)
    det = pd.DataFrame({"orbit_id": [60, 50]})
    assert match_truth(det, truth, cands, MATCH_PX).tolist() == [2, 1]
    assert match_truth(det.iloc[:0], truth, cands, MATCH_PX).empty


# ----------------------------------------------------------------------------- light curves
def test_light_curves_flux_errors_and_order():
    images = pd.DataFrame({"image_id": [0, 1, 2, 3], "mjd_mid_utc": [59000.3, 59000.1, 59000.2, 59000.2],
                           "band": ["r", "g", "r", "i"], "noise_sigma": 1.0})
    cands = pd.DataFrame({
        "orbit_id": [5, 5, 5, 2, 2, 2],
        "image_id": [0, 1, 3, 2, 3, 0],
        "x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "y": [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0],
        "psi": [6.0, -3.0, 0.0, 10.0, 2.5, 1.0],
        "phi": [4.0, 9.0, 1.0, 25.0, 0.25, 16.0],
    })
    lc = light_curves(cands, images)
    assert list(lc.columns) == ["orbit_id", "image_id", "mjd_mid_utc", "band", "x", "y", "flux_nmgy", "flux_sd_nmgy"]
    # sorted by orbit, then time, then image id (images 2 and 3 share a time)
    assert lc["orbit_id"].tolist() == [2, 2, 2, 5, 5, 5]
    assert lc["image_id"].tolist() == [2, 3, 0, 1, 3, 0]
    assert lc["mjd_mid_utc"].tolist() == [59000.2, 59000.2, 59000.3, 59000.1, 59000.2, 59000.3]
    assert lc["band"].tolist() == ["r", "i", "r", "g", "i", "r"]
    assert lc["x"].tolist() == [4.0, 5.0, 6.0, 2.0, 3.0, 1.0]
    # flux = psi / phi, sd = 1 / sqrt(phi), worked out by hand
    np.testing.assert_allclose(lc["flux_nmgy"], [0.4, 10.0, 0.0625, -1 / 3, 0.0, 1.5], rtol=1e-15)
    np.testing.assert_allclose(lc["flux_sd_nmgy"], [0.2, 2.0, 0.25, 1 / 3, 1.0, 0.5], rtol=1e-15)
    assert lc.index.tolist() == list(range(6))


# ----------------------------------------------------------------------------- coadd stamps
R = 3  # stamp radius: 7 x 7
POS = {0: (10.3, 12.6), 1: (20.8, 5.2), 2: (4.4, 25.7)}  # nearest pixels (10, 13), (21, 5), (4, 26)
# image_id: partition, magzp, counts/nmgy (10**(-0.4 (22.5 - magzp)), by hand), sky, noise,
# is_difference, constant level in nmgy, point-source nmgy (one pixel at the orbit position)
META = {
    0: dict(partition=0, magzp=22.5, c=1.0, sky=100.0, noise=1.0, diff=False, level=3.0, point=10.0),
    1: dict(partition=1, magzp=25.0, c=10.0, sky=50.0, noise=5.0, diff=True, level=2.0, point=10.0),
    2: dict(partition=0, magzp=20.0, c=0.1, sky=10.0, noise=0.1, diff=False, level=5.0, point=10.0),
}
# weights (c / noise)^2: 1, 4, 1.


@pytest.fixture(scope="module")
def coadd_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("coadd")
    pixels = {}
    for i, m in META.items():
        bg = 0.0 if m["diff"] else m["sky"]
        # A difference image's pixels carry no sky, whatever sky_level the index recorded.
        img = np.full((30, 30), m["level"] * m["c"] + bg)
        x, y = POS[i]
        img[int(round(y)), int(round(x))] += m["point"] * m["c"]
        pixels[i] = img
    pixels[1][5 - 2, 21 + 1] = np.nan  # a bad pixel in image 1 at stamp offset (dy, dx) = (-2, +1)
    for part in (0, 1):
        write_tile_cache(d / f"p{part}.tiles", [(i, pixels[i]) for i in META if META[i]["partition"] == part], tile=8)
    caches = {part: TileCache.open(d / f"p{part}.tiles") for part in (0, 1)}
    images = pd.DataFrame({
        "image_id": list(META), "partition": [m["partition"] for m in META.values()],
        "magzp": [m["magzp"] for m in META.values()], "sky_level": [m["sky"] for m in META.values()],
        "noise_sigma": [m["noise"] for m in META.values()], "is_difference": [m["diff"] for m in META.values()],
    })
    positions = pd.DataFrame({"orbit_id": 1, "image_id": list(POS), "x": [p[0] for p in POS.values()],
                              "y": [p[1] for p in POS.values()]})
    return positions, images, caches


def test_coadd_is_the_inverse_variance_mean_in_nmgy(coadd_case):
    positions, images, caches = coadd_case
    stamp = coadd_stamp(positions, images, caches, radius=R)
    assert stamp.shape == (2 * R + 1, 2 * R + 1)
    # weights 1, 4, 1 on levels 3, 2, 5 nmgy: (3 + 8 + 5) / 6
    background = 16.0 / 6.0
    want = np.full((7, 7), background)
    want[R, R] = background + 10.0  # the point source is 10 nmgy in every image
    want[R - 2, R + 1] = (3.0 + 5.0) / 2.0  # image 1's bad pixel: images 0 and 2 only, weights 1, 1
    # every pixel value (level c + sky, + 10 c at the source) is exact in float32, so the
    # only rounding is float64 arithmetic: 1e-12 relative
    np.testing.assert_allclose(stamp, want, rtol=1e-12)


def test_coadd_off_the_image_edge(coadd_case):
    """A stamp hanging off the image edge: NaN where no image has a pixel, the mean of the
    others where one does."""
    positions, images, caches = coadd_case
    p = positions.copy()
    # Stamps centred on pixel columns 0 (image 0), 1 (image 2) and 28 (image 1), on rows
    # away from every point source and bad pixel: off the image are image 0's stamp
    # columns dx = -3, -2, -1, image 2's dx = -3, -2, image 1's dx = +2, +3.
    p.loc[p["image_id"] == 0, ["x", "y"]] = [0.4, 12.6]
    p.loc[p["image_id"] == 2, ["x", "y"]] = [1.2, 15.2]
    p.loc[p["image_id"] == 1, ["x", "y"]] = [28.0, 5.2]
    stamp = coadd_stamp(p, images, caches, radius=R)
    # dx = -3, -2: image 1 alone (2 nmgy); dx = -1: images 1, 2 (weights 4, 1: (8 + 5) / 5);
    # dx = 0, +1: all three ((3 + 8 + 5) / 6); dx = +2, +3: images 0, 2 ((3 + 5) / 2).
    np.testing.assert_allclose(stamp[:, 0:2], 2.0, rtol=1e-12)
    np.testing.assert_allclose(stamp[:, 2], 13.0 / 5.0, rtol=1e-12)
    np.testing.assert_allclose(stamp[:, 3:5], 16.0 / 6.0, rtol=1e-12)
    np.testing.assert_allclose(stamp[:, 5:], 4.0, rtol=1e-12)
    # and where no image reaches: one image only, pushed off entirely on the left
    alone = p[p["image_id"] == 0]
    s = coadd_stamp(alone, images, caches, radius=R)
    assert np.isnan(s[:, :3]).all() and np.isfinite(s[:, 3:]).all()
    np.testing.assert_allclose(s[:, 3:], 3.0, rtol=1e-12)


def test_clipped_coadd_leaves_out_a_cosmic_ray(tmp_path):
    """Five difference images (1 ADU per nmgy, noise 0.1 nmgy), the object 4 nmgy at the stamp
    centre in each, a cosmic ray of 50 nmgy two pixels off it in one: the clipped coadd is the
    object alone (to float32 rounding), where the plain mean shows the ray at 1/5 strength."""
    n, size = 5, 20
    pixels = []
    for i in range(n):
        img = np.zeros((size, size), np.float32)
        img[10, 10] = 4.0
        if i == 2:
            img[12, 10] = 50.0
        pixels.append((i, img))
    write_tile_cache(tmp_path / "p0.tiles", pixels, tile=8)
    caches = {0: TileCache.open(tmp_path / "p0.tiles")}
    images = pd.DataFrame({"image_id": range(n), "partition": 0, "magzp": 22.5, "sky_level": 7.0,
                           "noise_sigma": 0.1, "is_difference": True})
    positions = pd.DataFrame({"orbit_id": 1, "image_id": range(n), "x": 10.2, "y": 9.9})
    want = np.zeros((2 * R + 1,) * 2)
    want[R, R] = 4.0
    np.testing.assert_allclose(clipped_coadd(positions, images, caches, radius=R), want, atol=1e-6)
    plain = coadd_stamp(positions, images, caches, radius=R)
    assert plain[R + 2, R] == pytest.approx(10.0)


def test_detection_predicate_match_radius_and_image_selection():
    from scipy.stats import norm

    from skystack.search.filters import duplicate_match_px, is_detection
    from skystack.search.results import expected_false_alarms
    from skystack.survey.stage import select_images

    combined = pd.DataFrame({"snr": [7.0, 6.999, 9.0, 12.0], "n_images": [5, 5, 4, 3]})
    assert is_detection(combined, 7.0, 4).tolist() == [True, False, True, False]
    images = pd.DataFrame({"image_id": [3, 1, 2, 0], "psf_sigma_px": [1.0, 2.0, 3.0, 4.0],
                           "is_difference": [True, False, True, False], "band": ["r", "g", "r", "r"]})
    assert duplicate_match_px(images) == pytest.approx(2.5 * 2.354820045, rel=1e-9)  # median sigma x FWHM/sigma
    assert select_images(images, "difference")["image_id"].tolist() == [2, 3]
    assert select_images(images, "science", band="r")["image_id"].tolist() == [0]
    with pytest.raises(ValueError, match="image kind"):
        select_images(images, "diff")
    # 10^6 noise orbits at 5 sigma: 0.287 expected; a 2% wider SNR raises it to 0.41.
    assert expected_false_alarms(10**6, 5.0) == pytest.approx(0.2866516, rel=1e-6)
    assert expected_false_alarms(10**6, 5.0, snr_sd=1.02) == pytest.approx(1e6 * norm.sf(5.0 / 1.02), rel=1e-12)


def test_search_refuses_an_image_kind_that_selects_nothing():
    from skystack.search.stage import searched_images

    index = pd.DataFrame({"image_id": [0, 1], "is_difference": [False, False], "band": ["r", "r"]})
    assert len(searched_images(index, "science", "images.parquet")) == 2
    with pytest.raises(ValueError, match=r"images.parquet: search.images = 'difference' selects none of the 2 "
                                         r"indexed images \(2 science\)"):
        searched_images(index, "difference", "images.parquet")


def test_photometric_stages_leave_out_images_without_a_zero_point(caplog):
    import logging

    from skystack.survey.stage import with_zero_point

    index = pd.DataFrame({"image_id": [0, 1, 2], "magzp": [26.0, np.nan, 25.5], "path": ["a.fits", "b.fits", "c.fits"]})
    kept = with_zero_point(index, "images.parquet", logging.getLogger("t"))
    assert kept["image_id"].tolist() == [0, 2]
    assert "1 of 3 images have no zero point" in caplog.text and "b.fits" in caplog.text
    with pytest.raises(ValueError, match=r"images.parquet: none of the 1 images has a zero point .*b.fits"):
        with_zero_point(index.iloc[[1]], "images.parquet")
