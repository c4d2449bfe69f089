# Config validation and the path helpers every rule uses.
import math
import os
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# The one schema (a link to src/skystack/core/config.schema.yaml, which load_config reads), taken
# relative to this file so that parsing the workflow (snakemake --lint, --dry-run) does not need
# skystack importable.
validate(config, schema="../schemas/config.schema.yaml")


def non_finite_keys(value, where=""):
    """Dotted keys of NaN or infinite numbers, which jsonschema's bounds let through (as
    skystack.core.config.non_finite_keys; here so that parsing needs no skystack)."""
    if isinstance(value, dict):
        items = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return [where] if isinstance(value, float) and not math.isfinite(value) else []
    return [bad for key, v in items for bad in non_finite_keys(v, key)]


if non_finite_keys(config):
    raise WorkflowError(
        f"config: {', '.join(non_finite_keys(config))}: must be a finite number "
        "(not NaN or inf)"
    )


# ----------------------------------------------------------------------------- bounded work
def n_random_orbits():
    """orbits.n_random, or its default when null: 2000 for source random, else 0 (as
    skystack.orbits.plan.n_random_of; here so that parsing needs no skystack)."""
    n = config["orbits"]["n_random"]
    if n is None:
        return 2000 if config["orbits"]["source"] == "random" else 0
    return int(n)


def orbit_file_rows(path):
    """Rows of an orbit file, counted cheaply (0 when it cannot be read here: the plan says why)."""
    try:
        if path.lower().endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows
        import gzip

        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            lines = sum(
                1 for line in fh if line.strip() and not line.lstrip().startswith(b"#")
            )
        return max(lines - 1, 0)  # less the header line
    except Exception:  # noqa: BLE001 - a lower bound only
        return 0


