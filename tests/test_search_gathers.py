"""Patch gathers and the fused search loop against plain numpy references.

Patches are compared with slices of the whole image (NaN-padded), whichever way the cache
gathers them (whole blocks of tiles for dense patches, pixel by pixel for sparse ones); the
search's partial sums with a direct float64 evaluation of the matched filter on those slices,
and with themselves under other batch sizes and intersection orders.
"""
import numpy as np
import pandas as pd
import pytest

from skystack.core.runtime import configure
from skystack.core.units import counts_per_nmgy
from skystack.search import shard
from skystack.search.matched_filter import matched_filter, patch_radii_px
from skystack.survey import cache as cache_module
from skystack.survey.cache import TileCache, write_tile_cache

configure()

SHAPES = {4: (45, 70), 9: (128, 128), 2: (33, 33), 13: (64, 100)}  # image_id: (ny, nx)


@pytest.fixture(scope="module", params=[8, 16, 32])
def survey(request, tmp_path_factory):
    """Noise images with bad pixels in a tile cache of the given tile size."""
    rng = np.random.default_rng(request.param)
    arrays = {}
    for image_id, shape in SHAPES.items():
        a = rng.normal(10.0, 3.0, shape).astype(np.float32)
        a[rng.random(shape) < 0.01] = np.nan
        arrays[image_id] = a
    path = tmp_path_factory.mktemp("gathers") / "p.tiles"
    write_tile_cache(path, arrays.items(), tile=request.param)
    return arrays, TileCache.open(path)


def reference_patches(arrays, image_id, x, y, radius):
    """Plain slices of each NaN-padded whole image."""
    pad = radius + 200  # centres may lie off the image
    padded = {i: np.pad(a, pad, constant_values=np.nan) for i, a in arrays.items()}
    out = []
    for i, xi, yi in zip(image_id, x, y):
        cx, cy = int(np.floor(xi + 0.5)) + pad, int(np.floor(yi + 0.5)) + pad
        out.append(padded[i][cy - radius:cy + radius + 1, cx - radius:cx + radius + 1])
    return np.array(out, np.float32)


def random_centres(rng, n, clustered: bool, margin: float = 0.0):
    """Patch centres on random images: scattered over each image (and ``margin`` px beyond
    its edges), or all within a few px of one point per image."""
    ids = rng.choice(list(SHAPES), n)
    shape = np.array([SHAPES[i] for i in ids], float)
    if clustered:
        centre = {i: rng.uniform(0, 1, 2) * np.array(SHAPES[i]) for i in SHAPES}
        c = np.array([centre[i] for i in ids])
        y, x = c[:, 0] + rng.normal(0, 2, n), c[:, 1] + rng.normal(0, 2, n)
    else:
        y = rng.uniform(-0.5 - margin, shape[:, 0] - 0.5 + margin)
        x = rng.uniform(-0.5 - margin, shape[:, 1] - 0.5 + margin)
    return ids, x, y


@pytest.mark.parametrize("path", ["as chosen", "blocks", "tiles"])
@pytest.mark.parametrize("clustered", [True, False])
def test_patches_equal_slices_of_the_whole_image(survey, monkeypatch, path, clustered):
    arrays, cache = survey
    if path != "as chosen":  # every patch one way: blocks of tiles, or pixel by pixel
        monkeypatch.setattr(cache_module, "_DENSE_PATCH_PIXELS_PER_PIXEL", 0.0 if path == "blocks" else np.inf)
    rng = np.random.default_rng(7)
    for radius in (0, 1, 4, 5, 9):
        ids, x, y = random_centres(rng, 600, clustered, margin=12.0)
        got = cache.patches(ids, x, y, radius)
        assert got.dtype == np.float32 and got.shape == (600, 2 * radius + 1, 2 * radius + 1)
        np.testing.assert_array_equal(got, reference_patches(arrays, ids, x, y, radius))


def test_patches_do_not_depend_on_the_batch(survey):
    _, cache = survey
    ids, x, y = random_centres(np.random.default_rng(3), 2000, clustered=False)
    whole = cache.patches(ids, x, y, 5)
    for batch in (1, 7, 333):
        np.testing.assert_array_equal(cache.patches(ids, x, y, 5, batch=batch), whole)


