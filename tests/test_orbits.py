"""Orbit tables, sources and Kepler propagation."""
import os

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from skystack.astrometry.directions import sky_positions
from skystack.astrometry.kepler import ecliptic_to_icrs_matrix, propagate, solve_kepler
from skystack.core.units import GAUSS_K
from skystack.orbits.grid import grid_around
from skystack.orbits.population import population
from skystack.orbits.table import (
    ELEMENT_COLUMNS,
    ORBIT_COLUMNS,
    load_known_objects,
    load_orbits,
    validate_orbits,
)

pytestmark = pytest.mark.filterwarnings("ignore:The file finals2000A.all has expired")
KNOWN = REPO / "resources" / "known_objects.csv"  # the repository's own copy


def table(**overrides):
    base = dict(orbit_id=[1, 2, 3], a_au=[40.0, 13.6, 5.9], e=[0.05, 0.38, 0.04], inc_deg=[2.0, 6.9, 9.4],
                node_deg=[10.0, 209.4, 312.6], argperi_deg=[20.0, 339.1, 50.5], mean_anomaly_deg=[30.0, 28.0, 186.2],
                epoch_jd_tdb=[2451545.0] * 3)
    base.update(overrides)
    return pd.DataFrame(base)


def skyfield_orbit(row, ts):
    from skyfield.constants import AU_KM, DAY_S
    from skyfield.data.spice import inertial_frames
    from skyfield.keplerlib import _KeplerOrbit

    a, e = row["a_au"], row["e"]
    orbit = _KeplerOrbit._from_mean_anomaly(a * (1 - e * e), e, row["inc_deg"], row["node_deg"], row["argperi_deg"],
                                            row["mean_anomaly_deg"], ts.tdb_jd(row["epoch_jd_tdb"]),
                                            0.01720209895**2 * AU_KM**3 / DAY_S**2, 10, "test")
    orbit._rotation = inertial_frames["ECLIPJ2000"].T
    return orbit


# ----------------------------------------------------------------------------- propagation
def test_circular_orbit_keeps_radius_and_period():
    df = table(e=[0.0] * 3, inc_deg=[0.0, 45.0, 170.0])
    period_d = 2 * np.pi / (GAUSS_K / df["a_au"].to_numpy() ** 1.5)
    jd = 2451545.0 + np.linspace(-40000, 40000, 201)
    pos = propagate(df, jd)
    assert pos.shape == (201, 3, 3)
    np.testing.assert_allclose(np.linalg.norm(pos, axis=-1), np.broadcast_to(df["a_au"].to_numpy(), (201, 3)), rtol=1e-13)
    for i in range(3):
        back = propagate(df.iloc[[i]], 2451545.0 + np.array([0.0, period_d[i]]))
        np.testing.assert_allclose(back[1], back[0], atol=1e-9 * df["a_au"].iloc[i])


def test_kepler_equation_residual():
    m = np.linspace(-50.0, 50.0, 20001)
    for e in (0.0, 0.1, 0.5, 0.9, 0.99, 0.999):
        ecc = np.asarray(solve_kepler(m, np.full_like(m, e)))
        resid = ecc - e * np.sin(ecc) - m
        resid = (resid + np.pi) % (2 * np.pi) - np.pi
        assert np.abs(resid).max() < 1e-13, e


def test_orbit_plane_and_energy():
    """Positions stay in the plane of the elements, and r ranges over [q, Q]."""
    df = table()
    jd = 2451545.0 + np.linspace(0, 60000, 3001)
    pos = propagate(df, jd)
    r = np.linalg.norm(pos, axis=-1)
    a, e = df["a_au"].to_numpy(), df["e"].to_numpy()
    assert np.all(r >= a * (1 - e) * (1 - 1e-12)) and np.all(r <= a * (1 + e) * (1 + 1e-12))
    normal = np.cross(pos[0], pos[7])
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    assert np.abs(np.einsum("tnk,nk->tn", pos, normal)).max() < 1e-10
    # The normal's inclination to the ecliptic pole is the element's inclination.
    pole = ecliptic_to_icrs_matrix() @ np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(np.degrees(np.arccos(normal @ pole)), df["inc_deg"], atol=1e-9)


def test_heliocentric_positions_match_skyfield():
    from skyfield.api import load

    ts = load.timescale(builtin=True)
    df = table()
    jd = np.array([2440000.5, 2451545.0, 2458849.5, 2466000.5])
    pos = propagate(df, jd)
    for i, row in df.iterrows():
        ref = skyfield_orbit(row, ts).at(ts.tdb_jd(jd)).position.au.T
        # skyfield counts time in TT, we in TDB (< 2 ms apart): metres, 1e-12 rad at 40 AU.
        assert np.abs(pos[:, i] - ref).max() < 1e-10


