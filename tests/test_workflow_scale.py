"""Workflows the size of a real survey: jobs sized by work, and per-orbit sums that combine to
what per-image partials combine to."""
import time

import numpy as np
import pandas as pd
import pytest

from benchmarks.workflow_scale import dry_run, plan_of, scale_config
from skystack.core.config import load_config
from skystack.orbits.plan import (
    chunk_range_ids,
    partition_groups,
    plan_orbits,
    shape_sample_positions,
    work_sized_shape,
)
from skystack.search.combine import combine_partials, combine_sums, reduce_partials

#: Intersections per orbit and image of KBOs on a ZTF-like survey (benchmarks.workflow_scale
#: measures it; about 7e-5): its order is what matters here.
KBO_HITS_PER_ORBIT_IMAGE = 7e-5


# ----------------------------------------------------------------------------- job shape
@pytest.mark.parametrize("args, want", [
    # (chunks, partitions, intersections per chunk and partition, per job, most search jobs) -> shape
    ((1000, 10, 1e4, 1e6, 10**6), (10, 10)),       # a range over all partitions holds 1e6
    ((1000, 10, 1e6, 1e6, 10**6), (1, 1)),         # one chunk on one partition is already the target
    ((1000, 10, 1e5, 1e6, 10**6), (1, 10)),        # one chunk: 10 partitions per search job
    ((1000, 10, 2e5, 1e6, 10**6), (1, 5)),         # 5 partitions reach it: 2 search jobs per range
    ((1000, 10, 1.0, 1e9, 10**6), (1000, 10)),     # all of it in one job
    ((1000, 10, 1e6, 1e6, 100), (21, 10)),         # bounded: at most 100 jobs, 48 ranges
])
def test_work_sized_shape_known_answers(args, want):
    assert work_sized_shape(*args) == want


