"""Covering a region of orbit space (``skystack.orbits.covering``) and refining a trial orbit
(``skystack.orbits.refine``), on the demo simulated survey's 120 exposures (3 years, Palomar).

The region is a KBO box: a = 39.5 AU, e = 0.21, i = 8.3 deg, half-widths a 0.05 AU, e 0.002 and
0.02 deg in the angles (``BOX``). Its covering has 1.7e7 trial orbits at max_snr_loss 0.2 and
4.7e8 at 0.05: those are checked through ``nearest_trials`` (the covering's points nearest each
sample, without building all of them). Coverings that are built and checked against every trial
use the same box 10x narrower (``SMALL``: 2e3 to 2e4 trials).
"""
import math
import re

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from skystack.astrometry.directions import sky_positions
from skystack.orbits import covering as cv
from skystack.orbits.refine import refine_orbit, synthetic_snr_fn

REFERENCE = {"a_au": 39.5, "e": 0.21, "inc_deg": 8.3, "node_deg": 100.0, "argperi_deg": 150.0,
             "mean_anomaly_deg": 20.0, "epoch_jd_tdb": 2459100.5}
BOX = {"a_au": 0.05, "e": 0.002, "inc_deg": 0.02, "node_deg": 0.02, "argperi_deg": 0.02, "mean_anomaly_deg": 0.02}
SMALL = {k: 0.1 * v for k, v in BOX.items()}
#: Tiles ``choose_tiles`` picks for BOX (seed 0), checked here on samples of the whole box.
BOX_TILES = {0.2: {"e": 8}, 0.05: {"e": 16}}


@pytest.fixture(scope="module")
def survey():
    ex = cv.survey_exposures({"preset": "demo"})
    jd, site, sigma = ex["jd_tdb"].to_numpy(), cv.exposure_site(ex), ex["psf_sigma_arcsec"].to_numpy()
    return {"exposures": ex, "jd": jd, "site": site, "sigma": sigma,
            "metric": cv.track_metric(REFERENCE, jd, site, sigma)}


def _loss(survey, trials, samples, **kw):
    return cv.covering_loss(trials, samples, survey["jd"], survey["site"], survey["sigma"], **kw)


def test_survey_exposures_and_metric(survey):
    ex = survey["exposures"]
    assert len(ex) == 120 and ex["jd_tdb"].is_monotonic_increasing
    assert 0.6 < ex["psf_sigma_arcsec"].min() and ex["psf_sigma_arcsec"].max() < 1.3
    met = survey["metric"]
    # The track model is the search's: the tangent-plane positions of sky_positions' RA/Dec.
    orbits = cv.sample_region(REFERENCE, BOX, 3, seed=9)
    ra, dec = sky_positions(orbits, survey["jd"], survey["site"])
    u = np.stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)), np.cos(np.radians(dec)) * np.sin(np.radians(ra)),
                  np.sin(np.radians(dec))], -1)  # (n, m, 3)
    g = met.geometry
    along = np.einsum("nmk,mk->nm", u, g.center)
    expect = np.stack([np.einsum("nmk,mk->nm", u, g.east), np.einsum("nmk,mk->nm", u, g.north)], -1) / along[..., None]
    got = cv.track_positions(orbits, g)
    assert np.abs(got - expect * cv.ARCSEC_PER_RAD).max() < 1e-6  # arcsec
    # Jacobian against central differences of the same positions.
    ref = pd.DataFrame([{**REFERENCE, "orbit_id": 0}])
    steps = np.array([1e-4, 1e-6, 1e-5, 1e-5, 1e-5, 1e-5])
    for j, col in enumerate(cv.REGION_ELEMENTS):
        hi, lo = ref.copy(), ref.copy()
        hi[col] += steps[j]
        lo[col] -= steps[j]
        fd = (cv.track_positions(hi, g)[0] - cv.track_positions(lo, g)[0]) / (2 * steps[j])
        assert np.abs(fd - met.jacobian[:, :, j]).max() < 1e-5 * np.abs(met.jacobian[:, :, j]).max()
    # M = (1/N) sum J^T J / (4 sigma^2), and the linear loss ~ delta^T M delta for small offsets.
    sc = met.jacobian / (2 * survey["sigma"][:, None, None])
    assert np.allclose(met.matrix, np.einsum("nai,naj->ij", sc, sc) / 120, rtol=1e-12)
    delta = np.array([1e-5, 1e-7, 1e-5, 0, 0, 1e-5])
    q = delta @ met.matrix @ delta
    assert q < 0.01 and abs(cv.linear_loss(met, delta) / q - 1) < 0.02


