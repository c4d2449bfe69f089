"""Regions are balanced by count, deterministic, and cover every source exactly once."""
import numpy as np
import pandas as pd
import pytest

from skystack.catalog.regions import make_regions, region_neighbours


@pytest.fixture(scope="module")
def candidates():
    rng = np.random.default_rng(4)
    # Clustered sky: a dense clump and a sparse background.
    ra = np.r_[rng.normal(150.0, 0.002, 300), rng.uniform(149.95, 150.05, 700)]
    dec = np.r_[rng.normal(2.0, 0.002, 300), rng.uniform(1.95, 2.05, 700)]
    return pd.DataFrame({"ra": ra, "dec": dec, "flux_r_nmgy": np.ones(1000)})


@pytest.mark.parametrize("n_regions", [1, 2, 7, 16])
def test_regions_balanced_and_partition(candidates, n_regions):
    reg = make_regions(candidates, n_regions=n_regions)
    assert reg.shape == (len(candidates),)
    assert set(reg) == set(range(n_regions))
    counts = np.bincount(reg)
    assert counts.sum() == len(candidates)
    assert counts.max() - counts.min() <= int(np.ceil(np.log2(max(n_regions, 2))))
    assert counts.max() <= int(np.ceil(len(candidates) / n_regions)) + 1


def test_max_sources_per_region(candidates):
    reg = make_regions(candidates, max_sources_per_region=90)
    assert np.bincount(reg).max() <= 90
    assert reg.max() + 1 == int(np.ceil(1000 / 90))


def test_regions_are_deterministic_and_spatially_compact(candidates):
    a = make_regions(candidates, n_regions=8)
    b = make_regions(candidates.copy(), n_regions=8)
    np.testing.assert_array_equal(a, b)
    # Compact: each region's extent is much smaller than the field's.
    for r in range(8):
        sel = candidates[a == r]
        assert min(np.ptp(sel["ra"]), np.ptp(sel["dec"])) < 0.08


def test_neighbours_come_from_other_regions_within_margin(candidates):
    reg = make_regions(candidates, n_regions=4)
    neigh = region_neighbours(candidates, reg, 0, margin_arcsec=20.0)
    assert len(neigh) > 0
    assert np.all(reg[neigh.index] != 0)
    mine = candidates[reg == 0]
    for _, row in neigh.head(20).iterrows():
        d = np.hypot((mine["ra"] - row["ra"]) * np.cos(np.radians(2.0)), mine["dec"] - row["dec"]) * 3600
        assert d.min() <= 20.0 + 1e-6
