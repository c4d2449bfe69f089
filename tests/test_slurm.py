"""Slurm: a local one-node cluster, a plain sbatch job, and a small workflow through the slurm executor.

Needs root and apt-get (to install Debian's Slurm and munge when missing);
elsewhere these tests skip and say why.
"""
import filecmp
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from slurm_cluster import (  # noqa: F401  (slurm_cluster is a fixture)
    FAST_POLLING,
    REPO,
    SNAKEMAKE,
    derive_profile,
    run_snakemake_on_slurm,
    slurm_cluster,
)

pytestmark = pytest.mark.slurm

GPU_RULES = {"fit_region", "deconvolve_shard", "search_shard"}

# Three stages with a fan-out; rule names borrowed from skystack so that the
# repository profile's set-resources (with gpu: 1 for search_shard) apply.
SNAKEFILE = textwrap.dedent('''\
    SHARDS = [1, 2, 3]

    rule all:
        input:
            "results/merged.txt",

    rule index_survey:
        output:
            "results/seed.txt",
        log:
            "logs/index_survey.log",
        threads: 2
        resources:
            mem_mb=200,
            runtime=5,
        shell:
            "(seq 1 10 > {output}) 2> {log}; echo indexed >> {log}"

    rule search_shard:
        input:
            "results/seed.txt",
        output:
            "results/shard_{shard}.txt",
        log:
            "logs/search_shard_{shard}.log",
        threads: 1
        resources:
            mem_mb=300,
            runtime=5,
        shell:
            "(awk -v s={wildcards.shard} '{{print $1 * s, $1 + s}}' {input} > {output}) 2> {log}; "
            "echo shard {wildcards.shard} on $(hostname) >> {log}"

    rule merge_detections:
        input:
            expand("results/shard_{shard}.txt", shard=SHARDS),
        output:
            "results/merged.txt",
        log:
            "logs/merge_detections.log",
        threads: 1
        resources:
            mem_mb=200,
            runtime=5,
        shell:
            "(cat {input} | sort -n > {output}) 2> {log}"
''')


def test_profile_is_complete():
    """profiles/slurm: slurm executor, squeue status, logs/slurm, no site settings, GPUs where JAX gains."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"
    assert profile["slurm-logdir"] == "logs/slurm"
    assert profile["rerun-incomplete"] is True
    defaults = profile["default-resources"]
    assert {"mem_mb", "runtime"} <= set(defaults)
    assert not {"slurm_partition", "slurm_account"} & set(defaults)
    rules = profile["set-resources"]
    expected = {"simulate_survey", "index_survey", "build_tile_cache", "detect", "fit_region", "merge_catalog",
                "extract_stamps", "deconvolve_shard", "merge_deconvolved", "search_shard", "combine_chunk",
                "merge_detections", "report"}
    assert expected <= set(rules)
    assert {r for r, res in rules.items() if res.get("gpu")} == GPU_RULES


def test_sbatch_wrap_completes(slurm_cluster, tmp_path):
    """The smallest check: sbatch --wrap runs on the node and finishes COMPLETED."""
    job = slurm_cluster.sbatch("--wrap", "echo hello from $SLURM_JOB_ID > hello.txt", "-D", str(tmp_path),
                               "-o", str(tmp_path / "slurm-%j.out"), "-t", "1", "--mem", "100")
    assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED"
    assert (tmp_path / "hello.txt").read_text().strip() == f"hello from {job}"


def test_gpu_request_rejected_without_gres(slurm_cluster, tmp_path):
    """Why the test profile drops gpu: the local node has no GPU GRES, so sbatch refuses --gpus."""
    with pytest.raises(RuntimeError, match="sbatch"):
        slurm_cluster.sbatch("--gpus=1", "--wrap", "true", "-D", str(tmp_path), "-o", "/dev/null")


def _outputs(workdir: Path) -> list[str]:
    return sorted(str(p.relative_to(workdir)) for p in (workdir / "results").rglob("*") if p.is_file())


def test_workflow_on_slurm_matches_local(slurm_cluster, tmp_path):
    """A fan-out workflow through `--executor slurm` (via the repository's profile) equals a local run."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(SNAKEFILE)
    profile = derive_profile(REPO / "profiles" / "slurm", tmp_path / "profile",
                             updates={**FAST_POLLING, "latency-wait": 5}, cluster=slurm_cluster)
    derived = yaml.safe_load((profile / "config.yaml").read_text())
    assert not any("gpu" in res for res in derived["set-resources"].values())

    slurm_dir, local_dir = tmp_path / "on_slurm", tmp_path / "local"
    slurm_dir.mkdir()
    local_dir.mkdir()
    proc = run_snakemake_on_slurm(slurm_dir, snakefile, profile, timeout=600)
    log = proc.stdout + proc.stderr
    assert "submitted with SLURM jobid" in log
    assert "Falling back to 'sacct'" not in log

    local = subprocess.run([SNAKEMAKE, "-s", str(snakefile), "--directory", str(local_dir), "--cores", "2",
                            "--workflow-profile", "none"], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-4000:]

    files = _outputs(local_dir)
    assert files == ["results/merged.txt", "results/seed.txt", "results/shard_1.txt", "results/shard_2.txt",
                     "results/shard_3.txt"]
    assert _outputs(slurm_dir) == files
    match, mismatch, errors = filecmp.cmpfiles(local_dir, slurm_dir, files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)

    # every job wrote its rule log, and Slurm's own per-job logs went to logs/slurm/
    for name in ("index_survey", "search_shard_1", "search_shard_2", "search_shard_3", "merge_detections"):
        assert (slurm_dir / "logs" / f"{name}.log").exists(), name
    assert "shard 2 on" in (slurm_dir / "logs" / "search_shard_2.log").read_text()
    slurm_logs = list((slurm_dir / "logs" / "slurm").rglob("*.log"))
    assert {p.relative_to(slurm_dir / "logs" / "slurm").parts[0] for p in slurm_logs} == {
        "rule_index_survey", "rule_search_shard", "rule_merge_detections"}
