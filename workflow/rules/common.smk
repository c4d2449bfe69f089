# Config validation and the path helpers every rule uses.
import os
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

EXPERIMENT = config["experiment"]
RESULTS = Path(config["results_dir"]) / EXPERIMENT
CACHE = Path(config["cache_dir"]) / EXPERIMENT
PARTITIONS = list(range(config["partitions"]))
KNOWN_OBJECTS = "resources/known_objects.csv"


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
    return [result("images.parquet")] + [cache_file(p) for p in PARTITIONS]
