"""Bad input past the index: empty work, sources off the images, device memory, config errors,
and bad images met by the workflow itself (error and skip policies)."""
import shutil

import jax
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY, run_snakemake

from skystack.catalog.stage import candidates_on_images, read_candidates
from skystack.search import intersect as intersect_module
from skystack.search import matched_filter as mf_module
from skystack.search.combine import combine_partials
from skystack.search.filters import merge_duplicates
from skystack.search.shard import PARTIAL_COLUMNS, search_partials
from skystack.survey.cache import TileCache, write_tile_cache
from skystack.survey.pixels import read_pixels


@pytest.fixture(scope="module")
def survey(tiny_run):
    res = tiny_run / "results" / "tiny"
    images = pd.read_parquet(res / "images.parquet")
    images["path"] = [str(tiny_run / p) for p in images["path"]]
    mine = images[(images["partition"] == 0) & images["is_difference"]]
    cache = TileCache.open(tiny_run / "cache" / "tiny" / "partition_0.tiles")
    truth = pd.read_parquet(res / "survey" / "orbits.parquet")
    return images, mine, cache, truth


def test_orbits_that_miss_every_image_give_empty_results(survey):
    _, mine, cache, truth = survey
    away = truth.assign(mean_anomaly_deg=truth["mean_anomaly_deg"] + 180.0)
    partials = search_partials(away, mine, cache)
    assert partials.empty and list(partials.columns) == PARTIAL_COLUMNS
    combined = combine_partials(partials)
    assert combined.empty and "snr" in combined.columns
    assert merge_duplicates(combined, partials, 2.0).empty


def test_empty_partition_gives_empty_results(survey, tmp_path):
    _, mine, _, truth = survey
    write_tile_cache(tmp_path / "empty.tiles", iter(()))
    partials = search_partials(truth, mine.iloc[:0], TileCache.open(tmp_path / "empty.tiles"))
    assert partials.empty and list(partials.columns) == PARTIAL_COLUMNS


def test_out_of_memory_batches_are_split_and_retried(survey, monkeypatch, caplog):
    _, mine, cache, truth = survey
    reference = search_partials(truth, mine, cache)
    assert len(reference) > 10
    for name in ("_matched_filter",):
        real = getattr(mf_module, name)
        calls = {"n": 0}

        def failing_once(*args, _real=real, _calls=calls):
            _calls["n"] += 1
            if _calls["n"] == 1:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB")
            return _real(*args)

        monkeypatch.setattr(mf_module, name, failing_once)

    real_batch = intersect_module._batch_intersections_jit
    seen = {"n": 0}

    def failing_batch(*args, **kw):
        seen["n"] += 1
        if seen["n"] == 1:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB")
        return real_batch(*args, **kw)

    monkeypatch.setattr(intersect_module, "_batch_intersections_jit", failing_batch)
    with caplog.at_level("WARNING", logger="skystack.search.shard"):
        again = search_partials(truth, mine, cache, max_batch_bytes=64 << 20)
    pd.testing.assert_frame_equal(again, reference)
    said = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(said) == 2 and "64.0 MiB batch: split in two and retried" in said[0]


def test_other_device_errors_are_not_retried(survey, monkeypatch):
    _, mine, cache, truth = survey

    def broken(*args):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(mf_module, "_matched_filter", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        search_partials(truth, mine, cache)


def test_saturated_and_masked_pixels_become_nan(survey):
    images, *_ = survey
    row = images[~images["is_difference"]].iloc[0]
    raw = read_pixels(row["path"], int(row["hdu"]))
    limit = float(np.nanpercentile(raw, 99.5))
    pixels = read_pixels(row["path"], int(row["hdu"]), saturate=limit)
    assert np.isnan(pixels[raw >= limit]).all() and np.isfinite(pixels[raw < limit]).all()


def test_catalog_candidates_off_every_image(survey, tmp_path):
    images, *_ = survey
    sci = images[~images["is_difference"]].iloc[0]
    good = pd.DataFrame({"ra": [sci["ra_center_deg"]], "dec": [sci["dec_center_deg"]], "flux_r_nmgy": [5.0]})
    off = pd.DataFrame({"ra": [sci["ra_center_deg"] + 90.0], "dec": [-10.0], "flux_r_nmgy": [5.0]})
    warnings = []
    kept = candidates_on_images(pd.concat([good, off], ignore_index=True), images, "cands.csv", warn=warnings.append)
    assert len(kept) == 1 and "cands.csv: 1 of 2 candidates lie outside every science image" in warnings[0]
    with pytest.raises(ValueError, match=r"cands.csv: none of the 1 candidates lies on any science image"):
        candidates_on_images(off, images, "cands.csv")
    (tmp_path / "bad.csv").write_text("ra,dec\n1,2\n")
    with pytest.raises(ValueError, match=r"bad.csv: candidate list lacks column\(s\) \['flux_r_nmgy'\]"):
        read_candidates(tmp_path / "bad.csv")


@pytest.mark.parametrize("settings, message", [
    ({"search": {"snr_treshold": 6.0}}, r"snr_treshold"),
    ({"partitions": "two"}, r"partitions"),
    ({"orbits": {"source": "comet"}}, r"comet"),
])
def test_config_errors_name_the_key(tmp_path, settings, message):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(yaml.safe_dump(settings))
    proc = run_snakemake(tmp_path, "--dry-run", configfile=[TINY, overlay], check=False)
    assert proc.returncode != 0
    assert __import__("re").search(message, proc.stdout + proc.stderr)
    assert not (tmp_path / "results").exists()


def _survey_with_one_bad_file(tiny_run, tmp_path):
    src = tiny_run / "results" / "tiny" / "survey" / "images"
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(src.glob("sim_0000[12]_*_diff.fits.fz")):
        shutil.copy(p, data / p.name)
    raw = (data / sorted(p.name for p in data.iterdir())[0]).read_bytes()
    (data / "zz_truncated.fits.fz").write_bytes(raw[: len(raw) // 2])
    return data


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_bad_file_in_the_workflow(tiny_run, tmp_path, policy):
    data = _survey_with_one_bad_file(tiny_run, tmp_path)
    overlay = tmp_path / "files.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": "files", "survey": {
        "source": "files", "paths": [str(data / "*.fits.fz")], "on_bad_image": policy}}))
    proc = run_snakemake(tmp_path, "results/files/images.parquet", configfile=[TINY, overlay], check=False)
    index = tmp_path / "results" / "files" / "images.parquet"
    if policy == "error":
        assert proc.returncode != 0
        log = (tmp_path / "logs" / "files" / "index_survey.log").read_text()
        assert "zz_truncated.fits.fz" in log and "truncated" in log.lower()
        assert not index.exists() and not list((tmp_path / "results").rglob("*.parquet"))
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(pd.read_parquet(index)) == 8
        rejected = pd.read_parquet(tmp_path / "results" / "files" / "rejected_images.parquet")
        assert rejected["path"].str.endswith("zz_truncated.fits.fz").tolist() == [True]


