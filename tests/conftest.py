"""Shared test fixtures: the repository paths and a runner for the workflow."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
def _shared_data() -> Path:
    """The shared real test data: $SKYSTACK_SHARED_DATA, else ../shared/data beside the clone."""
    for candidate in (os.environ.get("SKYSTACK_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data()


def needs_shared(*relative_paths):
    """Skip unless the shared real data holds every path: one reason, the same everywhere."""
    missing = [p for p in relative_paths if not (SHARED_DATA / p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"needs the shared real data ({', '.join(missing)} not under "
                              f"{SHARED_DATA}; set SKYSTACK_SHARED_DATA or put shared/ beside the clone)")
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TINY = REPO / "config" / "experiments" / "tiny.yaml"

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from skystack.core.runtime import configure  # noqa: E402

configure()  # the library changes no global state on import: tests set JAX up like every entry point


def run_snakemake(workdir, *args, configfile=None, cores=2, check=True, env=None, timeout=900):
    """Run the workflow in ``workdir`` (results, cache, logs and .snakemake all go there).

    ``configfile``: one path or a list (later files override earlier ones, key by key); it
    goes last on the command line, since ``--configfile`` takes every word after it.
    """
    configs = configfile if isinstance(configfile, (list, tuple)) else [configfile or TINY]
    cmd = [SNAKEMAKE, "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir), "--cores", str(cores),
           "--profile", str(REPO / "profiles" / "default"), *map(str, args), "--configfile", *map(str, configs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups from the markers
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs two workers, ``--dist loadgroup``) the tests that
    bring up the local Slurm cluster (one cluster on the machine) and those that share the
    session's tiny run go to one worker, so that the tiny run is made once, and the Slurm run
    is compared with that one; the other worker takes the rest as it frees up."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"slurm_cluster", "tiny_run"}:
            item.add_marker(pytest.mark.xdist_group("workflow_runs"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole workflow on the tiny survey, run once per test session."""
    workdir = tmp_path_factory.mktemp("tiny")
    run_snakemake(workdir)
    return workdir


def read_table(path):
    """A result table as a DataFrame, rows in a canonical order."""
    import pandas as pd

    df = pd.read_parquet(path)
    keys = [c for c in ("orbit_id", "image_id", "source_id", "region", "ra", "dec") if c in df.columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True) if keys else df


def assert_same_table(path_a, path_b, rtol=0.0):
    """Same columns and rows; floats equal to ``rtol`` (0: exactly)."""
    import numpy as np
    import pandas as pd

    a, b = read_table(path_a), read_table(path_b)
    assert list(a.columns) == list(b.columns), (path_a, path_b)
    assert len(a) == len(b), f"{path_a}: {len(a)} rows, {path_b}: {len(b)} rows"
    for col in a.columns:
        if pd.api.types.is_float_dtype(a[col]):
            np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=rtol, atol=0, equal_nan=True,
                                       err_msg=f"{path_a}: column {col}")
        elif a[col].dtype == object:  # may hold arrays (e.g. footprint corners)
            assert all(np.array_equal(u, v) for u, v in zip(a[col], b[col])), f"{path_a}: column {col}"
        else:
            assert a[col].tolist() == b[col].tolist(), f"{path_a}: column {col}"
