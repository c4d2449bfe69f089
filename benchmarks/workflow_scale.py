"""B: what Snakemake does with a search plan the size of a real survey.

ZTF's public archive holds about 3 million quadrant images per five years, and a blind search
tries billions of orbits. For surveys of 1e4, 1e5 and 1e6 images (one partition, i.e. one tile
cache, per ``--images-per-partition`` images) this measures

1. the dry run (``snakemake -n``) of the search DAG: its wall time, Snakemake's peak RSS and the
   number of jobs, for today's shape (``orbits.chunks_per_job`` chunks of 1000 orbits x one
   partition per job) and for a work-sized plan (``search.intersections_per_job``). Each runs
   in a temporary working directory in which every output before the search (the simulated
   survey's outputs, the index, the tile caches, the plan) is an empty stand-in file, so that
   Snakemake builds the search's jobs exactly as after ``plan_orbits``; the plan's shape comes
   from ``skystack.orbits.plan.work_sized_shape`` with the intersection rate measured below.
   Today's shape with 1e9 orbits makes millions of jobs, out of reach of a dry run here: it is
   run with ``--fixed-orbits`` orbits and its time scaled by the jobs of 1e9 orbits (said so
   in the output, ``"scaled": true``).
2. the partial-sum files and the combination, on one real chunk: the intersections of
   ``--sample-orbits`` KBOs (``orbits.population``) with a metadata-only ZTF-like survey of
   ``--sample-exposures`` exposures of 8 x 8 quadrants (``skystack.sim.mosaic``), psi and phi
   drawn as noise (the survey has no pixels). Its parquet bytes per intersection (per-image
   partials) and per orbit and partition (the sums written when ``search.sigma_g_clip`` is
   null), and the peak RSS of ``combine_chunk``'s combination on it (clipped per-image rows,
   and the sums), each in a fresh process, are scaled by the counts of each plan: the file
   figures and the combine RSS in the table are these scaled values, not a run of the big case.

    python -m benchmarks.workflow_scale [--images 1e4 1e5 1e6] [--orbits 1e9]
        [--intersections-per-job 1e8] [--fixed-orbits 1e6 1e5 1e4]

Prints JSON (one record per survey and shape, the measured chunk and ``uptime``), then a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CHUNK_SIZE = 1000
CHUNKS_PER_JOB = 4  # the schema's defaults


# ----------------------------------------------------------------------------- the dry run
def scale_config(n_orbits: int, n_partitions: int, intersections_per_job: float | None) -> dict:
    """A blind random search of a simulated survey, search only (no catalog, no deconvolution)."""
    search = {"sigma_g_clip": 3.0}
    if intersections_per_job is not None:
        search["intersections_per_job"] = float(intersections_per_job)
    return {"experiment": "scale", "partitions": n_partitions, "max_jobs": 100_000_000,
            "orbits": {"source": "random", "preset": "kbo", "n_random": int(n_orbits), "chunk_size": CHUNK_SIZE,
                       "chunks_per_job": CHUNKS_PER_JOB},
            "search": search, "catalog": {"enabled": False}, "deconvolve": {"enabled": False}}


def stand_in_outputs(workdir: Path, n_partitions: int, plan: dict) -> None:
    """Empty files for every output before the search, oldest first, and the plan itself."""
    res = workdir / "results" / "scale"
    (res / "survey" / "images").mkdir(parents=True)
    for name in ("survey/orbits.parquet", "survey/sources.parquet", "survey/injected.parquet", "images.parquet",
                 "rejected_images.parquet"):
        (res / name).touch()
    cache = workdir / "cache" / "scale"
    cache.mkdir(parents=True)
    for p in range(n_partitions):
        (cache / f"partition_{p}.tiles").touch()
    (res / "search").mkdir()
    (res / "search" / "orbits_listed.parquet").touch()
    (res / "search" / "plan.json").write_text(json.dumps(plan))


def plan_of(n_orbits: int, chunks_per_job: int, partitions_per_job: int) -> dict:
    """The plan.json plan_orbits writes for n random orbits, with the given job shape."""
    n_chunks = max(1, -(-n_orbits // CHUNK_SIZE))
    return {"seed": 2026, "preset": "kbo", "n_listed": 0, "n_random": n_orbits, "n_total": n_orbits,
            "chunk_size": CHUNK_SIZE, "chunks_per_job": chunks_per_job, "n_chunks": n_chunks,
            "n_chunk_ranges": -(-n_chunks // chunks_per_job), "first_random_id": 0, "regions": [],
            "ids_are_positions": True, "partitions_per_job": partitions_per_job}


def dry_run(config: dict, plan: dict, n_partitions: int, timeout_s: float) -> dict:
    """Wall time, peak RSS and per-rule job counts of ``snakemake -n`` on the stand-ins."""
    with tempfile.TemporaryDirectory(prefix="skystack_scale_") as tmp:
        work = Path(tmp)
        stand_in_outputs(work, n_partitions, plan)
        cfg = work / "scale.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd = ["/usr/bin/time", "-f", "maxrss_kb=%M", SNAKEMAKE, "-s", str(REPO / "workflow" / "Snakefile"),
               "--directory", str(work), "--cores", "2", "--dry-run", "--quiet", "rules", "--configfile", str(cfg)]
        start = time.perf_counter()
        # Its own session, so that a timeout ends Snakemake too, not only /usr/bin/time.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            return {"dry_run_s": float(timeout_s), "timed_out": True, "snakemake_peak_rss_mb": None, "jobs": 0,
                    "search_shard_jobs": 0, "combine_chunk_jobs": 0}
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"dry run failed ({proc.returncode}):\n{out[-3000:]}")
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", out, re.M)}
    rss = re.search(r"maxrss_kb=(\d+)", out)
    return {"dry_run_s": round(seconds, 2), "snakemake_peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "jobs": jobs.get("total", sum(v for k, v in jobs.items() if k != "total")),
            "search_shard_jobs": jobs.get("search_shard", 0), "combine_chunk_jobs": jobs.get("combine_chunk", 0)}


# ----------------------------------------------------------------------------- one real chunk
def measured_chunk(n_exposures: int, n_orbits: int, images_per_partition: int, seed: int = 7) -> dict:
    """Intersections of KBOs with a metadata-only mosaic survey; file bytes and combine RSS."""
    from skystack.core.runtime import configure
    from skystack.orbits.population import population
    from skystack.search.combine import reduce_partials
    from skystack.search.intersect import intersect
    from skystack.sim.mosaic import ecliptic_survey

    configure()
    images = ecliptic_survey(n_exposures, 5.0, seed)
    orbits = population("kbo", np.arange(n_orbits), seed)
    t0 = time.perf_counter()
    hits = intersect(orbits, images)
    seconds = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    phi = rng.uniform(0.5, 2.0, len(hits))
    partials = hits.assign(psi=rng.normal(0, np.sqrt(phi)), phi=phi)
    # Partitions of about images_per_partition images, neighbours on the sky as the workflow's
    # bisection makes them: exposures in order of ecliptic longitude (ecliptic_survey's own draw).
    draws = np.random.default_rng(seed)
    draws.uniform(size=n_exposures)
    lon_rank = np.argsort(np.argsort(draws.uniform(0, 360, n_exposures)))
    per_exposure = int(images.groupby("exposure_id").size().iloc[0])
    exposure_of = images.set_index("image_id")["exposure_id"].loc[partials["image_id"]].to_numpy()
    part = (lon_rank[exposure_of] * per_exposure) // images_per_partition
    with tempfile.TemporaryDirectory() as tmp:
        rows_path, sums_path = Path(tmp) / "rows.parquet", Path(tmp) / "sums.parquet"
        partials.to_parquet(rows_path, index=False)
        sums = pd.concat([reduce_partials(partials[part == p]) for p in np.unique(part)], ignore_index=True)
        sums.to_parquet(sums_path, index=False)
        bytes_row, bytes_sum = rows_path.stat().st_size / max(len(partials), 1), \
            sums_path.stat().st_size / max(len(sums), 1)
        rss_rows = combine_rss(rows_path, clipped=True)
        rss_sums = combine_rss(sums_path, clipped=False)
    n_images = len(images)
    return {"exposures": n_exposures, "images": n_images, "orbits": n_orbits, "intersections": len(partials),
            "intersect_s": round(seconds, 2),
            "intersections_per_orbit_image": len(partials) / (n_orbits * n_images),
            "orbit_partition_rows": len(sums), "intersections_per_orbit_partition_row": len(partials) / max(len(sums), 1),
            "parquet_bytes_per_intersection": round(bytes_row, 2), "parquet_bytes_per_sum_row": round(bytes_sum, 2),
            "combine_rss": {"rows": rss_rows, "sums": rss_sums}}


# combine_stage itself (blocks of orbits included) on one partial file of `copies` copies of the
# chunk. The peak is taken from after the imports and the writing of that file (Linux: writing 5
# to clear_refs resets VmHWM), so that it is the combination's own. The sums' second pass (the
# detections' orbits searched again) needs pixels, which this survey has none of: left out.
COMBINE_CHILD = r"""
import sys, json, logging, tempfile
from pathlib import Path
import numpy as np, pandas as pd
from skystack.search import stage