@pytest.mark.parametrize("psf_sigma, smoothing", [(1.5, 0.0), (1.5, 1.0), (1.0, 2.0)])
def test_smoothed_filter_matches_a_pixel_sum(psf_sigma, smoothing):
    """The SNR a filter widened by smoothing collects from a Gaussian star, at offsets, against
    a direct sum over a fine pixel grid of the star times the filter (no Gaussian identities)."""
    loss_sigma, peak = cv.smoothed_filter(psf_sigma, smoothing)
    step = 0.05
    x = np.arange(-30.0, 30.0 + step / 2, step)
    xx, yy = np.meshgrid(x, x)
    star = np.exp(-(xx**2 + yy**2) / (2 * psf_sigma**2))
    sigma_f2 = psf_sigma**2 + smoothing**2
    matched_snr = np.sum(star * star) / np.sqrt(np.sum(star * star))
    for d in (0.0, 0.7, 1.9, 3.5):
        filt = np.exp(-((xx - d) ** 2 + yy**2) / (2 * sigma_f2))
        snr = np.sum(star * filt) / np.sqrt(np.sum(filt * filt))
        expect = peak * np.exp(-d * d / (4 * loss_sigma**2))
        assert snr / matched_snr == pytest.approx(expect, rel=1e-9), d
    # The filter's own width would promise too little loss whenever it is smoothed.
    if smoothing > 0:
        assert loss_sigma < math.hypot(psf_sigma, smoothing)


def test_an_star_covering_radius():
    rng = np.random.default_rng(1)
    for k in (2, 3, 5):
        gen = cv.an_star_basis(k)
        r = cv.an_star_covering_radius(k)
        assert abs(abs(np.linalg.det(gen)) - 1 / math.sqrt(k + 1)) < 1e-12  # cell volume
        pts = rng.uniform(-3, 3, (20000, k))
        z0 = np.round(pts @ np.linalg.inv(gen).T)
        import itertools
        off = np.array(list(itertools.product((-1, 0, 1), repeat=k)))
        d = np.min(np.linalg.norm((z0[:, None, :] + off[None]) @ gen.T - pts[:, None, :], axis=-1), axis=1)
        assert d.max() <= r * (1 + 1e-9) and d.max() > 0.93 * r


@pytest.mark.parametrize("max_snr_loss", [0.2, 0.05])
def test_built_covering_keeps_its_promise(survey, max_snr_loss):
    trials, summary = cv.covering_lattice(REFERENCE, SMALL, survey["metric"], max_snr_loss, 200_000)
    assert summary["n_tiles"] == 1  # the small box is linear enough
    assert abs(summary["n_trials"] / summary["estimate"] - 1) < 0.15
    assert summary["lower_bound"] <= summary["n_trials"]
    samples = cv.sample_region(REFERENCE, SMALL, 500, seed=11)
    loss = _loss(survey, trials, samples)
    assert loss.max() <= max_snr_loss, (loss.max(), summary["lattice"])
    # The covering is not trivially loose: its worst sampled orbit uses most of the budget.
    assert loss.max() > 0.6 * max_snr_loss
    # nearest_trials returns points of the built covering (and the same loss).
    near, dist = cv.nearest_trials(summary, samples)
    assert dist.max() <= summary["covering_radius"] * (1 + 1e-9)
    built = {tuple(np.round(r, 9)) for r in trials[cv.REGION_ELEMENTS].to_numpy()}
    assert all(tuple(np.round(r, 9)) in built for r in near[cv.REGION_ELEMENTS].to_numpy())


