"""The demo's region search widened: trial orbits before and after pruning to the survey's fields.

    python -m benchmarks.box_estimate [--factor 3.333] [--max-snr-loss 0.6] [--smoothing-arcsec 2.5]
        [--min-exposures 5] [--build] [--check-run results/demo]

The box is ``config/experiments/demo.yaml``'s (30 times the simulated family's spread in a, i,
node and mean anomaly around 2060 Chiron; e and the argument of perihelion, where the family has
no spread, as there). ``--factor`` widens those four elements: 3.333 gives 100 times the spread.
The survey is the demo's (120 exposures, no rendering); each exposure's field is its pointing
+- half the mosaic (2 x 2 quadrants of 128 px at 1.01 arcsec), in the covering's tangent planes.

Printed, for the demo's box and the widened one: the one-tile Steiner estimate of the whole box's
covering (``covering_plan``), the share of 4,000 orbits drawn from the box whose exact tracks fall
in at least ``--min-exposures`` fields, and with ``--build`` the covering pruned to the fields
(``covering_lattice(fields=...)``): its trials, the lattice points it enumerated and the CPU
seconds it took. ``--check-run`` checks a finished demo run's covering instead: 3,000 orbits
drawn from its box, those on at least 5 exposures by the search's own intersection code (on the
indexed images' WCS), and the largest and median SNR loss of 300 of them against the trials the
workflow listed (exact tracks, ``covering_loss``).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from skystack.core.runtime import configure

WIDENED = ("a_au", "inc_deg", "node_deg", "mean_anomaly_deg")


def _pointing_fields(fp, exposures, geometry):
    from skystack.sim import survey as sim

    s = sim.settings({"preset": "demo"})
    half = float(np.min(np.array(s["mosaic"]) * np.array(s["quadrant_px"]))) * s["pixel_scale_arcsec"] / 2.0
    c = np.concatenate([fp.tangent_arcsec(ra, dec, geometry, i) for i, (ra, dec) in
                        enumerate(zip(exposures["ra_deg"], exposures["dec_deg"]))])
    return fp.Fields(c - half, c + half)


def check_run(run_dir: str, min_exposures: int, n_draw: int = 3000, n_check: int = 300) -> None:
    import json
    from pathlib import Path

    import pandas as pd

    from skystack.orbits.covering import covering_loss, sample_region
    from skystack.orbits.region import region_exposures
    from skystack.search.intersect import intersect

    run = Path(run_dir)
    images = pd.read_parquet(run / "images.parquet")
    images = images[images["is_difference"]]
    plan = json.loads((run / "search" / "plan.json").read_text())
    listed = pd.read_parquet(run / "search" / "orbits_listed.parquet")
    from skystack.core.config import load_config
    from skystack.orbits.covering import REPO

    smoothing = float(load_config(REPO / "config" / "experiments" / "demo.yaml")["search"]["smoothing_sigma_px"])
    for s in plan["regions"]:
        ex = region_exposures(images, s["reference"], s["half_width"], smoothing_sigma_px=smoothing)
        drawn = sample_region(s["reference"], s["half_width"], n_draw, seed=7)
        hits = intersect(drawn, images).merge(images[["image_id", "exposure_id"]], on="image_id")
        n = hits.groupby("orbit_id")["exposure_id"].nunique()
        sample = drawn[drawn["orbit_id"].isin(n.index[n >= min_exposures])].iloc[:n_check]
        site = {k: ex[f"site_{k}"].to_numpy() for k in ("lat_deg", "lon_deg", "height_m")}
        loss = covering_loss(listed[listed["name"] == s["name"]], sample, ex["jd_tdb"].to_numpy(), site,
                             ex["loss_sigma_arcsec"].to_numpy())
        print(f"{s['name']}: {int((n >= min_exposures).sum())} of {n_draw} drawn orbits on >= {min_exposures} "
              f"exposures; {len(sample)} of them lose at most {loss.max():.3f} (median {np.median(loss):.3f}) "
              f"against the {s['n_trials']:,} trials, promised {s['max_snr_loss']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=float, default=100 / 30)
    ap.add_argument("--smoothing-arcsec", type=float, default=2.5)
    ap.add_argument("--max-snr-loss", type=float, default=0.6)
    ap.add_argument("--min-exposures", type=int, default=5)
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--check-run", default=None)
    args = ap.parse_args(argv)
    configure()
    if args.check_run:
        return check_run(args.check_run, args.min_exposures)
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
    fields = _pointing_fields(fp, ex, metric.geometry)
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
