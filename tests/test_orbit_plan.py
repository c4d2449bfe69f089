"""The orbit plan: chunk boundaries, the listed/random id boundary, rebuilding a chunk alone,
and the listed sources (grid, truth, file), against answers written out by hand."""
import copy
import csv

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, TINY

from skystack.core.config import load_config
from skystack.orbits.plan import chunk_range_ids, orbits_for_ids, plan_orbits
from skystack.orbits.population import population
from skystack.orbits.table import ELEMENT_COLUMNS

KNOWN = REPO / "resources" / "known_objects.csv"
SEED = 20240611


def chiron():
    """The reference row read straight from the CSV (not through the library's reader)."""
    with open(KNOWN, newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["name"] == "2060 Chiron")
    return {k: float(row[k]) for k in ELEMENT_COLUMNS}


#: The list-of-orbits settings these tests vary (tiny.yaml itself searches a region).
LIST_SETTINGS = {"source": "random", "regions": [], "n_random": 300, "chunk_size": 100, "chunks_per_job": 2,
                 "include_truth": True}


def config(**changes):
    """tiny.yaml's orbits section (reference 2060 Chiron, focused preset) with a list of
    orbits instead of a region (``LIST_SETTINGS``), varied."""
    cfg = {**copy.deepcopy(load_config(TINY)["orbits"]), **copy.deepcopy(LIST_SETTINGS)}
    grid = changes.pop("grid", None)
    cfg.update(changes)
    if grid:
        cfg["grid"].update(grid)
    return cfg


def test_base_config_is_what_these_tests_assume():
    cfg = config()
    assert cfg["reference"] == "2060 Chiron" and cfg["preset"] == "focused"
    assert (cfg["n_random"], cfg["chunk_size"], cfg["chunks_per_job"]) == (300, 100, 2)
    assert (cfg["grid"]["a_frac_min"], cfg["grid"]["a_frac_max"], cfg["grid"]["n"]) == (-0.02, 0.02, 41)
    assert chiron()["a_au"] == 13.6050729525


# ----------------------------------------------------------------------------- chunks
def test_chunk_ranges_known_answer():
    """41 grid orbits + 300 random = 341 ids, chunks of 100, 2 per job: chunks [0, 100),
    [100, 200), [200, 300), [300, 341); ranges [0, 200) and [200, 341)."""
    listed, plan = plan_orbits(config(source="grid"), SEED, KNOWN)
    assert (plan["n_listed"], plan["n_random"], plan["n_total"]) == (41, 300, 341)
    assert (plan["n_chunks"], plan["n_chunk_ranges"]) == (4, 2)
    np.testing.assert_array_equal(chunk_range_ids(plan, 0), np.arange(0, 200))
    np.testing.assert_array_equal(chunk_range_ids(plan, 1), np.arange(200, 341))
    assert chunk_range_ids(plan, 0).dtype == np.int64
    assert len(chunk_range_ids(plan, 2)) == 0  # past the last range


# (source, n_random, chunk_size, chunks_per_job) -> (n_total, n_chunks, n_chunk_ranges), by hand
CHUNK_CASES = [
    (("grid", 300, 100, 2), (341, 4, 2)),
    (("random", 300, 100, 3), (300, 3, 1)),
    (("random", 301, 100, 3), (301, 4, 2)),
    (("grid", 59, 100, 1), (100, 1, 1)),  # exactly one full chunk
    (("grid", 0, 7, 5), (41, 6, 2)),
    (("random", 1000, 10, 1), (1000, 100, 100)),
    (("random", 1, 7, 5), (1, 1, 1)),
]


