"""Shared test fixtures: the repository paths and a runner for the workflow."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run_snakemake(workdir, *args, configfile=None, cores=2, check=True, env=None, timeout=900):
    """Run the workflow in ``workdir`` (results, cache, logs and .snakemake all go there)."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", str(cores),
           "--profile", str(REPO / "profiles" / "default"),
           "--configfile", str(configfile or REPO / "config" / "experiments" / "tiny.yaml"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole workflow on the tiny survey, run once per test session."""
    workdir = tmp_path_factory.mktemp("tiny")
    run_snakemake(workdir)
    return workdir