def test_work_sized_shape_covers_everything_within_the_bound():
    n_chunks, n_part, most = 10**6, 1000, 4000
    chunks, parts = work_sized_shape(n_chunks, n_part, 70.0 * 1000, 1e8, most)
    n_ranges, n_groups = -(-n_chunks // chunks), -(-n_part // parts)
    assert n_ranges * (n_groups + 1) + n_groups <= most
    groups = partition_groups({"partitions_per_job": parts}, n_part)
    assert sorted(p for g in groups for p in g) == list(range(n_part)) and len(groups) == n_groups


def test_shape_sample_spans_the_plan():
    pos = shape_sample_positions(10**9)
    assert len(pos) == 256 and pos[0] == 0 and pos[-1] == 10**9 - 1
    assert shape_sample_positions(3).tolist() == [0, 1, 2] and len(shape_sample_positions(0)) == 0


def test_the_plan_sizes_its_jobs_from_sampled_intersections(tmp_path):
    """A metadata-only ZTF-like survey (8 exposures x 64 quadrants, 4 partitions) and 20,000 KBOs
    in chunks of 100: the plan's shape is work_sized_shape of its own estimate, and its chunk
    ranges still cover every orbit once."""
    from benchmarks.workflow_scale import REPO
    from skystack.sim.mosaic import ecliptic_survey

    images = ecliptic_survey(8, 3.0, seed=5)
    images = images.assign(is_difference=True, partition=images["exposure_id"] % 4)
    images.to_parquet(tmp_path / "images.parquet")
    orbit_cfg = {**load_config()["orbits"], "source": "random", "preset": "kbo", "n_random": 20000,
                 "chunk_size": 100}
    shape = {"intersections_per_job": 2000.0, "partitions": 4, "max_jobs": 5000, "other_jobs": 6}
    _, plan = plan_orbits(orbit_cfg, 11, REPO / "resources" / "known_objects.csv",
                          images_path=tmp_path / "images.parquet",
                          search_cfg={"images": "difference", "job_shape": shape})
    per_cell = plan["estimated_intersections_per_orbit"] / 4 * 100
    assert 0 < plan["estimated_intersections_per_orbit"] < 64 * 8
    assert (plan["chunks_per_job"], plan["partitions_per_job"]) == work_sized_shape(200, 4, per_cell, 2000.0,
                                                                                    5000 - 4 - 6)
    ids = np.concatenate([chunk_range_ids(plan, r) for r in range(plan["n_chunk_ranges"])])
    np.testing.assert_array_equal(ids, np.arange(20000))


def test_a_survey_sized_plan_dry_runs_in_bounded_jobs():
    """1e6 images (1000 partitions) x 1e9 orbits: today's shape would be 2.5e5 chunk ranges x 1001
    jobs; sized by work (1e8 intersections per job, within the default max_jobs) the dry run of
    the whole search finishes in well under a minute."""
    n_images, n_orbits, n_part, max_jobs = 10**6, 10**9, 1000, 5000
    per_cell = KBO_HITS_PER_ORBIT_IMAGE * (n_images / n_part) * 1000
    chunks, parts = work_sized_shape(10**6, n_part, per_cell, 1e8, max_jobs - n_part - 6)
    config = scale_config(n_orbits, n_part, 1e8) | {"max_jobs": max_jobs}
    start = time.perf_counter()
    got = dry_run(config, plan_of(n_orbits, chunks, parts), n_part, timeout_s=120)
    assert time.perf_counter() - start < 60, got
    n_ranges = -(-10**6 // chunks)
    assert got["combine_chunk_jobs"] == n_ranges and got["search_shard_jobs"] == n_ranges * -(-n_part // parts)
    assert got["jobs"] <= max_jobs - n_part, got


# ----------------------------------------------------------------------------- per-orbit sums
def noisy_partials(n_orbits=300, n_images=40, seed=3):
    """Per-image partials with masked rows, rows of no weight (phi = 0) and a bright outlier."""
    rng = np.random.default_rng(seed)
    rows = [(o, i) for o in range(n_orbits) for i in rng.choice(n_images, rng.integers(1, n_images), replace=False)]
    p = pd.DataFrame(rows, columns=["orbit_id", "image_id"]).astype("int64")
    phi = rng.uniform(0.2, 3.0, len(p)) * (rng.uniform(size=len(p)) > 0.05)
    psi = rng.normal(0.4 * phi, np.sqrt(phi)) + 25.0 * (rng.uniform(size=len(p)) < 0.01)
    p = p.assign(x=rng.uniform(0, 100, len(p)), y=rng.uniform(0, 100, len(p)), psi=psi, phi=phi)
    return p.sample(frac=1.0, random_state=seed).reset_index(drop=True), rng.uniform(size=len(p)) < 0.03


def numpy_weighted_mean(partials, masked):
    """Independent: per orbit, the phi-weighted mean of psi/phi over kept images, its SNR."""
    out = {}
    for oid, g in partials.assign(m=masked).groupby("orbit_id"):
        kept = g[(g["phi"] > 0) & ~g["m"]]
        w, f = kept["phi"].to_numpy(), (kept["psi"] / kept["phi"]).to_numpy()
        mean = np.sum(w * f) / np.sum(w) if len(kept) else np.nan
        out[oid] = (len(kept), len(g) - len(kept), mean, mean * np.sqrt(np.sum(w)) if len(kept) else 0.0)
    return pd.DataFrame.from_dict(out, orient="index", columns=["n_images", "n_rejected", "flux_nmgy", "snr"])


@pytest.mark.parametrize("n_partitions, by", [(1, "image"), (3, "image"), (7, "random")])
def test_reduced_partials_combine_as_per_image_rows(n_partitions, by):
    partials, masked = noisy_partials()
    if by == "image":
        part = partials["image_id"].to_numpy() % n_partitions
    else:  # any cut of the rows, not only by image
        part = np.random.default_rng(1).integers(0, n_partitions, len(partials))
    sums = pd.concat([reduce_partials(partials[part == k], masked[part == k]) for k in range(n_partitions)],
                     ignore_index=True)
    assert len(sums) < len(partials)
    got = combine_sums(sums.sample(frac=1.0, random_state=2))
    ref = combine_partials(partials, n_sigma_g=None, masked=masked)
    assert got["orbit_id"].tolist() == ref["orbit_id"].tolist()
    for col in ("n_images", "n_rejected"):
        assert got[col].tolist() == ref[col].tolist(), col
    for col in ("psi", "phi", "flux_nmgy", "flux_sd_nmgy", "snr"):
        np.testing.assert_allclose(got[col], ref[col], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=col)
    independent = numpy_weighted_mean(partials, masked).loc[got["orbit_id"]]
    for col in ("n_images", "n_rejected"):
        assert got[col].tolist() == independent[col].tolist(), col
    for col in ("flux_nmgy", "snr"):
        np.testing.assert_allclose(got[col], independent[col], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=col)
    # The same detections whatever the cut.
    assert set(got.loc[got["snr"] >= 3, "orbit_id"]) == set(ref.loc[ref["snr"] >= 3, "orbit_id"])


def test_clipping_changes_the_combination_so_it_keeps_per_image_rows():
    """With clipping, the outlier images of an orbit depend on all of its images' fluxes: the
    combination is not a function of per-partition sums (why clipped searches write rows)."""
    partials, masked = noisy_partials()
    clipped = combine_partials(partials, n_sigma_g=3.0, masked=masked)
    unclipped = combine_partials(partials, n_sigma_g=None, masked=masked)
    assert (clipped["n_rejected"] > unclipped["n_rejected"]).any()


def test_empty_partials_reduce_and_combine_to_empty_tables():
    partials, masked = noisy_partials()
    empty = reduce_partials(partials.iloc[:0])
    assert empty.empty and list(combine_sums(empty).columns) == list(combine_partials(partials).columns)


def test_combining_in_blocks_of_orbits_changes_nothing(tmp_path):
    """combine_chunk holds a bounded number of rows at once; its tables do not depend on it."""
    import logging

    from skystack.search.stage import combine_stage

    partials, _ = noisy_partials()
    paths = []
    for k in range(3):  # three partition files, each in (orbit, image) order as search jobs write them
        paths.append(tmp_path / f"chunk0_p{k}.parquet")
        part = partials[partials["image_id"] % 3 == k].sort_values(["orbit_id", "image_id"])
        part.to_parquet(paths[-1], index=False)
    pd.DataFrame({"image_id": np.arange(40)}).to_parquet(tmp_path / "images.parquet")
    out = {}
    for block_rows in (10**9, 57):
        c, d = tmp_path / f"combined_{block_rows}.parquet", tmp_path / f"candidates_{block_rows}.parquet"
        combine_stage(paths, tmp_path / "images.parquet", None, c, d, sigma_g_clip=3.0, snr_threshold=2.0,
                      min_images=3, star_mask_radius_arcsec=4.0, log=logging.getLogger("test"), block_rows=block_rows)
        out[block_rows] = pd.read_parquet(c), pd.read_parquet(d)
    pd.testing.assert_frame_equal(out[57][0], out[10**9][0], check_exact=True)
    rows = [out[b][1].sort_values(["orbit_id", "image_id"]).reset_index(drop=True) for b in (57, 10**9)]
    pd.testing.assert_frame_equal(*rows, check_exact=True)  # the same rows (blocks are read orbit by orbit)
    assert len(out[57][1]) > 0
    pd.testing.assert_frame_equal(out[57][0], combine_partials(partials, n_sigma_g=3.0), check_exact=True)
