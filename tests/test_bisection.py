"""The one balanced bisection (image partitions, catalog regions) and region neighbours, near
the pole and across RA 0, against plain geometry and astropy separations."""
import numpy as np
import pandas as pd
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from skystack.catalog.regions import make_regions, region_neighbours
from skystack.core.bisection import balanced_bisection, unit_vectors


def _cap(center_ra, center_dec, radius_deg, n, seed):
    """Points spread uniformly over a small cap (astropy does the offsets)."""
    rng = np.random.default_rng(seed)
    sep = radius_deg * np.sqrt(rng.uniform(0, 1, n))
    pa = rng.uniform(0, 360, n)
    pts = SkyCoord(center_ra * u.deg, center_dec * u.deg).directional_offset_by(pa * u.deg, sep * u.deg)
    return pts.ra.deg, pts.dec.deg


@pytest.mark.parametrize("center", [(0.0, 90.0), (123.0, -89.95), (0.0, 0.0), (359.99, 30.0)])
@pytest.mark.parametrize("n_parts", [2, 3, 7])
def test_parts_are_balanced_and_separated_by_a_plane(center, n_parts):
    ra, dec = _cap(*center, 0.2, 1001, seed=n_parts)
    part = balanced_bisection(ra, dec, n_parts)
    sizes = np.bincount(part, minlength=n_parts)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(ra)
    if n_parts == 2:  # the first cut is a plane x_axis = const: nothing of one side is beyond it
        xyz = unit_vectors(ra, dec)
        assert any(xyz[part == 0, k].max() <= xyz[part == 1, k].min() or xyz[part == 1, k].max() <= xyz[part == 0, k].min()
                   for k in range(3))
    # Coherent: each part is far smaller on the sky than the cap (the old tangent-plane cut
    # in RA broke at the pole, where RA says nothing about position).
    coords = SkyCoord(ra * u.deg, dec * u.deg)
    for p in range(n_parts):
        mine = coords[part == p]
        centre = SkyCoord(*[np.mean(a) for a in (mine.cartesian.x, mine.cartesian.y, mine.cartesian.z)],
                          representation_type="cartesian").spherical
        spread = SkyCoord(centre.lon, centre.lat).separation(mine).deg
        assert np.median(spread) < 0.2 * (0.85 if n_parts == 2 else 0.7)


def test_ties_are_broken_by_the_key_and_results_do_not_depend_on_order():
    ra, dec = np.zeros(10), np.zeros(10)
    key = np.arange(10)[::-1]
    part = balanced_bisection(ra, dec, 2, tie_key=key)
    assert set(np.flatnonzero(part == 0)) == set(range(5, 10))  # lowest keys first


def test_region_neighbours_at_the_pole_match_astropy():
    ra, dec = _cap(10.0, 89.99, 0.05, 400, seed=3)
    cand = pd.DataFrame({"ra": ra, "dec": dec})
    regions = make_regions(cand, n_regions=4)
    margin_arcsec = 20.0
    coords = SkyCoord(ra * u.deg, dec * u.deg)
    for r in range(4):
        got = set(region_neighbours(cand, regions, r, margin_arcsec).index)
        mine = coords[regions == r]
        others = np.flatnonzero(regions != r)
        nearest = np.array([mine.separation(coords[i]).arcsec.min() for i in others])
        want = set(others[nearest <= margin_arcsec])
        assert got == want and len(want) > 0
