"""skystack as a user installs it: a non-editable install runs the workflow from another
working directory, and importing the library changes no global state."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SNAKEMAKE, TINY


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install .`` (not editable) into a folder of its own; dependencies from this venv."""
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("source")
    # Built from a copy: pip builds in the source tree, and the clone must stay clean.
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, text=True, timeout=600)
    return target


def _python(code, pythonpath, cwd):
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_installed_package_carries_its_config_schema(installed, tmp_path):
    code = ("import skystack.core.config as c; assert str(c.SCHEMA_PATH).startswith(%r), c.SCHEMA_PATH; "
            "cfg = c.load_config(%r); print(cfg['search']['snr_threshold'])") % (str(installed), str(TINY))
    proc = _python(code, installed, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip()) > 0


def test_import_changes_no_global_state(installed, tmp_path):
    code = ("import jax; import skystack.search.stage, skystack.catalog.stage, skystack.deconvolve.stage; "
            "assert not jax.config.jax_enable_x64, 'x64 switched on by an import'; "
            "assert not jax.config.jax_compilation_cache_dir, 'compilation cache set by an import'; "
            "from skystack.core.runtime import configure; configure(); assert jax.config.jax_enable_x64")
    proc = _python(code, installed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.workflow
def test_workflow_runs_on_the_installed_package_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed)}
    cmd = [SNAKEMAKE, "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "2", "--profile", str(REPO / "profiles" / "default"),
           "results/tiny/images.parquet", "--configfile", str(TINY)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (elsewhere / "results" / "tiny" / "images.parquet").exists()
    where = _python("import skystack; print(skystack.__file__)", installed, elsewhere).stdout
    assert where.startswith(str(installed))
