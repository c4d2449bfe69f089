"""DE421 positions and observatory offsets against skyfield (same kernel, own code)."""
import os

import numpy as np
import pytest

from skystack.astrometry import ephemeris

pytestmark = pytest.mark.filterwarnings("ignore:The file finals2000A.all has expired")
pytest.importorskip("skyfield")

PALOMAR = (33.3563, -116.8650, 1712.0)
JD_TDB = np.linspace(2415100.0, 2470000.0, 41)  # 1900 to 2050
JD_RECENT = np.linspace(2451545.0, 2460700.0, 23)  # 2000 to 2025, inside the IERS tables
M_PER_AU = ephemeris.AU_KM * 1e3


@pytest.fixture(scope="module")
def sky():
    from skyfield.api import load, load_file
    from skyfield.data import iers
    from skyfield_data import get_skyfield_data_path

    data = get_skyfield_data_path()
    ts = load.timescale(builtin=True)
    # Polar motion from the shipped IERS file, as astropy applies it (~10 m otherwise).
    with open(os.path.join(data, "finals2000A.all"), "rb") as f:
        iers.install_polar_motion_table(ts, iers.parse_x_y_dut1_from_finals_all(f))
    return ts, load_file(os.path.join(data, "de421.bsp"))


def test_kernel_is_shipped_with_skyfield_data():
    path = ephemeris.de421_path()
    assert path.name == "de421.bsp" and "skyfield_data" in str(path) and path.stat().st_size > 10_000_000


def test_earth_and_sun_match_skyfield(sky):
    ts, planets = sky
    t = ts.tdb_jd(JD_TDB)
    for body, ours in (("earth", ephemeris.earth_barycentric_posvel_au), ("sun", ephemeris.sun_barycentric_posvel_au)):
        ref = planets[body].at(t)
        pos, vel = ours(JD_TDB)
        assert pos.shape == vel.shape == (len(JD_TDB), 3)
        assert np.abs(pos - ref.position.au.T).max() < 1e-12
        assert np.abs(vel - ref.velocity.au_per_d.T).max() < 1e-12
    # Scalars work too, as one time.
    assert ephemeris.earth_barycentric_au(2451545.0).shape == (1, 3)


def test_sun_taylor_terms_predict_days_back():
    jd = JD_RECENT
    taylor = ephemeris.sun_barycentric_taylor_au(jd)
    # Light times of bodies at up to ~1000 AU; 500 m at 1000 AU is 3e-12 rad.
    for dt, tol_m in ((0.1, 0.01), (2.0, 30.0), (6.0, 500.0)):
        pred = taylor[:, 0] - dt * taylor[:, 1] + 0.5 * dt * dt * taylor[:, 2]
        true = ephemeris.sun_barycentric_au(jd - dt)
        assert np.linalg.norm(pred - true, axis=1).max() * M_PER_AU < tol_m


def test_observatory_offset_matches_skyfield(sky):
    from skyfield.api import wgs84

    ts, planets = sky
    t = ts.tdb_jd(JD_RECENT)
    ref = wgs84.latlon(PALOMAR[0], PALOMAR[1], elevation_m=PALOMAR[2]).at(t).position.au.T
    ours = ephemeris.observatory_gcrs_au(JD_RECENT, *PALOMAR)
    assert np.linalg.norm(ours - ref, axis=1).max() * M_PER_AU < 3.0  # metres
    radius_m = np.linalg.norm(ours, axis=1) * M_PER_AU
    assert np.all((radius_m > 6.37e6) & (radius_m < 6.38e6))

    observer = ephemeris.observer_barycentric_au(JD_RECENT, *PALOMAR)
    ref_bary = (planets["earth"] + wgs84.latlon(PALOMAR[0], PALOMAR[1], elevation_m=PALOMAR[2])).at(t).position.au.T
    assert np.linalg.norm(observer - ref_bary, axis=1).max() < 1e-9
    assert np.linalg.norm(observer - ref_bary, axis=1).max() * M_PER_AU < 3.0


def test_observatory_sites_broadcast():
    jd = JD_RECENT[:3]
    many = ephemeris.observatory_gcrs_au(jd, [PALOMAR[0], -30.24, 19.82], [PALOMAR[1], -70.74, -155.47], [1712.0, 2663.0, 4205.0])
    one = ephemeris.observatory_gcrs_au(jd[1:2], -30.24, -70.74, 2663.0)
    np.testing.assert_allclose(many[1], one[0], rtol=0, atol=1e-15)


def test_observatory_beyond_iers_tables_still_works():
    with pytest.warns(Warning):
        pos = ephemeris.observatory_gcrs_au(2469000.5, *PALOMAR)  # 2047: no IERS values there
    assert np.isfinite(pos).all()


def test_utc_to_tdb(sky):
    ts, _ = sky
    mjd = np.array([51544.5, 58849.0, 60000.3])  # 2000-01-01 12h, 2020-01-01 0h, 2023-02-25 7.2h UTC
    ref = np.array([ts.utc(2000, 1, 1, 12).tdb, ts.utc(2020, 1, 1).tdb, ts.utc(2023, 2, 25, 7, 12).tdb])
    ours = ephemeris.utc_mjd_to_tdb_jd(mjd)
    assert np.abs(ours - ref).max() * 86400 < 1e-4  # seconds
    # TT - UTC = 32.184 s + 32 leap seconds in 2000; TDB - TT is below 2 ms.
    assert abs((ours[0] - 2451545.0) * 86400 - 64.184) < 2e-3
    topo = ephemeris.utc_mjd_to_tdb_jd(mjd, *PALOMAR)
    assert np.abs(topo - ours).max() * 86400 < 1e-5


def test_out_of_range_times_are_refused():
    with pytest.raises(ValueError, match=r"de421.bsp: JD 2480000.0 TDB \(1 time\(s\)\) is outside the DE421 range"):
        ephemeris.earth_barycentric_au([2451545.0, 2480000.0])


_OBSERVATORY_SCRIPT = """
import sys
import numpy as np
from skystack.astrometry.ephemeris import observatory_gcrs_posvel_au, utc_mjd_to_tdb_jd
jd = np.linspace(2455000.5, 2460500.5, 7)
pos, vel = observatory_gcrs_posvel_au(jd, 33.3563, -116.865, 1712.0)
tdb = utc_mjd_to_tdb_jd(np.linspace(55000.0, 60500.0, 5), 33.3563, -116.865, 1712.0)
np.save(sys.argv[1], np.concatenate([pos.ravel(), vel.ravel(), tdb]))
"""


def test_cached_iers_table_gives_the_same_positions(tmp_path):
    """The pickled IERS table (written by one process, read by the next) places the observatory
    and converts times exactly as astropy's own parse of the bundled table does."""
    import subprocess
    import sys

    def run(name, cache):
        out = tmp_path / f"{name}.npy"
        subprocess.run([sys.executable, "-c", _OBSERVATORY_SCRIPT, str(out)], check=True,
                       env={**os.environ, "SKYSTACK_IERS_CACHE": cache})
        return np.load(out)

    parsed = run("parsed", "off")
    writes = run("writes", str(tmp_path / "iers"))
    assert len(list((tmp_path / "iers").glob("earth_orientation-*.pickle"))) == 1
    reads = run("reads", str(tmp_path / "iers"))
    np.testing.assert_array_equal(writes, parsed)
    np.testing.assert_array_equal(reads, parsed)
