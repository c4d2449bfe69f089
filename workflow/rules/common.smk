# Config validation and the path helpers every rule uses.
import os
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

EXPERIMENT = config["experiment"]
RESULTS = Path(config["results_dir"]) / EXPERIMENT
CACHE = Path(config["cache_dir"]) / EXPERIMENT
PARTITIONS = list(range(config["partitions"]))
CONDA_ENV = "../../envs/cpu.yaml"  # relative to the rule files; envs/cuda.yaml on GPU nodes
KNOWN_OBJECTS = str(Path(workflow.basedir) / "resources" / "known_objects.csv")


def result(*parts):
    """A path under results/<experiment>/."""
    return str(RESULTS.joinpath(*parts))


def log_path(rule, suffix=""):
    return str(Path("logs") / EXPERIMENT / f"{rule}{suffix}.log")


def bench_path(rule, suffix=""):
    return str(Path("benchmarks") / "out" / EXPERIMENT / f"{rule}{suffix}.tsv")


def cache_file(partition):
    return str(CACHE / f"partition_{partition}.tiles")


def survey_inputs():
    """The survey the index reads: the simulated images, or the configured files."""
    if config["survey"]["source"] == "simulate":
        return {"images": result("survey", "images")}
    from skystack.survey import expand_paths

    return {"files": expand_paths(config["survey"]["paths"])}


def all_targets():
    """Every stage's final outputs; catalog_targets and deconvolve_targets live in their rule files."""
    targets = [result("images.parquet"), result("detections.parquet"), result("report", "snr_histogram.png")]
    targets += [cache_file(p) for p in PARTITIONS]
    return targets + catalog_targets() + deconvolve_targets()


def orbit_plan_inputs(wildcards):
    """Files the orbit plan reads: known objects, the simulated truth, or the user's file."""
    inputs = {"known_objects": KNOWN_OBJECTS}
    o = config["orbits"]
    if o["source"] == "truth" or o["include_truth"]:
        if config["survey"]["source"] != "simulate":
            raise ValueError("orbits: source 'truth' / include_truth need survey.source: simulate")
        inputs["truth"] = result("survey", "orbits.parquet")
    if o["source"] == "file":
        if not o["path"]:
            raise ValueError("orbits.path: required when orbits.source is 'file'")
        inputs["orbit_file"] = o["path"]
    return inputs


def star_mask_input():
    """The catalog's bright-star mask when the catalog stage runs, else nothing."""
    return [result("catalog", "star_mask.parquet")] if config.get("catalog", {}).get("enabled", False) else []


def combined_chunks(wildcards):
    """Every chunk range's combined table (the number of ranges is known after plan_orbits)."""
    import json

    with open(checkpoints.plan_orbits.get().output.plan) as fh:
        n_jobs = json.load(fh)["n_chunk_ranges"]
    return [result("search", "combined", f"chunk{c}.parquet") for c in range(n_jobs)]


def truth_input():
    """The simulated truth (orbits and injected positions), when the survey is simulated."""
    if config["survey"]["source"] != "simulate":
        return []
    return [result("survey", "orbits.parquet"), result("survey", "injected.parquet"), result("images.parquet")]


def combined_candidates(wildcards):
    return [p.replace(".parquet", "_candidates.parquet") for p in combined_chunks(wildcards)]