def test_chiron_geocentric_direction_matches_skyfield():
    from skyfield.api import load, load_file
    from skyfield_data import get_skyfield_data_path

    planets = load_file(os.path.join(get_skyfield_data_path(), "de421.bsp"))
    ts = load.timescale(builtin=True)
    known = load_known_objects(KNOWN)
    chiron = known[known["name"] == "2060 Chiron"]
    jd = np.array([2451544.5, 2455000.5, 2458849.5, 2461000.5])
    ra, dec = sky_positions(chiron, jd)
    orbit = skyfield_orbit(chiron.iloc[0], ts)
    for k, t in enumerate(jd):
        r, d, _ = planets["earth"].at(ts.tdb_jd(t)).observe(planets["sun"] + orbit).radec()
        dra = ((ra[0, k] - r._degrees + 180) % 360 - 180) * np.cos(d.radians)
        sep_arcsec = np.hypot(dra, dec[0, k] - d.degrees) * 3600
        assert sep_arcsec < 0.1
        assert sep_arcsec < 1e-4  # in practice: same physics, independent code


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("edit, message", [
    (dict(e=[0.1, 1.0, 0.2]), "orbit_id 2: e = 1.0 must be < 1"),
    (dict(e=[0.1, -0.1, 0.2]), "orbit_id 2: e = -0.1 must be >= 0"),
    (dict(a_au=[40.0, 13.0, -5.0]), "orbit_id 3: a_au = -5.0 must be > 0"),
    (dict(inc_deg=[np.nan, 1.0, 2.0]), "orbit_id 1: non-finite inc_deg = nan"),
    (dict(mean_anomaly_deg=[1.0, np.inf, 2.0]), "orbit_id 2: non-finite mean_anomaly_deg = inf"),
    (dict(orbit_id=[1, 2, 1]), "orbit_id 1: duplicate id"),
    (dict(inc_deg=[1.0, 190.0, 2.0]), r"orbit_id 2: inc_deg = 190.0 must be in \[0, 180\]"),
    (dict(e=[1.5, 1.2, 0.1]), r"orbit_id 1: e = 1.5 must be < 1 .*\(1 more row"),
])
def test_validation_names_source_row_and_problem(edit, message):
    with pytest.raises(ValueError, match=f"^my_orbits.csv: {message}"):
        validate_orbits(table(**edit), source="my_orbits.csv")


def test_validation_missing_column_and_types():
    with pytest.raises(ValueError, match="src: missing orbit column.*epoch_jd_tdb"):
        validate_orbits(table().drop(columns="epoch_jd_tdb"), source="src")
    with pytest.raises(ValueError, match="src: row 1: orbit_id 'x' is not an integer"):
        validate_orbits(table(orbit_id=[1, "x", 3]), source="src")
    out = validate_orbits(table(orbit_id=[1.0, 2.0, 3.0]).assign(name=["a", "b", "c"]))
    assert out["orbit_id"].dtype == np.int64 and list(out["name"]) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- sources
@pytest.mark.parametrize("preset", ["kbo", "centaur"])
def test_population_rebuilds_any_orbit_from_its_id_alone(preset):
    a = population(preset, np.arange(1500, 2000), seed=11)
    whole = population(preset, np.arange(1000, 2500), seed=11)
    pd.testing.assert_frame_equal(a, whole.iloc[500:1000].reset_index(drop=True))
    scattered = population(preset, np.array([1999, 1500, 1700]), seed=11)
    pd.testing.assert_frame_equal(scattered, a.set_index("orbit_id").loc[[1999, 1500, 1700]].reset_index())
    assert not np.allclose(population(preset, np.arange(1500, 2000), seed=12)["a_au"], a["a_au"])


@pytest.mark.parametrize("preset, a_range, e_max, inc_scale", [("kbo", (30, 60), 0.25, 6.0),
                                                                ("centaur", (5, 30), 0.5, 10.0)])
