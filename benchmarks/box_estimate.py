"""The demo's region search widened: trial orbits before and after pruning to the survey's fields.

    python -m benchmarks.box_estimate [--factor 3.333] [--max-snr-loss 0.6] [--smoothing-arcsec 2.5]
        [--min-exposures 5] [--build]

The box is ``config/experiments/demo.yaml``'s (30 times the simulated family's spread in a, i,
node and mean anomaly around 2060 Chiron; e and the argument of perihelion, where the family has
no spread, as there). ``--factor`` widens those four elements: 3.333 gives 100 times the spread.
The survey is the demo's (120 exposures, no rendering); each exposure's field is its pointing
+- half the mosaic (2 x 2 quadrants of 128 px at 1.01 arcsec), in the covering's tangent planes.

Printed, for the demo's box and the widened one: the one-tile Steiner estimate of the whole box's
covering (``covering_plan``), the share of 4,000 orbits drawn from the box whose exact tracks fall
in at least ``--min-exposures`` fields, and with ``--build`` the covering pruned to the fields
(``covering_lattice(fields=...)``): its trials, the lattice points it enumerated and the CPU
seconds it took.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from skystack.core.runtime import configure

WIDENED = ("a_au", "inc_deg", "node_deg", "mean_anomaly_deg")


def _pointing_fields(cv, fp, exposures, geometry):
    from skystack.sim import survey as sim

    s = sim.settings({"preset": "demo"})
    half = float(np.min(np.array(s["mosaic"]) * np.array(s["quadrant_px"]))) * s["pixel_scale_arcsec"] / 2.0
    ra, dec = np.radians(exposures["ra_deg"].to_numpy()), np.radians(exposures["dec_deg"].to_numpy())
    p = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1)
    along = np.sum(p * geometry.center, axis=-1)
    c = np.stack([np.sum(p * geometry.east, -1), np.sum(p * geometry.north, -1)], -1) / along[:, None]
    c *= cv.ARCSEC_PER_RAD
    return fp.Fields(c - half, c + half)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=float, default=100 / 30)
    ap.add_argument("--smoothing-arcsec", type=float, default=2.5)
    ap.add_argument("--max-snr-loss", type=float, default=0.6)
    ap.add_argument("--min-exposures", type=int, default=5)
    ap.add_argument("--build", action="store_true")
    args = ap.parse_args(argv)
    configure()
    from skystack.core.config import load_config
    from skystack.orbits import covering as cv
    from skystack.orbits import footprint as fp
    from skystack.orbits.region import region_reference
    from skystack.orbits.table import load_known_objects

    (spec,) = load_config(cv.REPO / "config" / "experiments" / "demo.yaml")["orbits"]["regions"]
    ref = region_reference(spec, load_known_objects(cv.REPO / "resources" / "known_objects.csv"), "demo")
    ex = cv.survey_exposures({"preset": "demo"})
    jd, site = ex["jd_tdb"].to_numpy(), cv.exposure_site(ex)
    loss_sigma, _ = cv.smoothed_filter(ex["psf_sigma_arcsec"].to_numpy(), args.smoothing_arcsec)
    metric = cv.track_metric(ref, jd, site, loss_sigma)
    fields = _pointing_fields(cv, fp, ex, metric.geometry)
    for label, factor in (("demo box (30x)", 1.0), (f"box x {args.factor:g} ({30 * args.factor:.0f}x)", args.factor)):
        box = {k: v * (factor if k in WIDENED else 1.0) for k, v in spec["half_width"].items()}
        plan = cv.covering_plan(ref, box, metric, args.max_snr_loss)
        n_exp = fp.orbit_exposure_counts(cv.sample_region(ref, box, 4000, seed=1), metric.geometry, fields)
        share = float(np.mean(n_exp >= args.min_exposures))
        print(f"{label}: one tile, whole box: about {plan['estimate']:.3g} trial orbits (smoothing "
              f"{args.smoothing_arcsec:g} arcsec, max_snr_loss {args.max_snr_loss:g}); "
              f"{share:.2%} of the box on >= {args.min_exposures} exposures")
        if args.build:
            t0 = time.process_time()
            trials, summary = cv.covering_lattice(ref, box, metric, args.max_snr_loss, max_trials=50_000_000,
                                                  fields=fields, min_exposures=args.min_exposures)
            print(f"  pruned to the fields: {len(trials):,} trial orbits of {summary['n_lattice_points']:,} lattice "
                  f"points in {summary['n_tiles']} of {summary['n_grid_tiles']} tiles, "
                  f"{time.process_time() - t0:.0f} CPU s")


if __name__ == "__main__":
    main()
