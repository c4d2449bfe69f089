"""Results do not depend on how the work is cut; a killed run resumes; reruns are minimal."""
import re
import signal
import subprocess
import time

import pandas as pd
import yaml
from conftest import REPO, SNAKEMAKE, TINY, assert_same_table, run_snakemake

SEARCH_TABLES = ["detections.parquet", "search/all_orbits.parquet"]


def overlay(tmp_path, name, settings):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return [TINY, path]


def _cut_config(tmp_path, partitions, chunk_size, chunks_per_job, with_catalog):
    orbits = {"chunk_size": chunk_size, "chunks_per_job": chunks_per_job}
    return overlay(tmp_path, "cut", {"partitions": partitions, "orbits": orbits,
                                     "search": {"staging_dir": str(tmp_path / "node_local")},
                                     "catalog": {"enabled": with_catalog}, "deconvolve": {"enabled": False}})


def _assert_same_as_reference(tiny_run, tmp_path, partitions, with_catalog):
    """Same results as the reference run (2 partitions, chunks of 6000 trial orbits, 2 cores)."""
    staging = tmp_path / "node_local"
    # Each search job staged its partition's cache once to the node-local directory, named by its content.
    staged = sorted(p.name for p in staging.iterdir())
    assert [re.sub(r"-[0-9a-f]{32}\.tiles$", "", n) for n in staged] == [f"partition_{p}" for p in range(partitions)]
    assert "staged to" in (tmp_path / "logs" / "tiny" / "search_shard_0_0.log").read_text()
    ref, got = tiny_run / "results" / "tiny", tmp_path / "results" / "tiny"
    assert pd.read_parquet(got / "images.parquet")["partition"].nunique() == partitions
    for table in SEARCH_TABLES:
        assert_same_table(ref / table, got / table, rtol=1e-9)
    if with_catalog:
        assert_same_table(ref / "catalog.parquet", got / "catalog.parquet", rtol=1e-9)
    assert len(pd.read_parquet(got / "detections.parquet")) >= 3


def _dry_run_rules(workdir, *args, configfile=None) -> set[str]:
    """The rules a dry run would execute (from its job-stats table)."""
    out = run_snakemake(workdir, "--dry-run", "--quiet", "rules", *args, configfile=configfile).stdout
    rules = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            rules.add(parts[0])
    return rules


def test_changed_threshold_reruns_the_combination_not_the_partial_sums(tiny_run, tmp_path):
    config = overlay(tmp_path, "threshold", {"search": {"snr_threshold": 6.5}})
    rules = _dry_run_rules(tiny_run, configfile=config)
    assert {"combine_chunk", "merge_detections", "search_report"} <= rules
    # The partial sums do not depend on the threshold: the most expensive jobs stay.
    assert not rules & {"simulate_survey", "index_survey", "build_tile_cache", "detect_sources", "fit_region",
                        "plan_orbits", "search_shard", "star_mask"}


def test_forcerun_combine_chunk_reruns_only_downstream(tiny_run):
    rules = _dry_run_rules(tiny_run, "--forcerun", "combine_chunk")
    assert rules - {"all"} == {"combine_chunk", "merge_detections", "search_report"}


def test_killed_run_resumes_and_recomputes_only_unfinished_work(tiny_run, tmp_path):
    """Cut differently from the reference (4 partitions, chunks of 12000, one per job, with the
    catalog), killed at its first partial sums, resumed on one core (the search's and the
    catalog's jobs then run single-threaded): nothing finished is redone, and the results are
    the reference's (2 partitions, chunks of 6000 in jobs of 2, 2 cores)."""
    config = _cut_config(tmp_path, 4, 12000, 1, with_catalog=True)
    cmd = [SNAKEMAKE, "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(tmp_path), "--cores", "2",
           "--profile", str(REPO / "profiles" / "default"), "--configfile", *map(str, config)]
    partials = tmp_path / "results" / "tiny" / "search" / "partials"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not list(partials.glob("*.parquet")):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*") if p.is_file()}
    assert not [p for p in finished if ".tmp" in p.name], "a temporary file was left behind"
    assert not (tmp_path / "results" / "tiny" / "detections.parquet").exists()
    for path in finished:
        if path.suffix == ".parquet":
            pd.read_parquet(path)  # every file that exists is whole

    run_snakemake(tmp_path, configfile=config, cores=1)
    recomputed = [p for p, t in finished.items() if p.stat().st_mtime_ns != t]
    assert not recomputed, f"finished outputs were recomputed: {recomputed}"
    _assert_same_as_reference(tiny_run, tmp_path, partitions=4, with_catalog=True)