@pytest.mark.parametrize("case, want", CHUNK_CASES)
def test_chunk_ranges_cover_every_id_once_in_whole_chunks(case, want):
    source, n_random, size, per_job = case
    listed, plan = plan_orbits(config(source=source, n_random=n_random, chunk_size=size, chunks_per_job=per_job,
                                      include_truth=False), SEED, KNOWN)
    n_total, n_chunks, n_ranges = want
    assert (plan["n_total"], plan["n_chunks"], plan["n_chunk_ranges"]) == want
    ranges = [chunk_range_ids(plan, r) for r in range(n_ranges)]
    every = np.concatenate(ranges)
    np.testing.assert_array_equal(every, np.arange(n_total))  # all ids, each once, in order
    for r, ids in enumerate(ranges):
        assert len(ids) > 0
        # range r is chunks r P .. r P + P - 1, chunk c being ids [c S, (c + 1) S)
        chunks = np.unique(ids // size)
        np.testing.assert_array_equal(chunks, np.arange(r * per_job, min((r + 1) * per_job, n_chunks)))
        for c in chunks[:-1] if r == n_ranges - 1 else chunks:
            assert (ids // size == c).sum() == size  # whole chunks, except possibly the very last
    last = ranges[-1]
    assert last[-1] == n_total - 1  # the last range stops at n_total
    assert len(chunk_range_ids(plan, n_ranges)) == 0


def test_nothing_to_search():
    listed, plan = plan_orbits(config(n_random=0, include_truth=False), SEED, KNOWN)
    assert (plan["n_total"], plan["n_chunks"], plan["n_chunk_ranges"]) == (0, 1, 1)
    assert len(chunk_range_ids(plan, 0)) == 0
    assert len(orbits_for_ids(plan, listed, chunk_range_ids(plan, 0))) == 0


# ----------------------------------------------------------------------------- listed / random
def test_listed_then_random_at_the_boundary():
    """ids < 41 are the grid rows; ids >= 41 are population(preset, id, seed) rows; a range
    across the boundary gives both."""
    cfg = config(source="grid")
    listed, plan = plan_orbits(cfg, SEED, KNOWN)
    ids = np.arange(38, 45)
    got = orbits_for_ids(plan, listed, ids)
    assert got["orbit_id"].tolist() == ids.tolist()
    assert list(got.columns) == ["orbit_id"] + ELEMENT_COLUMNS
    lst = listed.set_index("orbit_id")
    for i in (38, 39, 40):
        row = got.set_index("orbit_id").loc[i, ELEMENT_COLUMNS]
        np.testing.assert_array_equal(row.to_numpy(float), lst.loc[i, ELEMENT_COLUMNS].to_numpy(float))
    want = population("focused", [41, 42, 43, 44], SEED, chiron(), cfg["focused_sigma"])
    np.testing.assert_array_equal(got[got["orbit_id"] >= 41][ELEMENT_COLUMNS].to_numpy(float),
                                  want[ELEMENT_COLUMNS].to_numpy(float))
    # The two kinds really differ: the last grid row (id 40) is a_ref (1 + 0.02), the focused
    # population's a scatter by a_frac sigma 1e-4 around a_ref.
    a_ref = chiron()["a_au"]
    assert got.loc[got["orbit_id"] == 40, "a_au"].item() == pytest.approx(a_ref * 1.02, rel=1e-15)
    assert all(abs(a / a_ref - 1) < 1e-3 for a in got.loc[got["orbit_id"] >= 41, "a_au"])
    for col in ELEMENT_COLUMNS:
        assert got[col].dtype == np.float64, col
    assert got["orbit_id"].dtype == np.int64


def test_random_ids_are_population_ids_whatever_the_listed_count():
    """Random orbit j is population row j: with 41 listed orbits ahead of it or none."""
    with_grid = plan_orbits(config(source="grid", include_truth=False), SEED, KNOWN)
    alone = plan_orbits(config(source="random", include_truth=False, n_random=400), SEED, KNOWN)
    a = orbits_for_ids(with_grid[1], with_grid[0], [41, 200, 340])
    b = orbits_for_ids(alone[1], alone[0], [41, 200, 340])
    pd.testing.assert_frame_equal(a, b)
    assert alone[1]["n_listed"] == 0


def test_random_only_plan_gives_float_elements():
    """No listed orbits at all (a real survey: random orbits, no truth): the rebuilt orbits
    are still an orbit table, float64 elements."""
    listed, plan = plan_orbits(config(source="random", include_truth=False), SEED, KNOWN)
    assert len(listed) == 0
    got = orbits_for_ids(plan, listed, [0, 1, 299])
    assert got["orbit_id"].tolist() == [0, 1, 299]
    for col in ELEMENT_COLUMNS:
        assert got[col].dtype == np.float64, col
    want = population("focused", [0, 1, 299], SEED, chiron(), config()["focused_sigma"])
    np.testing.assert_array_equal(got[ELEMENT_COLUMNS].to_numpy(), want[ELEMENT_COLUMNS].to_numpy())


def test_ids_outside_the_plan_are_dropped():
    listed, plan = plan_orbits(config(source="grid"), SEED, KNOWN)
    got = orbits_for_ids(plan, listed, [-1, 0, 340, 341, 10**6])
    assert got["orbit_id"].tolist() == [0, 340]


def test_any_chunk_range_is_rebuilt_identically_alone():
    """A job rebuilds its range from (config, seed) alone: the same rows as the whole
    table, with a fresh plan, and the same orbit for the same id whatever the chunking."""
    cfg = config(source="grid", n_random=250, chunk_size=30, chunks_per_job=2)
    listed, plan = plan_orbits(cfg, SEED, KNOWN)
    whole = orbits_for_ids(plan, listed, np.arange(plan["n_total"])).set_index("orbit_id")
    for r in range(plan["n_chunk_ranges"]):
        listed_again, plan_again = plan_orbits(copy.deepcopy(cfg), SEED, KNOWN)  # a fresh job
        ids = chunk_range_ids(plan_again, r)
        part = orbits_for_ids(plan_again, listed_again, ids).set_index("orbit_id")
        pd.testing.assert_frame_equal(part, whole.loc[ids], check_exact=True)
    other = plan_orbits(config(source="grid", n_random=250, chunk_size=7, chunks_per_job=3), SEED, KNOWN)
    pd.testing.assert_frame_equal(orbits_for_ids(*other[::-1], np.arange(100, 200)).set_index("orbit_id"),
                                  whole.loc[100:199], check_exact=True)
    # and the seed matters: another seed gives other random orbits, the same grid
    reseeded = orbits_for_ids(*plan_orbits(cfg, SEED + 1, KNOWN)[::-1], [0, 100]).set_index("orbit_id")
    assert reseeded.loc[0, "a_au"] == whole.loc[0, "a_au"]
    assert reseeded.loc[100, "mean_anomaly_deg"] != whole.loc[100, "mean_anomaly_deg"]


# ----------------------------------------------------------------------------- listed sources
@pytest.mark.parametrize("a_min, a_max, n", [(-0.02, 0.02, 41), (-0.1, 0.05, 7), (0.0, 0.0, 1)])
def test_grid_rows(a_min, a_max, n):
    listed, plan = plan_orbits(config(source="grid", include_truth=False,
                                      grid={"a_frac_min": a_min, "a_frac_max": a_max, "n": n}), SEED, KNOWN)
    ref = chiron()
    assert len(listed) == n and plan["n_listed"] == n
    assert (listed["listed_as"] == "grid").all()
    assert listed["orbit_id"].tolist() == list(range(n))
    np.testing.assert_allclose(listed["a_au"], ref["a_au"] * (1 + np.linspace(a_min, a_max, n)), rtol=1e-15)
    for col in ("e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg", "epoch_jd_tdb"):
        np.testing.assert_array_equal(listed[col], ref[col])
    assert plan["reference"] == ref and plan["reference_name"] == "2060 Chiron"
    assert listed["name"].str.startswith("2060 Chiron").all()


def test_grid_a_values_written_out():
    """The 5-point grid from -2% to +2% around a = 13.6050729525 AU, by hand."""
    listed, _ = plan_orbits(config(source="grid", include_truth=False, grid={"n": 5}), SEED, KNOWN)
    np.testing.assert_allclose(listed["a_au"], [13.33297149345, 13.469022222975, 13.6050729525,
                                                13.741123682025, 13.87717441155], rtol=1e-12)


@pytest.fixture
def truth_file(tmp_path):
    truth = pd.DataFrame({"orbit_id": [100, 101], "name": ["inj A", "inj B"], "a_au": [40.0, 12.5],
                          "e": [0.05, 0.3], "inc_deg": [3.0, 170.0], "node_deg": [10.0, 20.0],
                          "argperi_deg": [30.0, 40.0], "mean_anomaly_deg": [50.0, 60.0],
                          "epoch_jd_tdb": [2451545.0, 2458000.5], "expected_combined_snr": [12.0, 4.0]})
    path = tmp_path / "truth.parquet"
    truth.to_parquet(path)
    return truth, path


def test_truth_then_grid(truth_file):
    truth, path = truth_file
    listed, plan = plan_orbits(config(source="grid", include_truth=True), SEED, KNOWN, truth_path=path)
    assert plan["n_listed"] == 43 and plan["n_total"] == 343
    assert listed["listed_as"].tolist() == ["truth"] * 2 + ["grid"] * 41
    assert listed["orbit_id"].tolist() == list(range(43))  # the plan's ids, not the truth file's
    assert listed["name"].tolist()[:2] == ["inj A", "inj B"]
    np.testing.assert_array_equal(listed[ELEMENT_COLUMNS].to_numpy()[:2], truth[ELEMENT_COLUMNS].to_numpy())
    got = orbits_for_ids(plan, listed, [0, 1, 2, 43])
    np.testing.assert_array_equal(got[ELEMENT_COLUMNS].to_numpy()[:2], truth[ELEMENT_COLUMNS].to_numpy())
    assert got["a_au"].iloc[2] == pytest.approx(chiron()["a_au"] * 0.98, rel=1e-15)


def test_truth_listed_only_when_asked(truth_file):
    _, path = truth_file
    listed, _ = plan_orbits(config(source="random", include_truth=False), SEED, KNOWN, truth_path=path)
    assert len(listed) == 0
    listed, _ = plan_orbits(config(source="random", include_truth=True), SEED, KNOWN, truth_path=path)
    assert listed["listed_as"].tolist() == ["truth", "truth"]
    listed, _ = plan_orbits(config(source="truth", include_truth=False), SEED, KNOWN, truth_path=path)
    assert listed["listed_as"].tolist() == ["truth", "truth"]


def test_file_source(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("name,a_au,e,inc_deg,node_deg,argperi_deg,mean_anomaly_deg,epoch_jd_tdb\n"
                    "one,44.0,0.1,2.0,100.0,200.0,300.0,2451545.0\n"
                    "two,45.5,0.0,178.0,0.0,0.0,0.0,2451545.0\n")
    listed, plan = plan_orbits(config(source="file", include_truth=False, n_random=5), SEED, KNOWN, file_path=path)
    assert listed["listed_as"].tolist() == ["file", "file"] and listed["name"].tolist() == ["one", "two"]
    assert listed["a_au"].tolist() == [44.0, 45.5] and listed["inc_deg"].tolist() == [2.0, 178.0]
    assert (plan["n_listed"], plan["n_total"]) == (2, 7)


def test_unknown_reference():
    with pytest.raises(ValueError, match="'Planet Nine' is not in"):
        plan_orbits(config(reference="Planet Nine"), SEED, KNOWN)


def test_config_files_merge_as_snakemake_merges_them():
    """load_config merges files key by key like Snakemake's own update_config (one experiment,
    then another on top, as ``--configfile a.yaml b.yaml``), so the summary sees the run's config."""
    import yaml
    from snakemake.utils import update_config

    base, experiment = REPO / "config" / "experiments" / "demo.yaml", REPO / "config" / "experiments" / "chiron.yaml"
    expected = yaml.safe_load(base.read_text())
    update_config(expected, yaml.safe_load(experiment.read_text()))
    merged = load_config(base, experiment)
    for section in ("orbits", "search", "survey"):
        for key, value in expected.get(section, {}).items():
            assert merged[section][key] == value, (section, key)
