"""A user's own config on a hostile machine: nothing of the demo merged under it, the orbit
file's ids kept, work bounded before the DAG is built, bad links in survey.paths named, and
temporary files of killed jobs cleaned up by the next run."""
import json
import logging
import os
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, SNAKEMAKE, TINY, run_snakemake

from skystack.core.config import load_config
from skystack.core.io import write_parquet
from skystack.orbits.plan import chunk_range_ids, orbits_for_ids, plan_orbits
from skystack.orbits.stage import plan_stage
from skystack.search.stage import combine_stage, merge_stage, shard_stage
from skystack.survey.cache import TileCache, write_tile_cache
from skystack.survey.stage import index_stage

KNOWN = REPO / "resources" / "known_objects.csv"
LOG = logging.getLogger("test_user_config")
ELEMENTS = "a_au,e,inc_deg,node_deg,argperi_deg,mean_anomaly_deg,epoch_jd_tdb"


def orbit_file(path, rows=((1001, "alpha", 44.0), (5, "beta", 45.5), (77, "gamma", 40.0))):
    lines = [f"orbit_id,name,{ELEMENTS}"] + [f"{i},{n},{a},0.1,2.0,100.0,200.0,300.0,2451545.0" for i, n, a in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def user_config(tmp_path, **extra):
    """A user's experiment: their FITS files (empty ones do for a dry run) and their orbit file."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("a.fits", "b.fits"):
        (data / name).touch()
    config = {"experiment": "mine", "survey": {"source": "files", "paths": [str(data / "*.fits")]},
              "orbits": {"source": "file", "path": str(orbit_file(tmp_path / "orbits.csv"))}, **extra}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake_in(cwd, *args, timeout=300):
    """Snakemake as a user runs it: in ``cwd``, with no --directory."""
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "1", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    return proc, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- 1. no demo merged
def test_user_experiment_from_the_repository_gets_no_demo_settings(tmp_path):
    """From the repository root (where config/config.yaml used to be merged under every
    --configfile): the user's results, no simulated survey, no truth."""
    proc, out = snakemake_in(REPO, "--dry-run", "--configfile", user_config(tmp_path))
    assert proc.returncode == 0, out[-3000:]
    assert "results/mine/detections.parquet" in out and "results/demo" not in out
    assert "simulate_survey" not in out and "survey/orbits.parquet" not in out


def test_user_orbit_file_is_searched_alone(tmp_path):
    """The plan of a file of 3 orbits: 3 listed orbits, no random ones (n_random defaults to 0
    for every source but random), one chunk. A stale temporary file of the plan is removed."""
    stale = tmp_path / "results" / "mine" / "search" / ".plan.json.k1ll3d_0.tmp.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{")
    run_snakemake(tmp_path, "results/mine/search/plan.json", configfile=user_config(tmp_path))
    plan = json.loads((tmp_path / "results" / "mine" / "search" / "plan.json").read_text())
    assert (plan["n_listed"], plan["n_random"], plan["n_chunk_ranges"]) == (3, 0, 1)
    assert not stale.exists()


def test_no_configfile_runs_the_demo(tmp_path):
    proc, out = snakemake_in(tmp_path, "--dry-run")
    assert proc.returncode == 0, out[-3000:]
    assert "results/demo/detections.parquet" in out and "simulate_survey" in out


# ----------------------------------------------------------------------------- 2. the user's orbit ids
def orbit_settings(**changes):
    """The orbits section of a user's config (schema defaults) for an orbit file."""
    return {**load_config(TINY)["orbits"], "source": "file", "include_truth": False, **changes}


def test_plan_keeps_the_orbit_files_ids(tmp_path):
    cfg = orbit_settings(n_random=4, chunk_size=2, chunks_per_job=1)
    listed, plan = plan_orbits(cfg, 7, KNOWN, file_path=orbit_file(tmp_path / "o.csv"))
    assert listed["orbit_id"].tolist() == [1001, 5, 77] and listed["name"].tolist() == ["alpha", "beta", "gamma"]
    ids = np.concatenate([chunk_range_ids(plan, c, listed) for c in range(plan["n_chunk_ranges"])])
    assert ids.tolist() == [1001, 5, 77, 1002, 1003, 1004, 1005]  # random orbits follow the largest id
    got = orbits_for_ids(plan, listed, [77, 1003, 1001])
    assert got["orbit_id"].tolist() == [77, 1001, 1003] and got["a_au"].tolist()[:2] == [40.0, 44.0]


