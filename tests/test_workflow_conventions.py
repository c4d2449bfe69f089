"""The conventions of a published Snakemake workflow: snakefmt and ``snakemake --lint`` are clean, a
changed setting reruns only the jobs that use it, the GPU rules get the CUDA conda environment
where the profile gives them a GPU, and the workflow runs as a module of another workflow."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SNAKEMAKE, TINY, assert_same_table, run_snakemake

SNAKEFMT = str(Path(sys.executable).with_name("snakefmt"))
TRIGGERS = ["mtime", "params", "input", "software-env", "code"]  # Snakemake's rerun triggers, all of them
GPU_RULES = {"search_shard", "fit_region", "deconvolve_shard"}
CPU_ENV, CUDA_ENV = REPO / "envs" / "cpu.yaml", REPO / "envs" / "cuda.yaml"


def _run(cmd, cwd=None, env=None, timeout=900):
    proc = subprocess.run(list(map(str, cmd)), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})
    return proc, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- formatting and lint
def test_snakefmt_check_passes():
    proc, out = _run([SNAKEFMT, "--check", "--diff", "workflow/Snakefile", "workflow/rules"], cwd=REPO, timeout=120)
    assert proc.returncode == 0, f"snakefmt --check found unformatted files:\n{out[-6000:]}"


@pytest.mark.parametrize("variant", ["default", "slurm profile", "without skystack importable"])
def test_snakemake_lint_passes(variant):
    """``snakemake --lint`` as ``make lint`` runs it (in the repository, with no --configfile: the demo). Under
    the Slurm profile too, whose set-resources are read when the rules are parsed. And as the
    workflow catalog runs it, in an environment with Snakemake but not skystack."""
    if variant == "without skystack importable":
        code = "import sys; sys.modules['skystack'] = None; from snakemake.cli import main; main(['--lint'])"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [SNAKEMAKE, "--lint", *(["--profile", "profiles/slurm"] if variant == "slurm profile" else [])]
    proc, out = _run(cmd, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "Lints for" not in out, f"snakemake --lint ({variant}) failed:\n{out[-6000:]}"


# ----------------------------------------------------------------------------- minimal reruns
def _would_rerun(workdir, overlay: dict | None, tmp_path):
    """What Snakemake's rerun triggers would run after ``overlay`` is merged onto tiny.yaml: the set of
    rules in the dry run's job table, the rules triggered by changed params, and the output."""
    configs = [TINY]
    if overlay is not None:
        configs.append(tmp_path / "overlay.yaml")
        configs[-1].write_text(yaml.safe_dump(overlay))
    proc = run_snakemake(workdir, "--dry-run", "--quiet", "rules", "--rerun-triggers", *TRIGGERS, configfile=configs)
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    rules = set()
    for line in lines[: next((i for i, s in enumerate(lines) if s.strip() == "Reasons:"), len(lines))]:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total"):
            rules.add(parts[0])
    by_params = set()
    for i, line in enumerate(lines[:-1]):
        if line.strip() == "params have changed since last execution:":
            by_params = {r.strip() for r in lines[i + 1].split(",")}
    return rules - {"all"}, by_params, out


@pytest.fixture(scope="module")
def settled_tiny(tiny_run, tmp_path_factory):
    """The session's tiny run, checked to be up to date under every trigger."""
    rules, _, out = _would_rerun(tiny_run, None, tmp_path_factory.mktemp("unchanged"))
    assert not rules and "Nothing to be done" in out, f"the finished tiny run is not up to date:\n{out[-4000:]}"
    return tiny_run


@pytest.mark.workflow
def test_changed_snr_threshold_reruns_the_combination_not_the_search(settled_tiny, tmp_path):
    rules, by_params, out = _would_rerun(settled_tiny, {"search": {"snr_threshold": 6.0}}, tmp_path)
    assert "search_shard" not in rules, out[-4000:]
    assert rules == {"combine_chunk", "merge_detections", "search_report"}, out[-4000:]
    assert "combine_chunk" in by_params, out[-4000:]


