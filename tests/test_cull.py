"""The intersection search's pruning loses nothing.

``intersect`` propagates orbits exactly only at track nodes and at exposures its cull keeps,
and projects each candidate only on the images its exposure's lookup grid lists. Checked
here: the cull's error bound holds for orbits from the Kuiper belt to near the Earth, the
cull prunes, and on a ZTF-like mosaic survey the intersections are brute force's: every
orbit against every image, no pruning, pixels from astropy's WCS
(``tests/test_brute_force.py``).
"""
import numpy as np
import pandas as pd
import pytest

from skystack.astrometry.directions import _directions_jit
from skystack.astrometry.kepler import orbit_arrays
from skystack.orbits.population import population
from skystack.search.intersect import (
    NODE_SPACING_DAY,
    _cull_pairs,
    _node_states_jit,
    _orbit_track_bounds,
    _track_estimate,
    prepare_images,
)
from skystack.sim.mosaic import ecliptic_survey


def mixed_orbits(n_kbo: int, n_centaur: int, seed: int) -> pd.DataFrame:
    """KBOs, centaurs and inner-solar-system orbits (q from 0.3 AU), ids 0..n-1."""
    rng = np.random.default_rng(seed)
    inner = pd.DataFrame({"a_au": rng.uniform(1.0, 4.0, 200), "e": rng.uniform(0.0, 0.7, 200),
                          "inc_deg": rng.uniform(0, 30, 200), "node_deg": rng.uniform(0, 360, 200),
                          "argperi_deg": rng.uniform(0, 360, 200), "mean_anomaly_deg": rng.uniform(0, 360, 200),
                          "epoch_jd_tdb": 2451545.0})
    parts = [population("kbo", np.arange(n_kbo), seed=seed), population("centaur", np.arange(n_centaur), seed=seed), inner]
    out = pd.concat([p.drop(columns="orbit_id", errors="ignore") for p in parts], ignore_index=True)
    out.insert(0, "orbit_id", np.arange(len(out), dtype=np.int64))
    return out


@pytest.fixture(scope="module")
def survey():
    return mosaic_survey()


def mosaic_survey():
    return ecliptic_survey(24, years=6.0, seed=3)


def test_track_bound_holds(survey):
    """The true direction is always within the cull's bound of its track estimate."""
    orbits = mixed_orbits(3000, 1000, seed=4)
    im = prepare_images(survey)
    orb = orbit_arrays(orbits)
    pos, vel = _node_states_jit(orb, im.node_jd_tdb)
    acc_max, speed_max = _orbit_track_bounds(orb)
    rel, sin_bound = _track_estimate(pos, vel, acc_max, speed_max, im.exposure_node, im.exposure_dt_day,
                                            im.sun_taylor_au[:, 0, :] - im.observer_au)
    exact, _ = _directions_jit(orb, im.jd_tdb, im.observer_au, im.sun_taylor_au)
    rel, sin_bound, exact = np.asarray(rel), np.asarray(sin_bound), np.asarray(exact)
    estimate = rel / np.linalg.norm(rel, axis=-1, keepdims=True)
    angle = 2 * np.arcsin(np.clip(np.linalg.norm(exact - estimate, axis=-1) / 2, 0, 1))
    informative = sin_bound < 1
    bound = np.arcsin(np.minimum(sin_bound, 1.0))
    assert (angle[informative] <= bound[informative]).all()
    # Nodes every 120 days keep the bound tight for distant orbits: under 5 arcmin for KBOs
    # (q > 22 AU) and informative for all but the innermost orbits.
    kbo = np.arange(len(orbits)) < 3000
    assert np.degrees(bound[:, kbo]).max() * 60 < 5
    assert informative[:, : 4000].all()
    assert np.abs(im.exposure_dt_day).max() <= NODE_SPACING_DAY / 2


def test_cull_prunes_most_pairs(survey):
    """The cull keeps few (exposure, orbit) pairs, and the lookup grid few images per pair."""
    orbits = population("kbo", np.arange(5000), seed=6)
    im = prepare_images(survey)
    e, o = _cull_pairs(orbit_arrays(orbits), im, 64 << 20)
    kept = len(e) / (im.n_exposures * len(orbits))
    assert 0 < kept < 0.015
    assert im.cell_slots.shape[-1] <= 4  # a cell of the 8 x 8 mosaic meets at most 4 quadrants
