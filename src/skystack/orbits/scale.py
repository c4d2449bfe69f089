"""A plan for scale: how many trial orbits a blind search of a population in one survey field
needs, and how long the search would take at a measured throughput.

    python -m skystack.orbits.scale [--visits 300] [--years 3] [--psf-fwhm-arcsec 2.0]
        [--field-deg2 47] [--a 30 50] [--e 0 0.3] [--inc 0 30] [--max-snr-loss 0.2]
        [--intersections-per-s 8.9e5]

The estimate is the template-bank count of a lattice covering: in the survey's track metric M
(``covering.track_metric``: the SNR loss of an element offset d is about d^T M d), an A_6*
lattice of covering radius rho (rho^2 = -ln(1 - max_snr_loss) / safety factor) needs
``sqrt(det M) / det(lattice)`` points per unit volume of elements. The population's volume of
elements is that of its box (a, e, i ranges, the three angles over 360 deg) times the fraction
of its orbits inside the field at the first visit (drawn at random, ``population``-style),
and sqrt(det M) is averaged over orbits drawn inside the field. Assumptions, which make it an
order of magnitude and a lower bound: the object stays on the survey's images at every visit
(a survey tiles the sky around the field), the metric is that of a Gaussian PSF of the given
FWHM, and no tiles are needed (the covering's tiles add points where the tracks curve:
``covering.choose_tiles``). The search time is trial orbits x visits / intersections per
second (README's B2: 8.9e5 intersections/s end to end on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd

from ..core.units import FWHM_PER_SIGMA, PALOMAR
from .covering import (
    DEFAULT_SAFETY_FACTOR,
    an_star_basis,
    an_star_covering_radius,
    track_metric,
)
from .table import ELEMENT_COLUMNS

ARCSEC_PER_DEG = 3600.0


def field_visits(n_visits: int, years: float, field_lon_deg: float, first_jd_tdb: float, seed: int = 0):
    """Visit times (TDB JD) of one ecliptic field: nights within 60 days of its opposition each
    year, one visit a night, spread evenly over the seasons."""
    rng = np.random.default_rng(seed)
    seasons = max(1, int(math.ceil(years)))
    # Opposition: the Sun at the field's longitude + 180 deg (mean Sun, 1 deg/day from J2000).
    opp0 = first_jd_tdb + ((field_lon_deg - 180.0 - (280.46 + 0.98565 * (first_jd_tdb - 2451545.0))) % 360.0) / 0.98565
    jd = np.concatenate([opp0 + 365.25 * s + rng.uniform(-60, 60, n_visits // seasons + 1) for s in range(seasons)])
    return np.sort(np.floor(jd[:n_visits]) + 0.3)


def lattice_points_per_volume(k: int, max_snr_loss: float, safety_factor: float = DEFAULT_SAFETY_FACTOR) -> float:
    """Points of an A_k* covering per unit whitened volume at ``max_snr_loss``."""
    rho = math.sqrt(-math.log1p(-max_snr_loss) / safety_factor)
    det = abs(np.linalg.det(an_star_basis(k))) * (rho / an_star_covering_radius(k)) ** k
    return 1.0 / det


def population_in_field(n: int, a_au, e, inc_deg, field_radec_deg, field_radius_deg: float, jd_tdb: float,
                        seed: int = 0) -> tuple[pd.DataFrame, float]:
    """Orbits drawn uniformly from the box (angles uniform), those inside the field at
    ``jd_tdb``, and the fraction inside."""
    from ..astrometry.directions import sky_positions

    rng = np.random.default_rng(seed)
    orbits = pd.DataFrame({
        "orbit_id": np.arange(n, dtype=np.int64), "a_au": rng.uniform(*a_au, n), "e": rng.uniform(*e, n),
        "inc_deg": rng.uniform(*inc_deg, n), "node_deg": rng.uniform(0, 360, n),
        "argperi_deg": rng.uniform(0, 360, n), "mean_anomaly_deg": rng.uniform(0, 360, n),
        "epoch_jd_tdb": jd_tdb})
    ra, dec = (np.asarray(v)[:, 0] for v in sky_positions(orbits, jd_tdb, PALOMAR))
    ra0, dec0 = np.radians(field_radec_deg)
    cos_d = (np.sin(np.radians(dec)) * np.sin(dec0)
             + np.cos(np.radians(dec)) * np.cos(dec0) * np.cos(np.radians(ra) - ra0))
    inside = np.degrees(np.arccos(np.clip(cos_d, -1, 1))) <= field_radius_deg
    return orbits[inside].reset_index(drop=True), float(inside.mean())


def plan(n_visits=300, years=3.0, psf_fwhm_arcsec=2.0, field_deg2=47.0, a_au=(30.0, 50.0), e=(0.0, 0.3),
         inc_deg=(0.0, 30.0), max_snr_loss=0.2, intersections_per_s=8.9e5, n_draw=400_000, n_metric=40,
         field_lon_deg=0.0, first_jd_tdb=2459215.5, seed=0) -> dict:
    """The numbers of the module docstring, as a dict."""
    from ..sim.mosaic import ecliptic_to_radec_deg

    jd = field_visits(n_visits, years, field_lon_deg, first_jd_tdb, seed)
    field = ecliptic_to_radec_deg(field_lon_deg, 0.0)
    radius = math.sqrt(field_deg2 / math.pi)
    inside, fraction = population_in_field(n_draw, a_au, e, inc_deg, field, radius, float(jd[0]), seed)
    if len(inside) < 5:
        raise ValueError(f"only {len(inside)} of {n_draw} drawn orbits are in the field: draw more (n_draw)")
    sigma = psf_fwhm_arcsec / FWHM_PER_SIGMA
    root_det = []
    for _, orbit in inside.head(n_metric).iterrows():
        m = track_metric(orbit[ELEMENT_COLUMNS], jd, PALOMAR, sigma).matrix
        root_det.append(math.sqrt(max(np.linalg.det(m), 0.0)))
    volume = (a_au[1] - a_au[0]) * (e[1] - e[0]) * (inc_deg[1] - inc_deg[0]) * 360.0**3 * fraction
    density = float(np.mean(root_det)) * lattice_points_per_volume(6, max_snr_loss)
    n_trials = density * volume
    seconds = n_trials * n_visits / intersections_per_s
    return {"visits": n_visits, "years": years, "psf_fwhm_arcsec": psf_fwhm_arcsec, "field_deg2": field_deg2,
            "a_au": list(a_au), "e": list(e), "inc_deg": list(inc_deg), "max_snr_loss": max_snr_loss,
            "fraction_in_field": fraction, "n_in_field_drawn": len(inside),
            "sqrt_det_metric_median": float(np.median(root_det)), "element_volume": volume,
            "trial_orbits": n_trials, "intersections": n_trials * n_visits,
            "intersections_per_s": intersections_per_s, "cpu_core_hours": seconds / 3600.0 * 2.0,
            "hours_at_throughput": seconds / 3600.0}


def main(argv=None) -> dict:
    from ..core.runtime import configure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--visits", type=int, default=300)
    ap.add_argument("--years", type=float, default=3.0)
    ap.add_argument("--psf-fwhm-arcsec", type=float, default=2.0)
    ap.add_argument("--field-deg2", type=float, default=47.0)
    ap.add_argument("--a", type=float, nargs=2, default=[30.0, 50.0])
    ap.add_argument("--e", type=float, nargs=2, default=[0.0, 0.3])
    ap.add_argument("--inc", type=float, nargs=2, default=[0.0, 30.0])
    ap.add_argument("--max-snr-loss", type=float, nargs="+", default=[0.2])
    ap.add_argument("--intersections-per-s", type=float, default=8.9e5,
                    help="end-to-end search throughput (README's B2 on 2 CPU cores)")
    args = ap.parse_args(argv)
    configure()
    rows = [plan(args.visits, args.years, args.psf_fwhm_arcsec, args.field_deg2, tuple(args.a), tuple(args.e),
                 tuple(args.inc), loss, args.intersections_per_s) for loss in args.max_snr_loss]
    print(f"| max SNR loss | trial orbits | intersections | hours at {args.intersections_per_s:.3g} intersections/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_snr_loss']:g} | {r['trial_orbits']:.2e} | {r['intersections']:.2e} | "
              f"{r['hours_at_throughput']:.2e} |")
    r = rows[0]
    print(f"field {r['field_deg2']:g} deg2, {r['visits']} visits over {r['years']:g} years, PSF FWHM "
          f"{r['psf_fwhm_arcsec']:g} arcsec; population a {r['a_au']} AU, e {r['e']}, i {r['inc_deg']} deg: "
          f"{r['fraction_in_field']:.2e} of it in the field at the first visit")
    return {"rows": rows}


if __name__ == "__main__":
    main()
