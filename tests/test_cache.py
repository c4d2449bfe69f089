"""The tile cache returns exactly the FITS pixels, for any patch, anywhere."""
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from skystack.search.shard import stage_cache
from skystack.survey.cache import TileCache, write_tile_cache


@pytest.fixture(scope="module")
def fits_images(tmp_path_factory):
    """Three images of odd sizes, RICE-compressed and plain, read back as astropy reads them."""
    d = tmp_path_factory.mktemp("fits")
    rng = np.random.default_rng(1)
    arrays = {}
    for image_id, (ny, nx) in zip((7, 3, 11), ((45, 70), (33, 33), (64, 100))):
        data = rng.normal(100, 10, (ny, nx)).astype(np.float32)
        data[5, 3] = np.nan
        path = d / f"im{image_id}.fits.fz"
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="RICE_1", dither_seed=image_id)]).writeto(path)
        with fits.open(path) as h:
            arrays[image_id] = np.asarray(h[1].data, dtype=np.float32)
    cache_path = d / "p0.tiles"
    write_tile_cache(cache_path, arrays.items(), tile=16)
    return arrays, TileCache.open(cache_path)


def reference_patch(data, x, y, r):
    ny, nx = data.shape
    out = np.full((2 * r + 1, 2 * r + 1), np.nan, np.float32)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            yy, xx = y + dy, x + dx
            if 0 <= yy < ny and 0 <= xx < nx:
                out[dy + r, dx + r] = data[yy, xx]
    return out


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_patches_equal_fits_slices(fits_images, data):
    arrays, cache = fits_images
    ids = data.draw(st.lists(st.sampled_from(sorted(arrays)), min_size=1, max_size=6))
    r = data.draw(st.integers(0, 9))
    xs, ys = [], []
    for i in ids:
        ny, nx = arrays[i].shape
        xs.append(data.draw(st.floats(-12, nx + 11, allow_nan=False)))
        ys.append(data.draw(st.floats(-12, ny + 11, allow_nan=False)))
    got = cache.patches(np.array(ids), np.array(xs), np.array(ys), r)
    assert got.shape == (len(ids), 2 * r + 1, 2 * r + 1) and got.dtype == np.float32
    for k, i in enumerate(ids):
        want = reference_patch(arrays[i], int(np.floor(xs[k] + 0.5)), int(np.floor(ys[k] + 0.5)), r)
        np.testing.assert_array_equal(got[k], want)


def test_whole_image_and_unknown_id(fits_images):
    arrays, cache = fits_images
    for i, a in arrays.items():
        np.testing.assert_array_equal(cache.image(i), a)
    with pytest.raises(KeyError, match="not in this cache"):
        cache.patches(np.array([5]), np.array([1.0]), np.array([1.0]), 2)


def test_not_a_cache(tmp_path):
    bad = tmp_path / "x.tiles"
    bad.write_bytes(b"hello world, not tiles")
    with pytest.raises(ValueError, match="not a skystack tile cache"):
        TileCache.open(bad)


def test_failed_write_leaves_nothing(tmp_path):
    def images():
        yield 1, np.zeros((10, 10))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_tile_cache(tmp_path / "p.tiles", images(), tile=8)
    assert list(tmp_path.iterdir()) == []


def test_staging_copies_once_and_again_when_rebuilt(fits_images, tmp_path):
    arrays, _ = fits_images
    src = tmp_path / "partition_0.tiles"
    write_tile_cache(src, arrays.items(), tile=16)
    staged = Path(stage_cache(src, tmp_path / "node"))
    assert staged.read_bytes() == src.read_bytes() and staged.parent == tmp_path / "node"
    np.testing.assert_array_equal(TileCache.open(staged).image(7), arrays[7])
    first = staged.stat().st_mtime_ns
    assert stage_cache(src, tmp_path / "node") == str(staged) and staged.stat().st_mtime_ns == first
    write_tile_cache(src, [(i, a + 1) for i, a in arrays.items()], tile=16)  # rebuilt: other pixels
    again = Path(stage_cache(src, tmp_path / "node"))
    assert again != staged
    np.testing.assert_array_equal(TileCache.open(again).image(7), arrays[7] + 1)
    assert stage_cache(src, None) == str(src)
