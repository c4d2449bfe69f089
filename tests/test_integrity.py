"""Damaged caches, shared staging directories, unusable header values and out-of-range settings
are refused with a message that names the file (or setting), the keyword and the value."""
import logging
import os
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from conftest import REPO, TINY, run_snakemake
from test_bad_input import SITE, header, noise, write

from skystack.core.config import load_config
from skystack.orbits.table import load_orbits
from skystack.search.shard import stage_cache
from skystack.survey.cache import CacheIntegrityError, TileCache, write_tile_cache
from skystack.survey.headers import BadImageError
from skystack.survey.index import index_images, index_survey
from skystack.survey.stage import index_stage

TILE = 32
TILE_BYTES = TILE * TILE * 4


# ----------------------------------------------------------------------------- tile cache
def four_images(offset=0.0):
    """Images 0..3, 64 x 64 px: 4 tiles of 32 px each, 16 tiles in all (image 3: tiles 12-15)."""
    rng = np.random.default_rng(5)
    return [(i, rng.normal(100 + offset, 10, (64, 64)).astype(np.float32)) for i in range(4)]


def cache_file(path, offset=0.0):
    write_tile_cache(path, four_images(offset), tile=TILE)
    return path


def test_overwritten_pixels_are_refused_naming_the_tile(tmp_path):
    path = cache_file(tmp_path / "partition_0.tiles")
    before = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-TILE_BYTES:-TILE_BYTES + 96] = np.full(24, 1e6, "<f4").tobytes()  # inside the last tile
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
    assert path.stat().st_size == before.st_size
    with pytest.raises(CacheIntegrityError, match=rf"{re.escape(str(path))}: 1 of 16 tiles fail their checksum, "
                                                  r"first tile 15 \(image_id 3\).*delete this file"):
        TileCache.open(path)


def test_truncated_cache_names_the_file_and_both_sizes(tmp_path):
    path = cache_file(tmp_path / "partition_0.tiles")
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[: full - TILE_BYTES - 100])
    with pytest.raises(CacheIntegrityError, match=rf"{re.escape(str(path))}: tile cache is {full - TILE_BYTES - 100} "
                                                  rf"bytes, its index says {full} \(16 tiles of 32x32.*delete this file"):
        TileCache.open(path)
    path.write_bytes(b"SKYTI")
    with pytest.raises(CacheIntegrityError, match=r"5 bytes long, truncated; delete this file"):
        TileCache.open(path)


def test_damaged_index_is_refused(tmp_path):
    path = cache_file(tmp_path / "partition_0.tiles")
    raw = path.read_bytes()
    # Image 1 claims image 0's tiles: still valid JSON, but the index checksum fails.
    damaged = raw.replace(b'"first_tile": 4}', b'"first_tile": 0}', 1)
    assert damaged != raw and len(damaged) == len(raw)
    path.write_bytes(damaged)
    with pytest.raises(CacheIntegrityError, match=r"index fails its checksum.*delete this file"):
        TileCache.open(path)


def test_old_format_version_is_refused_by_name(tmp_path):
    path = tmp_path / "partition_0.tiles"
    header_json = b'{"tile": 32, "n_tiles": 0, "images": []}'
    path.write_bytes(b"SKYTILE1" + struct.pack("<Q", len(header_json)) + header_json)
    with pytest.raises(CacheIntegrityError, match=rf"{re.escape(str(path))}: tile cache format version 1 is not "
                                                  r"supported.*delete this file"):
        TileCache.open(path)