def test_orbit_file_ids_that_clash_with_the_truth_are_refused(tmp_path):
    truth = pd.read_csv(orbit_file(tmp_path / "t.csv", rows=((0, "inj A", 41.0), (1, "inj B", 42.0))))
    truth.to_parquet(tmp_path / "truth.parquet")
    with pytest.raises(ValueError, match=r"o.csv: orbit_id 1 is also the id of a simulated \(truth\) orbit"):
        plan_orbits(orbit_settings(include_truth=True), 7, KNOWN, truth_path=tmp_path / "truth.parquet",
                    file_path=orbit_file(tmp_path / "o.csv", rows=((1, "mine", 44.0),)))
    with pytest.raises(ValueError, match=r"n.csv: row 0: orbit_id -3 is negative"):
        plan_orbits(orbit_settings(), 7, KNOWN, file_path=orbit_file(tmp_path / "n.csv", rows=((-3, "x", 44.0),)))


@pytest.fixture(scope="module")
def tiny_images(tiny_run, tmp_path_factory):
    """The tiny run's index with absolute paths, its caches, and its simulated orbits."""
    res = tiny_run / "results" / "tiny"
    images = pd.read_parquet(res / "images.parquet")
    images["path"] = [str(tiny_run / p) for p in images["path"]]
    path = tmp_path_factory.mktemp("tiny_index") / "images.parquet"
    images.to_parquet(path)
    caches = [tiny_run / "cache" / "tiny" / f"partition_{p}.tiles" for p in range(2)]
    return path, caches, pd.read_parquet(res / "survey" / "orbits.parquet")


def test_detections_keep_the_orbit_files_ids_and_names(tiny_images, tmp_path):
    """The simulated orbits as a user's file with their own ids: every stage keeps them."""
    images, caches, truth = tiny_images
    user_ids = [1001, 5, 77][: len(truth)]
    mine = truth.iloc[: len(user_ids)].assign(orbit_id=user_ids, name=[f"obj-{i}" for i in user_ids])
    mine[["orbit_id", "name", *ELEMENTS.split(",")]].to_csv(tmp_path / "mine.csv", index=False)
    cfg = orbit_settings(n_random=0, chunk_size=10, chunks_per_job=1)
    listed, plan = tmp_path / "listed.parquet", tmp_path / "plan.json"
    plan_stage(cfg, 1, KNOWN, listed, plan, file_path=tmp_path / "mine.csv", log=LOG)
    partials = [tmp_path / f"p{p}.parquet" for p in range(2)]
    for p in range(2):
        shard_stage(images, caches[p], listed, plan, 0, p, partials[p], image_kind="difference", smoothing_sigma_px=0.0,
                    max_batch_mb=64, staging_dir=None, log=LOG)
    assert set(pd.concat(map(pd.read_parquet, partials))["orbit_id"]) <= set(user_ids)
    combined = tmp_path / "chunk0.parquet"
    combine_stage(partials, images, None, combined, tmp_path / "chunk0_candidates.parquet", sigma_g_clip=3.0,
                  snr_threshold=7.0, min_images=5, star_mask_radius_arcsec=4.0, log=LOG)
    det = merge_stage([combined], images, listed, plan, caches, detections_out=tmp_path / "det.parquet",
                      ecsv_out=tmp_path / "det.ecsv", light_curves_out=tmp_path / "lc.ecsv",
                      all_orbits_out=tmp_path / "all.parquet", plots_dir=tmp_path / "plots", snr_threshold=7.0,
                      min_images=5, log=LOG)
    assert len(det) >= 1 and set(det["orbit_id"]) <= set(user_ids)
    assert (det["name"] == det["orbit_id"].map(lambda i: f"obj-{i}")).all()
    by_id = mine.set_index("orbit_id")
    np.testing.assert_allclose(det["a_au"], by_id.loc[det["orbit_id"], "a_au"], rtol=1e-15)
    lc = pd.read_csv(tmp_path / "lc.ecsv", comment="#", sep=" ")
    assert set(lc["orbit_id"]) == set(det["orbit_id"])
    assert {f"orbit_{i}.png" for i in det["orbit_id"]} <= {p.name for p in (tmp_path / "plots").iterdir()}