def test_population_element_distributions(preset, a_range, e_max, inc_scale):
    """Kolmogorov-Smirnov against the documented distributions (scipy's, not ours)."""
    from scipy import stats

    df = population(preset, np.arange(20000), seed=5)
    assert stats.kstest(df["a_au"], stats.uniform(a_range[0], a_range[1] - a_range[0]).cdf).pvalue > 1e-3
    assert stats.kstest(df["e"], stats.uniform(0, e_max).cdf).pvalue > 1e-3
    capped = df["inc_deg"] < 60.0  # Rayleigh, capped at 60 deg
    assert stats.kstest(df.loc[capped, "inc_deg"], lambda x: stats.rayleigh(scale=inc_scale).cdf(x)
                        / stats.rayleigh(scale=inc_scale).cdf(60.0)).pvalue > 1e-3
    for col in ("node_deg", "argperi_deg", "mean_anomaly_deg"):
        assert stats.kstest(df[col], stats.uniform(0, 360).cdf).pvalue > 1e-3, col
    assert (df["epoch_jd_tdb"] == 2451545.0).all()


def test_focused_population_stays_near_the_reference():
    ref = load_known_objects(KNOWN).iloc[0]
    sigma = {"a_frac": 1e-3, "mean_anomaly_deg": 0.1, "inc_deg": 0.05, "node_deg": 0.0}
    df = population("focused", np.arange(4000), seed=1, reference=ref, sigma=sigma)
    assert abs(df["a_au"].std() / ref["a_au"] - 1e-3) < 5e-5
    assert abs(df["mean_anomaly_deg"].std() - 0.1) < 0.005
    assert abs(df["inc_deg"].std() - 0.05) < 0.0025
    assert abs(df["a_au"].mean() / ref["a_au"] - 1) < 1e-4
    assert (df["e"] == ref["e"]).all() and (df["node_deg"] == ref["node_deg"]).all()
    wide_e = population("focused", np.arange(4000), seed=1, reference=ref.to_dict() | {"e": 0.01}, sigma={"e": 0.05})
    assert wide_e["e"].between(0, 1).all() and wide_e["e"].min() < 0.005  # reflected at 0, not clipped
    with pytest.raises(ValueError, match="needs reference"):
        population("focused", np.arange(10), seed=1)
    with pytest.raises(ValueError, match="unknown width"):
        population("focused", np.arange(10), seed=1, reference=ref, sigma={"ecc": 0.1})
    with pytest.raises(ValueError, match="unknown orbit preset 'tno'"):
        population("tno", np.arange(10), seed=1)


def test_grid_around_chiron():
    chiron = load_known_objects(KNOWN).set_index("name").loc["2060 Chiron"].rename("2060 Chiron")
    grid = grid_around(chiron.to_dict() | {"name": "2060 Chiron"}, np.linspace(-0.01, 0.01, 5), start_id=10)
    assert grid["orbit_id"].tolist() == list(range(10, 15))
    np.testing.assert_allclose(grid["a_au"], chiron["a_au"] * (1 + np.linspace(-0.01, 0.01, 5)))
    assert (grid["e"] == chiron["e"]).all() and grid["name"].iloc[0].startswith("2060 Chiron a-0.01")
    two = grid_around(chiron.to_dict(), [0.0, 0.001], mean_anomaly_deg=[-0.5, 0.0, 0.5], name="C")
    assert len(two) == 6 and two["mean_anomaly_deg"].nunique() == 3
    with pytest.raises(ValueError, match="cannot offset"):
        grid_around(chiron.to_dict(), [0.0], epoch_jd_tdb=[1.0])


def test_load_orbits_csv_and_parquet(tmp_path):
    df = table().assign(name=["x", "y", "z"])
    df.to_csv(tmp_path / "o.csv", index=False)
    df.to_parquet(tmp_path / "o.parquet", index=False)
    for name in ("o.csv", "o.parquet"):
        got = load_orbits(tmp_path / name)
        pd.testing.assert_frame_equal(got[ORBIT_COLUMNS], validate_orbits(df)[ORBIT_COLUMNS])
    df.drop(columns="orbit_id").to_csv(tmp_path / "noid.csv", index=False)
    assert load_orbits(tmp_path / "noid.csv")["orbit_id"].tolist() == [0, 1, 2]
    table(e=[0.1, 2.0, 0.1]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad.csv'}: orbit_id 2: e = 2.0"):
        load_orbits(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unknown orbit file type"):
        load_orbits(tmp_path / "o.fits")


def test_load_known_objects():
    known = load_known_objects(KNOWN)
    assert {"2060 Chiron", "486958 Arrokoth"} <= set(known["name"])
    assert known["orbit_id"].tolist() == list(range(len(known)))
    assert known[ELEMENT_COLUMNS].dtypes.eq(np.float64).all()
