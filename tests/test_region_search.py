"""``orbits.source: region`` on the tiny survey: the covering the workflow built keeps its
promise on the survey's own exposures, and a region that needs too much is refused up front.
(That the search then finds the injected objects, and that refinement brings each trial onto
its object's track, is in tests/test_workflow.py::test_injected_objects_recovered.)"""
import itertools
import json

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from skystack.core.config import load_config
from skystack.orbits.covering import REGION_ELEMENTS, covering_loss, sample_region
from skystack.orbits.ellipsoid import sample_ellipsoid
from skystack.orbits.region import region_exposures, region_trials
from skystack.search.intersect import intersect

KNOWN = REPO / "resources" / "known_objects.csv"
TINY_REGION = load_config(REPO / "config" / "experiments" / "tiny.yaml")["orbits"]["regions"][0]


@pytest.fixture(scope="module")
def tiny_search(tiny_run):
    res = tiny_run / "results" / "tiny"
    images = pd.read_parquet(res / "images.parquet")
    plan = json.loads((res / "search" / "plan.json").read_text())
    return images[images["is_difference"]], plan, pd.read_parquet(res / "search" / "orbits_listed.parquet")


def _on_exposures(samples: pd.DataFrame, images: pd.DataFrame, min_exposures: int) -> pd.DataFrame:
    """The samples whose tracks fall on at least ``min_exposures`` exposures' images, by the
    search's own intersection code on the images' WCS (not the covering's rectangles)."""
    hits = intersect(samples, images).merge(images[["image_id", "exposure_id"]], on="image_id")
    n_exp = hits.groupby("orbit_id")["exposure_id"].nunique()
    return samples[samples["orbit_id"].isin(n_exp.index[n_exp >= min_exposures])]


def test_the_workflows_covering_keeps_its_promise(tiny_search):
    """Orbits drawn uniformly from the box whose tracks fall on at least search.min_images (5)
    exposures lose at most search.max_snr_loss (0.2) of their SNR against the best trial the
    plan listed, with the exact tracks (no metric, no linearisation) on the exposures the region
    reaches, at the indexed PSF widths."""
    images, plan, listed = tiny_search
    (summary,) = plan["regions"]
    assert summary["n_trials"] == len(listed) and summary["max_snr_loss"] == 0.2
    assert summary["min_exposures"] == 5
    exposures = region_exposures(images, summary["reference"], summary["half_width"])
    assert len(exposures) == summary["n_exposures"]
    samples = _on_exposures(sample_region(summary["reference"], summary["half_width"], 400, seed=11), images, 5)
    assert len(samples) >= 300
    site = {"lat_deg": exposures["site_lat_deg"].to_numpy(), "lon_deg": exposures["site_lon_deg"].to_numpy(),
            "height_m": exposures["site_height_m"].to_numpy()}
    loss = covering_loss(listed, samples, exposures["jd_tdb"].to_numpy(), site,
                         exposures["loss_sigma_arcsec"].to_numpy())
    assert loss.max() <= 0.2, np.sort(loss)[-5:]
    # Not vacuous: a tenth of the trials leaves part of the box uncovered.
    sparse = covering_loss(listed.iloc[::10], samples, exposures["jd_tdb"].to_numpy(), site,
                           exposures["loss_sigma_arcsec"].to_numpy())
    assert sparse.max() > 0.2


def test_a_covariance_region_is_covered_with_fewer_trials(tiny_search):
    """The tiny box as a 3-sigma ellipsoid with a fit's correlations (a with mean anomaly 0.97,
    inclination with node 0.9): fewer trials than the box, and orbits drawn uniformly from the
    ellipsoid still lose at most 0.2 against them (exact tracks); a tenth of them does not hold."""
    images, plan, box_trials = tiny_search
    sd = np.array([TINY_REGION["half_width"][k] for k in REGION_ELEMENTS]) / 3.0
    corr = np.eye(6)
    corr[0, 5] = corr[5, 0] = 0.97
    corr[2, 3] = corr[3, 2] = 0.9
    cov = np.diag(sd) @ corr @ np.diag(sd)
    spec = {"name": "fit", "reference": TINY_REGION["reference"], "covariance": cov.tolist(), "n_sigma": 3}
    trials, (summary,) = region_trials([spec], images, KNOWN, max_snr_loss=0.2, max_trials=10**6, min_exposures=5)
    assert summary["n_box_trials"] == len(box_trials) and len(trials) < 0.5 * len(box_trials)
    exposures = region_exposures(images, summary["reference"], summary["half_width"])
    site = {"lat_deg": exposures["site_lat_deg"].to_numpy(), "lon_deg": exposures["site_lon_deg"].to_numpy(),
            "height_m": exposures["site_height_m"].to_numpy()}
    samples = _on_exposures(sample_ellipsoid(summary["reference"], cov, 3.0, 300, seed=5), images, 5)
    assert len(samples) >= 200
    args = (exposures["jd_tdb"].to_numpy(), site, exposures["loss_sigma_arcsec"].to_numpy())
    assert covering_loss(trials, samples, *args).max() <= 0.2
    assert covering_loss(trials.iloc[::10], samples, *args).max() > 0.2