def test_runs_sharing_a_staging_dir_read_their_own_pixels(tmp_path):
    """Two runs of one experiment name: the same file name and size; the second cache is older
    than the first staged copy (what made size + mtime trust the wrong copy)."""
    a = cache_file(tmp_path / "run_a" / "tiny" / "partition_0.tiles")
    b = cache_file(tmp_path / "run_b" / "tiny" / "partition_0.tiles", offset=1000.0)
    assert a.stat().st_size == b.stat().st_size
    os.utime(b, ns=(a.stat().st_mtime_ns - 10**9,) * 2)
    node = tmp_path / "node"
    staged_a, staged_b = stage_cache(a, node), stage_cache(b, node)
    assert staged_a != staged_b
    np.testing.assert_array_equal(TileCache.open(staged_a).image(2), four_images()[2][1])
    np.testing.assert_array_equal(TileCache.open(staged_b).image(2), four_images(1000.0)[2][1])
    assert stage_cache(a, node) == staged_a and len(list(node.iterdir())) == 2


def test_a_short_staged_copy_is_refused_before_the_rename(tmp_path, monkeypatch):
    import shutil

    src = cache_file(tmp_path / "partition_0.tiles")
    monkeypatch.setattr(shutil, "copyfile", lambda s, d: Path(d).write_bytes(Path(s).read_bytes()[:-100]))
    with pytest.raises(CacheIntegrityError, match=rf"staging {re.escape(str(src))} to .*node gave a damaged copy"):
        stage_cache(src, tmp_path / "node")
    assert list((tmp_path / "node").iterdir()) == []


# ----------------------------------------------------------------------------- WCS cards
def set_raw_card(path, key, text):
    """Give ``key`` a raw value astropy will not write (NAN, INF)."""
    raw = bytearray(Path(path).read_bytes())
    at = raw.find(f"{key:<8}= ".encode())
    assert at >= 0 and at % 80 == 0, key
    raw[at:at + 80] = f"{key:<8}= {text:>20}".ljust(80).encode()
    Path(path).write_bytes(bytes(raw))
    return path


def cd_only_header():
    """A TAN header with a CD matrix only (no PC/CDELT), 1 arcsec pixels."""
    hdr = header()
    for key in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
        hdr.remove(key, ignore_missing=True)
    hdr.update({"CD1_1": -1 / 3600, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 1 / 3600})
    return hdr


@pytest.mark.parametrize("key, text", [("PC1_1", "NAN"), ("CD1_1", "NAN"), ("CRVAL1", "NAN"), ("CRPIX2", "NAN"),
                                       ("CDELT1", "INF"), ("CRVAL2", "-INF")])
def test_non_finite_wcs_card_is_a_rejection_naming_it(tmp_path, key, text):
    path = tmp_path / f"{key}.fits"
    hdr = cd_only_header() if key.startswith("CD") else header()
    hdr[key] = hdr.get(key, 1.0)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(noise(), header=hdr)]).writeto(path)
    set_raw_card(path, key, text)
    with pytest.raises(BadImageError, match=rf"{key}.fits \[HDU 1\]: unusable WCS card\(s\) {key} = '?{text}"):
        index_images([str(path)], site=SITE)
    good = write(tmp_path / "good.fits")
    images, rejected = index_survey([str(path), good], site=SITE, on_bad_image="skip")
    assert images["path"].tolist() == [good]
    assert rejected[["hdu", "kind"]].values.tolist() == [[1, "unusable WCS card"]]
    assert key in rejected["reason"].iloc[0]


def test_wcs_card_astropy_drops_is_a_rejection(tmp_path):
    """A WCS card outside the numeric list that wcslib cannot parse (and replaces by a default)."""
    path = write(tmp_path / "lonpole.fits", cards={"LONPOLE": "abc"})
    with pytest.raises(BadImageError, match=r"lonpole.fits \[HDU 1\]: unusable WCS card\(s\): astropy.wcs dropped "
                                            r"LONPOLE = 'abc"):
        index_images([path], site=SITE)


# ----------------------------------------------------------------------------- duplicates
def test_exposures_differing_only_in_exptime_are_not_duplicates(tmp_path):
    a = write(tmp_path / "e30.fits", cards={"EXPTIME": 30.0})
    b = write(tmp_path / "e300.fits", cards={"EXPTIME": 300.0})
    images, rejected = index_survey([a, b], site=SITE, on_bad_image="skip")
    assert rejected.empty
    mid = dict(zip(images["path"], images["mjd_mid_utc"]))
    assert mid[a] == pytest.approx(59000.3 + 15 / 86400, abs=1e-9)
    assert mid[b] == pytest.approx(59000.3 + 150 / 86400, abs=1e-9)