# ----------------------------------------------------------------------------- 3. bounded work
@pytest.mark.parametrize("settings, message", [
    ({"orbits": {"n_random": 1_000_000_000, "chunk_size": 100, "chunks_per_job": 2}},
     r"at least 15,000,0\d\d jobs .*5,000,00\d orbit chunk ranges.*orbits.chunk_size.*orbits.chunks_per_job.*max_jobs"),
    ({"partitions": 10000, "orbits": {"n_random": 300, "chunk_size": 100, "chunks_per_job": 2}},
     r"at least 30,0\d\d jobs .*10000 partitions.*fewer partitions.*max_jobs"),
])
def test_too_many_jobs_are_refused_before_the_dag(tmp_path, settings, message):
    overlay = tmp_path / "big.yaml"
    overlay.write_text(yaml.safe_dump(settings))
    start = time.perf_counter()
    proc = run_snakemake(tmp_path, "--dry-run", configfile=[TINY, overlay], check=False, timeout=120)
    elapsed = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and __import__("re").search(message, out), out[-3000:]
    assert elapsed < 30, elapsed  # the refusal itself takes milliseconds; the rest is Snakemake's start-up
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("max_jobs, refused", [(1000, True), (2000, False)])
def test_max_jobs_is_the_bound(tmp_path, max_jobs, refused):
    """100000 random orbits in chunks of 100, 2 per job, 2 partitions: 500 chunk ranges, 1500
    search jobs."""
    overlay = tmp_path / "big.yaml"
    overlay.write_text(yaml.safe_dump({"orbits": {"n_random": 100000, "chunk_size": 100, "chunks_per_job": 2},
                                       "max_jobs": max_jobs}))
    proc = run_snakemake(tmp_path, "--dry-run", "--quiet", configfile=[TINY, overlay], check=False, timeout=300)
    assert (proc.returncode != 0) == refused, (proc.stdout + proc.stderr)[-3000:]
    assert ("more than max_jobs: 1000" in proc.stdout + proc.stderr) == refused


def test_more_partitions_than_images_are_refused_at_the_index(tiny_images, tmp_path):
    index = pd.read_parquet(tiny_images[0])
    paths = index[index["is_difference"]]["path"].tolist()[:3]
    with pytest.raises(ValueError, match=r"partitions: 4 is more than the 3 indexed images"):
        index_stage(paths, tmp_path / "images.parquet", tmp_path / "rejected.parquet", site=None,
                    on_bad_image="error", n_partitions=4, log=LOG)
    assert not (tmp_path / "images.parquet").exists()


# ----------------------------------------------------------------------------- 4. bad links
def bad_links(data):
    data.mkdir(exist_ok=True)
    os.symlink(data / "gone.fits.fz", data / "dangling.fits.fz")
    os.symlink(data / "loop_b.fits.fz", data / "loop_a.fits.fz")
    os.symlink(data / "loop_a.fits.fz", data / "loop_b.fits.fz")


def test_bad_links_in_survey_paths_are_named(tmp_path):
    bad_links(tmp_path / "data")
    overlay = tmp_path / "files.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": "files", "survey": {
        "source": "files", "paths": [str(tmp_path / "data" / "*.fits.fz")]}}))
    proc = run_snakemake(tmp_path, "--dry-run", configfile=[TINY, overlay], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "dangling.fits.fz: dangling symbolic link" in out and "loop_a.fits.fz: symbolic link loop" in out, out[-3000:]
    assert "concurrent process" not in out and "MissingInputException" not in out


def test_bad_links_are_rejected_images_under_skip(tiny_images, tmp_path):
    data = tmp_path / "data"
    bad_links(data)
    index = pd.read_parquet(tiny_images[0])
    for p in index[index["is_difference"]]["path"].tolist()[:2]:
        os.symlink(p, data / os.path.basename(p))
    overlay = tmp_path / "files.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": "files", "partitions": 1, "survey": {
        "source": "files", "paths": [str(data / "*.fits.fz")], "on_bad_image": "skip"}}))
    run_snakemake(tmp_path, "results/files/images.parquet", configfile=[TINY, overlay])
    assert len(pd.read_parquet(tmp_path / "results" / "files" / "images.parquet")) == 2
    rejected = pd.read_parquet(tmp_path / "results" / "files" / "rejected_images.parquet")
    reasons = dict(zip(rejected["path"].map(os.path.basename), rejected["reason"]))
    assert set(reasons) == {"dangling.fits.fz", "loop_a.fits.fz", "loop_b.fits.fz"}
    assert reasons["dangling.fits.fz"].startswith("dangling symbolic link")
    assert reasons["loop_a.fits.fz"].startswith("symbolic link loop")


# ----------------------------------------------------------------------------- 5. temporary files
def test_stale_temporary_files_of_an_output_are_removed(tmp_path):
    out = tmp_path / "partition_0.tiles"
    stale = [tmp_path / ".partition_0.tiles.a1b2c3d4.tmp.tiles", tmp_path / ".partition_0.tiles.a1b2c3d4.tmp.tiles.body"]
    other = [tmp_path / ".partition_01.tiles.a1b2c3d4.tmp.tiles.body", tmp_path / "partition_0.tiles.notes"]
    for p in stale + other:
        p.write_bytes(b"x" * 10)
    write_tile_cache(out, iter([(0, np.zeros((8, 8)))]), tile=4)
    assert TileCache.open(out).image(0).shape == (8, 8)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in other)
    (tmp_path / ".t.parquet.zz_99_zz.tmp.parquet").mkdir()  # a temporary directory too
    write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "t.parquet")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".t.")) == []