def status_kb(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

path, clipped, copies = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
one = pd.read_parquet(path)
tmp = Path(tempfile.mkdtemp())
big = pd.concat([one.assign(orbit_id=one["orbit_id"] + k * 10**9) for k in range(copies)], ignore_index=True)
big.sort_values(["orbit_id"] + (["image_id"] if clipped else []), kind="stable").to_parquet(tmp / "p.parquet", index=False)
n_rows = len(big)
del big, one
pd.DataFrame({"image_id": [0]}).to_parquet(tmp / "images.parquet")
stage.candidate_partials = lambda ids, **kw: pd.DataFrame()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
base = status_kb("VmRSS")
stage.combine_stage([tmp / "p.parquet"], tmp / "images.parquet", None, tmp / "c.parquet", tmp / "d.parquet",
                    sigma_g_clip=3.0 if clipped else None, snr_threshold=7.0, min_images=5, star_mask_radius_arcsec=4.0,
                    log=logging.getLogger("bench"), research=None if clipped else {})
print(json.dumps({"rows": n_rows, "base_kb": base, "peak_kb": status_kb("VmHWM")}))
"""


COMBINE_COPIES = (100, 1000)  # about 1e6 and 1e7 rows: one block and five


def combine_rss(path: Path, clipped: bool) -> dict:
    """Peak RSS of combine_stage on 100 and 1000 copies of a chunk (fresh processes, the orbit ids
    of each copy shifted): the slope is the memory per row, the intercept the process's own."""
    runs = []
    for copies in COMBINE_COPIES:
        out = subprocess.run([sys.executable, "-c", COMBINE_CHILD, str(path), "1" if clipped else "0", str(copies)],
                             capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r1, r8 = runs
    per_row = max(r8["peak_kb"] - r1["peak_kb"], 0) * 1024 / max(r8["rows"] - r1["rows"], 1)
    return {"bytes_per_row": round(per_row, 1), "intercept_mb": round((r1["peak_kb"] * 1024 - per_row * r1["rows"]) / 2**20, 1),
            "runs": runs}  # the intercept: the process with its imports


# ----------------------------------------------------------------------------- the table
def shape_of(n_orbits: int, n_partitions: int, rate: float, n_images: int, per_job: float | None):
    """(chunks per job, partitions per job) of today's shape or of a work-sized one."""
    from skystack.orbits.plan import work_sized_shape

    if per_job is None:
        return CHUNKS_PER_JOB, 1
    n_chunks = -(-n_orbits // CHUNK_SIZE)
    per_cell = rate * (n_images / n_partitions) * CHUNK_SIZE
    return work_sized_shape(n_chunks, n_partitions, per_cell, per_job, 100_000_000 - n_partitions - 8)


def files_and_memory(chunk: dict, n_orbits: int, n_images: int, n_partitions: int, chunks_per_job: int,
                     partitions_per_job: int, reduced: bool) -> dict:
    """Partial files, their bytes and the combine's peak RSS of a plan, scaled from the chunk."""
    intersections = chunk["intersections_per_orbit_image"] * n_orbits * n_images
    n_ranges = -(-(-(-n_orbits // CHUNK_SIZE)) // chunks_per_job)
    n_groups = -(-n_partitions // partitions_per_job)
    rows = intersections / chunk["intersections_per_orbit_partition_row"] if reduced else intersections
    per_row = chunk["parquet_bytes_per_sum_row" if reduced else "parquet_bytes_per_intersection"]
    mem = chunk["combine_rss"]["sums" if reduced else "rows"]
    per_combine = rows / n_ranges
    return {"intersections": intersections, "partial_files": n_ranges * n_groups,
            "partial_bytes": rows * per_row, "rows_per_combine": per_combine,
            "combine_peak_rss_gb": (mem["intercept_mb"] * 2**20 + per_combine * mem["bytes_per_row"]) / 2**30}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    ap.add_argument("--orbits", type=float, default=1e9)
    ap.add_argument("--fixed-orbits", type=float, nargs="+", default=[1e6, 1e5, 1e4],
                    help="orbits of today's shape's dry run, per survey (its time is scaled to --orbits)")
    ap.add_argument("--images-per-partition", type=int, default=1000)
    ap.add_argument("--intersections-per-job", type=float, default=1e8)
    ap.add_argument("--sample-exposures", type=int, default=64)
    ap.add_argument("--sample-orbits", type=int, default=20000)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    chunk = measured_chunk(args.sample_exposures, args.sample_orbits, args.images_per_partition)
    rate, n_orbits = chunk["intersections_per_orbit_image"], int(args.orbits)
    records = []
    for n_img, fixed_orbits in zip((int(x) for x in args.images), (int(x) for x in args.fixed_orbits)):
        n_part = max(1, n_img // args.images_per_partition)
        for per_job in (None, args.intersections_per_job):
            for reduced in (False, True):
                if per_job is None and reduced:
                    continue  # sums change the files, not the DAG: shown for the work-sized plan
                run_orbits = fixed_orbits if per_job is None else n_orbits
                chunks, parts = shape_of(run_orbits, n_part, rate, n_img, per_job)
                rec = {"images": n_img, "orbits": n_orbits, "partitions": n_part,
                       "shape": "fixed" if per_job is None else f"work {per_job:.0e}",
                       "partials": "sums" if reduced else "rows", "chunks_per_job": chunks,
                       "partitions_per_job": parts}
                if not reduced:
                    dr = dry_run(scale_config(run_orbits, n_part, per_job), plan_of(run_orbits, chunks, parts),
                                 n_part, args.timeout)
                    rec.update(dr, dry_run_orbits=run_orbits, scaled=run_orbits != n_orbits)
                    if run_orbits != n_orbits and not dr.get("timed_out"):
                        # Today's shape: the jobs of n_orbits (the ones a dry run counts: search,
                        # combine, merge, report, all) and the time scaled by them (a lower bound:
                        # Snakemake's time per job grows with the DAG).
                        full = plan_of(n_orbits, chunks, parts)
                        rec["jobs_at_orbits"] = full["n_chunk_ranges"] * (n_part + 1) + 3
                        rec["dry_run_s_at_orbits"] = dr["dry_run_s"] * rec["jobs_at_orbits"] / dr["jobs"]
                else:
                    rec.update({k: records[-1][k] for k in ("dry_run_s", "jobs", "snakemake_peak_rss_mb")})
                rec.update(files_and_memory(chunk, n_orbits, n_img, n_part, *shape_of(n_orbits, n_part, rate, n_img,
                                                                                       per_job), reduced))
                records.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {"chunk": chunk, "records": records, "uptime": load}
    print(json.dumps(result, indent=1))
    print(table(records))
    return result


def table(records) -> str:
    head = ("| images | orbits | partitions | shape | partials | jobs (1e9 orbits) | dry run s | Snakemake RSS MB "
            "| partial files | partial bytes | rows per combine | combine peak RSS GB |")
    lines = [head, "|" + "---|" * 12]
    for r in records:
        jobs = f"{r['jobs_at_orbits']:,} (scaled from {r['jobs']:,})" if "jobs_at_orbits" in r else f"{r['jobs']:,}"
        secs = (f"{r['dry_run_s_at_orbits']:.0f} (scaled from {r['dry_run_s']:.1f})" if "dry_run_s_at_orbits" in r
                else f"{r['dry_run_s']:.1f}")
        if r.get("timed_out"):
            secs = f"> {r['dry_run_s']:.0f} (timed out)"
        lines.append(f"| {r['images']:.0e} | {r['orbits']:.0e} | {r['partitions']} | {r['shape']} "
                     f"({r['chunks_per_job']} chunks x {r['partitions_per_job']} partitions) | {r['partials']} | {jobs} "
                     f"| {secs} | {r['snakemake_peak_rss_mb']} | {r['partial_files']:,} | {r['partial_bytes']:.2e} "
                     f"| {r['rows_per_combine']:.2e} | {r['combine_peak_rss_gb']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