# ----------------------------------------------------------------------------- SATURATE, masks
def test_saturate_masking_most_pixels_is_a_rejection_naming_it(tmp_path):
    data = noise()  # N(50, 5): every pixel is above 0, 84 % above 45
    for level in (0, 45):
        path = write(tmp_path / f"sat{level}.fits", cards={"SATURATE": level})
        n = int((data >= level).sum())
        with pytest.raises(BadImageError, match=rf"sat{level}.fits \[HDU 1\]: saturation level: SATURATE = {level} "
                                                rf"marks {n} of 1600 finite pixels saturated"):
            index_images([path], site=SITE)
    ok = index_images([write(tmp_path / "sat70.fits", cards={"SATURATE": 70})], site=SITE)
    assert ok["saturate"].tolist() == [70.0]


def test_mask_marking_most_pixels_warns(tmp_path, caplog):
    mask = np.zeros((40, 40), np.int32)
    mask[:30] = 1  # 1200 of 1600 pixels
    path = tmp_path / "masked.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(noise(), header=header()),
                  fits.ImageHDU(mask, name="MASK")]).writeto(path)
    with caplog.at_level(logging.WARNING, logger="skystack.survey.index"):
        images = index_images([str(path)], site=SITE)
    assert len(images) == 1
    assert re.search(r"masked.fits \[HDU 1\]: the MASK marks 1200 of 1600 pixels bad", caplog.text)


# ----------------------------------------------------------------------------- header values
NOT_NUMBERS = {
    "exptime": ({"EXPTIME": "thirty"}, r"EXPTIME = 'thirty' is not a number"),
    "magzp": ({"MAGZP": "n/a"}, r"zero point: MAGZP = 'n/a' is not a number"),
    "gain": ({"GAIN": "n/a"}, r"gain: GAIN = 'n/a' is not a number"),
    "saturate": ({"SATURATE": "high"}, r"saturation level: SATURATE = 'high' is not a number"),
    "obsgeo_b": ({"OBSGEO-B": 200.0, "OBSGEO-L": 10.0, "OBSGEO-H": 100.0}, r"site: OBSGEO-B = 200.0 is not a latitude"),
    "obsgeo_h": ({"OBSGEO-B": 30.0, "OBSGEO-L": 10.0, "OBSGEO-H": "high"}, r"site: OBSGEO-H = 'high' is not the height"),
}


def test_values_that_are_not_numbers_are_recorded_per_file(tmp_path):
    paths = {name: write(tmp_path / f"{name}.fits", cards=cards) for name, (cards, _) in NOT_NUMBERS.items()}
    paths["nan_exptime"] = set_raw_card(write(tmp_path / "nan_exptime.fits"), "EXPTIME", "NAN")
    paths["mask_shape"] = str(tmp_path / "mask_shape.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(noise(), header=header()),
                  fits.ImageHDU(np.zeros((10, 10), np.int32), name="MASK")]).writeto(paths["mask_shape"])
    good = write(tmp_path / "good.fits", data=noise(3))
    out = tmp_path / "out"
    images = index_stage([*map(str, paths.values()), good], out / "images.parquet", out / "rejected_images.parquet",
                         site=SITE, on_bad_image="skip", n_partitions=1, log=logging.getLogger("test"))
    assert images["path"].tolist() == [good]
    rejected = pd.read_parquet(out / "rejected_images.parquet")
    reasons = dict(zip(rejected["path"], rejected["reason"]))
    assert rejected["hdu"].tolist() == [1] * len(paths)
    expected = {**{n: m for n, (_, m) in NOT_NUMBERS.items()},
                "nan_exptime": r"unparseable header card EXPTIME = '?NAN",
                "mask_shape": r"MASK image shape \(10, 10\) does not match the image \(40, 40\) \(MASK extension HDU 2\)"}
    for name, message in expected.items():
        assert re.search(message, reasons[str(paths[name])]), (name, reasons[str(paths[name])])