@pytest.mark.parametrize("max_snr_loss", [0.2, 0.05])
def test_whole_box_through_nearest_trials(survey, max_snr_loss):
    """The KBO box itself: 1.7e7 / 4.7e8 trials, checked at the points nearest 500 samples."""
    summary = cv.covering_plan(REFERENCE, BOX, survey["metric"], max_snr_loss, tiles=BOX_TILES[max_snr_loss])
    samples = cv.sample_region(REFERENCE, BOX, 500, seed=12)
    near, _ = cv.nearest_trials(summary, samples)
    loss, best = _loss(survey, near, samples, return_best=True)
    assert loss.max() <= max_snr_loss
    check = cv.loss_excess(summary, near, samples, loss, best)
    assert check["safety_needed"] < summary["safety_factor"]
    # One tile (the linear model over the whole box) is not enough at 0.05: the tiles are needed.
    if max_snr_loss == 0.05:
        one = cv.covering_plan(REFERENCE, BOX, survey["metric"], max_snr_loss, tiles=None)
        more = cv.sample_region(REFERENCE, BOX, 1500, seed=13)
        near1, _ = cv.nearest_trials(one, more)
        assert (_loss(survey, near1, more) > max_snr_loss).any()


def test_choose_tiles_small_box_is_one_tile(survey):
    tiles, safety, log = cv.choose_tiles(REFERENCE, SMALL, survey["metric"], 0.05, check_samples=100)
    assert set(tiles.values()) == {1} and safety == cv.DEFAULT_SAFETY_FACTOR and len(log) == 1


def test_choose_tiles_splits_the_wide_box(survey):
    """Over the KBO box the excess at 0.05 is ~0.8 rho^2 with one tile; e is the element to cut."""
    tiles, safety, log = cv.choose_tiles(REFERENCE, BOX, survey["metric"], 0.05, check_samples=100, max_rounds=3)
    assert log[0]["excess_over_rho2"][0] > 0.3 and log[0]["split"] == "e"
    assert tiles["e"] > 1 and safety < log[0]["safety_factor"]


def test_thin_direction_gets_one_point(survey):
    thin_box = {**SMALL, "e": 1e-8}  # far thinner than a cell along e
    trials, summary = cv.covering_lattice(REFERENCE, thin_box, survey["metric"], 0.2, 100_000, tiles=None)
    _, summary_fixed = cv.covering_lattice(REFERENCE, {**SMALL, "e": 0.0}, survey["metric"], 0.2, 100_000,
                                               tiles=None)
    thin = [d for d in summary["per_direction"] if d["thin"]]
    assert any(d["dominant_element"] == "e" and d["points"] == 1 for d in thin)
    assert summary["dimension"] == summary_fixed["dimension"]
    # One point along e: as many trials as with e not varied at all.
    assert abs(summary["n_trials"] / summary_fixed["n_trials"] - 1) < 0.02
    samples = cv.sample_region(REFERENCE, thin_box, 500, seed=14)
    assert _loss(survey, trials, samples).max() <= 0.2


def test_refusal_names_the_number(survey):
    plan = cv.covering_plan(REFERENCE, BOX, survey["metric"], 0.2, tiles=BOX_TILES[0.2])
    with pytest.raises(ValueError, match=r"needs about ([\d.e+]+) trial orbits.*orbits/s.*take about") as err:
        cv.covering_lattice(REFERENCE, BOX, survey["metric"], 0.2, 1_000_000, tiles=BOX_TILES[0.2],
                            throughput_orbits_per_s=2350)
    number = float(re.search(r"needs about ([\d.e+]+)", str(err.value)).group(1))
    assert abs(number / plan["estimate"] - 1) < 0.01
    assert "hours" in str(err.value)  # 1.7e7 orbits at 2350 orbits/s
    # Just above max_trials: counted exactly.
    trials, _ = cv.covering_lattice(REFERENCE, SMALL, survey["metric"], 0.2, 100_000, tiles=None)
    with pytest.raises(ValueError, match=f"needs {len(trials):,} trial orbits"):
        cv.covering_lattice(REFERENCE, SMALL, survey["metric"], 0.2, len(trials) - 1, tiles=None)


def test_half_as_dense_fails(survey):
    """A lattice twice as coarse in every direction (covering radius x2) breaks the promise."""
    trials, summary = cv.covering_lattice(REFERENCE, SMALL, survey["metric"], 0.2, 100_000, tiles=None)
    coarse, coarse_summary = cv.covering_lattice(REFERENCE, SMALL, survey["metric"], 0.2, 100_000, tiles=None,
                                                 safety_factor=summary["safety_factor"] / 4)
    assert coarse_summary["rho"] == pytest.approx(2 * summary["rho"])
    samples = cv.sample_region(REFERENCE, SMALL, 500, seed=15)
    assert _loss(survey, trials, samples).max() <= 0.2
    assert (_loss(survey, coarse, samples) > 0.2).any()