def planned_jobs():
    """A lower bound on the jobs the config asks for, and what it is made of, counted before
    Snakemake builds any job: the orbit chunk ranges x (partitions + 1) search jobs (one
    search_shard per partition and one combine_chunk), the partitions' tile caches, the
    deconvolution shards and the fixed rules. Simulated truth orbits and catalog regions are
    known only later (and counted again then). A work-sized plan (search.intersections_per_job)
    is counted as its least, one chunk range and one partition group: plan_orbits fits its shape
    within max_jobs less the rest."""
    o, n_part = config["orbits"], config["partitions"]
    listed = 0
    if o["source"] == "grid":
        listed = o["grid"]["n"]
    elif o["source"] == "file" and o["path"]:
        listed = orbit_file_rows(repo_path(o["path"]))
    n_chunks = max(1, -(-(listed + n_random_orbits()) // o["chunk_size"]))
    # A work-sized plan chooses its chunk ranges and partition groups within max_jobs (after
    # plan_orbits): counted here as its least, one range of one search and one combine job.
    n_ranges = 1 if work_sized() else -(-n_chunks // o["chunks_per_job"])
    others = 5 + (config["survey"]["source"] == "simulate")
    if config["catalog"]["enabled"]:
        others += 5  # detect_sources, plan_regions, fit_region (at least one), merge_catalog, star_mask
    if config["deconvolve"]["enabled"]:
        others += 2 + (
            1
            if config["deconvolve"]["mode"] == "lowrank"
            else config["deconvolve"]["shards"]
        )
    n_groups = 1 if work_sized() else n_part
    group_lists = 1 if work_sized() else 0  # cache_group
    total = n_ranges * (n_groups + 1) + group_lists + n_part + others
    return total, n_ranges, others


def work_sized():
    """Whether the search jobs are sized by their estimated work (search.intersections_per_job)
    rather than one per orbit chunk range and partition."""
    return config["search"]["intersections_per_job"] is not None


def reduced_partials():
    """Whether search jobs write per-orbit sums (no sigma-G clipping) instead of per-image rows."""
    return config["search"]["sigma_g_clip"] is None


def other_jobs():
    """The jobs that are neither search jobs nor tile caches (as counted by planned_jobs)."""
    return planned_jobs()[2]


def too_many_jobs(total, what):
    """The refusal of a run that would make more than max_jobs jobs."""
    o = config["orbits"]
    return WorkflowError(
        f"config: this run would make at least {total:,} jobs ({what}), more than "
        f"max_jobs: {config['max_jobs']}. Cut the work into fewer, larger jobs: raise "
        f"orbits.chunk_size (now {o['chunk_size']}) or orbits.chunks_per_job (now "
        f"{o['chunks_per_job']}), use fewer partitions (now {config['partitions']}), size the "
        f"jobs by their work (search.intersections_per_job, e.g. 1e8), or "
        f"search fewer orbits (orbits.n_random: {n_random_orbits()}); or raise max_jobs "
        f"if the machine or cluster takes that many jobs."
    )


def check_job_count():
    total, n_ranges, others = planned_jobs()
    if total > config["max_jobs"]:
        n_part = config["partitions"]
        groups = "1 partition group" if work_sized() else f"{n_part} partitions"
        raise too_many_jobs(
            total,
            f"{n_ranges:,} orbit chunk ranges x ({groups} + 1) search jobs, "
            f"{n_part} tile caches, {others} others",
        )


def check_search_settings():
    """Settings that cannot go together, refused before any job is built."""
    if reduced_partials() and config["orbits"]["source"] == "region":
        raise WorkflowError(
            "config: search.sigma_g_clip: null (no clipping, per-orbit sums) cannot be used with "
            "orbits.source: region, whose refinement clips each candidate's images; give "
            "search.sigma_g_clip a number (e.g. 3)"
        )


EXPERIMENT = config["experiment"]
RESULTS = Path(config["results_dir"]) / EXPERIMENT
CACHE = Path(config["cache_dir"]) / EXPERIMENT
PARTITIONS = list(range(config["partitions"]))
CONDA_ENV = "../../envs/cpu.yaml"  # relative to the rule files
CUDA_ENV = "../../envs/cuda.yaml"
# The repository: two levels above this file. Not workflow.basedir, which is the directory of the
# *main* Snakefile, i.e. another workflow's when skystack is used as a module.
REPO_DIR = Path(workflow.current_basedir.get_path_or_uri(secret_free=True)).parents[1]
KNOWN_OBJECTS = str(REPO_DIR / "resources" / "known_objects.csv")


def repo_path(path):
    """An input path of the config (``$VAR`` and ``~`` expanded), relative ones taken from the
    repository (two levels above this file), so that an experiment that ships with the
    repository reads the same files from any ``--directory``."""
    path = os.path.expanduser(os.path.expandvars(str(path)))
    return path if os.path.isabs(path) else str(REPO_DIR / path)


# Every input path of the config is resolved here, once: survey.paths (globs), survey.ccd_tables,
# catalog.path, orbits.path, deconvolve.stamps_path and deconvolve.psfs_path. Outputs
# (results_dir, cache_dir, logs, search.staging_dir) stay relative to the working directory.
config["survey"]["paths"] = [repo_path(p) for p in config["survey"]["paths"]]
config["survey"]["ccd_tables"] = [repo_path(p) for p in config["survey"]["ccd_tables"]]
for _section in ("catalog", "orbits"):
    if config[_section]["path"]:
        config[_section]["path"] = repo_path(config[_section]["path"])
for _key in ("stamps_path", "psfs_path"):
    if config["deconvolve"][_key]:
        config["deconvolve"][_key] = repo_path(config["deconvolve"][_key])

# Refused here, before any job is built: Snakemake needs memory and time per job.
check_job_count()
check_search_settings()

# envs/*.yaml install skystack from here (Snakemake hands conda a copy of each env file, so a
# path relative to the file would point into .snakemake/).
os.environ.setdefault("SKYSTACK_REPO", str(REPO_DIR))
DECONV = config["deconvolve"]
# Low-rank deconvolution couples all stamps: one shard.
DECONV_SHARDS = list(range(1 if DECONV["mode"] == "lowrank" else DECONV["shards"]))
# The settings deconvolve_shard uses (extraction settings rerun extraction only).
DECONV_SOLVER_KEYS = (
    "n_scales",
    "kappa",
    "n_reweights",
    "tol",
    "max_iter",
    "mode",
    "dtype",
)


def requested_gpus(rule):
    """The ``gpu`` resource that --set-resources (or a profile's set-resources) gives ``rule``.

    Snakemake 9 keeps these as parsed ``Resources`` mappings of ``Resource`` objects (whose
    ``get`` takes no default); plain mappings of numbers are accepted too. The rule is looked up
    under the name Snakemake gives it, which is another when skystack is used as a module
    (skystack_search_shard, with ``use rule * from skystack as skystack_*``).
    """
    name = workflow.modifier.modify_rulename(rule)
    requested = (workflow.resource_settings.overwrite_resources or {}).get(name) or {}
    if "gpu" not in requested:
        return 0
    gpus = requested["gpu"]
    if hasattr(gpus, "is_evaluable"):  # a parsed Resource
        if gpus.is_evaluable():
            raise WorkflowError(
                f"set-resources {name}:gpu must be a plain number (it chooses the rule's conda "
                f"environment when the workflow is parsed), not an expression"
            )
        gpus = gpus.value
    try:
        return int(gpus or 0)
    except (TypeError, ValueError):
        raise WorkflowError(
            f"set-resources {name}:gpu must be a number, got {gpus!r}"
        ) from None


def gpu_env(rule):
    """The conda environment of a JAX rule: envs/cuda.yaml where the profile gives the rule a
    GPU (``set-resources: <rule>: gpu: N`` with N > 0, as profiles/slurm does), else the CPU one.
    """
    return CUDA_ENV if requested_gpus(rule) > 0 else CONDA_ENV


def result(*parts):
    """A path under results/<experiment>/."""
    return str(RESULTS.joinpath(*parts))


def log_path(rule, suffix=""):
    return str(Path("logs") / EXPERIMENT / f"{rule}{suffix}.log")


def bench_path(rule, suffix=""):
    return str(Path("benchmarks") / "out" / EXPERIMENT / f"{rule}{suffix}.tsv")


def cache_file(partition):
    return str(CACHE / f"partition_{partition}.tiles")


_SURVEY_FILES = {}


def survey_files():
    """survey.paths resolved once, by the workflow itself (not by Snakemake's input checks):
    (the files, [[path, problem], ...] of the matched paths that are no readable file: dangling
    symbolic links, link loops, directories)."""
    if "resolved" not in _SURVEY_FILES:
        from skystack.survey.index import survey_files as resolve

        files, refused = resolve(config["survey"]["paths"])
        _SURVEY_FILES["resolved"] = files, [[p, why] for p, why in refused]
    return _SURVEY_FILES["resolved"]


def survey_inputs():
    """The survey the index reads: the simulated images, or the configured files. Matched
    paths that are no readable file stop the run here, named (on_bad_image: error), or are
    left out and recorded in rejected_images.parquet (skip)."""
    if config["survey"]["source"] == "simulate":
        return {"images": result("survey", "images")}
    files, refused = survey_files()
    if refused and config["survey"]["on_bad_image"] == "error":
        named = "; ".join(f"{p}: {why}" for p, why in refused[:10])
        more = f"; and {len(refused) - 10} more" if len(refused) > 10 else ""
        raise WorkflowError(
            f"survey.paths: {len(refused)} matched path(s) are no readable file: {named}{more}. "
            "Fix or remove them, or set survey.on_bad_image: skip to leave them out (they are "
            "then recorded in rejected_images.parquet)."
        )
    return {"files": files}


def survey_refused(wildcards):
    """The matched survey paths that are left out (on_bad_image: skip), for the index's record."""
    if config["survey"]["source"] == "simulate":
        return []
    return survey_files()[1]


def all_targets():
    """Every stage's final outputs."""
    targets = [
        result("images.parquet"),
        result("detections.parquet"),
        result("report", "snr_histogram.png"),
    ]
    targets += [cache_file(p) for p in PARTITIONS]
    return targets + catalog_targets() + deconvolve_targets()


def orbit_plan_inputs(wildcards):
    """Files the orbit plan reads: known objects, the simulated truth, or the user's file."""
    inputs = {"known_objects": KNOWN_OBJECTS}
    o = config["orbits"]
    if o["source"] == "truth" or o["include_truth"]:
        if config["survey"]["source"] != "simulate":
            raise ValueError(
                "orbits: source 'truth' / include_truth need survey.source: simulate"
            )
        inputs["truth"] = result("survey", "orbits.parquet")
    if o["source"] == "file":
        if not o["path"]:
            raise ValueError("orbits.path: required when orbits.source is 'file'")
        inputs["orbit_file"] = o["path"]
    if o["source"] == "region" or work_sized():
        inputs["images"] = result("images.parquet")
    return inputs


def region_search_settings():
    """The search settings the plan depends on: a region's covering, and the job shape of a
    work-sized plan (none otherwise, so that changing them does not re-plan a list of orbits).
    """
    settings = {}
    if config["orbits"]["source"] == "region":
        keys = (
            "images",
            "max_snr_loss",
            "max_trials",
            "smoothing_sigma_px",
            "min_images",
        )
        settings = {k: config["search"][k] for k in keys}
    if work_sized():
        settings["images"] = config["search"]["images"]
        settings["job_shape"] = {
            "intersections_per_job": config["search"]["intersections_per_job"],
            "partitions": config["partitions"],
            "max_jobs": config["max_jobs"],
            "other_jobs": other_jobs(),
        }
    return settings


def star_mask_input():
    """The catalog's bright-star mask when the catalog stage runs, else nothing."""
    return (
        [result("search", "star_mask.parquet")] if config["catalog"]["enabled"] else []
    )


_SEARCH_SHAPE = {}


def search_shape():
    """(chunk ranges, partitions per search job) of the plan (known after plan_orbits), read
    once per version of plan.json: every search job's input function asks."""
    import json

    path = checkpoints.plan_orbits.get().output.plan
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _SEARCH_SHAPE:
        with open(path) as fh:
            plan = json.load(fh)
        _SEARCH_SHAPE.clear()
        _SEARCH_SHAPE[key] = plan["n_chunk_ranges"], int(
            plan.get("partitions_per_job", 1)
        )
    return _SEARCH_SHAPE[key]


def partition_groups():
    """The partitions of each search job of a chunk range (one each unless work-sized)."""
    per_job = search_shape()[1] if work_sized() else 1
    return [PARTITIONS[g : g + per_job] for g in range(0, len(PARTITIONS), per_job)]


def shard_partitions(wildcards):
    """The partitions search_shard job {chunk}_{partition} takes ({partition}: its group)."""
    return partition_groups()[int(wildcards.partition)]


def group_caches(wildcards):
    """The tile caches of partition group {group}."""
    return [cache_file(p) for p in partition_groups()[int(wildcards.group)]]


def group_file(g):
    return result("search", "cache_groups", f"group{g}.txt")


def shard_caches(wildcards):
    """What search_shard {chunk}_{partition} depends on for its caches: the cache itself, or in
    a work-sized plan its group's list (one input per job, not one per partition: the chunk
    ranges x partitions cache inputs would otherwise dominate building the DAG)."""
    if work_sized():
        return [group_file(wildcards.partition)]
    return [cache_file(p) for p in shard_partitions(wildcards)]


def shard_cache_paths(wildcards):
    return [cache_file(p) for p in shard_partitions(wildcards)]


def chunk_partials(wildcards):
    """The partial files combine_chunk {chunk} adds up: one per partition group."""
    return [
        result("search", "partials", f"chunk{wildcards.chunk}_p{g}.parquet")
        for g in range(len(partition_groups()))
    ]


def shard_stars():
    """The bright-star mask a search job applies itself when it writes per-orbit sums."""
    return star_mask_input() if reduced_partials() else []


def research_inputs(wildcards):
    """What combine_chunk needs to search the detections' orbits again when the partials are
    per-orbit sums: every partition's cache, the plan and its listed orbits."""
    if not reduced_partials():
        return {}
    caches = [cache_file(p) for p in PARTITIONS]
    if work_sized():
        caches = [group_file(g) for g in range(len(partition_groups()))]
    return {
        "caches": caches,
        "listed": result("search", "orbits_listed.parquet"),
        "plan": result("search", "plan.json"),
    }


def research_settings():
    """The search settings combine_chunk searches the detections' orbits again with (none when
    the partials are per-image rows, so that they do not rerun the combination)."""
    if not reduced_partials():
        return None
    keys = ("images", "smoothing_sigma_px", "max_batch_mb", "without_zero_point")
    settings = {k: config["search"][k] for k in keys}
    return settings | {"caches": [cache_file(p) for p in PARTITIONS]}


def combined_chunks(wildcards):
    """Every chunk range's combined table (the number of ranges is known after plan_orbits)."""
    n_jobs = search_shape()[0]
    n_groups = len(partition_groups())
    # The simulated truth is counted now; a work-sized plan's cache lists too.
    total = n_jobs * (n_groups + 1) + (n_groups if work_sized() else 0)
    if total > config["max_jobs"]:
        raise too_many_jobs(
            total,
            f"{n_jobs:,} orbit chunk ranges of the plan x ({n_groups} partition groups + 1)",
        )
    return [result("search", "combined", f"chunk{c}.parquet") for c in range(n_jobs)]


def truth_input():
    """The simulated truth (orbits and injected positions), when the survey is simulated."""
    if config["survey"]["source"] != "simulate":
        return []
    return [
        result("survey", "orbits.parquet"),
        result("survey", "injected.parquet"),
        result("images.parquet"),
    ]


def combined_candidates(wildcards):
    return [
        p.replace(".parquet", "_candidates.parquet") for p in combined_chunks(wildcards)
    ]


# ----------------------------------------------------------------------------- catalog
def catalog_targets():
    if not config["catalog"]["enabled"]:
        return []
    return [result("catalog.parquet"), result("catalog.fits")]


def candidate_inputs(wildcards):
    inputs = {"images": result("images.parquet")}
    if config["catalog"]["source"] == "file":
        if not config["catalog"]["path"]:
            raise ValueError("catalog.path: required when catalog.source is 'file'")
        inputs["candidates"] = config["catalog"]["path"]
    return inputs


def region_catalogs(wildcards):
    """Every region's fitted table (the number of regions is known after plan_regions)."""
    import json

    with open(checkpoints.plan_regions.get().output.plan) as fh:
        n_regions = json.load(fh)["n_regions"]
    if n_regions > config["max_jobs"]:
        raise WorkflowError(
            f"config: the catalog would make {n_regions:,} fit_region jobs, more than max_jobs: "
            f"{config['max_jobs']}. Raise catalog.max_sources_per_region (now "
            f"{config['catalog']['max_sources_per_region']}), or raise max_jobs."
        )
    return [
        result("catalog", "regions", f"region_{r}.parquet") for r in range(n_regions)
    ]


# ----------------------------------------------------------------------------- deconvolution
def deconvolve_targets():
    if not DECONV["enabled"]:
        return []
    return [
        result("deconvolved", "deconvolved.fits"),
        result("deconvolved", "diagnostics.parquet"),
    ]


def stamp_sources(wildcards):
    source = DECONV["source"]
    if source == "stacks":
        if not (DECONV["stamps_path"] and DECONV["psfs_path"]):
            raise ValueError(
                "deconvolve.stamps_path and deconvolve.psfs_path: required when deconvolve.source is 'stacks'"
            )
        return {
            "stamps": repo_path(DECONV["stamps_path"]),
            "psfs": repo_path(DECONV["psfs_path"]),
        }
    if source == "catalog":
        if not config["catalog"]["enabled"]:
            raise ValueError("deconvolve.source 'catalog' needs catalog.enabled: true")
        return {
            "galaxies": result("catalog.parquet"),
            "images": result("images.parquet"),
        }
    if config["survey"]["source"] != "simulate":
        raise ValueError("deconvolve.source 'truth' needs survey.source: simulate")
    return {
        "galaxies": result("survey", "sources.parquet"),
        "images": result("images.parquet"),
    }