def reference_psi_phi(patch, x, y, sigma, noise, c, background, radius):
    """psi, phi of one patch: a direct float64 sum over the good pixels within ``radius``."""
    k = patch.shape[-1]
    r = (k - 1) // 2
    off = np.arange(-r, r + 1)
    dx, dy = x - np.floor(x + 0.5), y - np.floor(y + 0.5)
    psf = np.exp(-((off[None, :] - dx) ** 2 + (off[:, None] - dy) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    good = np.isfinite(patch) & (np.abs(off)[:, None] <= radius) & (np.abs(off)[None, :] <= radius)
    d = np.where(good, patch.astype(np.float64) - background, 0.0)
    p = np.where(good, psf, 0.0)
    return np.sum(d * p) * c / noise**2, np.sum(p * p) * c * c / noise**2


def test_matched_filter_background_and_own_radius():
    rng = np.random.default_rng(5)
    n, k = 300, 11
    patches = rng.normal(100.0, 5.0, (n, k, k)).astype(np.float32)
    patches[rng.random(patches.shape) < 0.02] = np.nan
    x, y = rng.uniform(10, 20, n), rng.uniform(10, 20, n)
    sigma, noise, c = rng.uniform(0.8, 1.6, n), rng.uniform(3, 6, n), rng.uniform(200, 300, n)
    background = rng.uniform(90, 110, n).astype(np.float32)
    radius = patch_radii_px(sigma)
    psi, phi = matched_filter(patches, x, y, sigma, noise, c, background=background, radius_px=radius)
    want = np.array([reference_psi_phi(*a) for a in zip(patches, x, y, sigma, noise, c, background, radius)])
    np.testing.assert_allclose(psi, want[:, 0], rtol=1e-4, atol=1e-5 * np.sqrt(want[:, 1]).max())
    np.testing.assert_allclose(phi, want[:, 1], rtol=1e-5)
    # The same as subtracting and cropping the patches first.
    off = np.abs(np.arange(-5, 6))
    outside = (off[None, :, None] > radius[:, None, None]) | (off[None, None, :] > radius[:, None, None])
    cropped = np.where(outside, np.float32(np.nan), patches - background[:, None, None])
    first = matched_filter(cropped, x, y, sigma, noise, c)
    np.testing.assert_array_equal(psi, first[0])
    np.testing.assert_array_equal(phi, first[1])
    for batch in (1, 64, 1000):
        again = matched_filter(patches, x, y, sigma, noise, c, batch=batch, background=background, radius_px=radius)
        np.testing.assert_array_equal(again[0], psi)
        np.testing.assert_array_equal(again[1], phi)


@pytest.fixture()
def images_index():
    """Index rows of the survey's images: difference and science, PSF widths on both sides
    of a radius change (3 sigma = 4 px)."""
    ids = sorted(SHAPES)
    return pd.DataFrame({"image_id": ids, "psf_sigma_px": [0.9, 1.3, 1.5, 1.1], "noise_sigma": [3.0, 4.0, 3.5, 5.0],
                         "magzp": [26.0, 26.2, 25.9, 26.1], "is_difference": [True, False, True, False],
                         "sky_level": [0.0, 10.0, 0.0, 9.5]})


def fake_hits(rng, n_orbits: int, per_orbit: int):
    """Intersections sorted by (orbit_id, image_id), as ``intersect`` returns them."""
    rows = []
    for o in range(n_orbits):
        for i in sorted(rng.choice(list(SHAPES), min(per_orbit, len(SHAPES)), replace=False)):
            ny, nx = SHAPES[i]
            rows.append((o, i, rng.uniform(-0.5, nx - 0.5), rng.uniform(-0.5, ny - 0.5)))
    return pd.DataFrame(rows, columns=["orbit_id", "image_id", "x", "y"]).astype({"orbit_id": "int64", "image_id": "int64"})


def test_search_partials_equal_a_direct_evaluation(survey, images_index, monkeypatch):
    arrays, cache = survey
    hits = fake_hits(np.random.default_rng(11), 400, 3)
    monkeypatch.setattr(shard, "intersect", lambda orbits, target, max_batch_bytes: hits.copy())
    orbits = pd.DataFrame({"orbit_id": np.arange(400)})
    smoothing = 0.5
    got = shard.search_partials(orbits, images_index, cache, smoothing_sigma_px=smoothing)
    assert list(got.columns) == shard.PARTIAL_COLUMNS and len(got) == len(hits)
    pd.testing.assert_frame_equal(got[["orbit_id", "image_id", "x", "y"]], hits)
    meta = images_index.set_index("image_id").loc[hits["image_id"]]
    sigma = np.hypot(meta["psf_sigma_px"].to_numpy(), smoothing)
    radius = patch_radii_px(sigma)
    bg = np.where(meta["is_difference"], 0.0, meta["sky_level"]).astype(np.float32)
    patches = reference_patches(arrays, hits["image_id"], hits["x"], hits["y"], int(radius.max()))
    want = np.array([reference_psi_phi(*a) for a in zip(patches, hits["x"], hits["y"], sigma, meta["noise_sigma"],
                                                        counts_per_nmgy(meta["magzp"].to_numpy()), bg, radius)])
    np.testing.assert_allclose(got["phi"], want[:, 1], rtol=1e-5)
    np.testing.assert_allclose(got["psi"], want[:, 0], rtol=1e-4, atol=1e-5 * np.sqrt(want[:, 1]).max())
    # Neither the batch budget nor which path gathers the patches changes a bit.
    for budget in (1 << 20, 64 << 20):
        pd.testing.assert_frame_equal(shard.search_partials(orbits, images_index, cache, smoothing_sigma_px=smoothing,
                                                            max_batch_bytes=budget), got)
    monkeypatch.setattr(cache_module, "_DENSE_PATCH_PIXELS_PER_PIXEL", np.inf)
    pd.testing.assert_frame_equal(shard.search_partials(orbits, images_index, cache, smoothing_sigma_px=smoothing), got)


def test_search_partials_do_not_depend_on_the_chunk(survey, images_index, monkeypatch):
    _, cache = survey
    hits = fake_hits(np.random.default_rng(12), 300, 4)
    monkeypatch.setattr(shard, "intersect", lambda orbits, target, max_batch_bytes: hits[
        hits["orbit_id"].isin(orbits["orbit_id"])].reset_index(drop=True))
    orbits = pd.DataFrame({"orbit_id": np.arange(300)})
    whole = shard.search_partials(orbits, images_index, cache)
    parts = pd.concat([shard.search_partials(orbits.iloc[s:s + 37], images_index, cache) for s in range(0, 300, 37)],
                      ignore_index=True)
    pd.testing.assert_frame_equal(parts, whole)