@pytest.mark.workflow
@pytest.mark.parametrize("setting", [{"tol": 2.0e-5}, {"max_iter": 20}], ids=["tol", "max_iter"])
def test_changed_catalog_fit_setting_reruns_the_fit_not_the_search(settled_tiny, tmp_path, setting):
    rules, by_params, out = _would_rerun(settled_tiny, {"catalog": setting}, tmp_path)
    assert "fit_region" in rules and "fit_region" in by_params, out[-4000:]
    assert not rules & {"search_shard", "deconvolve_shard", "extract_stamps", "detect_sources", "plan_regions",
                        "build_tile_cache", "plan_orbits"}, out[-4000:]
    # what may follow: the merged catalog, its star mask and the combination that uses it
    assert rules <= {"fit_region", "merge_catalog", "star_mask", "combine_chunk", "merge_detections",
                     "search_report"}, out[-4000:]


# ----------------------------------------------------------------------------- conda env per job
# Runs snakemake's own command line, and prints the conda environment file of every job of the
# DAG Snakemake built, at the point where it deploys the environments (in a dry run it only says
# what it would create).
JOB_ENV_DRIVER = '''
import sys
from snakemake import cli
from snakemake.dag import DAG

_create_conda_envs = DAG.create_conda_envs


def create_conda_envs(self, *args, **kwargs):
    for job in self.jobs:
        spec = job.conda_env_spec
        path = spec.file.get_path_or_uri(secret_free=True) if spec is not None else "-"
        print("JOB-CONDA-ENV", job.rule.name, path, sep="\\t", flush=True)
    return _create_conda_envs(self, *args, **kwargs)


DAG.create_conda_envs = create_conda_envs
sys.exit(cli.main(sys.argv[1:]))
'''

# Stands in for conda (not installed here): answers the checks Snakemake makes before deploying,
# logs every call, and refuses everything else, so no environment can be created.
FAKE_CONDA = '''#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CONDA_LOG"], "a") as fh:
    fh.write(" ".join(args) + "\\n")
if args == ["info", "--json"]:
    print(json.dumps({{"conda_prefix": os.environ["FAKE_CONDA_PREFIX"], "platform": "linux-64"}}))
elif args == ["--version"]:
    print("conda 25.1.0")
elif args[:2] == ["config", "--get"]:
    print(json.dumps({{"get": {{"channel_priority": "strict"}}}}))
else:
    sys.exit("fake conda: refusing " + " ".join(args))
'''