def test_a_garbled_zero_point_gives_way_to_the_next_keyword(tmp_path):
    images = index_images([write(tmp_path / "zp.fits", cards={"MAGZP": "n/a", "MAGZERO": 25.0})], site=SITE)
    assert images["magzp"].tolist() == [25.0]


def test_a_detector_name_is_no_crash(tmp_path):
    images = index_images([write(tmp_path / "lsst.fits", cards={"CCDID": "R22_S00_C00"})], site=SITE)
    assert images["ccd_id"].tolist() == [1]  # the HDU number


# ----------------------------------------------------------------------------- config
def overlay(tmp_path, text):
    path = tmp_path / "overlay.yaml"
    path.write_text(text)
    return path


BAD_SETTINGS = [
    ("search: {snr_threshold: -5}", r"search.snr_threshold: -5 is less than or equal to the minimum of 0"),
    ("search: {snr_threshold: .nan}", r"search.snr_threshold: must be a finite number"),
    ("search: {sigma_g_clip: .nan}", r"search.sigma_g_clip: must be a finite number"),
    ("deconvolve: {kappa: [3.0, .inf, 4.0]}", r"deconvolve.kappa\[1\]: must be a finite number"),
    ("seed: -1", r"seed: -1 is less than the minimum of 0"),
    ("seed: 1.0e+23", r"seed: 1e\+23 is greater than the maximum of 4294967295"),
    ("seed: 4294967296", r"seed: 4294967296 is greater than the maximum"),
    ("cache: {tile_px: 100000}", r"cache.tile_px: 100000 is greater than the maximum of 1024"),
]


@pytest.mark.parametrize("text, message", BAD_SETTINGS)
def test_load_config_refuses_out_of_range_and_non_finite(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, overlay(tmp_path, text))


def test_load_config_accepts_the_bounds_and_every_shipped_experiment(tmp_path):
    assert load_config(TINY, overlay(tmp_path, "seed: 4294967295"))["seed"] == 4294967295
    assert load_config(TINY, overlay(tmp_path, "seed: 0"))["seed"] == 0
    experiments = sorted((REPO / "config" / "experiments").glob("*.yaml"))
    assert "demo.yaml" in {e.name for e in experiments}
    for experiment in experiments:
        load_config(experiment)  # each on the schema's defaults alone, as the workflow reads it


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = overlay(tmp_path, "search:\n  snr_threshold: 6.0\n  sigma_g_clip: [3.0\nseed: 3\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: line 4, column 5: YAML syntax error: .*flow "
                                         r"sequence at line 3"):
        load_config(TINY, path)


@pytest.mark.parametrize("text, messages", [
    ("search: {snr_threshold: .nan}", [r"config: search.snr_threshold: must be a finite number"]),
    ("seed: -1", [r"-1 is less than the minimum of 0", r"On instance\['seed'\]"]),
    ("cache: {tile_px: 100000}", [r"100000 is greater than the maximum of 1024", r"On instance\['cache'\]\['tile_px'\]"]),
])
def test_the_workflow_refuses_them_too(tmp_path, text, messages):
    proc = run_snakemake(tmp_path, "--dry-run", configfile=[TINY, overlay(tmp_path, text)], check=False)
    assert proc.returncode != 0
    for message in messages:
        assert re.search(message, proc.stdout + proc.stderr), message
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- orbit files
def test_empty_orbit_file_names_the_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'empty.csv'))}: orbit file is empty"):
        load_orbits(tmp_path / "empty.csv")
    (tmp_path / "header_only.csv").write_text("a_au,e,inc_deg,node_deg,argperi_deg,mean_anomaly_deg,epoch_jd_tdb\n")
    with pytest.raises(ValueError, match=r"header_only.csv: orbit file has no orbit rows"):
        load_orbits(tmp_path / "header_only.csv")