def test_lattice_beats_cubic_and_random_sampling_estimate(survey):
    _, summary = cv.covering_lattice(REFERENCE, SMALL, survey["metric"], 0.2, 100_000, tiles=None)
    cubic = cv.covering_plan(REFERENCE, SMALL, survey["metric"], 0.2, lattice="cubic")
    assert cubic["estimate"] > 1.3 * summary["n_trials"]
    rnd = cv.random_trials_needed(summary, survey["metric"], 0.9, n_samples=200, n_proposals=2000, seed=3,
                                  model="exact")
    lin = cv.random_trials_needed(summary, survey["metric"], 0.9, n_samples=200, n_proposals=2000, seed=3)
    assert rnd["rel_error"] < 0.2 and rnd["edge_fraction"] < 0.01 and rnd["n_zero"] == 0
    assert abs(lin["n_random"] / rnd["n_random"] - 1) < 0.1
    n_random = int(rnd["n_random"])
    # Direct check of the random-sampling estimate: n_random uniform orbits cover ~90%.
    random = cv.sample_region(REFERENCE, SMALL, n_random, seed=16)
    samples = cv.sample_region(REFERENCE, SMALL, 500, seed=17)
    covered = np.mean(_loss(survey, random, samples) <= 0.2)
    print(f"covering {summary['n_trials']} trials (all covered); random: {n_random} for 90% (direct: {covered:.3f}),"
          f" {rnd['n_random_99']:.0f} for 99%")
    assert 0.86 < covered < 0.94, covered
    # On this small box random sampling reaches 90% with fewer orbits than the covering's 100%
    # (most of its directions are thinner than a cell), but not 99%.
    assert rnd["n_random_99"] > summary["n_trials"]


def test_refine_from_a_trial(survey):
    trials, _ = cv.covering_lattice(REFERENCE, SMALL, survey["metric"], 0.2, 100_000, tiles=None)
    truth = cv.sample_region(REFERENCE, SMALL, 1, seed=18).iloc[0]
    loss, best = _loss(survey, trials, truth.to_frame().T, return_best=True)
    start = trials.set_index("orbit_id").loc[best[0]]
    snr_fn, positions = synthetic_snr_fn(truth, survey["jd"], survey["site"], survey["sigma"], peak_snr=12.0)
    res = refine_orbit(start, snr_fn)
    assert res.snr_before == pytest.approx(12.0 * (1 - loss[0]), rel=1e-3)
    assert res.snr_after > res.snr_before and res.snr_after > 12.0 * (1 - 1e-6)
    x_true = np.array([truth[k] for k in cv.REGION_ELEMENTS])
    x_ref = np.array([res.elements[k] for k in cv.REGION_ELEMENTS])
    rms = float(np.sqrt(np.mean(np.sum((np.asarray(positions(x_ref)) - np.asarray(positions(x_true))) ** 2, -1))))
    assert rms < 0.1  # arcsec
    assert res.covariance.shape == (6, 6) and np.all(res.sigma > 0)


def _cusp_snr(x):
    """Finite at its start (x[0] = 0) but with no curvature there: the Hessian is NaN."""
    return 10.0 - jnp.sum((x[1:] - 0.5) ** 2) - jnp.sqrt(jnp.abs(x[0]))


def test_refine_stops_where_the_curvature_is_not_finite(capfd):
    """A start where the SNR's Hessian is NaN (as at a track crossing an image's edge) gives an
    unconverged result at the start with infinite sds, without handing the NaNs to LAPACK
    (which prints "On entry to DLASCL parameter number 4 had an illegal value")."""
    res = refine_orbit(np.zeros(6), _cusp_snr)
    assert "illegal value" not in "".join(capfd.readouterr())
    assert not res.converged and res.steps == 0
    assert res.snr_after == res.snr_before == pytest.approx(10.0 - 5 * 0.25)
    assert np.all(np.isinf(res.sigma))