def test_catalog_stages_on_a_survey_without_science_images(tiny_run, tmp_path):
    """A survey of difference images with the catalog left enabled: every catalog stage gives an
    empty table (with its columns), never a crash."""
    import logging

    from skystack.catalog.stage import detect_stage, fit_region_stage, merge_catalog_stage, plan_regions_stage
    from skystack.search.stage import star_mask_stage

    images = pd.read_parquet(tiny_run / "results" / "tiny" / "images.parquet")
    images["path"] = [str(tiny_run / p) for p in images["path"]]
    index = tmp_path / "images.parquet"
    images[images["is_difference"]].to_parquet(index)
    log = logging.getLogger("test")
    cands = detect_stage(index, tmp_path / "candidates.parquet", source="detect", thresh_sigma=3.0,
                         match_radius_arcsec=1.5, log=log)
    assert len(cands) == 0 and {"ra", "dec", "flux_r_nmgy"} <= set(cands.columns)
    plan = plan_regions_stage(tmp_path / "candidates.parquet", tmp_path / "regions.parquet", tmp_path / "plan.json",
                              max_sources_per_region=64, log=log)
    assert plan["n_regions"] == 1
    region = fit_region_stage(tmp_path / "regions.parquet", index, 0, tmp_path / "region_0.parquet", margin_arcsec=15.0,
                              patch_px=15, tol=1e-5, max_iter=50, max_images=None, log=log)
    assert len(region) == 0 and {"ra", "dec", "p_star"} <= set(region.columns)
    cat = merge_catalog_stage([tmp_path / "region_0.parquet"], tmp_path / "catalog.parquet", tmp_path / "catalog.fits",
                              tmp_path / "catalog.png", log=log)
    assert len(cat) == 0 and (tmp_path / "catalog.fits").exists()
    star_mask_stage(tmp_path / "catalog.parquet", tmp_path / "stars.parquet", mag_limit=16.0, log=log)
    assert len(pd.read_parquet(tmp_path / "stars.parquet")) == 0


def test_a_chunk_range_without_orbits_gives_empty_partials(tiny_run, tmp_path):
    """A chunk range that holds no orbit of the plan writes an empty table with its columns
    (pandas' "No objects to concatenate" before)."""
    import json
    import logging

    from skystack.search.stage import shard_stage

    res = tiny_run / "results" / "tiny"
    plan = json.loads((res / "search" / "plan.json").read_text())
    images = pd.read_parquet(res / "images.parquet")
    images["path"] = [str(tiny_run / p) for p in images["path"]]
    index = tmp_path / "images.parquet"
    images.to_parquet(index)
    out = tmp_path / "partials.parquet"
    beyond = 10 ** 6  # far past the plan's last range
    shard_stage(index, tiny_run / "cache" / "tiny" / "partition_0.tiles", res / "search" / "orbits_listed.parquet",
                res / "search" / "plan.json", beyond, 0, out, image_kind="difference", smoothing_sigma_px=0.0,
                max_batch_mb=64, staging_dir=None, log=logging.getLogger("test"))
    partials = pd.read_parquet(out)
    assert partials.empty and list(partials.columns) == PARTIAL_COLUMNS
    assert plan["n_total"] > 0