def test_a_region_wider_than_the_fields_is_covered_where_its_orbits_reach_the_images(tiny_search):
    """A box 8 times the tiny one in a, i, node and mean anomaly is mostly orbits that miss the
    survey's 3.2 arcmin fields or cross them on a few exposures. Pruned to the fields
    (``footprint``), the covering keeps a small part of its lattice, and orbits drawn from the box
    whose tracks fall on at least 5 exposures (the search's own intersection code) still lose at
    most the promised 0.5 against the trials kept (a quarter of them does not hold it)."""
    images, _, _ = tiny_search
    hw = {k: v * (8 if k in ("a_au", "inc_deg", "node_deg", "mean_anomaly_deg") else 1)
          for k, v in TINY_REGION["half_width"].items()}
    wide = {"name": "wide", "reference": TINY_REGION["reference"], "half_width": hw}
    trials, (summary,) = region_trials([wide], images, KNOWN, max_snr_loss=0.5, max_trials=10**6, min_exposures=5)
    assert len(trials) < 0.5 * summary["n_lattice_points"], (len(trials), summary["n_lattice_points"])
    drawn = sample_region(summary["reference"], hw, 3000, seed=21)
    samples = _on_exposures(drawn, images, 5)
    assert 150 <= len(samples) <= 0.6 * len(drawn), len(samples)
    exposures = region_exposures(images, summary["reference"], hw)
    site = {"lat_deg": exposures["site_lat_deg"].to_numpy(), "lon_deg": exposures["site_lon_deg"].to_numpy(),
            "height_m": exposures["site_height_m"].to_numpy()}
    args = (exposures["jd_tdb"].to_numpy(), site, exposures["loss_sigma_arcsec"].to_numpy())
    loss = covering_loss(trials, samples.iloc[:300], *args)
    assert loss.max() <= 0.5, np.sort(loss)[-5:]
    assert covering_loss(trials.iloc[::4], samples.iloc[:300], *args).max() > 0.5


def test_a_region_needing_too_many_trials_is_refused_with_the_number_and_time(tiny_search):
    images, _, _ = tiny_search
    with pytest.raises(ValueError, match=r"chiron-family.*needs about [\d.e+,]+ trial orbits.*would take about "
                                         r".*search\.max_trials"):
        region_trials([TINY_REGION], images, KNOWN, max_snr_loss=0.2, max_trials=1000)


@pytest.mark.parametrize("region, message", [
    ({"name": "r", "reference": "no such object", "half_width": {"a_au": 0.01}},
     r"orbits\.regions\[0\] \(r\)\.reference: 'no such object' is not a known object"),
    ({"name": "r", "reference": "2060 Chiron", "half_width": {}}, r"every half-width is 0"),
    ({"name": "r", "reference": "2060 Chiron", "half_width": {"e": 0.9}}, r"leaves bound orbits"),
    ({"name": "r", "reference": {"a_au": 13.6}, "half_width": {"a_au": 0.01}}, r"reference: missing e, inc_deg"),
    ({"name": "r", "reference": "2060 Chiron", "half_width": {"a_au": 0.01}, "covariance": np.eye(6).tolist()},
     r"\(r\): a half_width or a covariance, not both"),
])
def test_bad_regions_are_named(tiny_search, region, message):
    images, _, _ = tiny_search
    with pytest.raises(ValueError, match=message):
        region_trials([region], images, KNOWN, max_snr_loss=0.2, max_trials=10)


def test_a_region_the_survey_never_sees_is_refused(tiny_search):
    images, _, _ = tiny_search
    far = {"name": "elsewhere", "reference": "486958 Arrokoth", "half_width": {"a_au": 0.01}}
    with pytest.raises(ValueError, match=r"elsewhere.*fall on 0 of the survey's exposures"):
        region_trials([far], images, KNOWN, max_snr_loss=0.2, max_trials=10)


def test_grouped_trial_pruning_is_the_per_trial_test(monkeypatch):
    """``footprint.trial_reach`` decides groups of trials at once from their bounding boxes; it
    must keep exactly the trials that the per-trial rectangle test (``reach_counts``) keeps, on
    fields that a lattice only partly reaches (a track sweeping across 40 small rectangles)."""
    from skystack.orbits import footprint as fp

    rng = np.random.default_rng(5)
    n_exp, n = 40, 4
    centre = np.cumsum(rng.normal(0.0, 30.0, (n_exp, 2)), axis=0)
    diff = rng.normal(0.0, 300.0, (n_exp, 2, n))
    fields = fp.Fields(centre - rng.uniform(40, 120, (n_exp, 2)), centre + rng.uniform(40, 120, (n_exp, 2)))
    tp = {"split": type("S", (), {"thick": np.arange(n), "thin": np.zeros(0, int), "rho_thick": 0.05})(),
          "a_mat": np.eye(n)}
    curvature = rng.uniform(0.5, 2.0, (n_exp, 2))
    u = rng.uniform(-1.0, 1.0, (30_000, n))
    half = fp.trial_margins(tp, diff) + 2.0 * curvature
    pos = centre[None] + (u @ diff.reshape(-1, n).T).reshape(len(u), n_exp, 2)
    for min_exposures, leaf in itertools.product((2, 4, 6), (8, fp.REACH_LEAF_TRIALS)):
        expected = fp.reach_counts(pos, half[None], fields) >= min_exposures
        monkeypatch.setattr(fp, "REACH_LEAF_TRIALS", leaf)  # small groups: most decided as groups
        got = fp.trial_reach(u, tp, centre, diff, curvature, fields, min_exposures)
        assert 0.02 < expected.mean() < 0.9, expected.mean()
        assert np.array_equal(got, expected), (min_exposures, leaf, got.sum(), expected.sum())