def job_conda_envs(tmp_path, snakefile, workdir, *args, configfile=TINY):
    """{rule: set of conda env files} of a ``--sdm conda --dry-run`` (no conda env is created)."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir(exist_ok=True)
    conda = bin_dir / "conda"
    conda.write_text(FAKE_CONDA.format(python=sys.executable))
    conda.chmod(0o755)
    driver = tmp_path / "job_env_driver.py"
    driver.write_text(JOB_ENV_DRIVER)
    log = tmp_path / "conda_calls.log"
    cmd = [sys.executable, driver, "-s", snakefile, "--directory", workdir, "--sdm", "conda",
           "--conda-prefix", tmp_path / "conda_envs", "--dry-run", *args, "--configfile", configfile]
    proc, out = _run(cmd, timeout=300, env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                                            "FAKE_CONDA_LOG": str(log), "FAKE_CONDA_PREFIX": str(tmp_path)})
    assert proc.returncode == 0, f"the dry run failed:\n{out[-6000:]}"
    calls = log.read_text().splitlines() if log.exists() else []
    assert not [c for c in calls if "create" in c or "install" in c], calls  # nothing deployed
    envs = {}
    for line in out.splitlines():
        if line.startswith("JOB-CONDA-ENV\t"):
            _, rule, path = line.split("\t")
            envs.setdefault(rule, set()).add(os.path.normpath(path) if path != "-" else None)
    assert envs, f"no job listed:\n{out[-4000:]}"
    return envs, out


@pytest.mark.workflow
@pytest.mark.parametrize("profile, extra, gpu_rules", [
    ("slurm", [], GPU_RULES),  # profiles/slurm: set-resources gpu: 1 for the three JAX rules
    ("default", ["--set-resources", "search_shard:gpu=1"], {"search_shard"}),
    ("default", [], set()),
], ids=["slurm profile", "default profile + set-resources", "default profile"])
def test_rules_given_a_gpu_get_the_cuda_env(settled_tiny, tmp_path, profile, extra, gpu_rules):
    """A dry run in the finished tiny run (so the checkpoints are resolved and every job is in the
    DAG), forcing the JAX rules, with the Slurm executor where the profile says so."""
    envs, out = job_conda_envs(tmp_path, REPO / "workflow" / "Snakefile", settled_tiny, "--profile", REPO / "profiles" / profile,
                               *extra, "--rerun-triggers", "mtime", "--forcerun", *sorted(GPU_RULES))
    expected_rules = {"simulate_survey", "index_survey", "build_tile_cache", "detect_sources", "plan_regions",
                      "fit_region", "merge_catalog", "extract_stamps", "deconvolve_shard", "merge_deconvolved",
                      "plan_orbits", "search_shard", "star_mask", "combine_chunk", "merge_detections",
                      "search_report"}
    assert set(envs) - {"all"} == expected_rules, sorted(envs)
    for rule in expected_rules:
        want = str(CUDA_ENV if rule in gpu_rules else CPU_ENV)
        assert envs[rule] == {want}, f"{rule}: {envs[rule]}, expected {want}"
    assert f"{'cuda' if gpu_rules else 'cpu'}.yaml will be created" in out  # deployment planned, not done
    for rule in GPU_RULES:  # the forced JAX jobs are in the dry run's job table
        assert any(line.split()[:1] == [rule] for line in out.splitlines()), out[-4000:]


# ----------------------------------------------------------------------------- use as a module
OUTER_SNAKEFILE = '''\
module skystack:
    snakefile:
        "{snakefile}"
    config:
        config


use rule * from skystack as skystack_*


rule all:
    default_target: True
    input:
        rules.skystack_all.input,
'''


@pytest.mark.workflow
def test_workflow_runs_as_a_module(tiny_run, tmp_path):
    """The tiny experiment through an outer workflow that imports every skystack rule under a
    prefix: same detections and catalog as the direct run, nothing left to do afterwards, and
    the renamed GPU rule gets the CUDA env from set-resources under its new name."""
    outer = tmp_path / "outer"
    outer.mkdir()
    snakefile = outer / "Snakefile"
    snakefile.write_text(OUTER_SNAKEFILE.format(snakefile=REPO / "workflow" / "Snakefile"))
    base = [SNAKEMAKE, "-s", snakefile, "--directory", outer, "--cores", "2",
            "--profile", REPO / "profiles" / "default"]
    no_deconvolution = tmp_path / "no_deconvolution.yaml"  # its rules are checked by the dry run below
    no_deconvolution.write_text("deconvolve:\n  enabled: false\n")
    proc, out = _run([*base, "--configfile", TINY, no_deconvolution])
    assert proc.returncode == 0, f"the outer workflow failed:\n{out[-8000:]}"
    assert "skystack_search_shard" in out and "skystack_fit_region" in out
    res = outer / "results" / "tiny"
    assert (res / "detections.parquet").exists()
    for table in ("detections.parquet", "catalog.parquet", "search/all_orbits.parquet"):
        assert_same_table(tiny_run / "results" / "tiny" / table, res / table, rtol=1e-9)
    assert (outer / "logs" / "tiny" / "search_shard_0_0.log").exists()  # under the outer working directory

    proc, out = _run([*base, "--dry-run", "--configfile", TINY, no_deconvolution])
    assert proc.returncode == 0 and "Nothing to be done" in out, out[-4000:]

    envs, _ = job_conda_envs(tmp_path, snakefile, outer, "--profile", REPO / "profiles" / "default",
                             "--set-resources", "skystack_search_shard:gpu=1", "--rerun-triggers", "mtime",
                             "--forcerun", "skystack_search_shard")
    assert envs["skystack_search_shard"] == {str(CUDA_ENV)}, envs
    for rule in ("skystack_fit_region", "skystack_deconvolve_shard", "skystack_combine_chunk"):
        assert envs[rule] == {str(CPU_ENV)}, (rule, envs[rule])
